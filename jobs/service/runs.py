"""How the job service runs the built-in kinds of job (registered in jobs.kinds): what each needs from the cluster,
how it starts, how it ends, as a `RunEnd` with its `Outcome` (the service maps it to a job state, records.job_state).
- A label job runs in a thread of the service, dispatching its shards to workers leased from its model's warm
  pool: the same runner (jobs.label.runner) as `bulklabel label`, with the pool as its worker source.
- A fine-tune runs as a Ray task (its own process, so Ray Train's driver and torch stay out of the service), which
  a cancel kills; its checkpoints let `resume` continue from the last epoch. A curation job runs so too, on a CPU;
  its output is committed once, so `resume` after a kill computes it again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import ray

from jobs.cluster import ClusterResources
from jobs.errors import BadInput, InfrastructureError, exit_code_for
from jobs.label.compile_policy import CompileDecision
from jobs.label.placement import Placement, PlacementError, place_workers, resolve_compile
from jobs.output.lease import LeaseLost
from jobs.service.admission import Needs, Resources
from jobs.service.joblog import StoreLogHandler, set_current_job
from jobs.service.records import JobProgress, JobRecord
from schemas.finetune import FinetuneJobSpec
from schemas.masking import mask_text
from schemas.outcome import Outcome
from schemas.shards import ShardResult, WorkerSpec
from schemas.specs import LabelJobSpec, StorageOptions
from workers.io.storage import StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: its outcome (an `Outcome`; anything else is refused when mapped to a job state), the job
    summary's lines as `bulklabel label` prints them, the reason of a failure, and whether that failure was its
    output's lease lost (the run stalled past its expiry): it stopped before writing more, so another run is safe."""

    outcome: Outcome | str
    summary: tuple[str, ...] = ()
    error: str | None = None
    lease_lost: bool = False


class LabelProgress:
    """Counts a label job's shards as the runner reports them (jobs.progress.ProgressListener)."""

    def __init__(self, on_shard: Callable[[ShardResult], None] | None = None):
        self._lock = threading.Lock()
        self._on_shard = on_shard
        self.planned_count = self.done_count = self.images = self.errors = self.images_this_run = 0
        self._plan_complete = False
        self._started = None

    def planned(self, count: int) -> None:
        with self._lock:
            self.planned_count += count

    def plan_complete(self) -> None:
        with self._lock:
            self._plan_complete = True

    def already_complete(self, shards: int, images: int, errors: int) -> None:
        """The job found its output complete (nothing planned nor run): its figures are the manifest's."""
        with self._lock:
            self.planned_count = self.done_count = shards
            self.images, self.errors, self._plan_complete = images, errors, True

    def done(self, result: ShardResult, earlier: bool) -> None:
        with self._lock:
            self.done_count += 1
            self.images += result.rows
            self.errors += result.errors
            if not earlier:
                self._started = self._started or time.monotonic() - result.seconds
                self.images_this_run += result.rows
        if self._on_shard and not earlier:
            self._on_shard(result)

    def snapshot(self) -> JobProgress:
        """The job's progress; its shard total is known once the whole plan was counted (the plan is streamed to
        the workers as they take shards: until its end, only the shards dispatched so far are counted)."""
        with self._lock:
            seconds = time.monotonic() - self._started if self._started else 0.0
            rate = self.images_this_run / seconds if seconds > 0 else 0.0
            total = self.planned_count if self._plan_complete else None
            left = (total - self.done_count) if total is not None else None
            per_shard = self.images_this_run / max(self.done_count, 1)
            eta = left * per_shard / rate if rate > 0 and left is not None else None
            return JobProgress(shards_total=total, shards_done=self.done_count, images=self.images,
                               errors=self.errors, images_per_s=round(rate, 2),
                               eta_s=None if eta is None else round(eta, 1))  # fmt: skip


