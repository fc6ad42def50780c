"""One small object-storage interface with two backends: local folders and S3 (boto3).

Everything is addressed by URI (`/abs/path/key` or `s3://bucket/key`), so a spec means the same
thing on a laptop and on a cluster. Clients are built lazily inside the process that uses them.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from schemas.specs import StorageOptions

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user must fix (missing prefix, no permission)."""


class StoreUnavailable(StorageError):
    """The store could not be reached (connection refused or dropped, timeouts, 5xx, throttling) even after the
    bounded retries. Never a fact about one image: the shard fails and is retried later, the job may stop."""


class AccessDenied(StorageError):
    """Authentication or permission failure (wrong, rotated or expired credentials; a policy). A job error that
    stops the job naming the location: every further request would fail the same way."""


class ObjectMissing(StorageError, FileNotFoundError):
    """The object does not exist (S3 NoSuchKey/404, a local file not found): a fact about that one object."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    # What changes when the object is rewritten: the S3 ETag, or a local file's mtime in ns. Shard fingerprints
    # include it, so a shard rewritten under the same name is noticed on resume.
    etag: str = ""


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

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create the object only if it does not exist yet, atomically (S3 `If-None-Match: *`, local `link()`):
        True if this call created it, False if it already existed. Two processes racing: exactly one gets True."""


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
            stat = root.stat()
            yield ObjectInfo(str(root), stat.st_size, str(stat.st_mtime_ns))
        elif root.is_dir():
            yield from self._list_folder(str(root))

    def _list_folder(self, folder: str) -> Iterator[ObjectInfo]:
        # Sorting each folder's entries by name, with "/" after folder names, yields paths in key order (as AWS S3
        # lists keys); os.walk's order is not key order ("a/z" came before "a/b/c", and "a/x" before "a-b/x").
        # A file or folder removed (or renamed over: a record rewritten through its temp file) between the folder's
        # read and its stat is left out, as S3 leaves out a key deleted mid-listing; raising would fail a whole
        # listing (the job service's `list`) for a write that went on beside it.
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._list_folder(entry.path)
            elif entry.is_file():
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(entry.path, stat.st_size, str(stat.st_mtime_ns))

    def open_read(self, uri: str) -> BinaryIO:
        try:
            return open(uri, "rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{uri} does not exist") from exc

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as fh:
            return fh.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        os.replace(self._written_beside(uri, lambda fh: fh.write(data)), uri)

    def upload_file(self, local_path: str, uri: str) -> None:
        def copy(fh) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)

        os.replace(self._written_beside(uri, copy), uri)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        tmp = self._written_beside(uri, lambda fh: fh.write(data))
        try:
            os.link(tmp, uri)  # fails if `uri` exists; the object appears whole, never half-written
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def move(self, src: str, dst: str) -> None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    @staticmethod
    def _written_beside(uri: str, write) -> Path:
        """A hidden temporary file in the target folder holding the whole content, flushed to disk. A failed write
        (a full disk) removes it, so no empty or half file is left behind for a later run to trip over."""
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


