"""The job service: a detached, named Ray actor that queues jobs, admits them as the cluster can hold them, runs them
on warm model pools and keeps every job's record in the job store.

Why a detached actor and not Ray Jobs (the job submission API): a label job's work happens in the worker actors, so
its driver is only dispatch and bookkeeping, and pools shared across jobs need one process that sees every job; Ray
Jobs would give each job its own driver process (no shared pools, 4-7 s of imports each) and needs the dashboard's
job agent, which not every cluster runs. Fine-tunes, which need process isolation, run as Ray tasks of the service.
The job store (a folder or an S3 prefix) is the truth for jobs, the outputs' done-markers for what is committed, so
the service itself holds nothing that cannot be rebuilt: killed, Ray restarts it and it continues the jobs it was
running. Several clusters may share one store: each record names the cluster that holds it, and what a service does
with another cluster's jobs (leave them while it lives, interrupt or take them over once it is gone, record a late
success) is jobs.service.ownership's plain logic. The Ray calls it needs are behind `ClusterFacts`, so the service
core runs in tests without a cluster.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

import ray

from jobs.cluster import ClusterResources
from jobs.label.compile_policy import CompileDecision
from jobs.service import metrics
from jobs.service.admission import ClusterView, Needs, QueuedJob, Resources, admit, idle_expired, pool_target
from jobs.service.config import ServiceConfig
from jobs.service.kinds import (
    RUNNERS,
    FinetuneJobRun,
    LabelJobRun,
    LabelProgress,
    RunningJob,
    StoreLogHandler,
    finetune_needs,
    label_compile,
    label_needs,
    label_worker_spec,
    set_current_job,
)
from jobs.service.ownership import ClusterId, Liveness, Step, decide, held_elsewhere, holds, judge, settled_state
from jobs.service.pools import WorkerPool
from jobs.service.records import (
    MASK,
    Cancellation,
    IllegalTransition,
    JobKind,
    JobRecord,
    JobState,
    advance,
    new_record,
    with_owner,
    with_progress,
    with_waiting,
)
from jobs.service.store import CorruptRecord, JobStore, UnknownJob

log = logging.getLogger(__name__)

TICK_S = 0.5
PROGRESS_WRITE_S = 2.0  # a running job's record is rewritten at most this often between changes of state
RECONCILE_S = 30.0  # how often the service looks at other clusters' jobs in a shared store (probing their GCS)
STOP_WAIT_S = 60.0  # `service stop`: how long running jobs get to finish their running shards before it records them
PROBE_CONNECT_S = 3.0  # another cluster's GCS port: refused, or silent this long (its host is down), means gone
PROBE_ANSWER_S = 5.0  # its GCS accepted a connection: how long to wait for its session name


class ClusterFacts(Protocol):
    """What the service asks of its Ray cluster (RayCluster); tests give a fake, so the core runs without Ray."""

    def identity(self) -> ClusterId: ...

    def resources(self) -> ClusterResources: ...

    def free(self) -> Resources: ...

    def request(self, waiting: list[QueuedJob]) -> None: ...

    def liveness(self, cluster: ClusterId) -> Liveness: ...

    def node_id(self) -> str: ...


class JobService:
    """The service's state and policy; `service_actor()` wraps it in the detached Ray actor."""

    def __init__(self, config: ServiceConfig, cluster: ClusterFacts | None = None):
        self.config = config
        self.store = JobStore(config.state_uri, config.storage)
        self._facts = cluster or RayCluster()
        self.cluster = self._facts.identity()
        self.session = str(self.cluster)
        self._lock = threading.RLock()
        self._specs: dict[str, object] = {}  # job id → its spec, credentials included (never written anywhere)
        self._running: dict[str, RunningJob] = {}
        self._pools: dict[str, WorkerPool] = {}
        self._job_pool: dict[str, str] = {}
        self._needs: dict[str, Needs] = {}  # fine-tunes: what each holds (pools count their own workers)
        self._label_needs: dict[str, Needs] = {}  # label jobs: the workers each may use, for growing its pool
        self._written_at: dict[str, float] = {}
        self._written: dict[str, JobRecord] = {}  # what the service last wrote of each job it holds: the truth when
        # its file turns unreadable (it is written whole again from this)
        self._cancelled_by: dict[str, Cancellation] = {}
        self._said: set[str] = set()  # warnings given once, not every tick
        self._reconciled_at = time.monotonic()
        self._stopping = threading.Event()
        self._log_handler = StoreLogHandler(self.store)
        logging.getLogger().addHandler(self._log_handler)
        logging.getLogger().setLevel(logging.INFO)
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="bulklabel-service", daemon=True)
        self._thread.start()
        log.info("job service up: state %s, cluster session %s", config.state_uri, self.session)

    # --------------------------------------------------------------------------------------- the API (actor calls)

    def submit(self, spec, priority: int = 0, max_workers: int | None = None) -> str:
        """Queue a job; returns its id. The spec was validated (and its local paths made absolute) by the caller.

        The id is the spec's own (`resolved_job_id`: a hash of what decides the output), the one `bulklabel label`
        uses for the same spec: submitting a job that is queued or running again returns it; one that ended is
        queued again, as `resume` does, and labels only what is missing.
        """
        kind = JobKind(spec.kind)
        job_id = spec.resolved_job_id()
        # Outside the lock: `compile: auto` may list the input (as far as it takes to decide), and the loop waits
        # for nothing while it does.
        compiling = self._compile_for(spec, max_workers) if kind is JobKind.LABEL else None
        pool = {"model_key": RUNNERS[kind].model_key(spec, compiling), "compile": compiling}
        with self._lock:
            now = _now()
            self._specs[job_id] = spec
            if self.store.exists(job_id) and self.store.get(job_id).state is not JobState.SUCCEEDED:
                record = self.store.get(job_id)  # (a job that succeeded is submitted anew: new input gets labelled)
                if not record.state.is_active():
                    changes = {"priority": priority, "max_workers": max_workers, "last_error": None,
                               "cluster": self.session, **pool}  # fmt: skip
                    self._put(advance(record, JobState.QUEUED, now, **changes))
                    self.store.append_log(job_id, f"{now.isoformat()} submitted again: queued\n")
                return job_id
            record = new_record(job_id, kind, spec, output=spec.output, seq=self.store.next_seq(), now=now,
                                priority=priority, max_workers=max_workers, cluster=self.session, **pool)  # fmt: skip
            self._put(record)
            line = f"; {compiling.line()}" if compiling is not None and compiling.asked == "auto" else ""
            self.store.append_log(job_id, f"{now.isoformat()} submitted ({kind.value}, priority {priority}){line}\n")
        return job_id

    def _compile_for(self, spec, max_workers: int | None) -> CompileDecision:
        """The label job's compile decision, made once at submit (jobs.service.kinds.label_compile)."""
        return label_compile(spec, self._facts.resources(), max_workers, warm_pools=set(self._pools))

    def list(self) -> list[dict]:
        return [record.model_dump(mode="json") for record in self.store.list()]

    def status(self, job_id: str) -> dict:
        return self.store.get(job_id).model_dump(mode="json")

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            record = self.store.get(job_id)
            if (elsewhere := held_elsewhere(record, self.cluster, self._facts.liveness)) is not None:
                raise IllegalTransition(f"job {job_id} is {record.state} on another cluster ({elsewhere}); cancel "
                                        f"it there (RAY_ADDRESS={elsewhere.gcs_address})")  # fmt: skip
            if record.state is JobState.RUNNING and job_id in self._running:
                self._cancelled_by[job_id] = Cancellation.BY_USER
                self._running[job_id].cancel()  # the loop records "cancelled" once running shards have finished
                self.store.append_log(job_id, f"{_now().isoformat()} cancel requested\n")
            elif not record.state.is_terminal():
                self._put(advance(record, JobState.CANCELLED, _now(), waiting_reason=None,
                                  cancelled_by=Cancellation.BY_USER))  # fmt: skip
            return self.store.get(job_id).model_dump(mode="json")

    def resume(self, job_id: str, spec=None) -> dict:
        """Queue an interrupted, cancelled, failed or partial job again: it labels only what is not committed."""
        with self._lock:
            record = self.store.get(job_id)
            # running → queued is the state machine's re-admission after a restart, not a user's resume
            if record.state.is_active() or record.state is JobState.SUCCEEDED:
                raise IllegalTransition(f"job {job_id} is {record.state}: only an interrupted, cancelled, failed or "
                                        "partial job can be resumed")  # fmt: skip
            if spec is not None:
                self._specs[job_id] = spec
            # Resumed here, it is this cluster's now (an interrupted job's cluster is gone).
            self._put(advance(record, JobState.QUEUED, _now(), last_error=None, cluster=self.session))
            return self.store.get(job_id).model_dump(mode="json")

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        self.store.get(job_id)  # unknown job: a clear error
        self.store.flush_logs()
        return self.store.read_log(job_id, offset)

    def describe(self) -> dict:
        with self._lock:
            queued = [r.job_id for r in self.store.list([JobState.QUEUED])]
            return {"state_uri": self.config.state_uri, "session": self.session, "pid": _pid(),
                    "node_id": self._facts.node_id(), "running": sorted(self._running),
                    "queued": queued, "pools": [pool.describe() for pool in self._pools.values()],
                    "rss_mb": _rss_mb()}  # fmt: skip

    def stop(self) -> dict:
        """Stop dispatching and release the pools. Running jobs are cancelled (their running shards finish, for at
        most STOP_WAIT_S) and recorded as cancelled by the stop, so they stay stopped, also when the next command
        starts a new service, until `resume`; queued jobs stay queued. Returns what became of them (for the CLI)."""
        with self._lock:
            stopped = sorted(self._running)
            for job_id, run in self._running.items():
                self._cancelled_by.setdefault(job_id, Cancellation.SERVICE_STOPPED)
                run.cancel()
        self._stopping.set()
        self._thread.join(timeout=STOP_WAIT_S + 30)
        for pool in list(self._pools.values()):
            pool.close()
        with self._lock:
            queued = [r.job_id for r in self.store.list([JobState.QUEUED]) if holds(r, self.cluster)]
            ended = [self.store.get(job_id).model_dump(mode="json") for job_id in stopped]
        logging.getLogger().removeHandler(self._log_handler)
        self.store.close()
        return {"stopped": ended, "queued": queued}

    # ------------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        # Each step on its own: one that fails (a store hiccup, a damaged record) must not keep the others, admission
        # above all, from running.
        steps = (self._settle_running, self._admit, self._grow_pools, self._expire_pools, self.store.flush_logs)
        while not self._stopping.is_set():
            for step in steps:
                self._guarded(step)
            if time.monotonic() - self._reconciled_at >= RECONCILE_S:
                self._guarded(self._reconcile_others)
            self._stopping.wait(TICK_S)
        self._guarded(self._settle_stopped)

    def _guarded(self, step) -> None:
        try:
            with self._lock:
                step()
        except Exception as exc:  # noqa: BLE001 - the service lives on; said once while the same error repeats
            self._once(f"{step.__name__}: {exc!r}", "service loop step %s failed (%s); trying again every tick",
                       step.__name__, exc, exc_info=True)  # fmt: skip

    def _once(self, key: str, message: str, *args, exc_info: bool = False) -> None:
        """A warning given once per `key` (a loop repeats every TICK_S: the log must not)."""
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args, exc_info=exc_info)

    def _settle_running(self) -> None:
        for job_id, run in list(self._running.items()):
            try:
                self._settle(job_id, run)
            except Exception as exc:  # noqa: BLE001 - one job's trouble must not hold up the others
                self._once(f"settle {job_id}: {exc!r}", "job %s: its record could not be updated (%s)", job_id, exc,
                           exc_info=True)  # fmt: skip

    def _settle(self, job_id: str, run: RunningJob) -> bool:
        """Write a running job's progress, or its end; True once it ended."""
        record = self._held_record(job_id)
        outcome = run.outcome()
        if outcome is None:
            if time.monotonic() - self._written_at.get(job_id, 0.0) >= PROGRESS_WRITE_S:
                self._put(with_progress(record, run.progress(), _now()))
            return False
        del self._running[job_id]
        self._job_pool.pop(job_id, None)  # its lease is released; the pool stays warm for the next job
        self._needs.pop(job_id, None)
        self._label_needs.pop(job_id, None)
        cancelled_by = self._cancelled_by.pop(job_id, Cancellation.BY_USER)  # (asked, but it may have ended first)
        text = "\n".join(outcome.summary) + ("\n" if outcome.summary else "")
        to = settled_state(record.state, outcome.state, lambda: self._finished(record))
        if to is None:  # someone else changed the record meanwhile (an older service judged this cluster gone)
            self.store.append_log(job_id, text + f"{_now().isoformat()} ended {outcome.state.value}; the record, "
                                  f"{record.state.value} meanwhile, is left as it is\n")  # fmt: skip
            log.warning("job %s ended %s, but its record says %s: left as it is", job_id, outcome.state, record.state)
            return True
        record = with_progress(record, run.progress(), _now())
        self._put(advance(record, to, _now(), last_error=outcome.error,
                          cancelled_by=cancelled_by if to is JobState.CANCELLED else None))  # fmt: skip
        self.store.append_log(job_id, text + f"{_now().isoformat()} {to.value}\n")
        metrics.job_ended(record.kind.value, to.value)
        return True

    def _settle_stopped(self) -> None:
        """After `stop`: wait (at most STOP_WAIT_S) for the cancelled runs to end, then record each. One still
        running then is recorded as cancelled too: its pool closes next, and what it committed stays committed."""
        deadline = time.monotonic() + STOP_WAIT_S
        while self._running and time.monotonic() < deadline:
            self._settle_running()
            time.sleep(TICK_S)
        for job_id in sorted(self._running):
            record = self._held_record(job_id)
            progress = self._running.pop(job_id).progress()
            if record.state is JobState.RUNNING:
                cancelled_by = self._cancelled_by.pop(job_id, Cancellation.SERVICE_STOPPED)
                self._put(advance(with_progress(record, progress, _now()), JobState.CANCELLED, _now(),
                                  cancelled_by=cancelled_by))  # fmt: skip
                self.store.append_log(job_id, f"{_now().isoformat()} cancelled: {cancelled_by.value}\n")

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
        cluster = self._facts.resources()
        jobs, placements = [], {}
        for record in queued:
            spec = self._spec_of(record)
            if spec is None:
                continue
            if record.kind is JobKind.LABEL:
                needs, placements[record.job_id] = label_needs(spec, cluster, record.max_workers)
                self._label_needs[record.job_id] = needs
            else:
                needs = self._needs[record.job_id] = finetune_needs(spec, cluster)
            jobs.append(QueuedJob(record.job_id, record.priority, record.seq, needs, record.kind, record.model_key))
        view = ClusterView(free=self._free(cluster), nodes=tuple(Resources(c, g) for c, g in cluster.node_resources),
                           autoscaler=self.config.autoscaler)  # fmt: skip
        decision = admit(jobs, view, [pool.view() for pool in self._pools.values()])
        for key in decision.evict:
            self._pools.pop(key).close()
        for start in decision.start:
            self._start(self.store.get(start.job_id), placements.get(start.job_id))
        for job_id, waiting in decision.waiting.items():
            record = self.store.get(job_id)
            if waiting.never:
                self._put(advance(record, JobState.FAILED, _now(), last_error=waiting.reason))
            elif record.waiting_reason != waiting.reason:
                self._put(with_waiting(record, waiting.reason, _now()))
        self._facts.request([job for job in jobs if job.job_id in decision.waiting])

    def _free(self, cluster: ClusterResources) -> Resources:
        """What is free for new jobs: what Ray reports free, but never more than the cluster less what the service
        has handed out. A job just started has not taken its resources yet (its workers are still being placed):
        counting by Ray alone, the next round would give them away again, and a fine-tune's trainer could wait
        behind a warm pool for ever."""
        held = sum((p.view().per_worker.times(p.view().workers) for p in self._pools.values()), Resources())
        held += sum((self._needs[job].minimum for job in self._running if job in self._needs), Resources())
        left = Resources(cluster.cpus, cluster.gpus) - held
        ray_free = self._facts.free()
        return Resources(min(ray_free.cpus, left.cpus), min(ray_free.gpus, left.gpus)).clipped()

    def _start(self, record: JobRecord, placement) -> None:
        spec = self._specs[record.job_id]
        set_current_job(record.job_id)
        try:
            if record.kind is JobKind.LABEL:
                # Decided at submit; a record from before decisions were kept is decided now.
                compiling = record.compile or self._compile_for(spec, record.max_workers)
                pool = self._pool_for(spec, placement, compiling)
                self._job_pool[record.job_id] = pool.key
                progress = LabelProgress(on_shard=lambda r, m=spec.model.name: metrics.shard_done(r, m))
                cap = self._label_needs[record.job_id].max_workers
                # It starts on one worker; the rest come as the pool grows (_grow_pools) and it takes them.
                run = LabelJobRun(spec, pool.lease(record.job_id, cap), replace(pool.placement, workers=1), progress,
                                  record.job_id, compiling)  # fmt: skip
            else:
                run = FinetuneJobRun(spec, record.job_id, self.config.state_uri)
            self._running[record.job_id] = run
            self._put(advance(record, JobState.RUNNING, _now(), cluster=self.session))
            log.info("started %s %s", record.kind.value, record.job_id)
        finally:
            set_current_job(None)

    def _pool_for(self, spec, placement, compiling: CompileDecision) -> WorkerPool:
        worker = label_worker_spec(spec, compiling)
        pool = self._pools.get(worker.pool_key())
        if pool is None:
            pool = self._pools[worker.pool_key()] = WorkerPool(worker, placement)
        return pool

    def _grow_pools(self) -> None:
        """Pools of running jobs grow to what their jobs may use, as far as free resources allow: nodes that join
        get workers, and jobs take them (PoolLease.grow)."""
        if not self._pools:
            return
        spare = self._free(self._facts.resources())
        for key, pool in self._pools.items():
            jobs = [QueuedJob(job, 0, 0, self._label_needs[job]) for job, k in self._job_pool.items()
                    if k == key and job in self._label_needs]  # fmt: skip
            view = pool.view()
            target = pool_target(view, jobs, spare)
            if jobs and target > view.workers:
                log.info("growing the %s pool from %d to %d workers", key, view.workers, target)
                pool.grow_to(target)
                spare = (spare - view.per_worker.times(target - view.workers)).clipped()

    def _expire_pools(self) -> None:
        now = time.monotonic()
        for key, pool in list(self._pools.items()):
            if idle_expired(pool.view(), now, self.config.pool_idle_s):
                self._pools.pop(key).close()
        metrics.pools({key: pool.view().workers for key, pool in self._pools.items()})

    # --------------------------------------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """At start: continue this cluster's running jobs; another cluster's are left to it while it lives,
        interrupted (or taken over, when queued) once it is gone; a job judged lost whose output proves it finished
        is recorded as succeeded."""
        active = (JobState.RUNNING, JobState.QUEUED, JobState.INTERRUPTED)
        self._reconcile([r for r in self._readable_records() if r.state in active])

    def _reconcile_others(self) -> None:
        """Every RECONCILE_S: other clusters' running and queued jobs, in case their cluster went away since."""
        self._reconciled_at = time.monotonic()
        active = (JobState.RUNNING, JobState.QUEUED)
        self._reconcile([r for r in self._readable_records() if r.state in active and not holds(r, self.cluster)])

    def _readable_records(self) -> list[JobRecord]:
        # Every record file, not the writer's index: other clusters' services write to the store too.
        return self.store.list()

    def _reconcile(self, records: list[JobRecord]) -> None:
        seen: dict[ClusterId, Liveness] = {}

        def liveness(cluster: ClusterId) -> Liveness:  # each cluster probed once a round
            if cluster not in seen:
                seen[cluster] = self._facts.liveness(cluster)
                log.info("cluster %s: %s", cluster, seen[cluster])
            return seen[cluster]

        for record in records:
            try:
                decision = decide(record, self.cluster, liveness, running_here=record.job_id in self._running,
                                  rebuildable=lambda r=record: self._spec_of(r) is not None,
                                  proven=lambda r=record: self._finished(r))  # fmt: skip
                self._apply(record, decision)
            except Exception as exc:  # noqa: BLE001 - one job in doubt must not stop the service or the others
                self._once(f"reconcile {record.job_id}: {exc!r}", "job %s: could not be reconciled (%s)",
                           record.job_id, exc, exc_info=True)  # fmt: skip

    def _apply(self, record: JobRecord, decision) -> None:
        now, job_id = _now(), record.job_id
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
            self._put(advance(record, JobState.QUEUED, now, waiting_reason=decision.reason))
        elif decision.step is Step.INTERRUPT:
            self._put(advance(record, JobState.INTERRUPTED, now, last_error=decision.reason))
        elif decision.step is Step.ADOPT:
            self._put(with_owner(record, self.session, decision.reason, now))
        elif decision.step is Step.SUCCEED:
            self._put(advance(record, JobState.SUCCEEDED, now, last_error=None))
        self.store.append_log(job_id, f"{now.isoformat()} {decision.step.value}: {decision.reason}\n")

    def _finished(self, record: JobRecord) -> bool:
        """Whether the job's output proves its last run finished (a late success), by its kind's own test."""
        storage = getattr(self._specs.get(record.job_id), "storage", None)
        return RUNNERS[record.kind].finished(record, storage)

    def _spec_of(self, record: JobRecord):
        """The job's spec: in memory since submit, else from its record (which holds no credentials: a spec that
        had some cannot be rebuilt, and the job needs `resume` with the spec again)."""
        if record.job_id in self._specs:
            return self._specs[record.job_id]
        if f'"{MASK}"' in record.model_dump_json(include={"spec"}):
            return None
        spec = RUNNERS[record.kind].spec_class.model_validate(record.spec)
        self._specs[record.job_id] = spec
        return spec

    def _put(self, record: JobRecord) -> None:
        self.store.put(record)
        self._written_at[record.job_id] = time.monotonic()
        if record.state.is_active():
            self._written[record.job_id] = record
        else:
            self._written.pop(record.job_id, None)


