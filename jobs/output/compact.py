"""`bulklabel compact OUTPUT`: merge a finished output's small per-shard files into files of a target size.

Analytics engines pay per file (an open, a footer read, a request on S3): a million images in 1,000-row shards is a
thousand files of a few MB. Compaction rewrites them into files of about `target_bytes` with row groups of about
ROW_GROUP_BYTES, without breaking resume or exactly-once:

1. the new files are written under `_tmp/compact-<gen>/` (no reader looks there), then moved into `data/` as
   `compact-<gen>-<n>.parquet`;
2. ONE atomic switch: the manifest (`_job.json`, one object written whole) is rewritten to name, for every shard, the
   file holding its rows now, with the generation bumped. Readers (`open_output`) and resume (`read_committed`) go
   through the manifest, so they see either the old files or the new ones, never both and never neither;
3. the merged files are deleted.
A crash before 2 leaves new files no manifest names; after 2, old files no manifest names. Either kind is removed by
`remove_superseded`, which the next compaction and the next run of the job call first. Until then a reader that
globs `data/` itself (not through the manifest) can see both: run compaction when nobody globs the folder, or query
through bulklabel.

A compaction holds the output's writer lease (jobs.output.lease) from before it reads the manifest to after step 3:
a job writing the output, or another compaction, refuses it in one line naming that writer (exit 3), and it refuses
them. At the end of a job it runs under the job's own lease. Readers that read the manifest just before step 2 and
open a merged file after step 3 read again once, on the new generation (jobs.output.reader.read_pinned).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.output.errors import OutputError
from jobs.output.faultpoints import crash_point
from jobs.output.lease import Lease, Writer, WriterKind, acquire
from jobs.output.listing import OutputListing, list_output
from jobs.output.manifest import manifest_locations, read_manifest, switched, write_manifest
from jobs.output.reader import LabelOutput, open_output, read_rows
from schemas.layout import DATA_DIR, DATA_FILE, PART_FILE, compacted_uri, compaction_temp_uri, data_dir
from schemas.output import LABEL_SCHEMA, JobManifest
from schemas.specs import StorageOptions
from workers.io.storage import Storage, normalise_uri, open_storage, relative_key
from workers.io.writer import DICTIONARY_COLUMNS, PARQUET_COMPRESSION

log = logging.getLogger(__name__)

DEFAULT_TARGET_BYTES = 256 << 20
# Uncompressed bytes per row group (at most; a quarter of the target file below 512 MB): large enough for long
# sequential reads per column chunk (engines split scans by row group), small enough to hold one in memory.
ROW_GROUP_BYTES = 128 << 20
CONSOLIDATE_TABLES = 256  # tables waiting for their row group are merged into one at this count (see _RollingFile)
# At the end of a job, compaction runs only where it pays: this many files or more, averaging under a quarter of the
# target. A job of a few dozen shards is read just as fast as it is.
AUTO_MIN_FILES = 64


@dataclass(frozen=True)
class Compaction:
    """What one compaction did. `generation` is the manifest's generation after it (unchanged when nothing merged)."""

    generation: int
    files_before: int
    files_after: int
    files_merged: int
    rows_merged: int
    bytes_before: int
    bytes_after: int
    seconds: float


def compact_output(
    uri: str,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    storage_options: StorageOptions | None = None,
    *,
    wait_s: float = 0.0,
    lease: Lease | None = None,
) -> Compaction:
    """Merge the small data files of the finished output at `uri` into files of about `target_bytes`.

    `lease`: the writer lease the caller holds (a job compacting its own output at its end); without one the
    compaction takes the output's lease, waiting up to `wait_s` for another writer, else OutputBusy naming it.
    Raises OutputError for an output without a manifest (unfinished: its files still change) or in layout 1.
    """
    uri = normalise_uri(uri).rstrip("/")
    storage = open_storage(uri, storage_options)
    manifest = _finished_manifest(storage, uri)  # before the lease: a folder that is no output gets no `_lease/`
    if lease is not None:
        return _compact(storage, uri, target_bytes, storage_options, lease)
    writer = Writer(WriterKind.COMPACTION, manifest.job_id)
    advice = "run the compaction once it has finished (or give --wait SECONDS)"
    with acquire(storage, uri, writer, wait_s, advice=advice) as own:
        return _compact(storage, uri, target_bytes, storage_options, own)


