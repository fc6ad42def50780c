"""Admission: which queued jobs start now, and why each other one waits. Pure policy: no Ray, no clock.

The rule, applied to the queue in order (higher priority first, FIFO by `seq` within a priority):
1. A job whose model has a warm pool with room joins it and starts at once: it shares the pool's workers, so it
   needs no free resources (a pool made for a job earlier in the same round counts too).
2. A job no node of this cluster could ever hold (a GPU worker on a CPU-only cluster, a head with `num-cpus 0`, a
   gang larger than the cluster) waits for a node to join when an autoscaler may add one, and is reported as
   `never` ("could never run here") when none can. It reserves nothing: it cannot use what is there.
3. Otherwise it starts when at least `min_workers` of its workers fit, each on one node, in what is free minus
   what is *reserved*; it gets as many as fit, up to `max_workers`.
4. A job that does not fit reserves its minimum (`min_workers` x per-worker resources). Jobs after it may only
   backfill into what is left beyond the reservations, so a big job is never starved by a stream of small ones:
   the small ones start only with resources the big one could not have used anyway. If releasing idle warm pools
   (oldest idle first) would make it fit, they are listed in `evict`; it starts on a later round, once they are gone.
Placement on nodes is first-fit per worker; reservations and released pools are counted over the whole cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

EPS = 1e-9  # Ray reports fractional resources; 0.1 + 0.2 must still fit in 0.3
IDLE_S = 300.0  # a warm pool with no job is released after this long


@dataclass(frozen=True)
class Resources:
    """CPUs and GPUs, as Ray counts them (fractions allowed)."""

    cpus: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)

    def times(self, n: int) -> Resources:
        return Resources(self.cpus * n, self.gpus * n)

    def fits(self, within: Resources) -> bool:
        """Whether this much fits in `within`."""
        return self.cpus <= within.cpus + EPS and self.gpus <= within.gpus + EPS

    def clipped(self) -> Resources:
        """Negative amounts (more reserved than free) as zero."""
        return Resources(max(self.cpus, 0.0), max(self.gpus, 0.0))

    def count_in(self, free: Resources) -> float:
        """How many of this fit in `free` (math.inf for nothing at all)."""
        counts = [math.floor(have / need + EPS) for need, have in ((self.cpus, free.cpus), (self.gpus, free.gpus))
                  if need > EPS]  # fmt: skip
        return max(min(counts, default=math.inf), 0)

    def __str__(self) -> str:
        parts = [f"{_num(self.gpus)} GPU"] if self.gpus > EPS else []
        return " + ".join(parts + [f"{_num(self.cpus)} CPU"]) if self.cpus > EPS or not parts else parts[0]


def total(resources: Iterable[Resources]) -> Resources:
    return sum(resources, Resources())


@dataclass(frozen=True)
class Needs:
    """What a job asks for: `min_workers` to start at all, up to `max_workers` (None: as many as fit)."""

    per_worker: Resources
    min_workers: int = 1
    max_workers: int | None = None

    @classmethod
    def elastic(cls, per_worker: Resources, max_workers: int | None = None) -> Needs:
        """A label job: starts with one worker, takes more as they fit."""
        return cls(per_worker, 1, max_workers)

    @classmethod
    def gang(cls, per_worker: Resources, workers: int) -> Needs:
        """A fine-tune: all its Ray Train workers at once (its driver needs nothing)."""
        return cls(per_worker, workers, workers)

    @property
    def minimum(self) -> Resources:
        return self.per_worker.times(self.min_workers)


@dataclass(frozen=True)
class ClusterView:
    """The cluster as admission sees it. `nodes`: total resources of each alive node; `nodes_free`: free ones per
    node when known (then `free` is not used; without it `free` counts as one node); `autoscaler`: whether nodes
    may join (unknown: True on a remote cluster)."""

    free: Resources
    nodes: tuple[Resources, ...]
    autoscaler: bool = False
    nodes_free: tuple[Resources, ...] | None = None


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    priority: int
    seq: int
    needs: Needs
    kind: str = ""  # its job kind's name (jobs.kinds), for people
    model_key: str | None = None  # jobs with a model key run on that model's warm pool


@dataclass(frozen=True)
class WarmPool:
    """Workers holding one model. Their resources are already out of the cluster's free ones."""

    model_key: str
    workers: int
    per_worker: Resources
    busy: int = 0  # jobs using it
    idle_since: float | None = None  # monotonic seconds, when `busy` fell to 0
    max_jobs: int | None = None  # jobs it may serve at once (None: any number)

    @property
    def has_room(self) -> bool:
        return self.max_jobs is None or self.busy < self.max_jobs


