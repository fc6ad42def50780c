"""Warm model pools: label workers that keep one model resident and serve every job on it, one after another or
side by side. A job leases workers from its model's pool (a `WorkerSource` for its shard dispatcher); the pool
outlives the job, so the next job on that model starts without loading anything, and is released once it has
been idle for a while (admission also releases idle pools early when a waiting job needs their resources).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

from jobs.label.actors import start_label_worker
from jobs.label.placement import Placement
from jobs.service.admission import Resources, WarmPool
from schemas.shards import WorkerSpec

log = logging.getLogger(__name__)


class WorkerPool:
    """The workers holding one model (`spec.pool_key()`), each asking Ray for `placement`'s resources."""

    def __init__(self, spec: WorkerSpec, placement: Placement, clock: Callable[[], float] = time.monotonic):
        self.spec, self.placement, self.key = spec, placement, spec.pool_key()
        self._clock = clock
        self._lock = threading.Lock()
        self._actors: list[ray.actor.ActorHandle] = []
        self._leases: dict[str, list[ray.actor.ActorHandle]] = {}  # job id → the workers it holds
        self._replaced: dict[bytes, ray.actor.ActorHandle] = {}  # dead worker → its replacement (jobs share both)
        self._started = 0
        self.idle_since: float | None = clock()

    def lease(self, job_id: str, cap: int | None = None) -> PoolLease:
        """A job's access to the pool, for at most `cap` workers (None: all the pool has)."""
        with self._lock:
            self._leases.setdefault(job_id, [])
            self.idle_since = None
        return PoolLease(self, job_id, cap)

    def grow_to(self, workers: int) -> None:
        """Start workers until the pool has `workers` (Ray places them as resources allow)."""
        with self._lock:
            while len(self._actors) < workers:
                self._start()

    @property
    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def view(self) -> WarmPool:
        """The pool as admission sees it."""
        with self._lock:
            per_worker = Resources(self.placement.cpus_per_worker, self.placement.gpus_per_worker)
            return WarmPool(self.key, len(self._actors), per_worker, busy=len(self._leases), idle_since=self.idle_since)

    def describe(self) -> dict:
        """The pool for `bulklabel service status`, with what each started worker says of itself (models loaded,
        jobs served, shards labelled)."""
        with self._lock:
            idle = None if self.idle_since is None else round(self._clock() - self.idle_since, 1)
            actors = list(self._actors)
            described = {"model": self.spec.model.name, "key": self.key, "workers": len(actors),
                         "jobs": sorted(self._leases), "workers_started": self._started, "idle_s": idle}  # fmt: skip
        refs = [actor.describe.remote() for actor in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0) if refs else ([], [])
        details, dead = [], 0
        for ref in ready:
            # A worker killed while no job held it (no job replaced it yet) answers with its death: counted, not
            # raised, or `service status` would fail for as long as the pool keeps it.
            try:
                details.append(ray.get(ref))
            except RayActorError:
                dead += 1
        return described | {"worker_details": details, "workers_dead": dead}

    def close(self) -> None:
        with self._lock:
            actors, self._actors = self._actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)
        log.info("released the %s pool (%d workers)", self.key, len(actors))

    # What a lease asks of its pool.
    def _acquire(self, job_id: str) -> ray.actor.ActorHandle:
        """A worker this job does not hold yet: a warm one if there is one, else a new one."""
        with self._lock:
            held = {a._actor_id for a in self._leases[job_id]}
            actor = next((a for a in self._actors if a._actor_id not in held), None)
            if actor is None:
                actor = self._start()
            self._leases[job_id].append(actor)
            return actor

    def _offer(self, job_id: str, cap: int | None) -> list[ray.actor.ActorHandle]:
        """Pool workers this job does not hold yet, up to its cap (they joined the pool since it last asked)."""
        with self._lock:
            held = {a._actor_id for a in self._leases.get(job_id, [])}
            room = len(self._actors) if cap is None else cap - len(held)
            offered = [a for a in self._actors if a._actor_id not in held][: max(room, 0)]
            self._leases.setdefault(job_id, []).extend(offered)
            return offered

    def _replace(self, job_id: str, dead: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        """The replacement of a dead or hung worker; jobs sharing it get the same one."""
        with self._lock:
            new = self._replaced.get(dead._actor_id)
            if new is None:
                ray.kill(dead, no_restart=True)
                new = self._replaced[dead._actor_id] = self._start()
                self._actors = [a for a in self._actors if a._actor_id != dead._actor_id]
            lease = self._leases[job_id]
            self._leases[job_id] = [a for a in lease if a._actor_id != dead._actor_id] + [new]
            return new

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._leases.pop(job_id, None)
            if not self._leases:
                self.idle_since = self._clock()

    def _start(self) -> ray.actor.ActorHandle:
        self._started += 1
        actor = start_label_worker(self.spec, self.placement, name=f"bulklabel-pool-{self.key}-{self._started}")
        self._actors.append(actor)
        return actor


class PoolLease:
    """One job's workers from a pool (jobs.label.dispatch.WorkerSource): released back to the pool, not killed."""

    def __init__(self, pool: WorkerPool, job_id: str, cap: int | None = None):
        self.pool, self.job_id, self.cap = pool, job_id, cap

    def acquire(self) -> ray.actor.ActorHandle:
        return self.pool._acquire(self.job_id)

    def replace(self, dead: ray.actor.ActorHandle) -> ray.actor.ActorHandle:
        return self.pool._replace(self.job_id, dead)

    def grow(self) -> list[ray.actor.ActorHandle]:
        """Workers that joined the pool since this job last asked (the service grows pools when nodes join or
        resources free up), up to the job's cap; asked every dispatch round, so it is cheap and never blocks."""
        return self.pool._offer(self.job_id, self.cap)

    def ended_cleanly(self) -> None:
        """The pool keeps its workers whatever the job's end: a dead or hung one was replaced already."""

    def release(self, actors: list[ray.actor.ActorHandle]) -> None:
        self.pool._release(self.job_id)