def _compact(
    storage: Storage, uri: str, target_bytes: int, storage_options: StorageOptions | None, lease: Lease
) -> Compaction:
    clock = time.perf_counter()
    manifest = _finished_manifest(storage, uri)  # again, under the lease: a job may have finished since
    remove_superseded(storage, uri, manifest)  # a crashed compaction's leftovers, before anything new is written
    output = open_output(uri, storage_options)
    sizes = {o.uri: o.size for o in storage.list(data_dir(uri))}
    small = small_files([(f, sizes[f]) for f in output.files], target_bytes)
    before = sum(sizes[f] for f in output.files)
    generation = manifest.generation
    if not small:
        log.info("output %s: nothing to compact (%d files)", uri, len(output.files))
        return Compaction(generation, len(output.files), len(output.files), 0, 0, before, before, 0.0)
    generation += 1
    rows, moved = _write_generation(storage, output, small, generation, target_bytes)
    lease.ensure_held()  # the switch is the commit: never made by a writer that may no longer be the only one
    _switch(storage, uri, manifest, moved, generation)
    crash_point("compact:switched")
    for old in moved:
        storage.delete(old)
    after_files = open_output(uri, storage_options).files
    kept = set(after_files)
    after = sum(o.size for o in storage.list(data_dir(uri)) if o.uri in kept)
    result = Compaction(generation, len(output.files), len(after_files), len(moved), rows, before, after,
                        time.perf_counter() - clock)  # fmt: skip
    log.info("output %s compacted: %s", uri, result)
    return result


def auto_compact(
    uri: str, target_bytes: int, storage_options: StorageOptions | None = None, lease: Lease | None = None
) -> Compaction | None:
    """Compact at the end of a job (under its `lease`) when its files are many and small (see AUTO_MIN_FILES)."""
    output = open_output(uri, storage_options)
    storage = open_storage(uri, storage_options)
    committed = set(output.files)  # once: built per listed file, it made this O(n^2) (19 min at 100,000 shards)
    sizes = [o.size for o in storage.list(data_dir(output.uri)) if o.uri in committed]
    if len(sizes) < AUTO_MIN_FILES or sum(sizes) / len(sizes) >= target_bytes / 4:
        return None
    return compact_output(uri, target_bytes, storage_options, lease=lease)