class LabelJobRun:
    """A label job running in a thread of the service on a warm pool."""

    def __init__(self, start):  # a jobs.kinds.ServiceStart (not imported: jobs.kinds imports this module)
        from jobs.label.runner import LabelRun  # the runner pulls in planning and commit: only once a job runs
        from jobs.service import metrics

        spec, job_id = start.spec, start.job_id
        self._cancel = threading.Event()
        self._lease = start.lease
        self._progress = LabelProgress(on_shard=lambda r, m=spec.model.name: metrics.shard_done(r, m))
        self._outcome: RunEnd | None = None
        run = LabelRun(show_progress=False, workers=start.lease, placement=start.placement, listener=self._progress,
                       cancelled=self._cancel.is_set, compile=start.compiling)  # fmt: skip
        self._thread = threading.Thread(target=self._run, args=(spec, run, job_id), name=f"job-{job_id}", daemon=True)
        self._thread.start()

    def _run(self, spec: LabelJobSpec, run, job_id: str) -> None:
        from jobs.label.runner import run_label_job

        set_current_job(job_id)
        try:
            summary = run_label_job(spec, run=run)
            outcome = outcome_of(summary.status)
            if outcome is Outcome.ALREADY_COMPLETE:
                self._progress.already_complete(summary.shards, summary.images, summary.errors)
            self._outcome = RunEnd(outcome, tuple(summary.lines()))
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with its reason, the service lives on
            log.exception("job %s failed", job_id)
            summary = getattr(exc, "summary", None)
            lines = tuple(summary.lines()) if summary is not None else ()
            self._outcome = RunEnd(Outcome.FAILED, lines, _one_line(exc), lease_lost=isinstance(exc, LeaseLost))
        finally:
            self._lease.release([])  # also when the job failed before it had workers: the pool may go idle
            set_current_job(None)

    def outcome(self) -> RunEnd | None:
        return self._outcome if not self._thread.is_alive() else None

    def cancel(self) -> None:
        self._cancel.set()

    def progress(self) -> JobProgress:
        return self._progress.snapshot()


class TaskJobRun:
    """A job running as a Ray task in its own process (a fine-tune: Ray Train's driver and torch stay out of the
    service; a curation job: its reading and search); cancel kills the task (and the Ray Train workers it owns).
    `run(spec, quiet)`: the kind's run in the CLI's process (jobs.kinds.Kind.run_here), a module-level function
    (Ray sends it by name). `cpus`: what the task itself holds (a fine-tune's are its Ray Train workers', so 0)."""

    def __init__(self, start, run: Callable, cpus: float = 0):  # start: a jobs.kinds.ServiceStart
        self._ref = _kind_task.options(name=f"bulklabel-{start.job_id}", num_cpus=cpus).remote(
            run, start.spec, start.job_id, start.state_uri)  # fmt: skip
        self._cancelled = False
        self._outcome: RunEnd | None = None

    def outcome(self) -> RunEnd | None:
        if self._outcome is None and ray.wait([self._ref], timeout=0)[0]:
            try:
                outcome, lines = ray.get(self._ref)
                self._outcome = RunEnd(outcome_of(outcome), tuple(lines))
            except Exception as exc:  # noqa: BLE001 - a task killed by cancel, or a failed run
                cause = getattr(exc, "cause", None) or exc
                outcome = Outcome.CANCELLED if self._cancelled else Outcome.FAILED
                self._outcome = RunEnd(outcome, (), None if self._cancelled else _one_line(cause),
                                       lease_lost=not self._cancelled and isinstance(cause, LeaseLost))  # fmt: skip
        return self._outcome

    def cancel(self) -> None:
        self._cancelled = True
        ray.cancel(self._ref, force=True)

    def progress(self) -> JobProgress:
        return JobProgress()


@ray.remote(num_cpus=0, max_retries=0)
def _kind_task(run: Callable, spec, job_id: str, state_uri: str) -> tuple[str, list[str]]:
    """Run a job in its own process, as its CLI command would; its log lines go to the job's log."""
    from jobs.service.store import JobStore

    store = JobStore(state_uri, getattr(spec, "storage", None))
    handler = StoreLogHandler(store, job_id=job_id)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        summary = run(spec, True)
        return str(summary.status), list(summary.lines())  # a Ray task's result: the outcome's value, a string
    finally:
        logging.getLogger().removeHandler(handler)
        store.close()


# ------------------------------------------------------------------------------------------------- needs


