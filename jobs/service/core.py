"""The job service's core as plain logic: submit, cancel, resume, and the rounds that settle running jobs, admit
queued ones, grow and release warm pools, and look at other clusters' jobs. No Ray here: the cluster is a
`ClusterFacts`, pools come from a factory, runs start through their kind (jobs.kinds), and time is an injected
`Clock`, so tests drive a round at a time in milliseconds. jobs.service.service wraps it in a thread and a lock and
hands it the Ray-backed parts.

The job store is the truth for jobs, the outputs' done-markers for rows: the core holds nothing that cannot be
rebuilt from them. What it does with another cluster's jobs is jobs.service.ownership's plain logic; which job starts
next, jobs.service.admission's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from jobs import kinds
from jobs.kinds import Kind, ServiceStart
from jobs.service import metrics
from jobs.service.admission import ClusterView, Needs, QueuedJob, Resources, WarmPool, admit, idle_expired, pool_target
from jobs.service.config import ServiceConfig
from jobs.service.joblog import set_current_job
from jobs.service.ownership import ClusterId, Liveness, Step, decide, held_elsewhere, holds, settled_state
from jobs.service.records import (
    MASK,
    Cancellation,
    IllegalTransition,
    JobProgress,
    JobRecord,
    JobState,
    UnmappedOutcome,
    advance,
    job_state,
    new_record,
    with_owner,
    with_progress,
    with_waiting,
)
from jobs.service.store import CorruptRecord, JobStore, UnknownJob

if TYPE_CHECKING:
    from jobs.cluster import ClusterResources  # (it imports Ray: the core does not)

log = logging.getLogger(__name__)

TICK_S = 0.5
PROGRESS_WRITE_S = 2.0  # a running job's record is rewritten at most this often between changes of state
RECONCILE_S = 30.0  # how often the service looks at other clusters' jobs in a shared store (probing their GCS)
LEASE_LOST_ATTEMPTS = 3  # runs of a job that may end with its output's lease lost (a stall) before it is failed
STOP_WAIT_S = 60.0  # `service stop`: how long running jobs get to finish their running shards before it records them


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ClusterFacts(Protocol):
    """What the service asks of its Ray cluster (service.RayCluster); tests give a fake."""

    def identity(self) -> ClusterId: ...

    def resources(self) -> ClusterResources: ...

    def free(self) -> Resources: ...

    def request(self, waiting: list[QueuedJob]) -> None: ...

    def liveness(self, cluster: ClusterId) -> Liveness: ...

    def node_id(self) -> str: ...


class Pool(Protocol):
    """A warm model pool as the core uses it (jobs.service.pools.WorkerPool)."""

    key: str
    placement: Any

    def view(self) -> WarmPool: ...

    def lease(self, job_id: str, cap: int | None = None) -> Any: ...

    def grow_to(self, workers: int) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> dict: ...


class RunningJob(Protocol):
    def outcome(self) -> Any:
        """How it ended (jobs.service.runs.RunEnd), or None while it runs."""

    def cancel(self) -> None: ...

    def progress(self) -> JobProgress: ...


PoolFactory = Callable[[Any, Any], Pool]  # (WorkerSpec, Placement) → a new pool
StartRun = Callable[[Kind, ServiceStart], RunningJob]


def start_in_service(kind: Kind, start: ServiceStart) -> RunningJob:
    """Runs start as their kind starts them."""
    return kind.start_in_service(start)


@dataclass(frozen=True)
class Stopping:
    """What `stop` found: the jobs it cancelled (recorded once their runs end)."""

    stopped: tuple[str, ...]


class ServiceCore:
    """The service's state and policy. Not thread-safe: its shell calls it under one lock."""

    def __init__(self, config: ServiceConfig, facts: ClusterFacts, pools: PoolFactory, *, store: JobStore | None = None,
                 clock: Clock | None = None, start_run: StartRun = start_in_service):  # fmt: skip
        self.config = config
        self.store = store or JobStore(config.state_uri, config.storage)
        self.facts = facts
        self.clock = clock or SystemClock()
        self._new_pool = pools
        self._start_run = start_run
        self.cluster = facts.identity()
        self.session = str(self.cluster)
        self._specs: dict[str, object] = {}  # job id → its spec, credentials included (never written anywhere)
        self.running: dict[str, RunningJob] = {}
        self.pools: dict[str, Pool] = {}
        self._job_pool: dict[str, str] = {}  # a pooled job → its pool's key
        # Each queued or running job's needs (admission). A running pooled job's resources are its pool's workers,
        # counted by the pool; a job without a pool holds its minimum itself.
        self._needs: dict[str, Needs] = {}
        self._written_at: dict[str, float] = {}
        self._written: dict[str, JobRecord] = {}  # what the core last wrote of each job it holds: the truth when
        # its file turns unreadable (it is written whole again from this)
        self._cancelled_by: dict[str, Cancellation] = {}
        self._said: set[str] = set()  # warnings given once, not every tick
        self._reconciled_at = self.clock.monotonic()
        self._recover()

    # ------------------------------------------------------------------------------------------------- the API

    def decide_compile(self, spec, max_workers: int | None):
        """A job's compile decision, made once at submit by its kind (None: its kind decides none). It may list
        the input, so the shell calls it outside its lock."""
        kind = kinds.kind_of(spec)
        if kind.decide_compile is None:
            return None
        return kind.decide_compile(spec, self.facts.resources(), max_workers, set(self.pools))

    _UNDECIDED = object()

    def submit(self, spec, priority: int = 0, max_workers: int | None = None, compiling=_UNDECIDED) -> str:
        """Queue a job; returns its id. The spec was validated (and its local paths made absolute) by the caller.

        The id is the spec's own (`resolved_job_id`: a hash of what decides the output), the one `bulklabel label`
        uses for the same spec: submitting a job that is queued or running again returns it; one that ended is
        queued again, as `resume` does, and does only what is missing.
        """
        kind = kinds.kind_of(spec)
        if compiling is self._UNDECIDED:
            compiling = self.decide_compile(spec, max_workers)
        job_id = spec.resolved_job_id()
        pool = {"model_key": kind.pool_key(spec, compiling), "compile": compiling}
        now = self.clock.now()
        self._specs[job_id] = spec
        if self.store.exists(job_id) and self.store.get(job_id).state is not JobState.SUCCEEDED:
            record = self.store.get(job_id)  # (a job that succeeded is submitted anew: new input gets labelled)
            if not record.state.is_active():
                changes = {"priority": priority, "max_workers": max_workers, "last_error": None,
                           "cluster": self.session, **pool}  # fmt: skip
                self.put(advance(record, JobState.QUEUED, now, **changes))
                self.store.append_log(job_id, f"{now.isoformat()} submitted again: queued\n")
            return job_id
        record = new_record(job_id, kind.name, spec, output=spec.output, seq=self.store.next_seq(), now=now,
                            priority=priority, max_workers=max_workers, cluster=self.session, **pool)  # fmt: skip
        self.put(record)
        line = f"; {compiling.line()}" if compiling is not None and compiling.asked == "auto" else ""
        self.store.append_log(job_id, f"{now.isoformat()} submitted ({kind.name}, priority {priority}){line}\n")
        return job_id

    def cancel(self, job_id: str) -> dict:
        record = self.store.get(job_id)
        if (elsewhere := held_elsewhere(record, self.cluster, self.facts.liveness)) is not None:
            raise IllegalTransition(f"job {job_id} is {record.state} on another cluster ({elsewhere}); cancel "
                                    f"it there (RAY_ADDRESS={elsewhere.gcs_address})")  # fmt: skip
        if record.state is JobState.RUNNING and job_id in self.running:
            self._cancelled_by[job_id] = Cancellation.BY_USER
            self.running[job_id].cancel()  # the next round records "cancelled" once running shards have finished
            self.store.append_log(job_id, f"{self.clock.now().isoformat()} cancel requested\n")
        elif not record.state.is_terminal():
            self.put(advance(record, JobState.CANCELLED, self.clock.now(), waiting_reason=None,
                             cancelled_by=Cancellation.BY_USER))  # fmt: skip
        return self.store.get(job_id).model_dump(mode="json")

    def resume(self, job_id: str, spec=None) -> dict:
        """Queue an interrupted, cancelled, failed or partial job again: it does only what is not committed."""
        record = self.store.get(job_id)
        # running → queued is the state machine's re-admission after a restart, not a user's resume
        if record.state.is_active() or record.state is JobState.SUCCEEDED:
            raise IllegalTransition(f"job {job_id} is {record.state}: only an interrupted, cancelled, failed or "
                                    "partial job can be resumed")  # fmt: skip
        if spec is not None:
            self._specs[job_id] = spec
        # Resumed here, it is this cluster's now (an interrupted job's cluster is gone).
        self.put(advance(record, JobState.QUEUED, self.clock.now(), last_error=None, cluster=self.session))
        return self.store.get(job_id).model_dump(mode="json")

    def describe(self) -> dict:
        queued = [r.job_id for r in self.store.list([JobState.QUEUED])]
        return {"state_uri": self.config.state_uri, "session": self.session, "pid": os.getpid(),
                "node_id": self.facts.node_id(), "running": sorted(self.running),
                "queued": queued, "pools": [pool.describe() for pool in self.pools.values()],
                "rss_mb": _rss_mb()}  # fmt: skip

    def stop(self) -> Stopping:
        """Stop: running jobs are cancelled and, once their runs end (settle_stopped), recorded as cancelled by the
        stop, so they stay stopped, also under the next service, until `resume`; queued jobs stay queued."""
        for job_id, run in self.running.items():
            self._cancelled_by.setdefault(job_id, Cancellation.SERVICE_STOPPED)
            run.cancel()
        return Stopping(tuple(sorted(self.running)))

    def stopped(self, stopping: Stopping) -> dict:
        """After settle_stopped and close_pools: what became of the jobs (for the CLI)."""
        queued = [r.job_id for r in self.store.list([JobState.QUEUED]) if holds(r, self.cluster)]
        ended = [self.store.get(job_id).model_dump(mode="json") for job_id in stopping.stopped]
        return {"stopped": ended, "queued": queued}

    def close_pools(self) -> None:
        for pool in list(self.pools.values()):
            pool.close()

    # ------------------------------------------------------------------------------------------------ a round

    def tick(self) -> None:
        """One round: settle, admit, grow pools, release idle ones, flush logs; other clusters' jobs when due."""
        # Each step on its own: one that fails (a store hiccup, a damaged record) must not keep the others, admission
        # above all, from running.
        for step in (self._settle_running, self._admit, self._grow_pools, self._expire_pools, self.store.flush_logs):
            self.guarded(step)
        if self.clock.monotonic() - self._reconciled_at >= RECONCILE_S:
            self.guarded(self._reconcile_others)

    def settle_stopped(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """After `stop`: wait (at most STOP_WAIT_S) for the cancelled runs to end, then record each. One still
        running then is recorded as cancelled too: its pool closes next, and what it committed stays committed."""
        deadline = self.clock.monotonic() + STOP_WAIT_S
        while self.running and self.clock.monotonic() < deadline:
            self.guarded(self._settle_running)
            sleep(TICK_S)
        for job_id in sorted(self.running):
            record = self._held_record(job_id)
            progress = self.running.pop(job_id).progress()
            if record.state is JobState.RUNNING:
                now = self.clock.now()
                cancelled_by = self._cancelled_by.pop(job_id, Cancellation.SERVICE_STOPPED)
                self.put(advance(with_progress(record, progress, now), JobState.CANCELLED, now,
                                 cancelled_by=cancelled_by))  # fmt: skip
                self.store.append_log(job_id, f"{now.isoformat()} cancelled: {cancelled_by.value}\n")

    def guarded(self, step) -> None:
        """Run one step; its failure is logged (once while it repeats), never raised: the service lives on."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the service lives on; said once while the same error repeats
            self._once(f"{step.__name__}: {exc!r}", "service loop step %s failed (%s); trying again every tick",
                       step.__name__, exc, exc_info=True)  # fmt: skip

    def _once(self, key: str, message: str, *args, exc_info: bool = False) -> None:
        """A warning given once per `key` (a round repeats every TICK_S: the log must not)."""
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args, exc_info=exc_info)

    def _settle_running(self) -> None:
        for job_id, run in list(self.running.items()):
            try:
                self._settle(job_id, run)
            except Exception as exc:  # noqa: BLE001 - one job's trouble must not hold up the others
                self._once(f"settle {job_id}: {exc!r}", "job %s: its record could not be updated (%s)", job_id, exc,
                           exc_info=True)  # fmt: skip

    def _settle(self, job_id: str, run: RunningJob) -> bool:
        """Write a running job's progress, or its end; True once it ended."""
        record = self._held_record(job_id)
        end = run.outcome()
        now = self.clock.now()
        if end is None:
            if self.clock.monotonic() - self._written_at.get(job_id, float("-inf")) >= PROGRESS_WRITE_S:
                self.put(with_progress(record, run.progress(), now))
            return False
        error = end.error
        try:
            ended = job_state(end.outcome)
        except UnmappedOutcome as exc:  # a bug: recorded as the failure it is, never as a success
            log.error("job %s: %s", job_id, exc)
            ended, error = JobState.FAILED, f"internal error: {exc} (exit code 4)"
        del self.running[job_id]
        self._job_pool.pop(job_id, None)  # its lease is released; the pool stays warm for the next job
        self._needs.pop(job_id, None)
        cancelled_by = self._cancelled_by.pop(job_id, Cancellation.BY_USER)  # (asked, but it may have ended first)
        text = "\n".join(end.summary) + ("\n" if end.summary else "")
        if end.lease_lost and record.state is JobState.RUNNING and record.attempts < LEASE_LOST_ATTEMPTS:
            # The run stalled past its lease and stopped before writing more: what it committed stands, and the
            # next run (done-markers) labels only the rest. Queued again, it is admitted like any other job.
            log.warning("job %s: %s; queued to run again (attempt %d of %d)", job_id, error, record.attempts + 1,
                        LEASE_LOST_ATTEMPTS)  # fmt: skip
            self.put(advance(with_progress(record, run.progress(), now), JobState.QUEUED, now, last_error=error))
            self.store.append_log(job_id, text + f"{now.isoformat()} queued again: {error}\n")
            return True
        to = settled_state(record.state, ended, lambda: self._finished(record))
        if to is None:  # someone else changed the record meanwhile (an older service judged this cluster gone)
            self.store.append_log(job_id, text + f"{now.isoformat()} ended {ended.value}; the record, "
                                  f"{record.state.value} meanwhile, is left as it is\n")  # fmt: skip
            log.warning("job %s ended %s, but its record says %s: left as it is", job_id, ended, record.state)
            return True
        record = with_progress(record, run.progress(), now)
        self.put(advance(record, to, now, last_error=error,
                         cancelled_by=cancelled_by if to is JobState.CANCELLED else None))  # fmt: skip
        self.store.append_log(job_id, text + f"{now.isoformat()} {to.value}\n")
        metrics.job_ended(record.kind, to.value)
        return True

    def _held_record(self, job_id: str) -> JobRecord:
        """The record of a job this service runs. Its file unreadable (damaged, removed by hand), what the service
        last wrote stands in, and the next write puts it back whole."""
        try:
            return self.store.get(job_id)
        except (CorruptRecord, UnknownJob) as exc:
            if job_id not in self._written:
                raise
            self._once(f"held {job_id}", "job %s: its record is unreadable (%s); writing it again from the "
                       "service's own copy", job_id, exc)  # fmt: skip
            return self._written[job_id]

    def _admit(self) -> None:
        queued = [r for r in self.store.list([JobState.QUEUED]) if holds(r, self.cluster)]
        metrics.queue_length(len(queued))
        if not queued:
            return
        cluster = self.facts.resources()
        jobs, placements = [], {}
        for record in queued:
            spec = self._spec_of(record)
            if spec is None:
                continue
            needs, placements[record.job_id] = kinds.get(record.kind).needs(spec, cluster, record.max_workers)
            self._needs[record.job_id] = needs
            jobs.append(QueuedJob(record.job_id, record.priority, record.seq, needs, record.kind, record.model_key))
        view = ClusterView(free=self._free(cluster), nodes=tuple(Resources(c, g) for c, g in cluster.node_resources),
                           autoscaler=self.config.autoscaler)  # fmt: skip
        decision = admit(jobs, view, [pool.view() for pool in self.pools.values()])
        for key in decision.evict:
            self.pools.pop(key).close()
        for start in decision.start:
            self._start(self.store.get(start.job_id), placements.get(start.job_id))
        for job_id, waiting in decision.waiting.items():
            record = self.store.get(job_id)
            if waiting.never:
                self.put(advance(record, JobState.FAILED, self.clock.now(), last_error=waiting.reason))
            elif record.waiting_reason != waiting.reason:
                self.put(with_waiting(record, waiting.reason, self.clock.now()))
        self.facts.request([job for job in jobs if job.job_id in decision.waiting])

    def _free(self, cluster: ClusterResources) -> Resources:
        """What is free for new jobs: what Ray reports free, but never more than the cluster less what the service
        has handed out. A job just started has not taken its resources yet (its workers are still being placed):
        counting by Ray alone, the next round would give them away again, and a fine-tune's trainer could wait
        behind a warm pool for ever."""
        held = sum((p.view().per_worker.times(p.view().workers) for p in self.pools.values()), Resources())
        held += sum((self._needs[job].minimum for job in self.running
                     if job in self._needs and job not in self._job_pool), Resources())  # fmt: skip
        left = Resources(cluster.cpus, cluster.gpus) - held
        ray_free = self.facts.free()
        return Resources(min(ray_free.cpus, left.cpus), min(ray_free.gpus, left.gpus)).clipped()

    def _start(self, record: JobRecord, placement) -> None:
        spec, kind = self._specs[record.job_id], kinds.get(record.kind)
        set_current_job(record.job_id)
        try:
            # Decided at submit; a record from before decisions were kept is decided now.
            compiling = record.compile or self.decide_compile(spec, record.max_workers)
            start = ServiceStart(spec, record.job_id, self.config.state_uri, compiling=compiling)
            if kind.worker_spec is not None:
                pool = self._pool_for(kind.worker_spec(spec, compiling), placement)
                self._job_pool[record.job_id] = pool.key
                # It starts on one worker; the rest come as the pool grows (_grow_pools) and it takes them.
                start = replace(start, lease=pool.lease(record.job_id, self._needs[record.job_id].max_workers),
                                placement=replace(pool.placement, workers=1))  # fmt: skip
            self.running[record.job_id] = self._start_run(kind, start)
            self.put(advance(record, JobState.RUNNING, self.clock.now(), cluster=self.session))
            log.info("started %s %s", record.kind, record.job_id)
        finally:
            set_current_job(None)

    def _pool_for(self, worker, placement) -> Pool:
        pool = self.pools.get(worker.pool_key())
        if pool is None:
            pool = self.pools[worker.pool_key()] = self._new_pool(worker, placement)
        return pool

    def _grow_pools(self) -> None:
        """Pools of running jobs grow to what their jobs may use, as far as free resources allow: nodes that join
        get workers, and jobs take them (PoolLease.grow)."""
        if not self.pools:
            return
        spare = self._free(self.facts.resources())
        for key, pool in self.pools.items():
            jobs = [QueuedJob(job, 0, 0, self._needs[job]) for job, k in self._job_pool.items()
                    if k == key and job in self._needs]  # fmt: skip
            view = pool.view()
            target = pool_target(view, jobs, spare)
            if jobs and target > view.workers:
                log.info("growing the %s pool from %d to %d workers", key, view.workers, target)
                pool.grow_to(target)
                spare = (spare - view.per_worker.times(target - view.workers)).clipped()

    def _expire_pools(self) -> None:
        now = self.clock.monotonic()
        for key, pool in list(self.pools.items()):
            if idle_expired(pool.view(), now, self.config.pool_idle_s):
                self.pools.pop(key).close()
        metrics.pools({key: pool.view().workers for key, pool in self.pools.items()})

    # --------------------------------------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """At start: continue this cluster's running jobs; another cluster's are left to it while it lives,
        interrupted (or taken over, when queued) once it is gone; a job judged lost whose output proves it finished
        is recorded as succeeded."""
        active = (JobState.RUNNING, JobState.QUEUED, JobState.INTERRUPTED)
        self._reconcile([r for r in self.store.list() if r.state in active])

    def _reconcile_others(self) -> None:
        """Every RECONCILE_S: other clusters' running and queued jobs, in case their cluster went away since."""
        self._reconciled_at = self.clock.monotonic()
        active = (JobState.RUNNING, JobState.QUEUED)
        # Every record file, not the writer's index: other clusters' services write to the store too.
        self._reconcile([r for r in self.store.list() if r.state in active and not holds(r, self.cluster)])

    def _reconcile(self, records: list[JobRecord]) -> None:
        seen: dict[ClusterId, Liveness] = {}

        def liveness(cluster: ClusterId) -> Liveness:  # each cluster probed once a round
            if cluster not in seen:
                seen[cluster] = self.facts.liveness(cluster)
                log.info("cluster %s: %s", cluster, seen[cluster])
            return seen[cluster]

        for record in records:
            try:
                decision = decide(record, self.cluster, liveness, running_here=record.job_id in self.running,
                                  rebuildable=lambda r=record: self._spec_of(r) is not None,
                                  proven=lambda r=record: self._finished(r))  # fmt: skip
                self._apply(record, decision)
            except Exception as exc:  # noqa: BLE001 - one job in doubt must not stop the service or the others
                self._once(f"reconcile {record.job_id}: {exc!r}", "job %s: could not be reconciled (%s)",
                           record.job_id, exc, exc_info=True)  # fmt: skip

    def _apply(self, record: JobRecord, decision) -> None:
        now, job_id = self.clock.now(), record.job_id
        if decision.step is Step.KEEP:
            return
        if decision.step is Step.LEAVE:
            self._once(f"leave {job_id} {record.cluster}", "job %s: %s; left to that cluster's service", job_id,
                       decision.reason)  # fmt: skip
            return
        if self.store.get(job_id).updated_at != record.updated_at:  # changed since it was read: next round
            return
        log.info("job %s: %s (%s)", job_id, decision.step, decision.reason)
        if decision.step is Step.REQUEUE:
            self.put(advance(record, JobState.QUEUED, now, waiting_reason=decision.reason))
        elif decision.step is Step.INTERRUPT:
            self.put(advance(record, JobState.INTERRUPTED, now, last_error=decision.reason))
        elif decision.step is Step.ADOPT:
            self.put(with_owner(record, self.session, decision.reason, now))
        elif decision.step is Step.SUCCEED:
            self.put(advance(record, JobState.SUCCEEDED, now, last_error=None))
        self.store.append_log(job_id, f"{now.isoformat()} {decision.step.value}: {decision.reason}\n")

    def _finished(self, record: JobRecord) -> bool:
        """Whether the job's output proves its last run finished (a late success), by its kind's own test."""
        storage = getattr(self._specs.get(record.job_id), "storage", None)
        return kinds.get(record.kind).finished(record, storage)

    def _spec_of(self, record: JobRecord):
        """The job's spec: in memory since submit, else from its record (which holds no credentials: a spec that
        had some cannot be rebuilt, and the job needs `resume` with the spec again)."""
        if record.job_id in self._specs:
            return self._specs[record.job_id]
        if f'"{MASK}"' in record.model_dump_json(include={"spec"}):
            return None
        spec = kinds.get(record.kind).spec_class.model_validate(record.spec)
        self._specs[record.job_id] = spec
        return spec

    def put(self, record: JobRecord) -> None:
        """Write a record the service holds, keeping its own copy while the job is active."""
        self.store.put(record)
        self._written_at[record.job_id] = self.clock.monotonic()
        if record.state.is_active():
            self._written[record.job_id] = record
        else:
            self._written.pop(record.job_id, None)


def _rss_mb() -> float | None:
    """The service process's resident memory now (not its peak, which `ru_maxrss` gives), from /proc (Linux, as
    Ray's nodes are); None where there is no /proc."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
