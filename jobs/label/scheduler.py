"""Dispatch shard tasks to a pool of Ray actors and look at every result.

Each actor holds up to IN_FLIGHT_PER_ACTOR shards (one running, one queued, so it never waits on
the driver). Failures are handled by kind, each with a bound:
- the actor died (killed, OOM, node lost): a new actor replaces it, its shards are retried;
- a shard ran past `shard_timeout_s`: the actor is killed and replaced, the shard retried;
- the shard raised: it is retried, up to `max_attempts`, then reported as failed (an unreachable store is one
  such failure: the shard waits out its backoff and tries again, it never becomes rows);
- the shard met an authentication or permission failure (`AccessDenied`): the job stops at once, naming the
  location, since every other shard would fail the same way (rotated or expired credentials, a policy);
- workers died more often than `max_actor_restarts`: the job stops with `WorkersLost` (the cluster is at fault).
Commits are idempotent per shard, so a retry can never duplicate rows.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from jobs.errors import WorkersLost
from schemas.shards import ShardJob, ShardResult, ShardTask
from workers.storage import AccessDenied

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2
WAIT_SLICE_S = 1.0
# A failed shard waits before its next try, so a store that is briefly away (restart, throttling) is not
# hammered through all attempts in a second: 5 s, 10 s, 20 s, 40 s, then capped.
RETRY_BACKOFF_S = 5.0
RETRY_BACKOFF_MAX_S = 60.0


@dataclass
class _Slot:
    """One actor and the shards it holds, oldest (running) first."""

    actor: ray.actor.ActorHandle
    ready: ray.ObjectRef | None  # until the actor has started, its shards' timeouts do not run
    running: deque = field(default_factory=deque)  # (ref, task, attempt)
    head_started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SchedulerLimits:
    max_attempts: int
    shard_timeout_s: float
    max_actor_restarts: int


class ShardScheduler:
    """Runs shard tasks on actors made by `make_actor(index)` until every task is done or failed."""

    def __init__(self, workers: WorkerSource, num_actors: int, limits: SchedulerLimits, job: ShardJob):
        self._workers = workers
        self._job = ray.put(job)  # sent with every shard (workers serve any job on their model): stored once
        self._limits = limits
        self._slots = [self._new_slot() for _ in range(num_actors)]
        self._retry: deque[tuple[ShardTask, int, float]] = deque()  # (task, attempt, not before)
        self.failures: dict[str, str] = {}
        self.restarts = 0

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        return [slot.actor for slot in self._slots]

    def first_ready(self, cancelled: Callable[[], bool] = lambda: False) -> dict | None:
        """Wait for the first worker to be up (on a cluster without room yet, until a node joins) and return its
        description; None if the job was cancelled while it waited."""
        while not cancelled():
            started, _ = ray.wait([slot.ready for slot in self._slots if slot.ready], num_returns=1, timeout=1.0)
            if started:
                return ray.get(started[0])
        return None

    def run(
        self,
        tasks: Iterator[ShardTask],
        on_done: Callable[[ShardResult], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> dict[str, str]:
        """Run all tasks; `on_done` sees each committed shard. Returns failed shard ids and their errors.

        A failed shard does not stop the others: every shard that can be committed is, so a re-run
        has only the failed ones left to do. Once `cancelled()`, nothing new starts (retries included) and the
        shards already running are let finish: what they commit is committed.
        """
        pending = iter(tasks)
        while True:
            if cancelled():
                pending, self._retry = iter(()), deque()
            self._fill(pending)
            refs = {entry[0]: slot for slot in self._slots for entry in slot.running}
            if not refs and not self._retry:
                return self.failures
            if not refs:  # only retries left, all backing off
                time.sleep(WAIT_SLICE_S)
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_SLICE_S)
            for ref in ready:
                self._settle(refs[ref], ref, on_done)
            self._enforce_timeouts()

    def add_workers(self, count: int) -> None:
        """Take `count` more workers (nodes joined, or a warm pool grew); they get shards from the next fill."""
        self._slots += [self._new_slot() for _ in range(count)]

    def shutdown(self) -> None:
        self._workers.release([slot.actor for slot in self._slots])

    def _fill(self, pending: Iterator[ShardTask]) -> None:
        """Give each actor's free places to retries first, then to new tasks."""
        for slot in self._slots:
            while len(slot.running) < IN_FLIGHT_PER_ACTOR:
                if (due := self._due_retry()) is not None:
                    task, attempt = due
                elif (task := next(pending, None)) is not None:
                    attempt = 1
                else:
                    return
                self._submit(slot, task, attempt)

    def _due_retry(self) -> tuple[ShardTask, int] | None:
        """The first retry whose backoff has passed, taken off the queue."""
        now = time.monotonic()
        for index, (task, attempt, not_before) in enumerate(self._retry):
            if not_before <= now:
                del self._retry[index]
                return task, attempt
        return None

    def _submit(self, slot: _Slot, task: ShardTask, attempt: int) -> None:
        if not slot.running:
            slot.head_started = time.monotonic()
        slot.running.append((slot.actor.label_shard.remote(task, attempt, self._job), task, attempt))

    def _settle(self, slot: _Slot, ref: ray.ObjectRef, on_done: Callable[[ShardResult], None]) -> None:
        index = next(i for i, entry in enumerate(slot.running) if entry[0] == ref)
        _, task, attempt = slot.running[index]
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            log.warning("worker died while on shard %s (attempt %d): %s", task.shard_id, attempt, _first_line(exc))
            self._replace(slot, reason="died")
            return
        except RayTaskError as exc:
            del slot.running[index]
            if isinstance(getattr(exc, "cause", None), AccessDenied):
                log.error("shard %s: %s; stopping the job", task.shard_id, exc.cause)
                raise exc.cause from None
            self._retry_or_fail(task, attempt, _first_line(exc))
        else:
            del slot.running[index]
            on_done(result)
        if index == 0:
            slot.head_started = time.monotonic()

    def _retry_or_fail(self, task: ShardTask, attempt: int, error: str) -> None:
        if attempt < self._limits.max_attempts:
            log.warning(
                "shard %s failed (attempt %d/%d), retrying: %s",
                task.shard_id,
                attempt,
                self._limits.max_attempts,
                error,
            )
            delay = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S)
            self._retry.append((task, attempt + 1, time.monotonic() + delay))
        else:
            log.error("shard %s failed after %d attempts: %s", task.shard_id, attempt, error)
            self.failures[task.shard_id] = error

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Swap in a new actor; every shard the old one held is tried again (its running one counts a try)."""
        if self.restarts >= self._limits.max_actor_restarts:
            limit = self._limits.max_actor_restarts
            raise WorkersLost(f"workers {reason} {self.restarts} times; giving up (max {limit})")
        self.restarts += 1
        held = list(slot.running)
        slot.running.clear()
        slot.actor = self._workers.replace(slot.actor)
        slot.ready = slot.actor.describe.remote()
        for position, (_, task, attempt) in enumerate(held):
            if position == 0:
                self._retry_or_fail(task, attempt, f"worker {reason}")
            else:
                self._retry.appendleft((task, attempt, 0.0))

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.ready is not None:
                if not ray.wait([slot.ready], timeout=0)[0]:
                    continue  # still starting (loading its model): not the shard's time yet
                slot.ready, slot.head_started = None, now
            if slot.running and now - slot.head_started > self._limits.shard_timeout_s:
                shard = slot.running[0][1].shard_id
                log.warning("shard %s ran past %.0fs; replacing its worker", shard, self._limits.shard_timeout_s)
                self._replace(slot, reason="timed out")

    def _new_slot(self) -> _Slot:
        actor = self._workers.acquire()
        return _Slot(actor, ready=actor.describe.remote())


class WorkerSource(Protocol):
    """Where a job's workers come from: its own actors (PrivateWorkers), or a warm pool shared by jobs on one model."""

    def acquire(self) -> ray.actor.ActorHandle:
        """A worker for this job: started now, or already running (and warm)."""

    def replace(self, dead: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        """A worker in place of one that died or hung (which is killed, if it still runs)."""

    def release(self, actors: list[ray.actor.ActorHandle]) -> None:
        """The job is done with these workers."""


class PrivateWorkers:
    """Workers made for one job (`make_actor(index)`) and killed when it ends: `bulklabel label` without a service."""

    def __init__(self, make_actor: Callable[[int], ray.actor.ActorHandle]):
        self._make_actor = make_actor
        self._made = 0

    def acquire(self) -> ray.actor.ActorHandle:
        self._made += 1
        return self._make_actor(self._made - 1)

    def replace(self, dead: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        ray.kill(dead, no_restart=True)
        return self.acquire()

    def release(self, actors: list[ray.actor.ActorHandle]) -> None:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _first_line(exc: BaseException) -> str:
    """A one-line reason; Ray's task errors carry the remote traceback, which goes to the log instead."""
    if isinstance(exc, RayTaskError):
        inner = getattr(exc, "cause", None)
        if inner is not None:
            return f"{type(inner).__name__}: {inner}"
        return str(exc).strip().splitlines()[-1]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
