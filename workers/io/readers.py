"""Shard readers: turn a shard task into a stream of (key, source, bytes) records.

Tar shards follow the WebDataset convention (the layout img2dataset writes): members that share a
basename up to the first dot form one sample, `abc.jpg` + `abc.json` → key `abc`. The tar is read
as a stream and members are never extracted to disk, so hostile names (`../../etc/passwd`) are only
strings; links and other non-files become error rows.

Only what is wrong with one object becomes its row (missing, unreadable, too large, a malformed key); a store that
cannot be reached (StoreUnavailable) or refuses our credentials (AccessDenied) raises out of the shard, so the
driver retries the shard later or stops the job: an outage must never be committed as bad images.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import ClientError

from schemas.shards import ShardTask
from schemas.specs import LABEL_COLUMN, InputSpec, StorageOptions
from workers.io.rowkeys import (
    ParquetLayoutError,
    check_key_column,
    parquet_row_key,
    row_key_of,
    shard_kind,
)
from workers.io.storage import (
    AccessDenied,
    ObjectMissing,
    Storage,
    StorageError,
    StoreUnavailable,
    classify_s3_error,
    join,
    open_storage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Local errors that are about one file (its permissions, a folder where a file was expected, its name), not about the
# disk: those rows; any other OSError (EIO, ENOSPC, ...) fails the shard, which is retried.
_LOCAL_OBJECT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP}
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    """One image as read from storage; `error` is set instead of `data` when it could not be read."""

    key: str
    source: str
    data: bytes | None
    error: str | None = None
    given_label: str | None = None  # the input's own label: class folder, .cls member, .json label/cls field
    sidecar: str | None = None  # the WebDataset sample's .json member, as JSON text


def webdataset_key(member_name: str) -> tuple[str, str]:
    """('dir/abc', 'jpg') for 'dir/abc.jpg'; the extension is everything after the basename's first dot."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _image_extension(ext: str, extensions: tuple[str, ...]) -> bool:
    # 'cls.jpg' style multi-part extensions name the image type last.
    return ext.rsplit(".", 1)[-1] in extensions


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends its iteration quietly at a missing, cut-short or garbled header after the first; raise instead,
    so a tar cut at a member boundary fails the shard (and is retried) rather than committing with rows missing.
    A proper end-of-archive (zero) block still ends the iteration."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            raise tarfile.ReadError(f"truncated or corrupt tar at offset {tarfile_.offset}: {exc}") from None


def read_tar(
    storage: Storage,
    task: ShardTask,
    extensions: tuple[str, ...],
    max_bytes: int | None = None,
    image_field: str | None = None,
) -> Iterator[Record]:
    """Stream the image members of a WebDataset tar shard (plain or gzip-compressed); members above `max_bytes` are
    error rows, never read (tarfile's stream mode skips an unread member's data in blocks). With `image_field`
    ('jpg;png'), one row per sample: its first member of those extensions (see InputSpec.image_field)."""
    source = join(task.base_uri, task.keys[0])
    with (
        storage.open_read(source) as stream,
        tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar,
    ):
        if image_field is None:
            yield from _member_rows(tar, source, extensions, max_bytes)
        else:
            yield from _sample_rows(tar, source, tuple(image_field.lower().split(";")), max_bytes)


SIDECAR_BYTES = 1 << 20  # a .json or .cls member above this is not metadata: left unread


def _member_rows(tar: tarfile.TarFile, source: str, extensions: tuple[str, ...], max_bytes: int | None):
    """Every image member a row, with its sample's .cls/.json (consecutive members of one key, either side of it)."""
    seen: set[str] = set()
    key: str | None = None
    rows: list[Record] = []
    meta: dict[str, bytes] = {}
    for member in tar:
        if member.isdir():
            continue
        member_key, ext = webdataset_key(member.name)
        if member_key != key:
            yield from _with_sidecars(rows, meta)
            key, rows, meta = member_key, [], {}
        if ext in ("cls", "json") and member.isfile() and member.size <= SIDECAR_BYTES:
            fh = tar.extractfile(member)
            meta.setdefault(ext, fh.read() if fh else b"")
        if not _image_extension(ext, extensions):
            continue  # sidecars (.json, .txt, .cls) carry metadata, not pixels
        if member_key in seen:
            rows.append(Record(member_key, source, None, f"duplicate key {member_key!r} in shard (member "
                               f"{member.name!r}): a sample with several images needs image_field (e.g. "
                               "'jpg;png')"))  # fmt: skip
            continue
        seen.add(member_key)
        rows.append(_member_record(tar, member, member_key, source, max_bytes))
    yield from _with_sidecars(rows, meta)


