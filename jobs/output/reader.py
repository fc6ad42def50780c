"""Reading a label job's output: the committed rows only, with a typed manifest and the schema version checked.

The layout is schemas.layout, its writer jobs.output.session; this is the reader every command goes through
(`bulklabel query`, `similar`, `report`, `compact`). What counts as committed:
- an output with a manifest (`_job.json`, written last; rewritten by a compaction, the one atomic switch): exactly the
  data files it lists, `complete=True`;
- an output without one (a job still running, or interrupted): the data files of valid done-markers (parsed,
  of the owning job, data file present at the recorded size: jobs.output.markers.read_committed), `complete=False`.
Anything else under the prefix (a part file whose marker was never written, a temporary upload, another tool's
Parquet file, the files a compaction merged or a crashed compaction left behind) is never read. Both layout versions
read: 1 (data files at the top of the prefix) and 2 (under `data/`).

Readers are pinned to one manifest generation (`read_pinned`): a compaction switches the manifest to new files and
then deletes the merged ones, so a reader that read the manifest just before the switch can find a file gone. It
reads once more, on the new generation; a file gone without a new generation is a damaged output, said as such
(never an error blaming the reader's SQL).

Data files are found by their name relative to the output (the manifest and markers record them so since layout
version 3; older ones relative to the output the job wrote to), so an output copied or moved to another folder or
bucket, finished or not, reads the same. The output is listed once per open (jobs.output.listing). Driver-side: no
torch, no Ray.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs.output.errors import OutputError, UnsupportedSchemaVersion
from jobs.output.failure import read_failure
from jobs.output.listing import OutputListing, list_output
from jobs.output.manifest import check_schema_version, manifest_locations, read_manifest
from jobs.output.markers import read_committed
from schemas.layout import MANIFEST_NAME, OWNER_NAME
from schemas.output import LABEL_SCHEMA, JobFailure, JobManifest, error_kind_of
from schemas.specs import StorageOptions
from workers.io.storage import ObjectMissing, join, normalise_uri, open_storage, split_s3

if TYPE_CHECKING:
    import pyarrow.dataset as ds

log = logging.getLogger(__name__)

SCHEMA_VERSION_KEY = b"bulklabel.schema_version"
__all__ = ["OutputError", "UnsupportedSchemaVersion"]  # raised here, defined in jobs.output.errors: importers use both


class FilesVanished(OutputError):
    """A data file the manifest named was gone when it was read (a compaction switched generations meanwhile)."""


# How a data file that is gone shows in pyarrow's and DuckDB's errors (local files and S3)
_VANISHED = ("Failed to open local file", "No such file or directory", "Path does not exist", "NoSuchKey",
             "NO_SUCH_KEY")  # fmt: skip
T = TypeVar("T")


@dataclass(frozen=True)
class LabelOutput:
    """A label output as committed: its data files, its manifest (None while the job is unfinished)."""

    uri: str
    job_id: str
    complete: bool  # True when the manifest is there: the job finished, and `files` is final
    manifest: JobManifest | None
    files: tuple[str, ...]  # URIs of the committed data files, in shard order (a compacted file once)
    filesystem: pafs.FileSystem
    failure: JobFailure | None = None  # the last failed run's record (`_failed.json`), until a run completes

    @property
    def generation(self) -> int:
        """The manifest's compaction generation this view is pinned to (0: never compacted, or no manifest)."""
        return self.manifest.generation if self.manifest is not None else 0

    @property
    def embedding_dim(self) -> int | None:
        """The embedding width the model has (from the manifest; None without one, or without embeddings)."""
        if self.manifest is None or not self.manifest.embeddings:
            return None
        return self.manifest.model.embedding_dim

    def paths(self) -> list[str]:
        """The data files as paths of `filesystem` (`bucket/key` for S3)."""
        return [fs_path(uri) for uri in self.files]

    def dataset(self) -> ds.Dataset:
        """A pyarrow dataset of the committed rows (lazy: nothing is read until it is scanned)."""
        import pyarrow.dataset as ds  # here: it imports pandas, a third of a second of every CLI command

        return ds.dataset(self.paths(), schema=LABEL_SCHEMA, format="parquet", filesystem=self.filesystem)

    def to_table(self, columns: list[str] | None = None) -> pa.Table:
        """The committed rows, read whole (for small outputs; scan `dataset()` otherwise)."""
        return self.dataset().to_table(columns=columns)


def open_output(uri: str, storage_options: StorageOptions | None = None) -> LabelOutput:
    """The committed state of the label output at `uri` (local folder or s3://bucket/prefix).

    Raises OutputError when there is no bulklabel output there, when its manifest is damaged or lists files that are
    gone, and UnsupportedSchemaVersion when it was written in a schema version this bulklabel does not know.
    """
    uri = normalise_uri(uri).rstrip("/")
    storage = open_storage(uri, storage_options)
    manifest = read_manifest(storage, uri)
    listing = list_output(storage, uri)
    if manifest is not None:
        files = _manifest_files(manifest, uri, listing)
        job_id, complete = manifest.job_id, True
    else:
        complete = False
        job_id = _owner(storage, uri, listing)
        committed = read_committed(storage, uri, job_id, listing)
        files = [committed.files[s] for s in sorted(committed.done)]
        if committed.redo:
            # Said aloud: data files removed or damaged behind bulklabel's back land here.
            shard, why = next(iter(sorted(committed.redo.items())))
            log.warning("output %s: %d shard(s) whose done-markers cannot be trusted are not read (e.g. shard %s: %s)",
                        uri, len(committed.redo), shard, why)  # fmt: skip
    filesystem = pyarrow_filesystem(uri, storage_options)
    if manifest is None and files:
        _check_file_version(files[0], filesystem)
    log.debug("output %s: %d committed file(s), complete=%s", uri, len(files), complete)
    failure = read_failure(storage, uri) if listing.has_failure else None
    return LabelOutput(uri, job_id, complete, manifest, tuple(dict.fromkeys(files)), filesystem, failure)


