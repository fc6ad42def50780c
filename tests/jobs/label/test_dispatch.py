"""jobs.label.dispatch on a real local Ray, with small scripted actors in place of label workers (no model): each
Ray-side event (a result, a raised error, a dead or hung actor, a slow start, workers that grow, a cancel) reaches
the ledger and comes back as the right dispatch."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import ray
import ray.cloudpickle

from jobs.errors import WorkersLost
from jobs.label.dispatch import PrivateWorkers, ShardDispatcher
from jobs.label.ledger import LedgerLimits
from schemas.shards import ShardJob, ShardResult, ShardTask
from schemas.specs import InputSpec
from workers.io.storage import AccessDenied

# The scripted actor below is defined in this test module, which Ray's worker processes cannot import by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB = ShardJob(job_id="j", input=InputSpec(uri="/in"), output="/out", top_k=1, batch_size=1)
FAST = LedgerLimits(max_attempts=2, shard_timeout_s=30.0, max_actor_restarts=3, backoff_s=0.2, backoff_max_s=0.2)


class ScriptedWorker:
    """Plays a label worker: `script[(shard_id, attempt)]` says what that try does (default: commit after `work_s`)."""

    def __init__(self, index: int, script: dict[tuple[str, int], str], work_s: float, start_s: float):
        time.sleep(start_s)  # a model loading: calls wait until it is done
        self.index, self.script, self.work_s = index, script, work_s
        self.active = self.most_active = 0
        self.seen: list[tuple[str, int]] = []

    def describe(self) -> dict:
        return {"index": self.index, "most_active": self.most_active, "seen": self.seen}

    async def label_shard(self, task: ShardTask, attempt: int, job: ShardJob) -> ShardResult:
        self.seen.append((task.shard_id, attempt))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            return await self._play(self.script.get((task.shard_id, attempt), "ok"), task, attempt, job)
        finally:
            self.active -= 1

    async def _play(self, action: str, task: ShardTask, attempt: int, job: ShardJob) -> ShardResult:
        if action == "die":
            os._exit(1)
        if action == "hang":
            await asyncio.sleep(3600)
        if action == "denied":
            raise AccessDenied(f"s3://bucket/{task.shard_id}: access denied")
        if action == "raise":
            raise RuntimeError("boom")
        if action == "late_raise":
            await asyncio.sleep(1.0)
            raise RuntimeError("late boom")
        await asyncio.sleep(self.work_s)
        return ShardResult(shard_id=task.shard_id, job_id=job.job_id, fingerprint=str(self.index),
                           data_uri=f"{job.output}/{task.shard_id}", rows=2, errors=0, bytes_read=1,
                           seconds=self.work_s, attempt=attempt)  # fmt: skip


class ScriptedWorkers(PrivateWorkers):
    """The job's own scripted workers; `grow_on` lists the grow() calls that bring one more worker."""

    def __init__(self, script=None, work_s=0.2, start_s=0.0, grow_on=()):
        remote = ray.remote(num_cpus=0)(ScriptedWorker)
        super().__init__(lambda index: remote.remote(index, script or {}, work_s, start_s))
        self.grow_on, self.grow_calls, self.replaced = set(grow_on), 0, 0
        self.released: list = []

    def replace(self, dead):
        self.replaced += 1
        return super().replace(dead)

    def release(self, actors):
        self.released += actors
        super().release(actors)

    def grow(self):
        self.grow_calls += 1
        return [self.acquire()] if self.grow_calls in self.grow_on else []


def tasks(n: int) -> list[ShardTask]:
    return [ShardTask(shard_id=f"s{i}", kind="files", base_uri="/in", keys=(f"{i}.jpg",)) for i in range(n)]


def run(dispatcher: ShardDispatcher, n: int, cancelled=lambda: False) -> tuple[dict[str, ShardResult], dict]:
    done: dict[str, ShardResult] = {}

    def on_done(result: ShardResult) -> None:
        assert result.shard_id not in done, "a shard was reported committed twice"
        done[result.shard_id] = result

    try:
        failures = dispatcher.run(tasks(n), on_done, cancelled)
        return done, failures
    finally:
        dispatcher.shutdown()


def test_every_shard_is_committed_once_with_two_in_flight_per_worker(ray_cluster):
    source = ScriptedWorkers()
    dispatcher = ShardDispatcher(source, 1, FAST, JOB)
    assert dispatcher.first_ready()["index"] == 0
    done, failures = run(dispatcher, 5)
    assert sorted(done) == [f"s{i}" for i in range(5)] and failures == {} and dispatcher.restarts == 0
    counts = dispatcher.counts()
    assert (counts.planned, counts.done, counts.images, counts.running) == (5, 5, 10, 0)
    assert source.released == dispatcher.actors  # shutdown gave the workers back to their source


