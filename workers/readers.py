"""Shard readers: turn a shard task into a stream of (key, source, bytes) records.

Tar shards follow the WebDataset convention (the layout img2dataset writes): members that share a
basename up to the first dot form one sample, `abc.jpg` + `abc.json` → key `abc`. The tar is read
as a stream and members are never extracted to disk, so hostile names (`../../etc/passwd`) are only
strings; links and other non-files become error rows.
"""

from __future__ import annotations

import logging
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from schemas.shards import ShardTask
from workers.storage import Storage, join

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Errors that make one object unreadable (gone, no permission) rather than the store unreachable.
_OBJECT_ERRORS = (OSError, ClientError, BotoCoreError)


@dataclass(frozen=True)
class Record:
    """One image as read from storage; `error` is set instead of `data` when it could not be read."""

    key: str
    source: str
    data: bytes | None
    error: str | None = None


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


def read_tar(storage: Storage, task: ShardTask, extensions: tuple[str, ...]) -> Iterator[Record]:
    """Stream the image members of a WebDataset tar shard."""
    source = join(task.base_uri, task.keys[0])
    seen: set[str] = set()
    with (
        storage.open_read(source) as stream,
        tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar,
    ):
        for member in tar:
            if member.isdir():
                continue
            key, ext = webdataset_key(member.name)
            if not _image_extension(ext, extensions):
                continue  # sidecars (.json, .txt, .cls) carry metadata, not pixels
            if key in seen:
                yield Record(key, source, None, f"duplicate key {key!r} in shard (member {member.name!r})")
                continue
            seen.add(key)
            if not member.isfile():
                yield Record(key, source, None, f"member {member.name!r} is not a regular file (link or device)")
                continue
            fh = tar.extractfile(member)
            yield Record(key, source, fh.read() if fh else b"")


def read_files(storage: Storage, task: ShardTask, pool: Executor) -> Iterator[Record]:
    """Fetch the shard's image objects, several GETs in flight, yielded in the shard's key order."""

    def fetch(key: str) -> Record:
        # Manifests may name absolute locations; those are used as they are.
        uri = key if key.startswith(("s3://", "/")) else join(task.base_uri, key)
        try:
            return Record(key, uri, storage.read_bytes(uri))
        except _OBJECT_ERRORS as exc:  # after botocore's own bounded retries: one error row
            return Record(key, uri, None, f"cannot read {uri}: {type(exc).__name__}: {exc}")

    yield from bounded_map(pool, fetch, task.keys, window=16)


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """Like Executor.map, in order, but with at most `window` calls in flight, so memory stays bounded."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def read_shard(storage: Storage, task: ShardTask, extensions: tuple[str, ...], pool: Executor) -> Iterator[Record]:
    """Records of any shard task."""
    if task.kind == "tar":
        return read_tar(storage, task, extensions)
    return read_files(storage, task, pool)