def _with_sidecars(rows: list[Record], meta: dict[str, bytes]) -> list[Record]:
    """The sample's rows with its given label and sidecar JSON (when the .json is a JSON object)."""
    if not meta:
        return rows
    sidecar, fields = None, {}
    if "json" in meta:
        try:
            fields = json.loads(meta["json"])
            sidecar = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        except (ValueError, UnicodeDecodeError):
            fields = {}
        fields = fields if isinstance(fields, dict) else {}
    label = meta["cls"].decode("utf-8", "replace").strip() if "cls" in meta else None
    if not label:
        found = next((fields[f] for f in ("label", "cls") if fields.get(f) not in (None, "")), None)
        label = None if found is None or isinstance(found, dict | list) else str(found)
    return [dataclasses.replace(row, given_label=label or None, sidecar=sidecar) for row in rows]


def _member_record(tar: tarfile.TarFile, member: tarfile.TarInfo, key: str, source: str, max_bytes: int | None):
    if not member.isfile():
        return Record(key, source, None, f"member {member.name!r} is not a regular file (link or device)")
    if max_bytes is not None and member.size > max_bytes:
        return Record(key, source, None, f"refused: member {member.name!r} is {member.size} bytes, above "
                                         f"max_object_bytes={max_bytes}")  # fmt: skip
    fh = tar.extractfile(member)
    return Record(key, source, fh.read() if fh else b"")


def _sample_rows(tar: tarfile.TarFile, source: str, fields: tuple[str, ...], max_bytes: int | None):
    """One record per sample (consecutive members sharing a key, as webdataset groups them): the member of the
    first of `fields` the sample has; a sample with none is an error row naming what it has."""
    key: str | None = None
    found: dict[str, Record] = {}
    others: list[str] = []
    meta: dict[str, bytes] = {}
    for member in tar:
        if member.isdir():
            continue
        member_key, ext = webdataset_key(member.name)
        if member_key != key:
            if key is not None:
                yield from _with_sidecars([_pick(key, source, fields, found, others)], meta)
            key, found, others, meta = member_key, {}, [], {}
        if ext in fields and ext not in found:
            found[ext] = _member_record(tar, member, member_key, source, max_bytes)
            continue
        others.append(ext)
        if ext in ("cls", "json") and member.isfile() and member.size <= SIDECAR_BYTES:
            fh = tar.extractfile(member)
            meta.setdefault(ext, fh.read() if fh else b"")
    if key is not None:
        yield from _with_sidecars([_pick(key, source, fields, found, others)], meta)


def _pick(key: str, source: str, fields: tuple[str, ...], found: dict[str, Record], others: list[str]) -> Record:
    for field in fields:
        if field in found:
            return found[field]
    return Record(key, source, None, f"sample {key!r} has no member {';'.join(fields)} (it has "
                                     f"{', '.join(others) or 'nothing'}); see image_field")  # fmt: skip


PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "img")
_PARQUET_BATCH_ROWS = 64


def read_parquet(
    storage: Storage,
    task: ShardTask,
    scratch: str | None,
    image_column: str | None = None,
    max_bytes: int | None = None,
    label_column: str | None = LABEL_COLUMN,
    key_column: str | None = None,
) -> Iterator[Record]:
    """Rows of a Parquet shard holding image bytes: binary cells, or structs with a `bytes` field (Hugging Face's
    Image feature). Keys from `key_column` where the spec names one (the dataset's own id), else
    `parquet_row_key`; an empty cell (a failed img2dataset download) is an error row; `label_column`, where the
    file has it, gives each row's given_label. The file is copied to local scratch first (Parquet is read by
    seeking, object streams are not seekable), then read a few rows at a time."""
    import pyarrow.parquet as pq

    source = join(task.base_uri, task.keys[0])
    with tempfile.TemporaryFile(dir=scratch) as local:
        with storage.open_read(source) as stream:
            shutil.copyfileobj(stream, local, _READ_CHUNK)
        local.seek(0)
        parquet = pq.ParquetFile(local)
        names = parquet.schema_arrow.names
        column = image_column or next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
        if column not in names:
            raise ParquetLayoutError(f"{source} has no image column {column or PARQUET_IMAGE_COLUMNS} (columns: "
                                     f"{names}); set input.image_column")  # fmt: skip
        check_key_column(source, key_column, names)
        labels = _parquet_labels(parquet, source, label_column)
        row = 0
        columns = [column] + ([key_column] if key_column else []) + ([label_column] if labels else [])
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            keys = batch.column(key_column).to_pylist() if key_column else [None] * batch.num_rows
            given = map(labels, batch.column(label_column).to_pylist()) if labels else [None] * batch.num_rows
            for key, cell, label in zip(keys, batch.column(column).to_pylist(), given, strict=True):
                name = parquet_row_key(task.keys[0], row) if key_column is None else _id_key(key, source, row)
                record = _parquet_record(name, source, cell, max_bytes)
                yield dataclasses.replace(record, given_label=label) if label is not None else record
                row += 1


