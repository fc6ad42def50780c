"""`format: delta`: every committed shard's rows also appended to a Delta Lake table at `<output>/table`, exactly once.

Why Delta (deltalake, delta-rs) rather than Iceberg (pyiceberg): the table needs no catalog service (its log is
files beside the data, on a local disk or S3), its application transactions are the exactly-once mechanism the
issue asks for, and DuckDB, Polars, Spark, Trino and Athena read it. See docs/outputs.md.

Exactly once: the folder's done-markers stay the record of what the job labelled (resume works as for Parquet
outputs); the table is fed from them. Each append carries a Delta application transaction
`Transaction(app_id="bulklabel:<job>:<shard>", version=1)` in the same atomic commit as its rows, and a shard whose
transaction is already in the table is skipped. So:
- the driver dies between a shard's marker and its table commit: the next run's `start` finds the marker without
  the transaction and appends that shard (nothing lost);
- the driver dies after the commit, or a shard is retried, or the job is run again: the transaction is there, the
  shard is skipped (nothing twice).
One writer per table: the output's writer lease (jobs.output.lease) makes one driver of the job the only one at a
time, and table maintenance (optimize, checkpoints) runs only under it. Even so, the transaction check reads the
table's latest version (the log is read again before each check, never a snapshot cached from an earlier commit),
and a commit that loses a race in the log (CommitFailedError) is checked and retried, COMMIT_ATTEMPTS in all, then
TableCommitConflict (exit 3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pyarrow as pa

from jobs.output.faultpoints import crash_point
from jobs.output.lease import Lease
from jobs.output.reader import pyarrow_filesystem
from jobs.output.tables.sink import (
    COMMIT_ATTEMPTS,
    TABLE_NAME,
    TableCommitConflict,
    object_store_options,
    shard_rows,
    table_properties,
)
from schemas.layout import table_uri
from schemas.output import LABEL_SCHEMA
from schemas.shards import ShardResult
from schemas.specs import StorageOptions

log = logging.getLogger(__name__)

APP_ID_PREFIX = "bulklabel"


def app_id(job_id: str, shard_id: str) -> str:
    """The Delta application id a shard's append carries."""
    return f"{APP_ID_PREFIX}:{job_id}:{shard_id}"


def delta_storage_options(uri: str, options: StorageOptions | None) -> dict[str, str] | None:
    """delta-rs' object-store options for an s3:// table (endpoint, keys, region); None for a local one.

    Conditional puts (`If-None-Match`, which S3 and SeaweedFS support) make the log's commits atomic without a lock
    table."""
    found = object_store_options(uri, options)
    return None if found is None else {"conditional_put": "etag", **found}


class DeltaSink:
    """The Delta table of one label output. Args: the output URI, the job id, the job's storage options."""

    def __init__(self, output: str, job_id: str, storage_options: StorageOptions | None = None):
        self.output = output
        self.uri = table_uri(output)
        self.job_id = job_id
        self.storage_options = storage_options
        self._delta_options = delta_storage_options(self.uri, storage_options)
        self._filesystem = pyarrow_filesystem(output, storage_options)
        self._loaded = None  # the DeltaTable, loaded once and brought up to date after each commit

    def commit_shards(self, results: Iterable[ShardResult], locations: dict[str, str] | None = None) -> int:
        """Append each shard's rows that the table does not hold yet, one atomic commit per shard.

        `locations` names the file holding a shard's rows where a compaction moved them. Returns shards appended.
        """
        appended = 0
        for result in results:
            appended += self.commit_shard(result, (locations or {}).get(result.shard_id))
        return appended

    def commit_shard(self, result: ShardResult, location: str | None = None) -> bool:
        """Append one shard's rows with its application transaction, unless the table's latest version has them.
        True if appended."""
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError

        rows = None
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = self._table()
            if table is not None and table.transaction_version(app_id(self.job_id, result.shard_id)) is not None:
                log.debug("shard %s is in table %s already", result.shard_id, self.uri)
                return False
            rows = rows if rows is not None else self._rows(result, location)
            if table is None or "bulklabel.job_id" not in table.metadata().configuration:
                self._create(rows)  # also mends a crash between creating the table and recording its properties
            crash_point("table:commit")
            commit = CommitProperties(
                app_transactions=[Transaction(app_id(self.job_id, result.shard_id), 1)],  # in the same atomic commit
                custom_metadata={"bulklabel.job_id": self.job_id, "bulklabel.shard": result.shard_id},
            )
            try:
                write_deltalake(self.uri, rows, mode="append", storage_options=self._delta_options,
                                commit_properties=commit)  # fmt: skip
            except CommitFailedError as exc:  # another commit took the version: look at the log again, then retry
                log.warning("table %s: commit of shard %s lost a race (%s); attempt %d of %d", self.uri,
                            result.shard_id, exc, attempt, COMMIT_ATTEMPTS)  # fmt: skip
                continue
            crash_point("table:committed")
            return True
        raise TableCommitConflict(
            f"table {self.uri}: the commit of shard {result.shard_id} lost {COMMIT_ATTEMPTS} races in its log to "
            "other writers; is a program other than bulklabel writing it?"
        )

    def flush(self) -> int:
        """Nothing queued: each shard is committed as it comes."""
        return 0

    def finish(self, target_bytes: int, compact: bool, lease: Lease | None = None) -> None:
        """At the end of a job, under its writer `lease`: small files merged (Delta's optimize, a commit of its own)
        and a log checkpoint, so readers do not replay one log entry per shard. Each on the latest version, retried
        when it loses a race in the log."""
        from deltalake.exceptions import CommitFailedError

        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = self._table()
            if table is None:
                return
            if lease is not None:
                lease.ensure_held()
            try:
                if compact:
                    metrics = table.optimize.compact(target_size=target_bytes)
                    log.info("table %s optimized: %s", self.uri, metrics)
                table.create_checkpoint()
                return
            except CommitFailedError as exc:
                log.warning("table %s: maintenance lost a race (%s); attempt %d of %d", self.uri, exc, attempt,
                            COMMIT_ATTEMPTS)  # fmt: skip
        raise TableCommitConflict(f"table {self.uri}: optimize lost {COMMIT_ATTEMPTS} races in its log to other "
                                  "writers; is a program other than bulklabel writing it?")  # fmt: skip

    def _rows(self, result: ShardResult, location: str | None) -> pa.Table:
        return shard_rows(self.output, self._filesystem, result, location)

    def _table(self):
        """The table at its latest version (its log read again), or None before it exists."""
        from deltalake import DeltaTable

        if self._loaded is None:
            if DeltaTable.is_deltatable(self.uri, storage_options=self._delta_options):
                self._loaded = DeltaTable(self.uri, storage_options=self._delta_options)
        else:
            self._loaded.update_incremental()
        return self._loaded

    def _create(self, first: pa.Table) -> None:
        """Create the empty table (if absent), then record what its rows are as table properties."""
        from deltalake import DeltaTable

        DeltaTable.create(self.uri, schema=LABEL_SCHEMA, mode="ignore", name=TABLE_NAME,
                          description="bulklabel label output", storage_options=self._delta_options)  # fmt: skip
        self.set_properties(first)

    def set_properties(self, rows: pa.Table) -> None:
        """Table properties: the model, the job, the label schema version and the embedding width."""
        from deltalake import DeltaTable

        properties = table_properties(rows, self.job_id)
        self._loaded = DeltaTable(self.uri, storage_options=self._delta_options)
        self._loaded.alter.set_table_properties(properties, raise_if_not_exists=False)