def label_needs(spec: LabelJobSpec, cluster: ClusterResources, max_workers: int | None) -> tuple[Needs, Placement]:
    """What a label job asks of the cluster: workers as placed on its nodes now (placement.py); on a cluster that
    cannot hold one yet (no CPUs, no GPUs: scaled to zero), one worker of what the spec asks, so the job waits for
    a node instead of failing."""
    try:
        placement = place_workers(spec, cluster)
    except PlacementError:
        gpu = spec.model.device == "cuda"
        placement = Placement(spec.num_workers or 1, spec.cpus_per_worker or 1.0, 1.0 if gpu else 0.0,
                              max(1, int(spec.cpus_per_worker or 1)))  # fmt: skip
    cap = min(placement.workers, max_workers or placement.workers)
    per_worker = Resources(placement.cpus_per_worker, placement.gpus_per_worker)
    return Needs.elastic(per_worker, cap), placement


def label_compile(
    spec: LabelJobSpec, cluster: ClusterResources, max_workers: int | None, warm_pools: Collection[str]
) -> CompileDecision:
    """How a label job's workers compile, decided once when it is submitted (its pool's key depends on it): for
    `compile: auto`, the policy's choice for the workers it may use, compiling being free when a warm compiled pool
    of its model runs already. Input that cannot be counted now (missing, unreachable) leaves it eager: the job's
    own checks report the problem when it runs."""
    needs, placement = label_needs(spec, cluster, max_workers)
    warm = WorkerSpec.of(spec, compile=True).pool_key() in warm_pools
    try:
        return resolve_compile(spec, replace(placement, workers=needs.max_workers), warm_compiled=warm)
    except (BadInput, InfrastructureError, StorageError) as exc:
        return CompileDecision(asked="auto", compile=False, reason=f"input not counted ({_one_line(exc)})")


def label_worker_spec(spec: LabelJobSpec, compiling: CompileDecision | None) -> WorkerSpec:
    """The worker spec of a label job with its compile decision (None: the spec's own true or false)."""
    return WorkerSpec.of(spec, compile=None if compiling is None else compiling.compile)


def finetune_needs(spec: FinetuneJobSpec, cluster: ClusterResources) -> Needs:
    """A fine-tune needs all its Ray Train workers at once, each sized as jobs.finetune sizes it (the spec's
    cpus_per_worker, else an even split of the cluster's CPUs, at least 1)."""
    cpus = spec.cpus_per_worker or max(1.0, math.floor(cluster.cpus / spec.num_workers))
    return Needs.gang(Resources(cpus, spec.gpus_per_worker), spec.num_workers)


CURATION_CPUS = 1.0  # a curation task's reading and index search: numpy and faiss on one core


def curation_needs() -> Needs:
    """A curation job is one task on one CPU."""
    return Needs.gang(Resources(CURATION_CPUS, 0.0), 1)


def curation_finished(record: JobRecord, storage: StorageOptions | None) -> bool:
    """Whether the curation output holds this job's manifest, written since the record's last start."""
    from jobs.output.results import open_result

    try:
        result = open_result(record.output, storage)
    except Exception as exc:  # noqa: BLE001 - whatever keeps the output from being read, it proves nothing
        log.info("job %s: its output %s proves no success (%s)", record.job_id, record.output, _one_line(exc))
        return False
    return (result is not None and result.manifest.job_id == record.job_id
            and (record.started_at is None or result.manifest.finished_at >= record.started_at))  # fmt: skip


def label_finished(record: JobRecord, storage: StorageOptions | None) -> bool:
    """Whether the label job's output proves that a run of it finished since the record's last start: a manifest of
    this job, succeeded, written after that start. Anything unreadable proves nothing."""
    from jobs.output.reader import open_output  # pyarrow: only when a record is in doubt

    try:
        manifest = open_output(record.output, storage).manifest
    except Exception as exc:  # noqa: BLE001 - whatever keeps the output from being read, it proves nothing
        log.info("job %s: its output %s proves no success (%s)", record.job_id, record.output, _one_line(exc))
        return False
    return (manifest is not None and manifest.job_id == record.job_id and manifest.status is Outcome.SUCCEEDED
            and (record.started_at is None or manifest.finished_at >= record.started_at))  # fmt: skip


def outcome_of(status) -> Outcome | str:
    """A summary's status (or a fine-tune task's string of it) as an `Outcome`; a status that names none is passed
    on as it is, for records.job_state to refuse (never taken for a success)."""
    try:
        return Outcome(str(status))
    except ValueError:
        return status


def _one_line(exc: BaseException) -> str:
    """The reason a job record keeps (and `status` shows): one line, credentials masked (schemas.masking)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return mask_text(f"{type(exc).__name__}: {text[:2000]} (exit code {exit_code_for(exc)})")
