"""The shard accounting of one label job, apart from Ray: what is pending, running, backing off, done or failed.

The pool layer (which talks to the actors) feeds it events; the ledger decides, with an injected clock:
- next_ready(): shards put back from a dead worker first (`requeue`: not a try), then retries whose backoff has
  passed (5 s, doubling, capped at 60 s), then new shards, pulled lazily from the plan (a 1M-shard plan is never
  held in memory);
- failed(): retried up to `max_attempts` tries in all, then failed for good (`failures`). An AccessDenied stops
  the job (`fatal`): every other shard would fail the same way (rotated or expired credentials, a policy);
- lost(): the worker died while the shard ran: that counts a try, like a failure; worker_lost() counts the death
  itself and raises WorkersLost once more than `max_actor_restarts` deaths came with no shard committed between
  them (the cluster is at fault, not the input). A committed shard resets that count: a long job on a cluster that
  loses a worker now and then (preemptible nodes, OOM kills) goes on as long as it moves, while a cluster where
  workers die before committing anything stops the job within the bound;
- timed_out(): shards running past `shard_timeout_s`, counted from when the shard reached the head of its worker
  and the worker was ready (`started`), so a model still loading or a shard queued behind another never times out;
- cancel(): nothing more is handed out (retries included); shards already running may finish, and a shard that
  commits after the cancel still counts as done: a committed shard is committed.
Events for a shard's attempt that is no longer current (a late answer from a worker presumed dead) are ignored,
so a shard is counted done exactly once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from jobs.errors import WorkersLost
from schemas.shards import ShardResult, ShardTask
from workers.io.storage import AccessDenied

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = 5.0
RETRY_BACKOFF_MAX_S = 60.0


@dataclass(frozen=True)
class LedgerLimits:
    max_attempts: int
    shard_timeout_s: float
    max_actor_restarts: int
    backoff_s: float = RETRY_BACKOFF_S
    backoff_max_s: float = RETRY_BACKOFF_MAX_S

    def backoff(self, attempt: int) -> float:
        """The wait after failed try number `attempt`: 5 s, 10 s, 20 s, 40 s, then 60 s."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)


class Outcome(StrEnum):
    RETRY = "retry"  # tried again after its backoff
    FAILED = "failed"  # out of attempts: in `failures`
    FATAL = "fatal"  # the job stops (AccessDenied): see `fatal`
    ABANDONED = "abandoned"  # the job was cancelled: not retried, not failed (a resume does it)
    IGNORED = "ignored"  # not the shard's current attempt (or not running): nothing changed


@dataclass(frozen=True)
class Counts:
    """Progress figures; `planned` is final once `planning_done` (every source fed so far is used up)."""

    planned: int
    planning_done: bool
    done: int
    failed: int
    running: int
    retrying: int
    images: int
    errors: int


@dataclass
class _Running:
    task: ShardTask
    attempt: int
    head_since: float | None = None  # when it reached the head of a ready worker