# --------------------------------------------------------------------------------------------- cluster facts


def _now() -> datetime:
    return datetime.now(UTC)


class RayCluster:
    """ClusterFacts of the Ray cluster this process is connected to."""

    def identity(self) -> ClusterId:
        """This cluster's life (a new `ray start` is a new session): a service tells its own jobs from those of
        another cluster sharing the store, or of one that went away."""
        return ClusterId(ray.get_runtime_context().gcs_address, ray._private.worker.global_worker.node.session_name)

    def resources(self) -> ClusterResources:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        per_node = tuple((float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in alive)
        return ClusterResources(cpus=sum(c for c, _ in per_node), gpus=sum(g for _, g in per_node),
                                nodes=len(alive), node_resources=per_node)  # fmt: skip

    def free(self) -> Resources:
        free = ray.available_resources()
        return Resources(float(free.get("CPU", 0)), float(free.get("GPU", 0)))

    def request(self, waiting: list[QueuedJob]) -> None:
        """Tell the autoscaler what the waiting jobs need (a no-op on a cluster without one)."""
        bundles = [{"CPU": j.needs.per_worker.cpus,
                    **({"GPU": j.needs.per_worker.gpus} if j.needs.per_worker.gpus else {})}
                   for j in waiting for _ in range(j.needs.min_workers)]  # fmt: skip
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles or [])
        except Exception:  # noqa: BLE001 - no autoscaler here
            pass

    def liveness(self, cluster: ClusterId) -> Liveness:
        return probe_cluster(cluster)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def probe_cluster(cluster: ClusterId) -> Liveness:
    """Whether another cluster lives: a TCP connection to its GCS address (refused or silent for PROBE_CONNECT_S:
    gone), then its session name from the GCS's key-value store (another session: a new cluster there, so gone).
    Bounded: Ray's GCS client waits long for an address that does not answer, so it asks from a thread."""
    host, _, port = cluster.gcs_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_CONNECT_S):
            pass
    except (OSError, ValueError):
        return judge(cluster, reachable=False, session=None)
    answer: list[str] = []

    def ask() -> None:
        try:
            from ray._raylet import GcsClient

            name = GcsClient(address=cluster.gcs_address).internal_kv_get(b"session_name", b"session",
                                                                          timeout=PROBE_ANSWER_S)  # fmt: skip
            if name:
                answer.append(name.decode())
        except Exception as exc:  # noqa: BLE001 - any failure to answer leaves it unknown
            log.info("cluster %s does not say its session: %s", cluster, exc)

    asking = threading.Thread(target=ask, name="bulklabel-probe", daemon=True)
    asking.start()
    asking.join(PROBE_ANSWER_S + 1)
    return judge(cluster, reachable=True, session=answer[0] if answer else None)


def _pid() -> int:
    import os

    return os.getpid()


def _rss_mb() -> float | None:
    """The service process's resident memory now (not its peak, which `ru_maxrss` gives), from /proc (Linux, as
    Ray's nodes are); None where there is no /proc."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
