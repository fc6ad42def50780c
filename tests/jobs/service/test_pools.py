"""Warm pools (jobs/service/pools.py) on the session's Ray cluster, with stand-in workers: what a pool says."""

from __future__ import annotations

import os
import time

import ray
from ray.exceptions import RayActorError

from jobs.label.placement import Placement
from jobs.service.pools import WorkerPool
from schemas.shards import WorkerSpec
from schemas.specs import ModelSpec


@ray.remote(num_cpus=0)
class StandInWorker:
    """Answers `describe` as a label worker does."""

    def describe(self) -> dict:
        return {"pid": os.getpid(), "models_loaded": 1}


def test_a_worker_killed_while_no_job_holds_it_is_counted_not_raised(ray_cluster):
    """Found by the chaos row: the last kill landed after the job ended, and `service status` failed (exit 3) with
    the dead worker's RayActorError for as long as the pool kept it."""
    pool = WorkerPool(WorkerSpec(model=ModelSpec(name="mobilenet_v2")), Placement(2, 1.0, 0.0, 1))
    live, dead = StandInWorker.remote(), StandInWorker.remote()
    ray.get([live.describe.remote(), dead.describe.remote()])
    ray.kill(dead, no_restart=True)
    _wait_dead(dead)  # ray.kill is asynchronous: a call sent at once may still be answered
    pool._actors = [live, dead]  # as _start() would have left them
    described = pool.describe()
    assert described["workers"] == 2 and described["workers_dead"] == 1, described
    assert [w["models_loaded"] for w in described["worker_details"]] == [1]
    ray.kill(live, no_restart=True)


def _wait_dead(actor, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.describe.remote(), timeout=5)
        except RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"actor still answers {timeout_s:.0f} s after ray.kill")
