"""Warm workers for label jobs run one after another in one process (the Python API in a notebook, a script that
labels several folders, a test session): a job's workers, once it ends cleanly, are kept for the next job on the same
model and placement, so that job starts without a worker process importing torch and loading the model again.
Kept workers hold their cluster resources, so they are released after `keep_s` idle, when a job in this process
needs other workers (another model, another placement, a fine-tune), and at exit.

Off unless asked for (`LabelRun.keep_workers_s`, or $BULKLABEL_KEEP_WORKERS_S for the process): a CLI command runs one
job and exits, and on a shared cluster idle workers would hold CPUs that other users' jobs could have.
A job with test faults armed takes kept workers too: its rules travel with its shards (workers/faults.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from jobs.label.dispatch import PrivateWorkers, WorkerSource
from jobs.label.placement import Placement
from schemas.errors import BadInput
from schemas.shards import WorkerSpec

log = logging.getLogger(__name__)

KEEP_ENV = "BULKLABEL_KEEP_WORKERS_S"


def keep_seconds_from_env() -> float:
    """$BULKLABEL_KEEP_WORKERS_S as seconds (unset or empty: 0, off); anything else is refused in one line."""
    raw = os.environ.get(KEEP_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        raise BadInput(f"${KEEP_ENV} must be a number of seconds, not {raw!r}") from None
    if not seconds >= 0:
        raise BadInput(f"${KEEP_ENV} must be 0 or more seconds, not {raw!r}")
    return seconds


@dataclass(frozen=True)
class WarmKey:
    """What a kept worker can serve: the model side of its spec (credentials left out, as pools key it) and the
    resources it was started with."""

    pool_key: str
    placement: Placement


@dataclass
class _Kept:
    key: WarmKey
    actors: list[ray.actor.ActorHandle] = field(default_factory=list)
    timer: threading.Timer | None = None  # the idle timer of the latest release; an older one that fires does nothing


_lock = threading.Lock()
_kept: _Kept | None = None


def release_kept(reason: str = "released") -> int:
    """Kill this process's kept workers now (their resources go back to the cluster); how many there were."""
    global _kept
    with _lock:
        kept, _kept = _kept, None
    if kept is None:
        return 0
    if kept.timer is not None:
        kept.timer.cancel()
    for actor in kept.actors:
        _kill(actor)
    if kept.actors:
        log.info("%d warm worker(s) of %s %s", len(kept.actors), kept.key.pool_key, reason)
    return len(kept.actors)


def kept_workers() -> list[ray.actor.ActorHandle]:
    """The idle workers this process keeps now."""
    with _lock:
        return list(_kept.actors) if _kept else []


def kept_count() -> int:
    return len(kept_workers())


def workers_for(
    spec: WorkerSpec, placement: Placement, make_actor: Callable[[int], ray.actor.ActorHandle], keep_s: float
) -> WorkerSource:
    """The job's workers: its own (killed at its end) when keeping is off; else kept ones of a
    job before it where they fit, new ones for the rest, all kept after a clean end."""
    key = WarmKey(spec.pool_key(), placement)
    keep = keep_s > 0
    with _lock:
        stale = _kept is not None and (_kept.key != key or not keep)
    if stale:  # workers this job will not use would hold the resources its own need
        release_kept("released for a job that cannot use them")
    return KeptWorkers(key, make_actor, keep_s) if keep else PrivateWorkers(make_actor)


def _kill(actor: ray.actor.ActorHandle) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - already gone, or Ray shut down: nothing left to release
        log.debug("warm worker not killed: %s", exc)


class KeptWorkers:
    """A WorkerSource that takes kept workers first and, once the job has ended cleanly (`ended_cleanly`), keeps its
    workers for the next job; after a failure or an interruption they are killed, like a private job's."""

    def __init__(self, key: WarmKey, make_actor: Callable[[int], ray.actor.ActorHandle], keep_s: float):
        self.key, self.keep_s = key, keep_s
        self._make_actor = make_actor
        self._made = 0
        self._clean = False

    def acquire(self) -> ray.actor.ActorHandle:
        with _lock:
            if _kept is not None and _kept.key == self.key and _kept.actors:
                if _kept.timer is not None:  # busy again: idle time counts from its next release
                    _kept.timer.cancel()
                    _kept.timer = None
                return _kept.actors.pop(0)
        self._made += 1
        return self._make_actor(self._made - 1)

    def replace(self, dead: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        _kill(dead)
        self._made += 1
        return self._make_actor(self._made - 1)

    def grow(self) -> list[ray.actor.ActorHandle]:
        return []

    def ended_cleanly(self) -> None:
        """Every shard the job dispatched has settled: its workers are idle, and fit to serve the next job."""
        self._clean = True

    def release(self, actors: list[ray.actor.ActorHandle]) -> None:
        global _kept
        if not self._clean:
            for actor in actors:
                _kill(actor)
            return
        with _lock:
            if _kept is not None and _kept.key != self.key:  # a job on another model ended meanwhile (threads)
                actors, surplus = [], actors
            else:
                _kept = _kept or _Kept(self.key)
                _kept.actors.extend(actors)
                surplus = []
                if _kept.timer is not None:
                    _kept.timer.cancel()
                _kept.timer = threading.Timer(self.keep_s, lambda kept=_kept: _expire(kept, threading.current_thread()))
                _kept.timer.daemon = True
                _kept.timer.start()
        for actor in surplus:
            _kill(actor)


def _expire(kept: _Kept, timer: threading.Thread) -> None:
    """The idle timer: release the workers if they are still the ones it was set for, and no job took them since."""
    with _lock:
        current = _kept is kept and kept.timer is timer
    if current:
        release_kept("released after their idle time")


atexit.register(release_kept)