@dataclass(frozen=True)
class Start:
    job_id: str
    workers: int  # new workers to start for it (0 when it joins a warm pool that exists)
    pool: str | None  # the model key of the pool it joins or creates; None for jobs without a model key


@dataclass(frozen=True)
class Waiting:
    reason: str  # for people: "needs 1 worker of 2 CPU, 0 CPU free; 2 jobs ahead"
    never: bool = False  # no node could ever hold it and no autoscaler may add one


@dataclass(frozen=True)
class Admission:
    start: tuple[Start, ...]
    waiting: dict[str, Waiting]
    evict: tuple[str, ...]  # model keys of idle pools to release now, for a waiting job
    spare: Resources = Resources()  # free beyond what started and what is reserved: room for pools to grow


def queue_order(queue: Iterable[QueuedJob]) -> list[QueuedJob]:
    """Higher priority first, FIFO (submission order) within a priority."""
    return sorted(queue, key=lambda job: (-job.priority, job.seq))


def admit(queue: Iterable[QueuedJob], cluster: ClusterView, pools: Iterable[WarmPool] = ()) -> Admission:
    """Decide one round of admission (see the module docstring for the rule)."""
    round_ = _Round(cluster, pools)
    for job in queue_order(queue):
        round_.consider(job)
    return Admission(tuple(round_.started), round_.waiting, tuple(round_.evicted), round_.available())


@dataclass
class _Round:
    """What one admit() call has given out so far."""

    cluster: ClusterView
    pools_in: Iterable[WarmPool]
    nodes_free: list[Resources] = field(init=False)
    pools: dict[str, WarmPool] = field(init=False)
    reserved: Resources = Resources()
    ahead: int = 0  # jobs waiting on resources so far
    started: list[Start] = field(default_factory=list)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)
    used_pools: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.nodes_free = list(self.cluster.nodes_free or (self.cluster.free,))
        self.pools = {pool.model_key: pool for pool in self.pools_in}

    def available(self) -> Resources:
        return (total(self.nodes_free) - self.reserved).clipped()

    def consider(self, job: QueuedJob) -> None:
        if self._join_pool(job):
            return
        if (never := _never_fits(job.needs, self.cluster.nodes)) is not None:
            suffix = "waiting for a node to join (autoscaler)" if self.cluster.autoscaler else "could never run here"
            self.waiting[job.job_id] = Waiting(f"{never} - {suffix}", never=not self.cluster.autoscaler)
            return
        workers = self._workers_now(job.needs)
        if workers >= job.needs.min_workers:
            self._place(job.needs.per_worker, workers)
            self.started.append(Start(job.job_id, workers, job.model_key))
            if job.model_key is not None:  # later jobs on this model in this round join the pool it creates
                self.pools[job.model_key] = WarmPool(job.model_key, workers, job.needs.per_worker, busy=1)
                self.used_pools.add(job.model_key)
            return
        reason = self._wait_reason(job.needs)
        if released := self._evict_for(job.needs):
            reason += f"; releasing idle pool{'s' if len(released) > 1 else ''} {', '.join(released)} for it"
        self.waiting[job.job_id] = Waiting(reason)
        self.reserved += job.needs.minimum
        self.ahead += 1

    def _join_pool(self, job: QueuedJob) -> bool:
        pool = self.pools.get(job.model_key) if job.model_key is not None else None
        if pool is None or not pool.has_room or job.model_key in self.evicted:
            return False
        self.pools[pool.model_key] = replace(pool, busy=pool.busy + 1)
        self.used_pools.add(pool.model_key)
        self.started.append(Start(job.job_id, 0, pool.model_key))
        return True

    def _workers_now(self, needs: Needs) -> int:
        per_node = sum(needs.per_worker.count_in(free) for free in self.nodes_free)
        fit = min(per_node, needs.per_worker.count_in(self.available()))
        if needs.max_workers is not None:
            fit = min(fit, needs.max_workers)
        return needs.min_workers if fit == math.inf else int(fit)  # a worker needing nothing: just the minimum

    def _place(self, per_worker: Resources, workers: int) -> None:
        """Take `workers` workers' resources from the nodes, first fit."""
        for index, free in enumerate(self.nodes_free):
            while workers and per_worker.fits(free):
                free, workers = free - per_worker, workers - 1
            self.nodes_free[index] = free

    def _wait_reason(self, needs: Needs) -> str:
        """Why a job that could run on this cluster does not start now."""
        per, free = needs.per_worker, total(self.nodes_free)
        count = f"{needs.min_workers} worker{'s' if needs.min_workers > 1 else ''}"
        reason = f"needs {count} of {per}{' at once' if needs.min_workers > 1 else ''}, {_shown(free, per)} free"
        if needs.minimum.fits(free) and not needs.minimum.fits(self.available()):
            return f"{reason}, held for the {_jobs(self.ahead)} ahead"
        if needs.minimum.fits(free):  # enough in all, but split over nodes so that no worker fits on one
            return f"{reason}, but no node has {per} free (at most {_shown(_largest(self.nodes_free, per), per)})"
        return f"{reason}; {_jobs(self.ahead)} ahead" if self.ahead else reason

    def _evict_for(self, needs: Needs) -> list[str]:
        """Idle pools (oldest idle first) whose release makes `needs` fit, now marked for eviction; none if even
        releasing every idle pool would not."""
        idle = sorted((p for key, p in self.pools.items() if p.busy == 0 and key not in self.used_pools
                       and key not in self.evicted), key=lambda p: (p.idle_since or 0.0, p.model_key))  # fmt: skip
        chosen, room = [], self.available()
        for pool in idle:
            if needs.minimum.fits(room):
                break
            chosen.append(pool.model_key)
            room += pool.per_worker.times(pool.workers)
        if not chosen or not needs.minimum.fits(room):
            return []
        self.evicted.extend(chosen)
        return chosen


