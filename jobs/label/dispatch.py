"""Dispatch one label job's shards to Ray actors: the thin layer between the job's ShardLedger and its workers.

The ledger (jobs/label/ledger.py, no Ray) answers every policy question: which shard goes next, retry or fail,
backoff, timeouts, cancel, counts, the bound on worker deaths. This module holds only what talks to Ray: actor
handles, the object refs of shards in flight, `ray.wait`, each worker's `describe` ref (is it up yet?), and
killing or replacing workers through the job's WorkerSource.

Each actor holds up to IN_FLIGHT_PER_ACTOR shards (one running, one queued, so it never waits on the driver).
Failures are handled by kind, each with a bound:
- the actor died (killed, OOM, node lost): a new actor replaces it; the shard it ran counts a try, the one queued
  behind it goes first to the next free worker without counting one;
- a shard ran past `shard_timeout_s` (counted from when it reached the head of a worker that is up, so a model still
  loading never times out): the actor is killed and replaced as if it died, the shard retried;
- the shard raised: it is retried after a backoff (5 s, doubling, capped at 60 s), up to `max_attempts` tries in
  all, then reported as failed (an unreachable store is one such failure: it never becomes rows);
- the shard met an authentication or permission failure (`AccessDenied`): the job stops at once, raising it,
  since every other shard would fail the same way (rotated or expired credentials, a policy);
- workers died or hung more than `max_actor_restarts` times with no shard committed between them: the job stops
  with `WorkersLost` (the cluster is at fault, not the input).
Once cancelled, nothing new is dispatched (retries included); shards already running finish and what they
commit is committed. Commits are idempotent per shard, so a retry can never duplicate rows.

Elastic growth: every round of the loop (and while waiting for a first worker) asks the WorkerSource for workers
that became available since (`grow()`: a warm pool that grew, nodes that joined); each becomes a slot and gets
shards from the next fill. Nothing is asked once the job is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from jobs.label.ledger import Counts, LedgerLimits, Outcome, ShardLedger
from schemas.shards import ShardJob, ShardResult, ShardTask
from workers.io.storage import AccessDenied

log = logging.getLogger(__name__)

# Two per worker: the running shard and the next, which the (async) worker reads and decodes ahead.
IN_FLIGHT_PER_ACTOR = 2
WAIT_SLICE_S = 1.0  # how long one round waits for a result before it looks at timeouts, growth and cancel


@dataclass(frozen=True)
class _InFlight:
    ref: ray.ObjectRef
    shard_id: str
    attempt: int


@dataclass
class _Slot:
    """One actor and the shards it holds, oldest (running) first."""

    actor: ray.actor.ActorHandle
    ready: ray.ObjectRef | None  # its describe() until it answered (model loaded); None once the actor is up
    held: deque[_InFlight] = field(default_factory=deque)

    @classmethod
    def of(cls, actor: ray.actor.ActorHandle) -> _Slot:
        return cls(actor, ready=actor.describe.remote())


class ShardDispatcher:
    """Runs one job's shard tasks on actors from a WorkerSource until every task is done or failed."""

    def __init__(
        self,
        workers: WorkerSource,
        num_actors: int,
        limits: LedgerLimits,
        job: ShardJob,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Args:
        workers: where actors come from and go back to (replacements too).
        num_actors: how many to acquire now; more may come from `add_workers` and `workers.grow()`.
        limits: attempts, timeout and worker-death bounds, handed to the ledger.
        job: what every shard needs from its job; stored once in Ray's object store and sent with each shard.
        clock: the ledger's clock (backoff and timeouts).
        """
        self._workers = workers
        self._job = ray.put(job)
        self._ledger = ShardLedger(limits, clock)
        self._slots = [_Slot.of(workers.acquire()) for _ in range(num_actors)]

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        return [slot.actor for slot in self._slots]

    @property
    def failures(self) -> dict[str, str]:
        """Shards failed for good (out of attempts) → their last error."""
        return self._ledger.failures

    @property
    def restarts(self) -> int:
        """Workers replaced so far (died or hung)."""
        return self._ledger.restarts

    def counts(self) -> Counts:
        """The ledger's progress figures (planned, done, failed, running, retrying, images, errors)."""
        return self._ledger.counts()

    def first_ready(self, cancelled: Callable[[], bool] = lambda: False) -> dict | None:
        """Wait for the first worker to be up (on a cluster without room yet, until a node joins) and return its
        description; None if the job was cancelled while it waited."""
        while not cancelled():
            self._grow()
            starting = [slot.ready for slot in self._slots if slot.ready is not None]
            if not starting:
                time.sleep(WAIT_SLICE_S)  # no worker yet (a pool that has none to lend): wait for one to grow
                continue
            started, _ = ray.wait(starting, num_returns=1, timeout=WAIT_SLICE_S)
            if started:
                self._poll_ready()  # the worker that answered is up: the first fill gives it shards at once
                return ray.get(started[0])
        return None

    def run(
        self,
        tasks: Iterable[ShardTask],
        on_done: Callable[[ShardResult], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> dict[str, str]:
        """Run all tasks; `on_done` sees each committed shard once. Returns failed shard ids and their errors.

        A failed shard does not stop the others: every shard that can be committed is, so a re-run has only the
        failed ones left to do. Once `cancelled()`, nothing new starts (retries included) and the shards already
        running are let finish: what they commit is committed. Raises AccessDenied or WorkersLost (see above).
        """
        self._ledger.feed(tasks)  # pulled lazily, a shard at a time, when a worker has room
        while True:
            if cancelled() and not self._ledger.cancelled:
                log.info("job cancelled: dispatching nothing more; %d shard(s) running", len(self._ledger.running()))
                self._ledger.cancel()
            self._grow()
            self._poll_ready()
            self._fill()
            if self._ledger.done():
                return self.failures
            self._settle_next(on_done)
            self._enforce_timeouts()

    def add_workers(self, count: int) -> None:
        """Take `count` more workers from the source; they get shards from the next fill."""
        self._slots += [_Slot.of(self._workers.acquire()) for _ in range(count)]

    def shutdown(self) -> None:
        """Give every worker back to the source (killed, or back to its pool)."""
        self._workers.release(self.actors)

    # ------------------------------------------------------------------------------------------ the loop

    def _grow(self) -> None:
        if self._ledger.cancelled:
            return
        grown = self._workers.grow()
        if grown:
            log.info("%d more worker(s) for this job (%d in all)", len(grown), len(self._slots) + len(grown))
            self._slots += [_Slot.of(actor) for actor in grown]

    def _fill(self) -> None:
        """Give each actor's free places to whatever the ledger hands out next, until it has nothing due."""
        for slot in self._slots:
            while len(slot.held) < IN_FLIGHT_PER_ACTOR:
                if (ready := self._ledger.next_ready()) is None:
                    return
                task, attempt = ready
                slot.held.append(_InFlight(slot.actor.label_shard.remote(task, attempt, self._job), task.shard_id,
                                           attempt))  # fmt: skip
                if len(slot.held) == 1:
                    self._head_started(slot)

    def _settle_next(self, on_done: Callable[[ShardResult], None]) -> None:
        """Wait (one slice at most) for a shard to finish, and settle it; with none in flight, wait for a retry."""
        owners = {entry.ref: slot for slot in self._slots for entry in slot.held}
        if not owners:  # only retries left, all backing off, or no worker up to run them yet
            due = self._ledger.next_due_in()
            wait_s = WAIT_SLICE_S if due is None else min(due, WAIT_SLICE_S)
            if starting := [slot.ready for slot in self._slots if slot.ready is not None]:
                ray.wait(starting, num_returns=1, timeout=wait_s)  # back as soon as a worker is up
            else:
                time.sleep(wait_s)
            return
        finished, _ = ray.wait(list(owners), num_returns=1, timeout=WAIT_SLICE_S)
        for ref in finished:
            self._settle(owners[ref], ref, on_done)

    def _settle(self, slot: _Slot, ref: ray.ObjectRef, on_done: Callable[[ShardResult], None]) -> None:
        index = next(i for i, entry in enumerate(slot.held) if entry.ref == ref)
        entry = slot.held[index]
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            log.warning("worker died while on shard %s (attempt %d): %s", entry.shard_id, entry.attempt,
                        _first_line(exc))  # fmt: skip
            self._replace(slot, reason="died")
            return
        except RayTaskError as exc:
            del slot.held[index]
            self._failed(entry, exc)
        else:
            del slot.held[index]
            if self._ledger.succeeded(result):
                on_done(result)
        if index == 0:
            self._head_started(slot)

    def _failed(self, entry: _InFlight, exc: RayTaskError) -> None:
        """The shard raised: the ledger retries or fails it; an AccessDenied is raised here and stops the job."""
        cause = getattr(exc, "cause", None)
        denied = isinstance(cause, AccessDenied)
        if self._ledger.failed(entry.shard_id, entry.attempt, _first_line(exc), fatal=denied) is Outcome.FATAL:
            raise cause from None

    def _poll_ready(self) -> None:
        """Notice workers that came up since the last round: their head shard's timeout starts now."""
        for slot in self._slots:
            if slot.ready is not None and ray.wait([slot.ready], timeout=0)[0]:
                slot.ready = None
                self._head_started(slot)

    def _enforce_timeouts(self) -> None:
        late = set(self._ledger.timed_out())
        for slot in self._slots:
            if slot.held and slot.held[0].shard_id in late:
                limit = self._ledger.limits.shard_timeout_s
                log.warning("shard %s ran past %.0fs; replacing its worker", slot.held[0].shard_id, limit)
                self._replace(slot, reason="timed out")

    def _head_started(self, slot: _Slot) -> None:
        """The slot's head shard runs from now, if the worker is up (else from when it comes up)."""
        if slot.ready is None and slot.held:
            self._ledger.started(slot.held[0].shard_id, slot.held[0].attempt)

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Swap in a new actor (WorkersLost past the bound); the shard it ran counts a try, the others do not."""
        self._ledger.worker_lost(reason)
        held = list(slot.held)
        slot.held.clear()
        slot.actor = self._workers.replace(slot.actor)
        slot.ready = slot.actor.describe.remote()
        for position, entry in enumerate(held):
            if position == 0:
                self._ledger.lost(entry.shard_id, entry.attempt, reason)
            else:
                self._ledger.requeue(entry.shard_id, entry.attempt)


class WorkerSource(Protocol):
    """Where a job's workers come from: its own actors (PrivateWorkers), or a warm pool shared by jobs on one model."""

    def acquire(self) -> ray.actor.ActorHandle:
        """A worker for this job: started now, or already running (and warm)."""

    def replace(self, dead: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        """A worker in place of one that died or hung (which is killed, if it still runs)."""

    def grow(self) -> list[ray.actor.ActorHandle]:
        """Workers that became available to this job since it last asked (asked every dispatch round: keep it
        cheap and non-blocking); [] when none."""

    def ended_cleanly(self) -> None:
        """Every shard the job dispatched has settled: its workers are idle (a source that keeps workers for
        later jobs keeps only such ones)."""

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

    def grow(self) -> list[ray.actor.ActorHandle]:
        """A job's own workers are placed once, at its start: none come later."""
        return []

    def ended_cleanly(self) -> None:
        """Nothing to keep: they are killed all the same."""

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
