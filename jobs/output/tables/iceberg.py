"""`format: iceberg`: every committed shard's rows also appended to an Apache Iceberg table (pyiceberg), exactly once.

The table lives in a catalog: by default a SQL catalog on a SQLite file in `<output>/table/` (the warehouse is that
folder: a laptop needs no catalog service), else `output.catalog` (a REST catalog, Glue, or any SQLAlchemy URL).

Exactly once: Iceberg has no application transactions (Delta's), so each append carries the job id and the ids of
the shards it holds in its snapshot's summary (`bulklabel.job_id`, `bulklabel.shards`), in the same atomic commit as
their rows: the catalog swaps the table's metadata pointer only if no other commit came first. Shards are queued and
appended together, at most every `output.table_commit_seconds` (each commit rewrites the table's metadata file,
which lists every snapshot: a commit per shard made a job of N shards write O(N^2) metadata bytes), at the end of
the job, and when a run ends another way. Before each append the table is loaded again and its snapshots' summaries
read (each snapshot once: the ids are kept between commits), and a shard already there is skipped. So, as for Delta:
- the driver dies between a shard's done-marker and its table commit (or while the shard waits in the queue for
  the next commit): the next run's `start` appends it;
- it dies after the commit, or a shard is retried, or the job runs again: the summary is there, nothing is added.
A commit that loses the race (CommitFailedException: another writer moved the pointer) is checked again on the new
state and retried, COMMIT_ATTEMPTS in all, then TableCommitConflict (exit 3). Snapshots are never expired by
bulklabel: their summaries are the record of what was committed (expire them only after the job has finished).
At the end of the job (`finish`) a table of many small data files is rewritten into files of the target size, in one
commit whose summary names no shard.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from jobs.output.faultpoints import crash_point
from jobs.output.reader import pyarrow_filesystem
from jobs.output.tables.sink import COMMIT_ATTEMPTS, TableCommitConflict, shard_rows, table_properties
from schemas.layout import table_uri
from schemas.output import LABEL_SCHEMA
from schemas.shards import ShardResult
from schemas.specs import OutputOptions, StorageOptions

if TYPE_CHECKING:
    from jobs.output.lease import Lease

log = logging.getLogger(__name__)

CATALOG_NAME = "bulklabel"
CATALOG_FILE = "catalog.sqlite"  # the default SQL catalog, in the output's table folder
SUMMARY_JOB, SUMMARY_SHARDS = "bulklabel.job_id", "bulklabel.shards"  # the shards: a JSON list of their ids
# Shards go in together: each commit rewrites the table's metadata file, which lists every snapshot, so a commit per
# shard made a job of N shards write O(N^2) metadata. At most this many in one commit (its summary lists them).
MAX_BATCH_SHARDS = 256


def shards_of(summary: dict[str, str]) -> list[str]:
    """The shard ids a snapshot's summary names (none: not a shard commit, e.g. a compaction)."""
    return json.loads(summary[SUMMARY_SHARDS]) if SUMMARY_SHARDS in summary else []


SUMMARY_COMPACTION = "bulklabel.compacted_files"  # a compaction's snapshot: how many files it rewrote