def split_s3(uri: str) -> tuple[str, str]:
    """('bucket', 'key') of an s3:// URI."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}")
    return bucket, key


class S3Storage:
    """S3 and S3-compatible stores through boto3.

    Every call goes through `_call`, which classifies what went wrong and retries only what can pass:
    - unreachable (connection refused or dropped, timeouts, 5xx, throttling): retried with capped exponential
      backoff and jitter, RETRY_ATTEMPTS in all, then StoreUnavailable. These retries are ours, not botocore's:
      botocore's standard mode shares a retry quota per client (500 units, 5-10 a retry) that 16 parallel GETs
      drain in moments, after which it stops retrying altogether;
    - authentication or permission: AccessDenied at once, naming the location;
    - a missing key: ObjectMissing at once.
    """

    RETRY_ATTEMPTS = 8
    RETRY_BASE_S = 0.5
    RETRY_MAX_S = 8.0  # 0.5 + 1 + 2 + 4 + 8 + 8 + 8 = 31.5 s of backoff at most, 15.75 s at least (jitter 0.5-1x)

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
                retries={"total_max_attempts": 1, "mode": "standard"},  # retries happen in `_call`
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

    def _call(self, what: str, uri: str, fn):
        """fn() with our bounded retries on transient errors; every failure leaves as a classified StorageError."""
        for attempt in range(1, self.RETRY_ATTEMPTS + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below; anything unknown is re-raised as it is
                error = classify_s3_error(exc, what, uri)
                if error is None:
                    raise
                if not isinstance(error, StoreUnavailable) or attempt == self.RETRY_ATTEMPTS:
                    raise error from exc
                delay = min(self.RETRY_BASE_S * 2 ** (attempt - 1), self.RETRY_MAX_S) * random.uniform(0.5, 1.0)
                log.debug("%s %s: %s; retry %d in %.1fs", what, uri, error, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3(prefix)
        below = key.rstrip("/") + "/"  # S3 prefixes match partial names; keep `key` itself and what is below it
        token = None
        while True:
            args = {"Bucket": bucket, "Prefix": key} | ({"ContinuationToken": token} if token else {})
            page = self._call("list", prefix, lambda args=args: self.client.list_objects_v2(**args))
            for item in page.get("Contents", ()):
                if not key or item["Key"] == key or item["Key"].startswith(below):
                    yield ObjectInfo(f"s3://{bucket}/{item['Key']}", int(item["Size"]), item.get("ETag", ""))
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def open_read(self, uri: str) -> BinaryIO:
        bucket, key = split_s3(uri)
        return self._call("read", uri, lambda: self.client.get_object(Bucket=bucket, Key=key))["Body"]

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)

        def get() -> bytes:  # the body is read inside the retry: a connection dropped mid-body is retried too
            with self.client.get_object(Bucket=bucket, Key=key)["Body"] as body:
                return body.read()

        return self._call("read", uri, get)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self._call("write", uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)

        def put() -> bool:
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise

        return self._call("create", uri, put)

    def upload_file(self, local_path: str, uri: str) -> None:
        bucket, key = split_s3(uri)
        # Multipart uploads only become visible when completed, so readers never see a part.
        self._call("write", uri, lambda: self.client.upload_file(local_path, bucket, key))

    def move(self, src: str, dst: str) -> None:
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        self._call("copy", dst, lambda: self.client.copy({"Bucket": sb, "Key": sk}, db, dk))
        self._call("delete", src, lambda: self.client.delete_object(Bucket=sb, Key=sk))

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self._call("head", uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
            return True
        except ObjectMissing:
            return False

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call("delete", uri, lambda: self.client.delete_object(Bucket=bucket, Key=key))


_DENIED_CODES = {
    "403", "AccessDenied", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity",
}  # fmt: skip
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeTooSkewed", "RequestLimitExceeded", "BandwidthLimitExceeded", "TooManyRequests",
}  # fmt: skip


def _error_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or exc.response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode", ""))  # fmt: skip


def classify_s3_error(exc: BaseException, what: str, uri: str) -> StorageError | None:
    """The StorageError for a boto3/botocore failure of `what` on `uri`, or None for errors we do not know."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, S3UploadFailedError):  # upload_file wraps the ClientError in a string; look at its text
        text = str(exc)
        if any(code in text for code in _DENIED_CODES - {"403"}):
            return AccessDenied(f"access to {uri} denied: check the credentials and their permissions ({text})")
        return StoreUnavailable(f"cannot {what} {uri}: {text}")
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in _DENIED_CODES:
            return AccessDenied(f"access to {uri} denied ({code}): check the credentials and their permissions")
        if code in _MISSING_CODES:
            return ObjectMissing(f"{uri} does not exist")
        if code == "NoSuchBucket":
            return StorageError(f"bucket {split_s3(uri)[0]!r} does not exist ({uri})")
        if code in _TRANSIENT_CODES:
            return StoreUnavailable(f"cannot {what} {uri}: the store answered {code}")
        return None
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AccessDenied(f"no credentials to access {uri}: {exc}")
    if isinstance(exc, ConnectionError | HTTPClientError | ReadTimeoutError | BotoCoreError | OSError):
        return StoreUnavailable(f"cannot {what} {uri}: store unreachable ({type(exc).__name__}: {exc})")
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
