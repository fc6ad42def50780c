"""Table formats of a label output: each committed shard's rows also appended to a table, exactly once.

A format is a sink with three phases, the same for each (jobs.output.session calls them, never a format by name):
- `commit_shards(results, locations)` on start: shards an earlier run committed (done-marker written) whose table
  commit it did not live to make;
- `commit_shard(result)` as each shard is committed, after its done-marker (a format may queue it for its next
  commit: Iceberg);
- `flush()` when a run ends any other way than `finish`: what is queued is committed;
- `finish(...)` at the end of the job, under the writer lease: maintenance (compaction, checkpoints).
Exactly once in every format: each shard's append carries the job and shard ids in the same atomic commit as its
rows, and is skipped when the table's latest state already holds them; a commit that loses a race is checked again
and retried, COMMIT_ATTEMPTS in all, then TableCommitConflict (exit 3).
"""

from __future__ import annotations

from collections.abc import Callable

from jobs.output.tables.sink import TableSink
from schemas.specs import OutputFormat, OutputOptions, StorageOptions


def _delta(output: str, job_id: str, options: OutputOptions, storage: StorageOptions | None) -> TableSink:
    from jobs.output.tables.delta import DeltaSink

    return DeltaSink(output, job_id, storage)


def _iceberg(output: str, job_id: str, options: OutputOptions, storage: StorageOptions | None) -> TableSink:
    from jobs.output.tables.iceberg import IcebergSink

    return IcebergSink(output, job_id, options, storage)


def _lance(output: str, job_id: str, options: OutputOptions, storage: StorageOptions | None) -> TableSink:
    from jobs.output.tables.lance import LanceSink

    return LanceSink(output, job_id, storage, index=options.vector_index == "auto", namespace=options.namespace)


# Each table format once; parquet has no table. Imported when a job uses the format: deltalake, pyiceberg and lance
# load nothing for the others.
SINKS: dict[OutputFormat, Callable[[str, str, OutputOptions, StorageOptions | None], TableSink]] = {
    OutputFormat.DELTA: _delta,
    OutputFormat.ICEBERG: _iceberg,
    OutputFormat.LANCE: _lance,
}


def sink_for(output: str, job_id: str, options: OutputOptions, storage: StorageOptions | None) -> TableSink | None:
    """The table sink of an output's format, or None for plain Parquet."""
    make = SINKS.get(options.format)
    return make(output, job_id, options, storage) if make else None