def test_a_worker_holds_two_shards_at_once_and_never_more(ray_cluster):
    source = ScriptedWorkers(work_s=0.5)
    dispatcher = ShardDispatcher(source, 1, FAST, JOB)
    done: list[str] = []
    dispatcher.run(tasks(4), lambda r: done.append(r.shard_id))
    seen = ray.get(dispatcher.actors[0].describe.remote())
    dispatcher.shutdown()
    # An async actor may start its queued calls in any order (nothing depends on it); each shard came once.
    assert seen["most_active"] == 2 and sorted(seen["seen"]) == [(f"s{i}", 1) for i in range(4)]


def test_a_raising_shard_is_retried_after_its_backoff_then_fails_for_good(ray_cluster):
    script = {("s0", 1): "raise", ("s1", 1): "raise", ("s1", 2): "raise"}
    dispatcher = ShardDispatcher(ScriptedWorkers(script), 1, FAST, JOB)
    started = time.monotonic()
    done, failures = run(dispatcher, 3)
    assert sorted(done) == ["s0", "s2"] and done["s0"].attempt == 2
    assert failures == {"s1": "RuntimeError: boom"} and dispatcher.failures == failures
    assert time.monotonic() - started >= FAST.backoff_s and dispatcher.restarts == 0


def test_access_denied_stops_the_job_at_once(ray_cluster):
    dispatcher = ShardDispatcher(ScriptedWorkers({("s1", 1): "denied"}, work_s=0.5), 1, FAST, JOB)
    with pytest.raises(AccessDenied, match="s3://bucket/s1"):
        run(dispatcher, 50)
    assert dispatcher.counts().done < 50


def test_a_dead_worker_is_replaced_its_shard_counts_a_try_and_the_one_behind_does_not(ray_cluster):
    source = ScriptedWorkers({("s0", 1): "die"}, work_s=0.5)
    dispatcher = ShardDispatcher(source, 1, FAST, JOB)
    done, failures = run(dispatcher, 3)
    assert sorted(done) == ["s0", "s1", "s2"] and failures == {}
    assert (done["s0"].attempt, done["s1"].attempt) == (2, 1)  # s1 was queued behind s0 on the dead worker
    assert dispatcher.restarts == source.replaced == 1 and done["s0"].fingerprint == "1"


def test_workers_dying_past_max_actor_restarts_stop_the_job(ray_cluster):
    # Two deaths with no shard committed between them (the only shard kills its worker twice): past the bound of 1.
    # A committed shard between deaths renews the budget (the ledger's tests), so this job has one shard only.
    limits = LedgerLimits(max_attempts=5, shard_timeout_s=30.0, max_actor_restarts=1, backoff_s=0.1)
    dispatcher = ShardDispatcher(ScriptedWorkers({("s0", 1): "die", ("s0", 2): "die"}), 1, limits, JOB)
    with pytest.raises(WorkersLost, match="died 1 times"):
        run(dispatcher, 1)


def test_a_hung_shard_is_replaced_after_its_timeout_but_a_loading_worker_is_not(ray_cluster):
    # Each worker takes 2.5 s to start, past the 2 s timeout: only time at the head of a worker that is up counts.
    limits = LedgerLimits(max_attempts=2, shard_timeout_s=2.0, max_actor_restarts=3, backoff_s=0.1)
    source = ScriptedWorkers({("s1", 1): "hang"}, work_s=0.1, start_s=2.5)
    dispatcher = ShardDispatcher(source, 1, limits, JOB)
    done, failures = run(dispatcher, 3)
    assert sorted(done) == ["s0", "s1", "s2"] and failures == {}
    assert done["s0"].attempt == 1 and done["s1"].attempt == 2 and dispatcher.restarts == 1


def test_after_cancel_nothing_new_starts_not_even_a_retry_and_running_shards_finish(ray_cluster):
    source = ScriptedWorkers({("s1", 1): "late_raise"}, work_s=0.3)
    dispatcher = ShardDispatcher(source, 1, FAST, JOB)
    dispatcher.first_ready()
    done: dict[str, ShardResult] = {}
    failures = dispatcher.run(tasks(6), lambda r: done.setdefault(r.shard_id, r), cancelled=lambda: bool(done))
    seen_before_shutdown = ray.get(dispatcher.actors[0].describe.remote())["seen"]
    dispatcher.shutdown()
    # s0 committed, then the cancel: s1 (already in the worker) ran and raised; it is neither retried nor failed.
    assert sorted(done) == ["s0"] and failures == {} and sorted(seen_before_shutdown) == [("s0", 1), ("s1", 1)]
    assert dispatcher.counts().running == 0


def test_workers_that_grow_while_the_job_runs_get_shards(ray_cluster):
    source = ScriptedWorkers(work_s=0.5, grow_on={2})
    dispatcher = ShardDispatcher(source, 1, FAST, JOB)
    done, failures = run(dispatcher, 20)
    assert len(done) == 20 and failures == {} and len(dispatcher.actors) == 2
    assert {result.fingerprint for result in done.values()} == {"0", "1"}  # the grown worker committed some


def test_a_job_s_own_workers_never_grow():
    assert PrivateWorkers(lambda index: None).grow() == []
