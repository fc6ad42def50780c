"""Fakes for jobs.service.core: a clock, a cluster, warm pools and runs, so a test drives the service a round at a
time (`core.tick()`) in milliseconds. The job store is real (a tmp folder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from jobs.cluster import ClusterResources
from jobs.kinds import Kind, ServiceStart
from jobs.service.admission import Resources, WarmPool
from jobs.service.config import ServiceConfig
from jobs.service.core import ServiceCore
from jobs.service.ownership import ClusterId, Liveness
from jobs.service.records import JobProgress
from jobs.service.runs import RunEnd
from jobs.service.store import JobStore
from schemas.outcome import Outcome

OURS = ClusterId("10.0.0.1:6379", "session_2026-12-06_22-00-00_000001_100")
OTHER = ClusterId("10.0.0.1:6380", "session_2026-12-06_22-30-00_000002_200")
T0 = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self):
        self.seconds = 1000.0

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.seconds)

    def monotonic(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@dataclass
class FakeCluster:
    """Nodes of (CPUs, GPUs); what is free is what the nodes have less what `used` says (the pools' workers and the
    jobs the service started take theirs through the core's own accounting); other clusters' liveness."""

    nodes: list[tuple[float, float]] = field(default_factory=list)
    others: dict[ClusterId, Liveness] = field(default_factory=dict)
    requested: list[list[str]] = field(default_factory=list)

    def identity(self) -> ClusterId:
        return OURS

    def resources(self) -> ClusterResources:
        nodes = tuple(self.nodes) or ((0.0, 0.0),)
        return ClusterResources(cpus=sum(c for c, _ in nodes), gpus=sum(g for _, g in nodes), nodes=len(nodes),
                                node_resources=nodes)  # fmt: skip

    def free(self) -> Resources:
        cluster = self.resources()
        return Resources(cluster.cpus, cluster.gpus)

    def request(self, waiting) -> None:
        self.requested.append([job.job_id for job in waiting])

    def liveness(self, cluster: ClusterId) -> Liveness:
        return self.others[cluster]

    def node_id(self) -> str:
        return "fake-node"


class FakePool:
    """A warm pool's bookkeeping without actors: workers started, jobs leasing it, idle since when."""

    def __init__(self, worker, placement, clock: FakeClock):
        self.key, self.placement, self.worker, self.clock = worker.pool_key(), placement, worker, clock
        self.workers, self.jobs, self.closed, self.jobs_served = 0, set(), False, 0
        self.idle_since: float | None = clock.monotonic()

    def view(self) -> WarmPool:
        per = Resources(self.placement.cpus_per_worker, self.placement.gpus_per_worker)
        return WarmPool(self.key, self.workers, per, busy=len(self.jobs), idle_since=self.idle_since)

    def lease(self, job_id: str, cap: int | None = None) -> FakeLease:
        self.jobs.add(job_id)
        self.jobs_served += 1
        self.idle_since = None
        self.workers = max(self.workers, 1)  # the job's first worker (a real pool starts it on the job's acquire)
        return FakeLease(self, job_id)

    def release(self, job_id: str) -> None:
        self.jobs.discard(job_id)
        if not self.jobs:
            self.idle_since = self.clock.monotonic()

    def grow_to(self, workers: int) -> None:
        self.workers = max(self.workers, workers)

    def close(self) -> None:
        self.closed = True

    def describe(self) -> dict:
        return {"model_key": self.key, "workers": self.workers, "jobs_served": self.jobs_served}


@dataclass
class FakeLease:
    pool: FakePool
    job_id: str

    def release(self, actors) -> None:
        self.pool.release(self.job_id)


class FakeRun:
    """A running job that ends when told (or, once cancelled, at once, as cancelled, unless stubborn)."""

    def __init__(self, start: ServiceStart | None = None, progress: JobProgress | None = None):
        self.start, self.ended, self.stubborn = start, None, False
        self._progress = progress or JobProgress()

    def finish(self, outcome: Outcome | str = Outcome.SUCCEEDED, *lines: str, error: str | None = None,
               lease_lost: bool = False) -> None:  # fmt: skip
        self.ended = RunEnd(outcome, lines, error, lease_lost)
        if self.start is not None and self.start.lease is not None:
            self.start.lease.release([])  # as LabelJobRun does when its thread ends

    def outcome(self) -> RunEnd | None:
        return self.ended

    def cancel(self) -> None:
        if not self.stubborn:
            self.finish(Outcome.CANCELLED)

    def progress(self) -> JobProgress:
        return self._progress


class Harness:
    """A ServiceCore on a real store, with the fakes above; `runs` by job id as the core started them."""

    def __init__(self, state, cluster: FakeCluster | None = None, clock: FakeClock | None = None, **config):
        self.state, self.clock = state, clock or FakeClock()
        self.cluster = cluster or FakeCluster()
        self.config = ServiceConfig(state_uri=str(state), **config)
        self.store = JobStore(str(state))
        self.runs: dict[str, FakeRun] = {}
        self.pools_made: list[FakePool] = []
        self.started: list[str] = []

    def new_pool(self, worker, placement) -> FakePool:
        pool = FakePool(worker, placement, self.clock)
        self.pools_made.append(pool)
        return pool

    def start_run(self, kind: Kind, start: ServiceStart) -> FakeRun:
        run = self.runs[start.job_id] = FakeRun(start)
        self.started.append(start.job_id)
        return run

    def core(self) -> ServiceCore:
        """A service (a new one each call, as after a restart) on the same store, cluster and clock."""
        return ServiceCore(self.config, self.cluster, self.new_pool, store=self.store, clock=self.clock,
                           start_run=self.start_run)  # fmt: skip

    def rounds(self, core: ServiceCore, count: int = 1, seconds: float = 0.5) -> None:
        for _ in range(count):
            core.tick()
            self.clock.advance(seconds)
