"""Where a key listed in a file may point: the one rule for every file of keys (label manifests, fine-tune labels
files), so a key refused in one is refused in the other.

A key is relative to the listing file's folder, or absolute (`/local/path`, `s3://bucket/key`); it may name the
folder's contents or a location the spec allows by name (`allowed_roots`), nothing else: a listing must not reach
`/etc/hostname` or another user's photos because the file says so. Plain text logic, no storage calls.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

from workers.io.storage import normalise_uri


class KeyResolver:
    """Where a key of a listing file (a label manifest, a fine-tune labels file) may point: under the file's folder,
    or under one of the spec's allowed roots.

    Keys are relative (to the file's folder) or absolute (`/local/path`, `s3://bucket/key`). `.` and `..` are
    collapsed before the check, so '/data/in/../../etc/passwd' and '../../etc/passwd' are outside; the check is on
    the text, so a symbolic link inside an allowed root is followed (the root's owner put it there).
    """

    def __init__(self, base: str, allowed_roots: Iterable[str]):
        self.base = base
        self._base_prefix = base.rstrip("/") + "/"
        roots = [base]
        for root in allowed_roots:
            roots += _root_forms(root)
        self._prefixes = tuple({r.rstrip("/") + "/" for r in roots if r})

    def resolve(self, key: str) -> str | None:
        """The key as a worker reads it (relative to the manifest's folder when under it and given relative, else
        absolute), or None when it lies outside every allowed location."""
        if _plain_relative(key):  # the common case, kept cheap: a million keys are checked in a fraction of a second
            return key
        absolute = _absolute(self.base, key)
        if absolute is None:
            return None
        relative = not key.startswith(("/", "s3://"))
        if relative and absolute.startswith(self._base_prefix):
            return absolute[len(self._base_prefix) :]
        if absolute.startswith(self._prefixes):
            return absolute
        return None


def _plain_relative(key: str) -> bool:
    """A relative key without `.`, `..` or empty parts (so inside the manifest's folder, as it is)."""
    return (
        not key.startswith(("/", "."))
        and "./" not in key
        and "//" not in key
        and not key.endswith(".")
        and ("\0" not in key)
    )


def _absolute(base: str, key: str) -> str | None:
    """The key as an absolute, dot-collapsed location; None if it cannot be one (another scheme, above a bucket)."""
    if key.startswith("s3://"):
        return _collapse_s3(key)
    if key.startswith("/"):
        return posixpath.normpath(key)
    if "://" in key or "\0" in key:
        return None
    if base.startswith("s3://"):
        return _collapse_s3(f"{base}/{key}")
    return posixpath.normpath(f"{base}/{key}")


def _collapse_s3(uri: str) -> str | None:
    """s3://bucket/a/./b/../c → s3://bucket/a/c. S3 keys are literal (empty parts kept), but some stores and proxies
    collapse dot segments in URLs, so a key is checked (and read) in its collapsed form."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        return None
    parts: list[str] = []
    for part in key.split("/"):
        if part == ".":
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return f"s3://{bucket}/" + "/".join(parts)


def _root_forms(root: str) -> list[str]:
    """An allowed root as the keys may spell it: s3 collapsed; a local folder both as written and with its
    symbolic links resolved."""
    if root.startswith("s3://"):
        return [_collapse_s3(root.rstrip("/")) or ""]
    lexical = posixpath.normpath(os.path.abspath(os.path.expanduser(root)))
    return [lexical, normalise_uri(root)]
