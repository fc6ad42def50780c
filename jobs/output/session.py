"""The driver's side of writing a label output, in explicit phases (the layout: schemas.layout).

    check()                 before any write: the output is ours or free (jobs.output.ownership), what earlier runs
                            committed holds (jobs.output.markers), from one listing of the output
    start()                 the writer lease taken (jobs.output.lease: a second run of the job, or a compaction, is
                            refused naming this one); the ownership claim, a write probe, stale partial uploads and
                            the leftovers of a crashed compaction removed, from check()'s listing, unless another
                            writer held the lease since check() read it: then from a new listing under the lease
    shard_committed(result) a worker committed a shard (data file, then done-marker); format delta: its rows
                            appended to the table, exactly once (jobs.output.tables)
    complete(...)           every shard is done: the manifest (jobs.output.manifest), written last; then many small
                            files compacted
    failed(reason, ...)     the run stops: `_failed.json` says why (a failed run used to leave no record)
    close()                 the lease released (complete and failed do it; the runner calls it whatever happened)

The job runner calls these and nothing else of the output; the workers write shards (workers/io/writer.py).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from jobs.output.compact import auto_compact, remove_superseded
from jobs.output.errors import OutputConflict
from jobs.output.failure import remove_failure, write_failure
from jobs.output.faultpoints import crash_point
from jobs.output.lease import Lease, LeaseRecord, Writer, WriterKind, acquire, read_current
from jobs.output.listing import OutputListing, list_output
from jobs.output.manifest import read_manifest, write_manifest
from jobs.output.markers import CommittedShards, read_committed
from jobs.output.ownership import check_output, claim_output
from jobs.output.partials import remove_partials
from jobs.output.tables import sink_for
from schemas.layout import LAYOUT_VERSION, TMP_DIR
from schemas.outcome import Outcome
from schemas.output import (
    LABEL_SCHEMA,
    LABEL_SCHEMA_VERSION,
    JobFailure,
    JobManifest,
    ManifestColumn,
    ManifestFailedShard,
    ManifestModel,
    ManifestShard,
    ManifestTotals,
)
from schemas.shards import ShardResult
from schemas.specs import LabelJobSpec
from workers.io.storage import Storage, check_writable, open_storage, relative_key

log = logging.getLogger(__name__)

# How long a run waits for another writer of its output (a compaction, another run of the job) to finish before it is
# refused: a compaction of a large output takes minutes, a run hours; a user re-runs when told who holds it.
LABEL_WAIT_S = 10.0


class OutputSession:
    """One run of a label job writing into its output. Args: the job's spec (locations made absolute), its id."""

    def __init__(self, spec: LabelJobSpec, job_id: str, storage: Storage | None = None):
        self.spec = spec
        self.job_id = job_id
        self.uri = spec.output
        self.storage = storage or open_storage(spec.output, spec.storage)
        self.started_at = datetime.now(UTC)
        self.committed = CommittedShards()
        self.table = sink_for(self.uri, job_id, spec.output_options, spec.storage)
        self.lease: Lease | None = None
        self._lease_seen: LeaseRecord | None = None  # the lease as check() read it, before it listed the output
        self._checked: OutputListing | None = None  # check()'s listing: start() reuses it when no writer came between

    def check(self) -> CommittedShards:
        """Refuse an output another job owns or that holds foreign files; read and verify earlier done-markers.

        Writes nothing. Returns the shards earlier runs committed (verified) and those to redo (with why); start()
        reads them again under the lease and updates this same object where another writer changed them meanwhile.
        """
        # The lease read first, then the output: a writer that takes the lease after this read is seen by start().
        self._lease_seen = read_current(self.storage, self.uri)
        listing = list_output(self.storage, self.uri)
        check_output(self.storage, self.uri, self.job_id, self.spec.foreign_files, listing)
        self.committed = read_committed(self.storage, self.uri, self.job_id, listing)
        self._checked = listing
        return self.committed

    def manifest(self) -> JobManifest | None:
        """The output's manifest as it is now (read only; None when there is none)."""
        return read_manifest(self.storage, self.uri)

    def start(self) -> JobManifest | None:
        """Claim the output (the first write), probe that it is writable, remove partial uploads of dead attempts.

        Returns the manifest of an earlier complete run, or None.
        """
        if self.lease is None:  # held until close(): from here on this run is the output's only writer
            self.lease = acquire(self.storage, self.uri, Writer(WriterKind.LABEL_JOB, self.job_id), LABEL_WAIT_S,
                                 advice="run the job again once that writer has finished",
                                 refuse=self._another_jobs)  # fmt: skip
        # Every writer holds the lease while it writes. When this run's generation is the one after a lease that was
        # released when check() read it, no writer came between, and check()'s listing still holds. Else another run
        # or a compaction may have written since: listed again, under the lease. The listing feeds what was
        # committed, the partial uploads to remove and the superseded files to delete.
        unchanged = self._unchanged_since_check()
        listing = self._checked if unchanged else list_output(self.storage, self.uri)
        manifest = read_manifest(self.storage, self.uri) if listing.has_manifest else None
        if not unchanged:  # the done-markers read again too
            fresh = read_committed(self.storage, self.uri, self.job_id, listing, manifest)
            if fresh != self.committed:
                log.info("output %s changed since it was checked (another writer ended meanwhile): %d shard(s) done "
                         "now", self.uri, len(fresh.done))  # fmt: skip
                vars(self.committed).update(vars(fresh))  # the runner plans with this object
        claim_output(self.storage, self.uri, self.job_id)
        check_writable(self.storage, self.uri)
        remove_partials(self.storage, self.uri, listing)
        remove_superseded(self.storage, self.uri, manifest, listing)
        if self.table is not None:  # shards an earlier run committed whose table commit it did not live to make
            added = self.table.commit_shards(self.committed.done.values(), self.committed.locations)
            log.info("table %s: %d earlier shard(s) appended on start", self.table.uri, added)
        return manifest

    def _unchanged_since_check(self) -> bool:
        if self._checked is None or self.lease is None:
            return False
        seen = self._lease_seen
        return (seen is None or seen.released) and self.lease.record.generation == (seen.generation if seen else 0) + 1

    def shard_committed(self, result: ShardResult) -> None:
        """A worker committed `result`'s shard: its data file and done-marker are in place."""
        log.debug("shard %s committed: %d rows in %s on %s", result.shard_id, result.rows, result.data, result.host)
        crash_point("session:shard_committed")
        if self.table is not None:
            self._held()
            self.table.commit_shard(result)

    def complete(self, worker: dict, results: dict[str, ShardResult], failures: dict[str, str],
                 workers_died: bool = False) -> JobManifest:  # fmt: skip
        """Write the manifest last (every shard in `results` is committed), and drop an earlier run's failure record.

        Args: the worker's description (model id, embedding width), every committed shard, shards that failed, and
        whether a worker of this run died or was killed (hung) while it ran.
        Returns the manifest as written (before a compaction, which rewrites only its file names). Releases the lease.
        """
        self._held()
        # Uploads this run's dead attempts left: only `_tmp/` is listed (start() saw the rest), unless a worker died:
        # a process killed mid-write leaves its hidden temporary beside the marker or data file it was writing
        # (LocalStorage), and only a listing of the whole output finds it.
        remove_partials(self.storage, self.uri, list_output(self.storage, self.uri,
                                                            under=None if workers_died else TMP_DIR))  # fmt: skip
        manifest = self._manifest(worker, results, failures)
        write_manifest(self.storage, self.uri, manifest)
        remove_failure(self.storage, self.uri)
        options = self.spec.output_options
        if options.compact == "auto":
            auto_compact(self.uri, options.target_file_mb << 20, self.spec.storage, lease=self.lease)
        if self.table is not None:
            self.table.finish(options.target_file_mb << 20, compact=options.compact == "auto", lease=self.lease)
        self.close()
        return manifest

    def failed(self, reason: str, results: dict[str, ShardResult], failures: dict[str, str] | None = None) -> None:
        """Record that this run failed and why; what was committed stays committed for a re-run.

        Never raises: the caller is already on its way out with the original error, which must not be masked.
        """
        record = JobFailure(
            job_id=self.job_id,
            reason=reason,
            started_at=self.started_at,
            failed_at=datetime.now(UTC),
            shards_committed=len(results),
            failed_shards=tuple(ManifestFailedShard(shard=s, error=e) for s, e in sorted((failures or {}).items())),
        )
        if self.lease is not None and self.lease.lost is not None:
            log.warning("job %s failed (%s); not recorded at %s: its lease was lost", self.job_id, reason, self.uri)
            return
        try:
            write_failure(self.storage, self.uri, record)
            log.info("job %s failed: %s (recorded in %s)", self.job_id, reason, self.uri)
        except Exception as exc:  # noqa: BLE001 - the store may be why the job failed; keep the first error
            log.warning("could not record the failure of job %s at %s: %s", self.job_id, self.uri, exc)
        self.close()

    def _manifest(self, worker: dict, results: dict[str, ShardResult], failures: dict[str, str]) -> JobManifest:
        """The manifest of this run: every shard in `results` by its name relative to the output (a shard a
        compaction merged by its compacted file's)."""
        moved = {shard: relative_key(self.uri, uri) for shard, uri in self.committed.locations.items()}
        shards = sorted(results.values(), key=lambda r: r.shard_id)
        entries = [ManifestShard(shard=r.shard_id, data=moved.get(r.shard_id) or r.data_name(self.uri), rows=r.rows,
                                 errors=r.errors) for r in shards]  # fmt: skip
        return JobManifest(
            job_id=self.job_id,
            status=Outcome.SUCCEEDED if not failures else Outcome.PARTIAL,
            spec=json.loads(self.spec.model_dump_json()),  # SecretStr fields dump as '**********'
            model=ManifestModel.model_validate(worker),
            schema_version=LABEL_SCHEMA_VERSION,
            layout_version=LAYOUT_VERSION,
            generation=self.committed.generation,
            columns=tuple(ManifestColumn(name=f.name, type=str(f.type)) for f in LABEL_SCHEMA),
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            totals=ManifestTotals(
                shards=len(shards),
                rows=sum(r.rows for r in shards),
                errors=sum(r.errors for r in shards),
                failed_shards=len(failures),
            ),
            shards=tuple(entries),
            failed_shards=tuple(ManifestFailedShard(shard=s, error=e) for s, e in sorted(failures.items())),
        )

    def close(self) -> None:
        """Commit what the table sink queued (a run cancelled or failed before `complete`), then release the writer
        lease (if taken): the next writer may start at once. Never raises: a queued shard whose commit fails here
        is appended by the next run's `start` (its done-marker is there)."""
        if self.table is not None and self.lease is not None and not self.lease.released:
            try:
                self._held()
                self.table.flush()
            except Exception as exc:  # noqa: BLE001 - closing must not mask what ended the run
                log.warning("table %s: queued shards not committed (%s); the next run appends them", self.table.uri,
                            exc)  # fmt: skip
        if self.lease is not None:
            self.lease.release()

    def _another_jobs(self, holder: LeaseRecord) -> None:
        """A writer of another job holds the output: it is that job's (it claims it, or has), so no wait helps."""
        if holder.job_id != self.job_id:
            raise OutputConflict(f"output {self.uri} belongs to job {holder.job_id!r}, not {self.job_id!r} (written "
                                 f"now by its {holder.describe()}): use a new output prefix")  # fmt: skip

    def _held(self) -> None:
        if self.lease is not None:
            self.lease.ensure_held()
