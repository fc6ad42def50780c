"""Turn an input location into a stream of shard tasks, without holding the whole listing.

- tar: every `.tar` object under the prefix is one shard (WebDataset layout);
- files: loose images under the prefix, grouped in listing order into shards of N keys;
- manifest: a CSV or Parquet file whose key column names the images, read in chunks.
Shard ids are stable across runs for unchanged input, which is what makes resume possible.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import PurePosixPath

from schemas.shards import ShardTask
from schemas.specs import InputSpec
from workers.storage import Storage, StorageError, normalise_uri, relative_key

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar",)
MANIFEST_SUFFIXES = (".csv", ".parquet")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
MANIFEST_CHUNK_ROWS = 65_536


class PlanError(ValueError):
    """The input cannot be planned: missing, empty, or not what the spec says."""


def input_format(spec: InputSpec, storage: Storage, uri: str) -> str:
    """The spec's format, with `auto` decided from the URI or the first listing page."""
    if spec.format != "auto":
        return spec.format
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        return "manifest"
    for obj in islice(storage.list(uri), 1000):
        if obj.uri.lower().endswith(TAR_SUFFIXES):
            return "tar"
    return "files"


def plan_shards(spec: InputSpec, storage: Storage) -> Iterator[ShardTask]:
    """Shard tasks for the input, streamed; raises PlanError before yielding if there is nothing to do."""
    uri = normalise_uri(spec.uri)
    fmt = input_format(spec, storage, uri)
    tasks = {"tar": _tar_shards, "files": _file_shards, "manifest": _manifest_shards}[fmt](spec, storage, uri)
    first = next(tasks, None)
    if first is None:
        wanted = "tar shards" if fmt == "tar" else f"images ({', '.join(spec.extensions)})"
        raise PlanError(f"input {spec.uri} holds no {wanted}; check the path and the input format ({fmt})")
    log.info("planning %s input %s", fmt, spec.uri)
    yield first
    yield from tasks


def _listing(storage: Storage, uri: str) -> Iterator[str]:
    """Keys relative to `uri`, skipping hidden and underscore paths (our own outputs, editor files)."""
    try:
        for obj in storage.list(uri):
            key = relative_key(uri, obj.uri) if obj.uri != uri else PurePosixPath(obj.uri).name
            if not any(part.startswith((".", "_")) for part in key.split("/")):
                yield key
    except FileNotFoundError as exc:
        raise PlanError(f"input {uri} does not exist") from exc
    except StorageError as exc:
        raise PlanError(str(exc)) from exc


def _tar_shards(spec: InputSpec, storage: Storage, uri: str) -> Iterator[ShardTask]:
    for key in _listing(storage, uri):
        if key.lower().endswith(TAR_SUFFIXES):
            yield ShardTask(shard_id=shard_id_for(key), kind="tar", base_uri=uri, keys=(key,))


def shard_id_for(key: str) -> str:
    """A file-name-safe id from a tar key: 'a/b/00001.tar' → 'a__b__00001'."""
    stem = key.rsplit(".", 1)[0].replace("/", "__")
    return _UNSAFE_ID_CHARS.sub("_", stem)


def _file_shards(spec: InputSpec, storage: Storage, uri: str) -> Iterator[ShardTask]:
    images = (k for k in _listing(storage, uri) if k.rsplit(".", 1)[-1].lower() in spec.extensions)
    yield from _group(images, spec.files_per_shard, "files", uri)


def _manifest_shards(spec: InputSpec, storage: Storage, uri: str) -> Iterator[ShardTask]:
    base = uri.rsplit("/", 1)[0]
    yield from _group(_manifest_keys(spec, storage, uri), spec.files_per_shard, "manifest", base)


def _group(keys: Iterable[str], size: int, prefix: str, base: str) -> Iterator[ShardTask]:
    it = iter(keys)
    index = 0
    while chunk := tuple(islice(it, size)):
        yield ShardTask(shard_id=f"{prefix}-{index:06d}", kind="files", base_uri=base, keys=chunk)
        index += 1


def _manifest_keys(spec: InputSpec, storage: Storage, uri: str) -> Iterator[str]:
    """Keys from the manifest's key column, read in chunks from a local copy."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        raise PlanError(f"manifest {uri} does not exist")
    with tempfile.NamedTemporaryFile(suffix=PurePosixPath(uri).suffix) as local:
        with storage.open_read(uri) as src:
            while chunk := src.read(1 << 20):
                local.write(chunk)
        local.flush()
        column = spec.manifest_column
        if uri.lower().endswith(".parquet"):
            reader = pq.ParquetFile(local.name)
            if column not in reader.schema_arrow.names:
                raise PlanError(f"manifest {uri} has no column {column!r}; it has {reader.schema_arrow.names}")
            batches = reader.iter_batches(batch_size=MANIFEST_CHUNK_ROWS, columns=[column])
        else:
            reader = pacsv.open_csv(local.name, read_options=pacsv.ReadOptions(block_size=1 << 22))
            if column not in reader.schema.names:
                raise PlanError(f"manifest {uri} has no column {column!r}; it has {reader.schema.names}")
            batches = reader
        for batch in batches:
            for key in batch.column(column).to_pylist():
                if key:
                    yield str(key)
