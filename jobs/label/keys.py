"""Row keys of a plan, each at most once: the first key two rows of an input would share, found before any work.

Pure logic over an enumeration of (row key, where it comes from) that the caller can run twice: the first pass keeps
8 bytes per key (a numpy array of digests, sorted once, so a plan of 10 million keys holds 80 MB, not a set of
strings), the second, run only when two digests agree, finds the keys behind them and where each came from (so a
repeat is named by both its sources, and two different keys whose digests collide are no repeat at all).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RepeatedKey:
    """A row key that two rows of the input would share: the rows' places, in the order the input lists them."""

    key: str
    first: str
    second: str


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def find_repeated_key(rows: Callable[[], Iterable[tuple[str, str]]]) -> RepeatedKey | None:
    """The first repeated key of `rows()` (called once, or twice when digests agree), or None when every key is
    distinct."""
    digests = array("Q")
    for key, _ in rows():
        digests.append(_digest(key))
    ordered = np.sort(np.frombuffer(digests, dtype=np.uint64))
    del digests
    agreeing = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(agreeing):
        return None
    suspects = set(agreeing.tolist())
    del ordered, agreeing
    first: dict[str, str] = {}
    for key, where in rows():
        if _digest(key) in suspects:
            if key in first:
                return RepeatedKey(key, first[key], where)
            first[key] = where
    return None  # only digests agreed: the keys differ