def _worth_compacting(table, target_bytes: int) -> bool:
    """Several data files, some under half the target (the same rule as the folder's: jobs.output.compact)."""
    if table.current_snapshot() is None:
        return False
    sizes = table.inspect.files(snapshot_id=table.current_snapshot().snapshot_id)["file_size_in_bytes"].to_pylist()
    return len(sizes) > 1 and sum(size < target_bytes // 2 for size in sizes) > 1


def catalog_properties(output: str, options: OutputOptions, storage: StorageOptions | None) -> dict[str, str]:
    """pyiceberg's `load_catalog` properties: the default SQLite catalog beside a local output, or `output.catalog`
    with the job's S3 endpoint and keys (never logged)."""
    spec = options.catalog
    if spec is None:
        folder = Path(table_uri(output))
        return {"type": "sql", "uri": f"sqlite:///{folder / CATALOG_FILE}", "warehouse": folder.as_uri()}
    found = {"type": spec.type, **spec.properties}
    found |= {k: v for k, v in (("uri", spec.uri), ("warehouse", spec.warehouse)) if v}
    storage = storage or StorageOptions()
    if spec.sigv4:
        found |= {"rest.sigv4-enabled": "true", "rest.signing-name": spec.signing_name,
                  "rest.signing-region": storage.region or "us-east-1"}  # fmt: skip
    for prefix in ("s3.", "client.") if spec.sigv4 else ("s3.",):  # client.*: the keys SigV4 signs with
        if storage.endpoint_url and prefix == "s3.":
            found["s3.endpoint"] = storage.endpoint_url
        if storage.region:
            found[f"{prefix}region"] = storage.region
        if storage.access_key_id is not None:
            found[f"{prefix}access-key-id"] = storage.access_key_id.get_secret_value()
            found[f"{prefix}secret-access-key"] = storage.secret_access_key.get_secret_value()
    return found


class IcebergSink:
    """The Iceberg table of one label output. Args: the output URI, the job id, its output options and storage."""

    def __init__(self, output: str, job_id: str, options: OutputOptions, storage: StorageOptions | None = None):
        self.output = output
        self.job_id = job_id
        spec = options.catalog
        self.namespace, self.name = (spec.namespace, spec.table) if spec else ("bulklabel", "labels")
        where = table_uri(output) if spec is None else (spec.uri or spec.type)
        self.uri = f"{where} ({self.namespace}.{self.name})"
        self._properties = catalog_properties(output, options, storage)
        self._local = spec is None
        self._filesystem = pyarrow_filesystem(output, storage)
        self._catalog = None
        self._seen: set[int] = set()  # snapshot ids whose summaries were read
        self._committed: set[str] = set()  # this job's shards the table holds
        self._pending: dict[str, tuple[ShardResult, str | None]] = {}  # committed shards queued for the table
        self.commit_seconds = options.table_commit_seconds
        self._last_commit = time.monotonic()

    @property
    def identifier(self) -> tuple[str, str]:
        return self.namespace, self.name

    def commit_shards(self, results: Iterable[ShardResult], locations: dict[str, str] | None = None) -> int:
        """Append the rows of each shard the table does not hold yet (an earlier run's, on start), together."""
        for result in results:
            self._pending[result.shard_id] = (result, (locations or {}).get(result.shard_id))
        return self.flush()

    def commit_shard(self, result: ShardResult, location: str | None = None) -> bool:
        """Queue one committed shard's rows; the queue is appended in one commit once `commit_seconds` have passed
        since the last commit (0: at once) or MAX_BATCH_SHARDS wait. True if this call committed."""
        self._pending[result.shard_id] = (result, location)
        due = time.monotonic() - self._last_commit >= self.commit_seconds or len(self._pending) >= MAX_BATCH_SHARDS
        return due and self.flush() > 0

    def flush(self) -> int:
        """Append the queued shards the table does not hold yet, their ids in the snapshot summary, in one commit
        (checked again and retried when it loses a race). Returns how many shards it appended."""
        from pyiceberg.exceptions import CommitFailedException

        rows: dict[str, pa.Table] = {}
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = self._latest()
            todo = sorted(shard for shard in self._pending if shard not in self._committed)
            if not todo:
                self._pending.clear()
                return 0
            for shard in todo:
                if shard not in rows:
                    result, location = self._pending[shard]
                    rows[shard] = shard_rows(self.output, self._filesystem, result, location)
            batch = pa.concat_tables([rows[shard] for shard in todo])
            if table is None:
                table = self._create(batch)
            crash_point("table:commit")
            try:
                table.append(batch, snapshot_properties={SUMMARY_JOB: self.job_id, SUMMARY_SHARDS: json.dumps(todo)})
            except CommitFailedException as exc:  # another commit moved the table: read it again, then retry
                log.warning("table %s: commit of %d shard(s) lost a race (%s); attempt %d of %d", self.uri, len(todo),
                            exc, attempt, COMMIT_ATTEMPTS)  # fmt: skip
                continue
            crash_point("table:committed")
            self._committed.update(todo)
            self._pending.clear()
            self._last_commit = time.monotonic()
            return len(todo)
        raise TableCommitConflict(
            f"table {self.uri}: the commit of {len(self._pending)} shard(s) lost {COMMIT_ATTEMPTS} races to other "
            "writers; is a program other than bulklabel writing it?"
        )

    def finish(self, target_bytes: int, compact: bool, lease: Lease | None = None) -> None:
        """With `compact`, a table of several data files, some under half of `target_bytes`, is rewritten into files
        of about `target_bytes`: one commit that deletes every data file and appends the rows again, streamed (a
        batch of files at a time, never the whole table in memory). Its snapshot names the job but no shard, and
        the shards' own snapshots stay in the table's history, so the exactly-once check still finds them."""
        from pyiceberg.exceptions import CommitFailedException

        self.flush()
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = self._latest()
            if not compact or table is None or not _worth_compacting(table, target_bytes):
                return
            if lease is not None:
                lease.ensure_held()
            try:
                self._rewrite(table, target_bytes)
                return
            except CommitFailedException as exc:
                log.warning("table %s: compaction lost a race (%s); attempt %d of %d", self.uri, exc, attempt,
                            COMMIT_ATTEMPTS)  # fmt: skip
        raise TableCommitConflict(f"table {self.uri}: its compaction lost {COMMIT_ATTEMPTS} races to other writers")

    def _rewrite(self, table, target_bytes: int) -> None:
        from pyiceberg.expressions import AlwaysTrue

        files = table.inspect.files(snapshot_id=table.current_snapshot().snapshot_id)
        rows_per_file = max(1, int(target_bytes * files["record_count"].to_numpy().sum()
                                   / max(1, files["file_size_in_bytes"].to_numpy().sum())))  # fmt: skip
        properties = {SUMMARY_JOB: self.job_id, SUMMARY_COMPACTION: str(len(files))}
        batches = table.scan().to_arrow_batch_reader()
        with table.transaction() as tx:
            tx.delete(AlwaysTrue(), snapshot_properties=properties)
            pending, count, written = [], 0, 0
            for batch in batches:
                pending.append(batch)
                count += batch.num_rows
                if count >= rows_per_file:
                    tx.append(pa.Table.from_batches(pending), snapshot_properties=properties)
                    written, pending, count = written + 1, [], 0
            if pending:
                tx.append(pa.Table.from_batches(pending), snapshot_properties=properties)
                written += 1
        log.info("table %s compacted: %d data files rewritten as %d", self.uri, len(files), written)

    def _catalog_or_open(self):
        if self._catalog is None:
            from pyiceberg.catalog import load_catalog

            if self._local:
                Path(table_uri(self.output)).mkdir(parents=True, exist_ok=True)
            self._catalog = load_catalog(CATALOG_NAME, **self._properties)
        return self._catalog

    def _latest(self):
        """The table as the catalog has it now (None before it exists), its new snapshots' shards recorded."""
        from pyiceberg.exceptions import NoSuchTableError

        try:
            table = self._catalog_or_open().load_table(self.identifier)
        except NoSuchTableError:
            return None
        for snapshot in table.snapshots():
            if snapshot.snapshot_id in self._seen:
                continue
            self._seen.add(snapshot.snapshot_id)
            summary = snapshot.summary.additional_properties if snapshot.summary else {}
            if summary.get(SUMMARY_JOB) == self.job_id:
                self._committed.update(shards_of(summary))
        return table

    def _create(self, first: pa.Table):
        """The table (created if absent, with what its rows are as table properties)."""
        catalog = self._catalog_or_open()
        catalog.create_namespace_if_not_exists(self.namespace)
        return catalog.create_table_if_not_exists(self.identifier, schema=LABEL_SCHEMA,
                                                  properties=table_properties(first, self.job_id))  # fmt: skip