def small_files(files: list[tuple[str, int]], target_bytes: int) -> list[str]:
    """The files worth merging, in shard order: those under half the target, when there are two or more."""
    small = [uri for uri, size in files if size < target_bytes // 2]
    return small if len(small) > 1 else []


def remove_superseded(
    storage: Storage, uri: str, manifest: JobManifest | None, listing: OutputListing | None = None
) -> int:
    """Delete data files the manifest does not name and never will again: a crashed compaction's new files (before
    its switch) or merged files (after it). A shard's own file is kept unless the manifest places that shard in
    another file: without a manifest entry it may belong to a run in progress. `listing`: the output's listing this
    phase made (else `data/` is listed now). Returns how many were deleted."""
    if manifest is None:
        return 0
    placed = manifest.names()
    named = set(placed.values())
    names = listing.data if listing is not None else list_output(storage, uri, under=DATA_DIR).data
    deleted = 0
    for name in list(names):
        if name in named or not DATA_FILE.fullmatch(name) or not name.startswith(DATA_DIR + "/"):
            continue
        own = PART_FILE.fullmatch(name)  # else a compacted file no manifest names: never read again
        if own is None or placed.get(own.group(1), name) != name:
            log.info("removing superseded data file %s/%s", uri, name)
            storage.delete(f"{uri.rstrip('/')}/{name}")
            deleted += 1
    return deleted


def _finished_manifest(storage: Storage, uri: str) -> JobManifest:
    manifest = read_manifest(storage, uri)
    if manifest is None:
        raise OutputError(
            f"output {uri} has no manifest: only a finished job's output is compacted (a running job's files still "
            "change; an interrupted one resumes first)"
        )
    if manifest.layout_version < 2:
        raise OutputError(f"output {uri} is in output layout version 1 (data files at the top): not compacted")
    return manifest


def _write_generation(
    storage: Storage, output: LabelOutput, small: list[str], generation: int, target_bytes: int
) -> tuple[int, dict[str, str]]:
    """Stream the rows of `small`, in order, into new files of about `target_bytes` (each written locally, uploaded
    under `_tmp/`, then moved into `data/`). Returns the rows written and old file → the new file holding its rows."""
    paths = dict(zip(output.files, output.paths(), strict=True))
    group_bytes = min(ROW_GROUP_BYTES, max(target_bytes // 4, 1))  # files end within a quarter above the target
    moved: dict[str, str] = {}
    temps: list[str] = []
    rows = 0
    with tempfile.TemporaryDirectory(prefix="bulklabel-compact-") as scratch:
        rolling = _RollingFile(scratch, target_bytes, group_bytes)
        for uri in small:
            table = read_rows(paths[uri], output.filesystem)
            rows += table.num_rows
            moved[uri] = compacted_uri(output.uri, generation, rolling.index)
            if rolling.append(table):  # the file reached the target: publish it, start the next
                temps.append(_upload(storage, rolling, output.uri, generation))
        if rolling.close():
            temps.append(_upload(storage, rolling, output.uri, generation))
    crash_point("compact:uploaded")
    for index, temp in enumerate(temps):
        storage.move(temp, compacted_uri(output.uri, generation, index))
    crash_point("compact:moved")
    return rows, moved


class _RollingFile:
    """Local Parquet files of about `target_bytes`, row groups of about `group_bytes` (uncompressed); an input
    table is never split between two files, so each shard's rows are in exactly one new file."""

    def __init__(self, scratch: str, target_bytes: int, group_bytes: int):
        self.scratch, self.target_bytes, self.group_bytes = scratch, target_bytes, group_bytes
        self.index = 0  # the file being written
        self.finished: str | None = None  # the last file closed, to upload
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0  # bytes in _buffer, kept as it grows: summing it per append was O(n^2) over tiny shards

    @property
    def path(self) -> str:
        return os.path.join(self.scratch, f"{self.index:05d}.parquet")

    def append(self, table: pa.Table) -> bool:
        """Add the rows; True when that closed the file (it reached the target): `finished` is then to upload."""
        self._buffer.append(table)
        self._buffered += table.nbytes
        if len(self._buffer) >= CONSOLIDATE_TABLES:
            # Each table costs memory beyond its nbytes (buffers per column, metadata): 1-row tables of one-image
            # shards took ~50 KB each against ~3 KB of nbytes, so a row group's 128 MB of them held gigabytes.
            self._buffer = [pa.concat_tables(self._buffer).combine_chunks()]
        if self._buffered >= self.group_bytes:
            self._flush()
            if os.path.getsize(self.path) >= self.target_bytes:
                return self.close()
        return False

    def close(self) -> bool:
        """Close the current file (True if it holds rows) and move on to the next index."""
        self._flush()
        if self._writer is None:
            return False
        self._writer.close()
        self._writer, self.finished = None, self.path
        self.index += 1
        return True

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, LABEL_SCHEMA, compression=PARQUET_COMPRESSION,
                                            use_dictionary=DICTIONARY_COLUMNS)  # fmt: skip
        table = pa.concat_tables(self._buffer).combine_chunks()
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._buffer, self._buffered = [], 0


def _upload(storage: Storage, rolling: _RollingFile, output: str, generation: int) -> str:
    index = int(os.path.basename(rolling.finished).split(".")[0])
    temp = compaction_temp_uri(output, generation, index)
    storage.upload_file(rolling.finished, temp)
    os.unlink(rolling.finished)
    return temp


def _switch(storage: Storage, uri: str, manifest: JobManifest, moved: dict[str, str], generation: int) -> None:
    """The one atomic step: the manifest, derived from the one it replaces, names each merged shard's new file
    (relative to the output) and the new generation."""
    placed = manifest_locations(manifest, uri)
    names = {shard: relative_key(uri, moved[old]) for shard, old in placed.items() if old in moved}
    write_manifest(storage, uri, switched(manifest, names, generation))