def _never_fits(needs: Needs, nodes: Sequence[Resources]) -> str | None:
    """Why no node of this cluster could ever hold the job (even empty), or None if some could."""
    per = needs.per_worker
    if per.gpus > EPS and not any(node.gpus > EPS for node in nodes):
        return f"needs {_num(per.gpus)} GPU per worker; no node of this cluster has a GPU"
    capacity = sum(per.count_in(node) for node in nodes)
    if capacity == 0:
        largest = _shown(_largest(nodes, per), per)
        return f"needs {per} per worker; no node of this cluster has that much (largest: {largest})"
    if capacity < needs.min_workers:
        return f"needs {needs.min_workers} workers of {per} at once; this cluster holds {int(capacity)} at most"
    return None


def pool_target(pool: WarmPool, jobs_using_it: Sequence[QueuedJob], spare: Resources | None = None) -> int:
    """How many workers the pool should have: the largest `max_workers` of the jobs using it (no cap: all that
    fit), capped by what fits in `spare` (Admission.spare: free beyond reservations). It may be below
    `pool.workers`: the pool gives back workers beyond what its jobs asked for. A pool with no job keeps its
    workers until idle_expired releases it."""
    if not jobs_using_it:
        return pool.workers
    caps = [job.needs.max_workers for job in jobs_using_it]
    wanted = math.inf if None in caps else max(caps)
    room = math.inf if spare is None else pool.workers + pool.per_worker.count_in(spare)
    target = min(wanted, room)
    return max(1, pool.workers if target == math.inf else int(target))


def idle_expired(pool: WarmPool, now: float, idle_s: float = IDLE_S) -> bool:
    """Whether the pool has had no job for `idle_s` seconds (then it is released)."""
    return pool.busy == 0 and pool.idle_since is not None and now - pool.idle_since >= idle_s


def _num(value: float) -> str:
    return f"{value:g}"


def _jobs(n: int) -> str:
    return f"{n} job{'s' if n != 1 else ''}"


def _shown(free: Resources, like: Resources) -> str:
    """`free` in the dimensions `like` asks for ("0 CPU", "0 GPU", "1 GPU + 3 CPU")."""
    parts = [f"{_num(free.gpus)} GPU"] if like.gpus > EPS else []
    if like.cpus > EPS or not parts:
        parts.append(f"{_num(free.cpus)} CPU")
    return " + ".join(parts)


def _largest(nodes: Sequence[Resources], like: Resources) -> Resources:
    """The node with the most of what `like` asks for most (GPUs first)."""
    return max(nodes, key=lambda n: (n.gpus, n.cpus) if like.gpus > EPS else (n.cpus, n.gpus), default=Resources())
