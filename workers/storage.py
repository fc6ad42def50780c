"""One small object-storage interface with two backends: local folders and S3 (boto3).

Everything is addressed by URI (`/abs/path/key` or `s3://bucket/key`), so a spec means the same
thing on a laptop and on a cluster. Clients are built lazily inside the process that uses them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from schemas.specs import StorageOptions

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user must fix (missing prefix, no permission)."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


class Storage(Protocol):
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object under `prefix` (recursively), in key order, one listing page at a time."""

    def open_read(self, uri: str) -> BinaryIO:
        """A readable, possibly non-seekable stream of the object's bytes."""

    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write an object whole; readers see either the old object or the new one, never a part."""

    def upload_file(self, local_path: str, uri: str) -> None: ...

    def move(self, src: str, dst: str) -> None:
        """Move an object; `dst` appears complete or not at all."""

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None: ...


def join(prefix: str, *parts: str) -> str:
    """Join URI parts with single slashes."""
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def relative_key(prefix: str, uri: str) -> str:
    """The part of `uri` below `prefix`."""
    prefix = prefix.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri!r} is not under {prefix!r}")
    return uri[len(prefix) :]


def normalise_uri(uri: str) -> str:
    """Local paths become absolute; s3 URIs are kept as they are."""
    if uri.startswith("s3://"):
        return uri
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return str(Path(uri).expanduser().resolve())


def open_storage(uri: str, options: StorageOptions | None = None) -> Storage:
    """The backend for `uri`: S3 for s3://, local files otherwise."""
    if uri.startswith("s3://"):
        return S3Storage(options or StorageOptions())
    normalise_uri(uri)  # rejects unknown schemes with a clear message
    return LocalStorage()


class LocalStorage:
    """Local folders. Writes go to a hidden temporary file in the target folder, then os.replace (atomic)."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        root = Path(prefix)
        if root.is_file():
            yield ObjectInfo(str(root), root.stat().st_size)
        elif root.is_dir():
            yield from self._list_folder(str(root))

    def _list_folder(self, folder: str) -> Iterator[ObjectInfo]:
        # Sorting each folder's entries by name, with "/" after folder names, yields paths in key order (as AWS S3
        # lists keys); os.walk's order is not key order ("a/z" came before "a/b/c", and "a/x" before "a-b/x").
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._list_folder(entry.path)
            elif entry.is_file():
                yield ObjectInfo(entry.path, entry.stat().st_size)

    def open_read(self, uri: str) -> BinaryIO:
        return open(uri, "rb")

    def read_bytes(self, uri: str) -> bytes:
        return Path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        tmp = self._temp_beside(uri)
        tmp.write_bytes(data)
        os.replace(tmp, uri)

    def upload_file(self, local_path: str, uri: str) -> None:
        tmp = self._temp_beside(uri)
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, uri)

    def move(self, src: str, dst: str) -> None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    @staticmethod
    def _temp_beside(uri: str) -> Path:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def split_s3(uri: str) -> tuple[str, str]:
    """('bucket', 'key') of an s3:// URI."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}")
    return bucket, key


class S3Storage:
    """S3 and S3-compatible stores through boto3.

    Transient errors (throttling, 5xx, dropped connections) are retried by botocore's standard retry
    mode: bounded attempts with exponential backoff and jitter, only on the error codes it lists.
    """

    MAX_ATTEMPTS = 10  # botocore's capped exponential backoff; the scheduler's shard retries back off further

    def __init__(self, options: StorageOptions):
        self._options = options
        self._client = None

    def __getstate__(self) -> dict:  # the client holds sockets; rebuild it where the object lands
        return {"_options": self._options, "_client": None}

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            opts = self._options
            kwargs = {}
            if opts.access_key_id is not None:
                kwargs["aws_access_key_id"] = opts.access_key_id.get_secret_value()
                kwargs["aws_secret_access_key"] = opts.secret_access_key.get_secret_value()
            config = Config(
                retries={"max_attempts": self.MAX_ATTEMPTS, "mode": "standard"},
                s3={"addressing_style": "path"} if opts.endpoint_url else {},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=32,
            )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
                region_name=opts.region or _region_from_environment(),
                config=config,
                **kwargs,
            )
        return self._client

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3(prefix)
        below = key.rstrip("/") + "/"  # S3 prefixes match partial names; keep `key` itself and what is below it
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for item in page.get("Contents", ()):
                    if not key or item["Key"] == key or item["Key"].startswith(below):
                        yield ObjectInfo(f"s3://{bucket}/{item['Key']}", int(item["Size"]))
        except self.client.exceptions.NoSuchBucket as exc:
            raise StorageError(f"bucket {bucket!r} does not exist ({prefix})") from exc
        except self.client.exceptions.ClientError as exc:
            denied = _denied(exc, prefix)
            if denied is None:
                raise
            raise denied from exc

    def open_read(self, uri: str) -> BinaryIO:
        bucket, key = split_s3(uri)
        return self.client.get_object(Bucket=bucket, Key=key)["Body"]

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as body:
            return body.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def upload_file(self, local_path: str, uri: str) -> None:
        bucket, key = split_s3(uri)
        # Multipart uploads only become visible when completed, so readers never see a part.
        self.client.upload_file(local_path, bucket, key)

    def move(self, src: str, dst: str) -> None:
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        self.client.copy({"Bucket": sb, "Key": sk}, db, dk)
        self.client.delete_object(Bucket=sb, Key=sk)

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            denied = _denied(exc, uri)
            if denied is None:
                raise
            raise denied from exc

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self.client.delete_object(Bucket=bucket, Key=key)


_DENIED_CODES = {"403", "AccessDenied", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId"}


def _denied(exc, uri: str) -> StorageError | None:
    """A StorageError naming the location for an authentication or permission failure, else None."""
    code = exc.response.get("Error", {}).get("Code", "")
    if code in _DENIED_CODES:
        return StorageError(f"access to {uri} denied ({code}): check the credentials and their permissions")
    return None


def _region_from_environment() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def check_writable(storage: Storage, prefix: str) -> None:
    """Write and delete a probe object, so an unwritable output fails before any work starts."""
    probe = join(prefix, f"_probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except Exception as exc:  # noqa: BLE001 - re-raised with the location named
        raise StorageError(f"output {prefix} is not writable: {type(exc).__name__}: {exc}") from exc


def local_scratch_dir() -> str:
    """A scratch folder for files on their way to storage."""
    return tempfile.mkdtemp(prefix="bulklabel-")
