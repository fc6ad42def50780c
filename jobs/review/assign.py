"""Who reviews which image, as plain logic over an injected clock: several reviewers at once get different images.

An image handed to a reviewer is leased to them for LEASE_S, renewed each time they ask again; a lease not renewed
(a closed tab, a reviewer gone to lunch) returns the image to the queue. A reviewer holds one image at a time; one
who comes back is given it again first, so a reload shows the image they were looking at (after an undo, the image
undone). Decided images (a label, bad) leave the
queue; an undo puts its image back; a skip leaves the image to the others (and to this reviewer once nothing else
is left). Leases live in the server's memory only: a restarted server starts with none, which costs at most one
LEASE_S of double work, never a decision (decisions are committed, jobs.output.corrections).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LEASE_S = 120.0


@dataclass
class _Lease:
    reviewer: str
    expires: float


class Assignments:
    """The queue's open images and their leases. Thread-safe: the app's requests run in a thread pool."""

    def __init__(self, keys: Sequence[str], decided: set[str] | None = None, lease_s: float = LEASE_S,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self._order = list(keys)
        self._decided = set(decided or ())
        self._leases: dict[str, _Lease] = {}
        self._skipped: dict[str, set[str]] = {}  # reviewer → keys they skipped (and nobody decided since)
        self._lease_s, self._clock = lease_s, clock
        self._lock = threading.Lock()

    def next_for(self, reviewer: str, wanted: Callable[[str], bool] = lambda key: True) -> str | None:
        """The image `reviewer` should look at now, leased to them; None when none is left for them."""
        with self._lock:
            now = self._clock()
            mine = next((k for k, lease in self._leases.items()
                         if lease.reviewer == reviewer and lease.expires > now and wanted(k)), None)  # fmt: skip
            key = mine or self._first_open(reviewer, wanted, now, skipped_too=False)
            key = key or self._first_open(reviewer, wanted, now, skipped_too=True)
            if key is not None:
                self._lease(key, reviewer, now)
            return key

    def decided(self, key: str) -> None:
        with self._lock:
            self._decided.add(key)
            self._leases.pop(key, None)
            for keys in self._skipped.values():
                keys.discard(key)

    def reopened(self, key: str, reviewer: str) -> None:
        """An undo: the image is open again, leased to the reviewer who undid (they see it next)."""
        with self._lock:
            self._decided.discard(key)
            self._lease(key, reviewer, self._clock())

    def skipped(self, key: str, reviewer: str) -> None:
        with self._lock:
            self._skipped.setdefault(reviewer, set()).add(key)
            if (lease := self._leases.get(key)) is not None and lease.reviewer == reviewer:
                del self._leases[key]

    def holder(self, key: str) -> str | None:
        """Who holds `key`'s live lease, if anyone."""
        with self._lock:
            lease = self._leases.get(key)
            return lease.reviewer if lease is not None and lease.expires > self._clock() else None

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._order) - len(self._decided.intersection(self._order))

    def _lease(self, key: str, reviewer: str, now: float) -> None:
        """One image per reviewer: taking one lets go of any other they held (it goes back to the others)."""
        for held in [k for k, lease in self._leases.items() if lease.reviewer == reviewer and k != key]:
            del self._leases[held]
        self._leases[key] = _Lease(reviewer, now + self._lease_s)

    def _first_open(self, reviewer: str, wanted: Callable[[str], bool], now: float, skipped_too: bool) -> str | None:
        skipped = self._skipped.get(reviewer, set())
        for key in self._order:
            if key in self._decided or (key in skipped and not skipped_too) or not wanted(key):
                continue
            lease = self._leases.get(key)
            if lease is None or lease.expires <= now or lease.reviewer == reviewer:
                return key
        return None