def files_vanished(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says a file that was to be read is not there."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FilesVanished | FileNotFoundError) or any(t in str(seen) for t in _VANISHED):
            return True
        seen = seen.__cause__
    return False


def read_pinned(uri: str, options: StorageOptions | None, read: Callable[[LabelOutput], T]) -> T:
    """`read(output)` on the output's committed state; when a file it names vanished meanwhile (a compaction
    switched the manifest and deleted the merged files), once more on the new generation. A file gone without a
    new generation, or gone again, raises OutputError naming the output."""
    output = open_output(uri, options)
    try:
        return read(output)
    except Exception as exc:
        if not files_vanished(exc):
            raise
        again = open_output(uri, options)
        if again.generation == output.generation and again.files == output.files:
            raise OutputError(f"output {output.uri}: a data file it lists vanished while it was read ({_cause(exc)}); "
                              "is another program deleting its files?") from exc  # fmt: skip
        log.info("output %s: generation %d replaced by %d while it was read; reading the new one", output.uri,
                 output.generation, again.generation)  # fmt: skip
    try:
        return read(again)
    except Exception as exc:
        if files_vanished(exc):
            raise OutputError(f"output {again.uri} changed twice while it was read (compacted again?): run the "
                              "command again") from exc  # fmt: skip
        raise


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _manifest_files(manifest: JobManifest, uri: str, listing: OutputListing) -> list[str]:
    located = manifest_locations(manifest, uri)
    files = []
    for shard in sorted(located):
        name = located[shard][len(uri) + 1 :]
        if name not in listing.data:
            raise OutputError(f"output {uri} is damaged: its manifest lists {name} (shard {shard}), which is not there")
        files.append(located[shard])
    return files


def _owner(storage, uri: str, listing: OutputListing) -> str:
    if not listing.has_owner:
        what = "is empty or missing" if not listing.objects else f"has no {OWNER_NAME} or {MANIFEST_NAME}"
        raise OutputError(f"{uri} is not a bulklabel label output: it {what}")
    try:
        return json.loads(storage.read_bytes(join(uri, OWNER_NAME)))["job_id"]
    except (ValueError, KeyError, TypeError, ObjectMissing) as exc:
        raise OutputError(f"ownership claim {join(uri, OWNER_NAME)} is unreadable ({exc})") from exc


def _check_file_version(uri: str, filesystem: pafs.FileSystem) -> None:
    """Without a manifest, the version the writer put in the file's Arrow metadata."""
    metadata = pq.read_schema(fs_path(uri), filesystem=filesystem).metadata or {}
    check_schema_version(metadata.get(SCHEMA_VERSION_KEY), uri)


# ----------------------------------------------------------------------------------------------- filesystems


def read_rows(path: str, filesystem: pafs.FileSystem) -> pa.Table:
    """One data file's rows in this version's label schema, so compaction and the table take old outputs too: a file
    an earlier version wrote gains the columns it lacks as nulls (as `LabelOutput.dataset` reads it), except
    `error_kind`, which is never null and follows from the row's error text as the writer derives it."""
    import pyarrow.dataset as ds

    dataset = ds.dataset([path], schema=LABEL_SCHEMA, format="parquet", filesystem=filesystem)
    has_kind = "error_kind" in pq.read_schema(path, filesystem=filesystem).names
    columns = [name for name in LABEL_SCHEMA.names if has_kind or name != "error_kind"]
    table = dataset.to_table(columns=columns)
    if has_kind:
        return table
    kinds = pa.array([error_kind_of(e).value for e in table.column("error").to_pylist()], pa.string())
    at = LABEL_SCHEMA.get_field_index("error_kind")
    return table.add_column(at, LABEL_SCHEMA.field("error_kind"), kinds).cast(LABEL_SCHEMA)


def fs_path(uri: str) -> str:
    """`uri` as a path of its pyarrow filesystem (`bucket/key` for S3)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        return f"{bucket}/{key}"
    return uri


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> pafs.FileSystem:
    """pyarrow's filesystem for `uri`. For S3 the endpoint comes from the options or $AWS_ENDPOINT_URL_S3 (pyarrow
    itself does not read that variable), the keys from the options or else the standard AWS chain."""
    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem()
    options = options or StorageOptions()
    kwargs: dict = {
        "region": options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs |= {"endpoint_override": parts.netloc + parts.path.rstrip("/"), "scheme": parts.scheme}
    if options.access_key_id is not None:
        kwargs["access_key"] = options.access_key_id.get_secret_value()
        kwargs["secret_key"] = options.secret_access_key.get_secret_value()
    return pafs.S3FileSystem(**kwargs)