def _id_key(value: object, source: str, row: int) -> str:
    """A key column's cell as the row's key; an empty id cannot name a row (planning refuses it first)."""
    if value is None or value == "":
        raise ParquetLayoutError(f"{source} row {row}: the key column is empty; every row needs its own id")
    return str(value)


def _parquet_labels(parquet, source: str, column: str | None) -> Callable[[object], str | None] | None:
    """How a cell of the label column becomes a given_label, or None where there is no label column. A Hugging Face
    ClassLabel (an integer column whose names the file's `huggingface` metadata lists) gives the class name."""
    names = parquet.schema_arrow.names
    if column is None or column not in names:
        if column not in (None, LABEL_COLUMN):
            raise ParquetLayoutError(f"{source} has no label column {column!r} (columns: {names}); set "
                                     "input.label_column to one of them, or null")  # fmt: skip
        return None
    classes = _class_label_names(parquet.schema_arrow.metadata or {}, column)

    def label(cell: object) -> str | None:
        if cell is None:
            return None
        if classes is not None and isinstance(cell, int) and 0 <= cell < len(classes):
            return classes[cell]
        return str(cell)

    return label


def _class_label_names(metadata: dict[bytes, bytes], column: str) -> list[str] | None:
    """The class names a Hugging Face ClassLabel feature gives `column` ({"info": {"features": {column: {"_type":
    "ClassLabel", "names": [...]}}}} in the schema's `huggingface` metadata), None where there are none."""
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        feature = features[column]
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    return [str(name) for name in names] if isinstance(names, list) else None


def _parquet_record(key: str, source: str, cell, max_bytes: int | None) -> Record:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if data is None:
        return Record(key, source, None, "empty: no image bytes in this row")
    if max_bytes is not None and len(data) > max_bytes:
        return Record(key, source, None, f"refused: row {key!r} is {len(data)} bytes, above max_object_bytes="
                                         f"{max_bytes}")  # fmt: skip
    return Record(key, source, bytes(data))


class StorageByScheme:
    """One Storage per URI scheme, built on first use from the job's StorageOptions: a manifest may name keys on
    another store than its own (a local path in an S3 manifest), and each key is read through the store it names."""

    def __init__(self, options: StorageOptions | None = None, known: dict[str, Storage] | None = None):
        self._options = options or StorageOptions()
        self._stores: dict[str, Storage] = dict(known or {})

    @staticmethod
    def scheme(uri: str) -> str:
        """'s3', 'local' for a path, or the unsupported scheme named (which open_storage then refuses)."""
        scheme, sep, _ = uri.partition("://")
        return scheme.lower() if sep else "local"

    def __call__(self, uri: str) -> Storage:
        """The storage for `uri`; StorageError for a URI of no supported scheme."""
        scheme = self.scheme(uri)
        if scheme not in self._stores:
            self._stores[scheme] = open_storage(uri, self._options)
        return self._stores[scheme]


def key_uri(base_uri: str, key: str) -> str:
    """Where a shard's key lives: an absolute URI or path (manifests may name them) as given, else under the base."""
    return key if key.startswith("/") or "://" in key else join(base_uri, key)


def read_files(
    storage: Storage,
    task: ShardTask,
    pool: Executor,
    *,
    stores: StorageByScheme | None = None,
    max_bytes: int | None = None,
) -> Iterator[Record]:
    """Fetch the shard's image objects, several GETs in flight, yielded in the shard's key order.

    `storage` serves keys of the base URI's scheme, `stores` any other. What is wrong with one key (missing, not
    readable, too large, malformed) is its error row; StoreUnavailable and AccessDenied raise and fail the shard.
    """
    base_scheme = StorageByScheme.scheme(task.base_uri)
    stores = stores or StorageByScheme()
    sizes = dict(zip(task.keys, task.sizes, strict=True)) if task.sizes else {}

    def fetch(key: str) -> Record:
        uri = key_uri(task.base_uri, key)
        try:
            store = storage if StorageByScheme.scheme(uri) == base_scheme else stores(uri)
            return _fetch(store, key, uri, sizes.get(key), max_bytes)
        except (StoreUnavailable, AccessDenied):
            raise  # about the store or the credentials, not this image
        except ObjectMissing:
            return Record(key, uri, None, f"missing: {uri} does not exist")
        except (StorageError, ClientError) as exc:  # malformed URI, no such bucket, an error S3 names for one key
            return Record(key, uri, None, f"cannot read {uri}: {type(exc).__name__}: {exc}")
        except ValueError as exc:  # a local path open() refuses (an embedded NUL byte)
            return Record(key, uri, None, f"cannot read {uri}: malformed key: {exc}")
        except OSError as exc:
            if exc.errno not in _LOCAL_OBJECT_ERRNOS or StorageByScheme.scheme(uri) != "local":
                raise
            return Record(key, uri, None, f"cannot read {uri}: {type(exc).__name__}: {exc.strerror}")

    yield from bounded_map(pool, fetch, task.keys, window=16)


