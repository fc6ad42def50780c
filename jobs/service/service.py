"""The job service: a detached, named Ray actor that queues jobs, admits them as the cluster can hold them, runs them
on warm model pools and keeps every job's record in the job store.

Why a detached actor and not Ray Jobs (the job submission API): a label job's work happens in the worker actors, so
its driver is only dispatch and bookkeeping, and pools shared across jobs need one process that sees every job; Ray
Jobs would give each job its own driver process (no shared pools, 4-7 s of imports each) and needs the dashboard's
job agent, which not every cluster runs. Fine-tunes, which need process isolation, run as Ray tasks of the service.
The job store (a folder or an S3 prefix) is the truth for jobs, the outputs' done-markers for what is committed, so
the service itself holds nothing that cannot be rebuilt: killed, Ray restarts it and it continues the jobs it was
running; on a new cluster, it lists the old cluster's running jobs as interrupted, for `resume`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

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
from jobs.service.pools import WorkerPool
from jobs.service.records import (
    MASK,
    IllegalTransition,
    JobKind,
    JobRecord,
    JobState,
    advance,
    new_record,
    with_progress,
    with_waiting,
)
from jobs.service.store import JobStore

log = logging.getLogger(__name__)

TICK_S = 0.5
PROGRESS_WRITE_S = 2.0  # a running job's record is rewritten at most this often between changes of state


class JobService:
    """The service's state and policy; `service_actor()` wraps it in the detached Ray actor."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.store = JobStore(config.state_uri, config.storage)
        self.session = _cluster_session()
        self._lock = threading.RLock()
        self._specs: dict[str, object] = {}  # job id → its spec, credentials included (never written anywhere)
        self._running: dict[str, RunningJob] = {}
        self._pools: dict[str, WorkerPool] = {}
        self._job_pool: dict[str, str] = {}
        self._needs: dict[str, Needs] = {}  # fine-tunes: what each holds (pools count their own workers)
        self._label_needs: dict[str, Needs] = {}  # label jobs: the workers each may use, for growing its pool
        self._written_at: dict[str, float] = {}
        self._stopping = threading.Event()
        logging.getLogger().addHandler(StoreLogHandler(self.store))
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
                    changes = {"priority": priority, "max_workers": max_workers, "last_error": None, **pool}
                    self._put(advance(record, JobState.QUEUED, now, **changes))
                    self.store.append_log(job_id, f"{now.isoformat()} submitted again: queued\n")
                return job_id
            record = new_record(job_id, kind, spec, output=spec.output, seq=self.store.next_seq(), now=now,
                                priority=priority, max_workers=max_workers, **pool)  # fmt: skip
            self._put(record)
            line = f"; {compiling.line()}" if compiling is not None and compiling.asked == "auto" else ""
            self.store.append_log(job_id, f"{now.isoformat()} submitted ({kind.value}, priority {priority}){line}\n")
        return job_id

    def _compile_for(self, spec, max_workers: int | None) -> CompileDecision:
        """The label job's compile decision, made once at submit (jobs.service.kinds.label_compile)."""
        return label_compile(spec, _cluster(), max_workers, warm_pools=set(self._pools))

    def list(self) -> list[dict]:
        return [record.model_dump(mode="json") for record in self.store.list()]

    def status(self, job_id: str) -> dict:
        return self.store.get(job_id).model_dump(mode="json")

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            record = self.store.get(job_id)
            if record.state is JobState.RUNNING and job_id in self._running:
                self._running[job_id].cancel()  # the loop records "cancelled" once running shards have finished
                self.store.append_log(job_id, f"{_now().isoformat()} cancel requested\n")
            elif not record.state.is_terminal():
                self._put(advance(record, JobState.CANCELLED, _now(), waiting_reason=None))
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
            self._put(advance(record, JobState.QUEUED, _now(), last_error=None))
            return self.store.get(job_id).model_dump(mode="json")

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        self.store.get(job_id)  # unknown job: a clear error
        self.store.flush_logs()
        return self.store.read_log(job_id, offset)

    def describe(self) -> dict:
        with self._lock:
            queued = [r.job_id for r in self.store.list([JobState.QUEUED])]
            return {"state_uri": self.config.state_uri, "session": self.session, "pid": _pid(),
                    "node_id": ray.get_runtime_context().get_node_id(), "running": sorted(self._running),
                    "queued": queued, "pools": [pool.describe() for pool in self._pools.values()],
                    "rss_mb": _rss_mb()}  # fmt: skip

    def stop(self) -> None:
        """Stop dispatching and release the pools; running label jobs end cancelled (resume continues them)."""
        self._stopping.set()
        with self._lock:
            for run in self._running.values():
                run.cancel()
        self._thread.join(timeout=60)
        for pool in list(self._pools.values()):
            pool.close()
        self.store.close()

    # ------------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._lock:
                    self._settle_running()
                    self._admit()
                    self._grow_pools()
                    self._expire_pools()
                self.store.flush_logs()
            except Exception:  # noqa: BLE001 - one bad round (a store hiccup) must not stop the service
                log.exception("service loop round failed; trying again")
            self._stopping.wait(TICK_S)
        with self._lock:
            self._settle_running(final=True)

    def _settle_running(self, final: bool = False) -> None:
        for job_id, run in list(self._running.items()):
            record = self.store.get(job_id)
            outcome = run.outcome()
            if outcome is None and final:
                continue
            if outcome is None:
                if time.monotonic() - self._written_at.get(job_id, 0.0) >= PROGRESS_WRITE_S:
                    self._put(with_progress(record, run.progress(), _now()))
                continue
            del self._running[job_id]
            record = with_progress(record, run.progress(), _now())
            self._put(advance(record, outcome.state, _now(), last_error=outcome.error))
            text = "\n".join(outcome.summary) + ("\n" if outcome.summary else "")
            self.store.append_log(job_id, text + f"{_now().isoformat()} {outcome.state.value}\n")
            metrics.job_ended(record.kind.value, outcome.state.value)
            self._job_pool.pop(job_id, None)  # its lease is released; the pool stays warm for the next job
            self._needs.pop(job_id, None)
            self._label_needs.pop(job_id, None)

    def _admit(self) -> None:
        queued = self.store.list([JobState.QUEUED])
        metrics.queue_length(len(queued))
        if not queued:
            return
        cluster = _cluster()
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
        _request_resources([job for job in jobs if job.job_id in decision.waiting])

    def _free(self, cluster: ClusterResources) -> Resources:
        """What is free for new jobs: what Ray reports free, but never more than the cluster less what the service
        has handed out. A job just started has not taken its resources yet (its workers are still being placed):
        counting by Ray alone, the next round would give them away again, and a fine-tune's trainer could wait
        behind a warm pool for ever."""
        held = sum((p.view().per_worker.times(p.view().workers) for p in self._pools.values()), Resources())
        held += sum((self._needs[job].minimum for job in self._running if job in self._needs), Resources())
        left = Resources(cluster.cpus, cluster.gpus) - held
        ray_free = Resources(*_free())
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
        spare = self._free(_cluster())
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
        """After a restart: continue this cluster's running jobs; another cluster's are interrupted."""
        for record in self.store.list([JobState.RUNNING]):
            if record.cluster == self.session and self._spec_of(record) is not None:
                log.info("continuing %s after a service restart", record.job_id)
                self._put(advance(record, JobState.QUEUED, _now(), waiting_reason="the service restarted"))
            else:
                why = "its cluster went away" if record.cluster != self.session else "its spec held credentials"
                self._put(advance(record, JobState.INTERRUPTED, _now(), last_error=f"interrupted: {why}"))

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