class ShardLedger:
    """Attempts, backoff, timeouts and cancellation for one job's shards (see the module docstring)."""

    def __init__(self, limits: LedgerLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._sources: deque[Iterator[ShardTask]] = deque()
        self._new: deque[ShardTask] = deque()
        self._requeued: deque[tuple[ShardTask, int]] = deque()
        self._backoff: list[tuple[float, int, str]] = []  # heap of (not before, order, shard id)
        self._retrying: dict[str, tuple[ShardTask, int, float]] = {}  # shard id → (task, next attempt, not before)
        self._running: dict[str, _Running] = {}
        self._order = itertools.count()
        self.failures: dict[str, str] = {}
        self.fatal: str | None = None
        self.cancelled = False
        self.restarts = 0  # every worker death of the job (reported)
        self._deaths_since_progress = 0  # those since the last committed shard (bounded)
        self.planned = self.done_count = self.images = self.errors = 0

    # ----------------------------------------------------------------------------------------- feeding

    def add(self, task: ShardTask) -> None:
        """One more shard to do (after those added before)."""
        self._new.append(task)
        self.planned += 1

    def feed(self, tasks: Iterable[ShardTask]) -> None:
        """Shards to do, pulled one at a time when a worker has room (after what was added or fed before)."""
        self._sources.append(iter(tasks))

    def next_ready(self) -> tuple[ShardTask, int] | None:
        """The next (shard, attempt) to hand to a worker, now counted as running; None if none is due now."""
        if self.cancelled:
            return None
        if self._requeued:
            task, attempt = self._requeued.popleft()
        elif (due := self._due_retry()) is not None:
            task, attempt = due
        elif (task := self._next_new()) is not None:
            attempt = 1
        else:
            return None
        self._running[task.shard_id] = _Running(task, attempt)
        return task, attempt

    def next_due_in(self) -> float | None:
        """Seconds until the earliest backing-off retry is due (0 if one is), None if none backs off."""
        self._drop_stale_backoff()
        return max(self._backoff[0][0] - self._clock(), 0.0) if self._backoff else None

    # ---------------------------------------------------------------------------------------- results

    def started(self, shard_id: str, attempt: int, at: float | None = None) -> None:
        """The shard reached the head of its worker and the worker is ready: its timeout runs from now (or `at`)."""
        if (running := self._current(shard_id, attempt)) is not None:
            running.head_since = self._clock() if at is None else at

    def succeeded(self, result: ShardResult) -> bool:
        """A committed shard (after a cancel too). False if it was already counted or not known as in flight."""
        shard_id = result.shard_id
        if self._running.pop(shard_id, None) is None and self._retrying.pop(shard_id, None) is None:
            log.debug("shard %s: result of attempt %d ignored (already settled)", shard_id, result.attempt)
            return False
        self.done_count += 1
        self._deaths_since_progress = 0
        self.images += result.rows
        self.errors += result.errors
        return True

    def failed(self, shard_id: str, attempt: int, error: str | BaseException, fatal: bool | None = None) -> Outcome:
        """The attempt raised `error`. `fatal` defaults to whether it is an AccessDenied (which stops the job)."""
        if self._current(shard_id, attempt) is None:
            return Outcome.IGNORED
        running = self._running.pop(shard_id)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if fatal if fatal is not None else isinstance(error, AccessDenied):
            log.error("shard %s: %s; stopping the job", shard_id, text)
            self.fatal = text
            self.cancel()
            return Outcome.FATAL
        return self._retry_or_fail(running.task, attempt, text)

    def lost(self, shard_id: str, attempt: int, reason: str) -> Outcome:
        """The worker died (or was killed for a timeout) while on this shard: it counts a try."""
        return self.failed(shard_id, attempt, f"worker {reason}", fatal=False)

    def requeue(self, shard_id: str, attempt: int) -> bool:
        """The shard was queued behind a worker that died: it goes first to the next worker, no try counted."""
        if self._current(shard_id, attempt) is None:
            return False
        running = self._running.pop(shard_id)
        if not self.cancelled:
            self._requeued.append((running.task, attempt))
        return True

    def worker_lost(self, reason: str) -> None:
        """A worker of this job died or hung; raises WorkersLost once that happened more than max_actor_restarts
        times since the last committed shard."""
        if self._deaths_since_progress >= self.limits.max_actor_restarts:
            limit, again = self.limits.max_actor_restarts, self._deaths_since_progress
            since = "" if again == self.restarts else " since the last committed shard"
            raise WorkersLost(f"workers {reason} {again} times{since}; giving up (max {limit})")
        self.restarts += 1
        self._deaths_since_progress += 1

    def timed_out(self, now: float | None = None) -> list[str]:
        """Shards running past shard_timeout_s since they reached the head of a ready worker."""
        now = self._clock() if now is None else now
        limit = self.limits.shard_timeout_s
        return [shard for shard, r in self._running.items() if r.head_since is not None and now - r.head_since > limit]

    def cancel(self) -> None:
        """Hand out nothing more; retries and unplanned shards are dropped. Running shards may still finish."""
        self.cancelled = True
        self._sources.clear()
        self._new.clear()
        self._requeued.clear()
        self._backoff.clear()
        self._retrying.clear()

    # ------------------------------------------------------------------------------------------- state

    def done(self) -> bool:
        """Nothing pending, backing off or running: the job's dispatch is over."""
        return not self._running and not self._retrying and not self._requeued and self._peek_new() is None

    def running(self) -> list[tuple[str, int]]:
        return [(shard_id, r.attempt) for shard_id, r in self._running.items()]

    def counts(self) -> Counts:
        return Counts(planned=self.planned, planning_done=not self._sources, done=self.done_count,
                      failed=len(self.failures), running=len(self._running), retrying=len(self._retrying),
                      images=self.images, errors=self.errors)  # fmt: skip

    # -------------------------------------------------------------------------------------- internals

    def _current(self, shard_id: str, attempt: int) -> _Running | None:
        running = self._running.get(shard_id)
        if running is None or running.attempt != attempt:
            log.debug("shard %s attempt %d is not running now; event ignored", shard_id, attempt)
            return None
        return running

    def _retry_or_fail(self, task: ShardTask, attempt: int, error: str) -> Outcome:
        if attempt >= self.limits.max_attempts:
            log.error("shard %s failed after %d attempts: %s", task.shard_id, attempt, error)
            self.failures[task.shard_id] = error
            return Outcome.FAILED
        if self.cancelled:
            log.info("shard %s failed after the job was cancelled; left for a resume: %s", task.shard_id, error)
            return Outcome.ABANDONED
        limit = self.limits.max_attempts
        log.warning("shard %s failed (attempt %d/%d), retrying: %s", task.shard_id, attempt, limit, error)
        not_before = self._clock() + self.limits.backoff(attempt)
        self._retrying[task.shard_id] = (task, attempt + 1, not_before)
        heapq.heappush(self._backoff, (not_before, next(self._order), task.shard_id))
        return Outcome.RETRY

    def _due_retry(self) -> tuple[ShardTask, int] | None:
        self._drop_stale_backoff()
        if not self._backoff or self._backoff[0][0] > self._clock():
            return None
        _, _, shard_id = heapq.heappop(self._backoff)
        task, attempt, _ = self._retrying.pop(shard_id)
        return task, attempt

    def _drop_stale_backoff(self) -> None:
        """Heap entries of shards that settled while backing off (a late success) are skipped."""
        while self._backoff and self._retrying.get(self._backoff[0][2], (None, 0, None))[2] != self._backoff[0][0]:
            heapq.heappop(self._backoff)

    def _peek_new(self) -> ShardTask | None:
        while not self._new and self._sources:
            task = next(self._sources[0], None)
            if task is None:
                self._sources.popleft()
            else:
                self._new.append(task)
                self.planned += 1
        return self._new[0] if self._new else None

    def _next_new(self) -> ShardTask | None:
        return self._new.popleft() if self._peek_new() is not None else None