def _fetch(store: Storage, key: str, uri: str, listed_size: int | None, max_bytes: int | None) -> Record:
    """One object's record; one above `max_bytes` is refused from its listed size, or once reading passes the cap."""
    if max_bytes is None:
        return Record(key, uri, store.read_bytes(uri))
    if listed_size is not None and listed_size > max_bytes:
        return Record(key, uri, None, _refused(uri, str(listed_size), max_bytes))
    if listed_size is not None and uri.startswith("s3://"):
        return Record(key, uri, store.read_bytes(uri))  # whole, inside S3Storage's retries (mid-body drops too)
    data = _read_capped(store, uri, max_bytes)
    if data is None:
        return Record(key, uri, None, _refused(uri, f"more than {max_bytes}", max_bytes))
    return Record(key, uri, data)


def _refused(uri: str, size: str, max_bytes: int) -> str:
    return f"refused: {uri} is {size} bytes, above max_object_bytes={max_bytes}"


def _read_capped(store: Storage, uri: str, cap: int) -> bytes | None:
    """The object's bytes, or None as soon as it proves longer than `cap` (the rest is never read)."""
    chunks: list[bytes] = []
    total = 0
    try:
        with store.open_read(uri) as stream:
            while total <= cap:
                chunk = stream.read(min(_READ_CHUNK, cap + 1 - total))
                if not chunk:  # at the end: botocore checks the body against its Content-Length here
                    break
                chunks.append(chunk)
                total += len(chunk)
    except Exception as exc:
        # An S3 body that breaks off mid-read arrives as botocore's or urllib3's own error: classify it like a GET.
        error = classify_s3_error(exc, "read", uri) if uri.startswith("s3://") else None
        if error is None or error is exc:
            raise
        raise error from exc
    return None if total > cap else b"".join(chunks)


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """Like Executor.map, in order, but with at most `window` calls in flight, so memory stays bounded."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class ShardSource:
    """Where and how a worker reads a job's shards: the input's storage and the job's input spec (which image of a
    tar sample, which Parquet column, how loose files are keyed, the size cap), and the worker's own helpers."""

    storage: Storage
    layout: InputSpec
    pool: Executor | None = None  # fetches a shard's loose files in parallel (None: one at a time)
    stores: StorageByScheme | None = None  # clients of other stores a manifest's keys name
    scratch: str | None = None  # a local folder for Parquet shards' copies


def read_shard(source: ShardSource, task: ShardTask) -> Iterator[Record]:
    """Records of any shard task; objects (loose files, tar members, Parquet cells) above the input's
    `max_object_bytes` are error rows."""
    storage, layout, max_bytes = source.storage, source.layout, source.layout.max_object_bytes
    if task.kind == "tar":
        return read_tar(storage, task, layout.extensions, max_bytes, layout.image_field)
    if task.kind == "parquet":
        return read_parquet(storage, task, source.scratch, layout.image_column, max_bytes, layout.label_column,
                            layout.key_column)  # fmt: skip
    records = read_files(storage, task, source.pool, stores=source.stores, max_bytes=max_bytes)
    if task.labels:  # a manifest's label column; records come in the shard's key order
        records = (dataclasses.replace(record, given_label=label or None)
                   for record, label in zip(records, task.labels, strict=True))  # fmt: skip
    if layout.row_key == "name":  # img2dataset's files layout: its folders are shard numbers, not classes
        return (dataclasses.replace(record, key=row_key_of(record.key, "name")) for record in records)
    if task.labels:
        return records
    return (dataclasses.replace(record, given_label=class_folder(record.key)) for record in records)


def read_source(storage: Storage, base_uri: str, key: str, layout: InputSpec, scratch: str | None = None
                ) -> Iterator[Record]:  # fmt: skip
    """Every record of the one shard file `key` under `base_uri` (a tar or Parquet shard), keyed exactly as the
    label job keyed them: what reads a shard back after the job (the report's thumbnails) goes through here."""
    kind = shard_kind(key)
    if kind is None:
        raise ValueError(f"{join(base_uri, key)} is not a tar or Parquet shard")
    task = ShardTask(shard_id="read-back", kind=kind, base_uri=base_uri, keys=(key,))
    return read_shard(ShardSource(storage, layout, scratch=scratch), task)


def class_folder(key: str) -> str | None:
    """The class of a loose file under class folders (`cat/001.jpg` → 'cat'), as torchvision's ImageFolder names
    it: the key's first folder; None for a file at the top or a key given as an absolute URI or path (manifests)."""
    if key.startswith("/") or "://" in key or "/" not in key:
        return None
    return key.split("/", 1)[0] or None