# --------------------------------------------------------------------------------------------- cluster facts


def _now() -> datetime:
    return datetime.now(UTC)


def _cluster_session() -> str:
    """Identifies this Ray cluster (a new `ray start` is a new session), so a restarted service tells its own
    running jobs from those of a cluster that went away."""
    return ray.get_runtime_context().gcs_address + "/" + ray._private.worker.global_worker.node.session_name


def _cluster() -> ClusterResources:
    alive = [node for node in ray.nodes() if node.get("Alive")]
    per_node = tuple((float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in alive)
    return ClusterResources(cpus=sum(c for c, _ in per_node), gpus=sum(g for _, g in per_node), nodes=len(alive),
                            node_resources=per_node)  # fmt: skip


def _free() -> tuple[float, float]:
    free = ray.available_resources()
    return float(free.get("CPU", 0)), float(free.get("GPU", 0))


def _request_resources(waiting: list[QueuedJob]) -> None:
    """Tell the autoscaler what the waiting jobs need (a no-op on a cluster without one)."""
    bundles = [{"CPU": j.needs.per_worker.cpus, **({"GPU": j.needs.per_worker.gpus} if j.needs.per_worker.gpus else {})}
               for j in waiting for _ in range(j.needs.min_workers)]  # fmt: skip
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles or [])
    except Exception:  # noqa: BLE001 - no autoscaler here
        pass


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
