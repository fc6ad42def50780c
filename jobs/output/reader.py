"""Reading a label job's output: the committed rows only, with a typed manifest and the schema version checked.

The layout is jobs.output.layout, its writer jobs.output.session; this is the reader every command goes through
(`bulklabel query`, `similar`, `report`, `compact`). What counts as committed:
- an output with a manifest (`_job.json`, written last; rewritten by a compaction, the one atomic switch): exactly the
  data files it lists, `complete=True`;
- an output without one (a job still running, or interrupted): the data files of valid done-markers (parsed,
  of the owning job, data file present at the recorded size: jobs.label.commit.read_committed), `complete=False`.
Anything else under the prefix (a part file whose marker was never written, a temporary upload, another tool's
Parquet file, the files a compaction merged or a crashed compaction left behind) is never read. Both layout versions
read: 1 (data files at the top of the prefix) and 2 (under `data/`).

Readers are pinned to one manifest generation (`read_pinned`): a compaction switches the manifest to new files and
then deletes the merged ones, so a reader that read the manifest just before the switch can find a file gone. It
reads once more, on the new generation; a file gone without a new generation is a damaged output, said as such
(never an error blaming the reader's SQL).

Data files are found by their name relative to the output the job wrote to, so an output copied or moved to
another folder or bucket (with its manifest) reads the same. Driver-side: no torch, no Ray.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from pydantic import ValidationError

from jobs.errors import BadInput
from jobs.label.commit import read_committed, read_failure, read_manifest
from jobs.output.layout import FAILED_NAME, MANIFEST_NAME, OWNER_NAME
from schemas.output import LABEL_SCHEMA, LABEL_SCHEMA_VERSION, JobFailure, JobManifest, error_kind_of
from schemas.specs import StorageOptions
from workers.storage import ObjectMissing, join, normalise_uri, open_storage, relative_key, split_s3

log = logging.getLogger(__name__)

SCHEMA_VERSION_KEY = b"bulklabel.schema_version"


class OutputError(BadInput):
    """The location is not a readable bulklabel label output (none there, damaged, or not a label job's)."""


class UnsupportedSchemaVersion(OutputError):
    """The output was written with a schema version this bulklabel cannot read (newer, or unknown)."""


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
    raw = read_manifest(storage, uri)
    # (a file named as the output lists as itself: not below it, so not one of its files)
    sizes = {relative_key(uri, o.uri): o.size for o in storage.list(uri) if o.uri.startswith(uri + "/")}
    if raw is not None:
        manifest = _parse_manifest(raw, join(uri, MANIFEST_NAME))
        files = _manifest_files(manifest, uri, sizes)
        job_id, complete = manifest.job_id, True
    else:
        manifest, complete = None, False
        job_id = _owner(storage, uri, sizes)
        committed = read_committed(storage, uri, job_id)
        files = [committed.locations.get(s, committed.done[s].data_uri) for s in sorted(committed.done)]
        if committed.redo:
            # Said aloud: an unfinished output copied elsewhere lands here (its markers name the old location).
            shard, why = next(iter(sorted(committed.redo.items())))
            log.warning("output %s: %d shard(s) whose done-markers cannot be trusted are not read (e.g. shard %s: %s)",
                        uri, len(committed.redo), shard, why)  # fmt: skip
    filesystem = pyarrow_filesystem(uri, storage_options)
    if manifest is None and files:
        _check_file_version(files[0], filesystem)
    log.debug("output %s: %d committed file(s), complete=%s", uri, len(files), complete)
    failure = read_failure(storage, uri) if FAILED_NAME in sizes else None
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


def _parse_manifest(raw: dict, where: str) -> JobManifest:
    kind = raw.get("kind", "label")
    if kind != "label":
        raise OutputError(f"{where} is the manifest of a {kind!r} job, not of a label job")
    _check_version(raw.get("schema_version"), where)
    try:
        return JobManifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        raise OutputError(f"job manifest {where} is damaged: {field}: {err['msg']}") from exc


def _check_version(version: object, where: str) -> None:
    """Refuse rows whose meaning this bulklabel does not know: a newer version, or no usable version at all."""
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= LABEL_SCHEMA_VERSION:
        newer = isinstance(version, int) and version > LABEL_SCHEMA_VERSION
        raise UnsupportedSchemaVersion(
            f"{where} was written in label schema version {version!r}; this bulklabel reads version "
            f"{LABEL_SCHEMA_VERSION}" + (": upgrade bulklabel to read it" if newer else " (unknown version)")
        )


def _manifest_files(manifest: JobManifest, uri: str, sizes: dict[str, int]) -> list[str]:
    recorded = normalise_uri(manifest.output).rstrip("/")
    files = []
    for entry in sorted(manifest.shards, key=lambda s: s.shard):
        try:
            name = relative_key(recorded, entry.data)
        except ValueError:
            raise OutputError(
                f"job manifest {join(uri, MANIFEST_NAME)} lists {entry.data} for shard {entry.shard}, outside the "
                f"job's output {recorded}: the manifest is damaged"
            ) from None
        if name not in sizes:
            raise OutputError(
                f"output {uri} is damaged: its manifest lists {name} (shard {entry.shard}), which is not there"
            )
        files.append(join(uri, name))
    return files


def _owner(storage, uri: str, sizes: dict[str, int]) -> str:
    if OWNER_NAME not in sizes:
        what = "is empty or missing" if not sizes else f"has no {OWNER_NAME} or {MANIFEST_NAME}"
        raise OutputError(f"{uri} is not a bulklabel label output: it {what}")
    try:
        return json.loads(storage.read_bytes(join(uri, OWNER_NAME)))["job_id"]
    except (ValueError, KeyError, TypeError, ObjectMissing) as exc:
        raise OutputError(f"ownership claim {join(uri, OWNER_NAME)} is unreadable ({exc})") from exc


def _check_file_version(uri: str, filesystem: pafs.FileSystem) -> None:
    """Without a manifest, the version the writer put in the file's Arrow metadata."""
    metadata = pq.read_schema(fs_path(uri), filesystem=filesystem).metadata or {}
    _check_version(metadata.get(SCHEMA_VERSION_KEY), uri)


# ----------------------------------------------------------------------------------------------- filesystems


def read_rows(path: str, filesystem: pafs.FileSystem) -> pa.Table:
    """One data file's rows in this version's label schema, so compaction and the table take old outputs too: a file
    an earlier version wrote gains the columns it lacks as nulls (as `LabelOutput.dataset` reads it), except
    `error_kind`, which is never null and follows from the row's error text as the writer derives it."""
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
