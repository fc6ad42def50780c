"""Peak resident memory of the driver and Ray's worker processes, sampled from /proc while a measurement runs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

SAMPLE_EVERY_S = 0.25
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0  # the process ended between listing and reading


def _parents() -> dict[int, int]:
    """pid → parent pid for every process (from /proc/PID/stat; a thread-independent view of the process tree)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name field may hold spaces
    return out


def _is_ray_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


def driver_and_workers_rss(roots: tuple[int, ...] = ()) -> tuple[int, int]:
    """(RSS of this process, RSS of every `ray::` worker descended from it or from `roots` (the raylet of a `ray
    start` cluster): actors and tasks; not Ray's daemons, not other users' Ray clusters, not weed). Shared library
    pages count once per process, as RSS does."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    workers, stack = 0, [pid for root in (me, *roots) for pid in children.get(root, [])]
    while stack:
        pid = stack.pop()
        if _is_ray_worker(pid):
            workers += _rss_bytes(pid)
        stack.extend(children.get(pid, []))
    return _rss_bytes(me), workers


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.mib`: the highest driver + workers RSS seen meanwhile
    (`driver_mib`: the driver's own peak)."""

    def __init__(self, roots: tuple[int, ...] = ()) -> None:
        self.roots = roots
        self.peak = 0
        self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20

    @property
    def driver_mib(self) -> float:
        return self.driver_peak / 2**20

    def _sample(self) -> None:
        while True:
            driver, workers = driver_and_workers_rss(self.roots)
            self.peak = max(self.peak, driver + workers)
            self.driver_peak = max(self.driver_peak, driver)
            if self._stop.wait(SAMPLE_EVERY_S):
                return
