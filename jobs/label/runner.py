"""Run a label job: check → plan → dispatch → commit.

Everything that can be checked is checked before a worker starts: the spec (pydantic), the
model and weights names, the input listing and the output location.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from jobs.cluster import ensure_ray
from jobs.label.actors import start_label_worker
from jobs.label.compile_policy import CompileDecision
from jobs.label.dispatch import ShardDispatcher, WorkerSource
from jobs.label.ledger import LedgerLimits
from jobs.label.placement import Placement, check_locations_reachable, place_workers, resolve_compile
from jobs.label.plan import PlanError, PlanStats, plan_shards
from jobs.label.warm import keep_seconds_from_env, workers_for
from jobs.locations import label_locations
from jobs.output.markers import CommittedShards, error_summary
from jobs.output.session import OutputSession
from jobs.progress import JobSummary, Progress, ProgressListener, Skipped
from schemas.catalog import class_names
from schemas.outcome import Outcome
from schemas.output import JobManifest
from schemas.shards import ShardJob, ShardResult, ShardTask, StageSeconds, WorkerSpec
from schemas.specs import LabelJobSpec
from workers import faults
from workers.finetune.artifacts import card_of
from workers.io.storage import open_storage

log = logging.getLogger(__name__)
COUNT_REST_S = 30.0  # a cancelled job counts the rest of its plan (a listing) for at most this long


class JobFailed(RuntimeError):
    """More shards failed than the spec allows; the summary names each one."""

    def __init__(self, summary: JobSummary):
        super().__init__("\n".join(summary.lines()))
        self.summary = summary


@dataclass(frozen=True)
class LabelRun:
    """How a label job runs: alone, from the CLI (its own workers, a progress bar), or inside the job service
    (workers from a warm pool shared with other jobs on the same model, progress reported to the job's record)."""

    show_progress: bool = True
    workers: WorkerSource | None = None  # None: the job's own workers, started for it and killed at its end
    placement: Placement | None = None  # None: placed on the cluster as it is now (place_workers)
    listener: ProgressListener | None = None
    cancelled: Callable[[], bool] = lambda: False  # checked between shards: once true, nothing new is dispatched
    # How the workers compile (`compile: auto` decided): the service's, made when it chose the pool; None: decided
    # here from the placement and the plan (jobs.label.placement.resolve_compile).
    compile: CompileDecision | None = None
    # Seconds the job's own workers are kept after it, for the next job in this process on the same model
    # (jobs.label.warm); None: $BULKLABEL_KEEP_WORKERS_S, unset meaning 0 (killed at the job's end).
    keep_workers_s: float | None = None


def run_label_job(spec: LabelJobSpec, show_progress: bool = True, run: LabelRun | None = None) -> JobSummary:
    """Run (or resume, or extend with new input) a label job to completion and return its summary.

    A cancelled run (run.cancelled) dispatches nothing more, lets running shards commit, and returns a summary with
    status "cancelled": the committed shards stay, and running the job again labels exactly the rest.
    """
    run = run or LabelRun(show_progress=show_progress)
    spec = label_locations(spec)  # workers in other processes (and the job id) must see the same places
    job_id = spec.resolved_job_id()
    clock = time.perf_counter()
    session = OutputSession(spec, job_id)  # every write to the output goes through its phases
    try:
        return _run_in(session, spec, job_id, run, clock)
    finally:
        session.close()  # the writer lease, whatever ended the run (complete and failed have released it already)


def _run_in(session: OutputSession, spec: LabelJobSpec, job_id: str, run: LabelRun, clock: float) -> JobSummary:
    # Check: nothing starts unless model, output and input are usable, and what earlier runs committed holds.
    check_locations_reachable(spec)  # local paths on a multi-node cluster: other nodes cannot see them
    check_top_k(spec)
    committed = session.check()
    plan = _check_plan(spec, committed)
    # A finished job run again writes nothing, not even the writer lease: it is read, not written.
    manifest = session.manifest() if not plan.todo else None
    if manifest and manifest.status == Outcome.SUCCEEDED:
        log.info("job %s already complete at %s; nothing to do", job_id, spec.output)
        return _summary_of_manifest(manifest, spec.output, plan.stats)
    manifest = session.start()  # the first write: only once the input and the output have checked out
    if not plan.todo and manifest and manifest.status == Outcome.SUCCEEDED:
        log.info("job %s completed at %s by another run meanwhile; nothing to do", job_id, spec.output)
        return _summary_of_manifest(manifest, spec.output, plan.stats)

    # Plan and dispatch.
    stats = PlanStats()
    tasks = plan_shards(spec.input, open_storage(spec.input.uri, spec.storage), stats, committed.done.values())
    placement = run.placement or place_workers(spec, ensure_ray())
    compiling = run.compile or resolve_compile(spec, placement, committed.done.values())  # before the workers' spec
    progress = Progress(enabled=run.show_progress, listener=run.listener)
    results: dict[str, ShardResult] = {}

    def on_done(result: ShardResult) -> None:
        results[result.shard_id] = result
        session.shard_committed(result)
        progress.done(result)

    workers = run.workers or _own_workers(spec, job_id, placement, compiling, run)
    shard_job = ShardJob.of(spec, job_id, faults.forwarded_rules())  # test faults go with the shards, to any worker
    scheduler = ShardDispatcher(workers, placement.workers, _limits(spec, placement), shard_job)
    failures: dict[str, str] = {}
    try:
        worker = scheduler.first_ready(run.cancelled)
        if worker is not None:
            log.info("%d worker(s): %s on %s", placement.workers, worker["model_id"], worker["device"])
            pending = _not_yet_done(tasks, committed.done, results, progress)
            failures = scheduler.run(pending, on_done, run.cancelled)
            workers.ended_cleanly()
    except BaseException as exc:
        session.failed(f"{type(exc).__name__}: {exc}", results)
        raise
    finally:
        scheduler.shutdown()
        progress.close()

    # Commit.
    run_facts = {"worker_restarts": scheduler.restarts, "compile": _compile_line(compiling)}
    if run.cancelled():  # what committed stays committed; the manifest is written by the run that finishes
        if worker is not None:
            _count_the_rest(pending)
        return replace(_summarise(spec, job_id, results, {}, plan, stats, time.perf_counter() - clock, progress),
                       status=Outcome.CANCELLED, **run_facts)  # fmt: skip
    summary = _summarise(spec, job_id, results, failures, plan, stats, time.perf_counter() - clock, progress)
    summary = replace(summary, **run_facts)
    if summary.status is Outcome.FAILED:
        session.failed(summary.failure_reason or f"{len(failures)} shard(s) failed", results, failures)
        raise JobFailed(summary)
    session.complete(worker | {"compiled": compiling.compile, "compile_decision": compiling.line()}, results, failures,
                     workers_died=scheduler.restarts > 0)  # fmt: skip
    return summary


def _compile_line(decision: CompileDecision) -> str | None:
    """The summary's compile line: only where `auto` decided (an explicit true or false is in the spec)."""
    return decision.line() if decision.asked == "auto" else None


@dataclass(frozen=True)
class _CheckedPlan:
    """What a first pass over the plan found, before any worker starts."""

    todo: int  # shards to label this run (at least 1 on a first run: the input is not empty)
    new: int  # of them, shards an earlier run never saw (input that grew); 0 on a first run
    redo: dict[str, str]  # of them, committed shards whose data or marker is gone or damaged → why
    stats: PlanStats


def _check_plan(spec: LabelJobSpec, committed: CommittedShards) -> _CheckedPlan:
    """Walk the whole plan once against what is committed, so that changed input is refused before any work.

    Refused: a committed shard whose objects changed (size, ETag or mtime; for loose files, keys added inside its
    key range) and a committed shard the input no longer lists. New shards are fine (incremental labelling).
    Without earlier markers this pass only checks that the input has something to label.
    """
    stats = PlanStats()
    tasks = plan_shards(spec.input, open_storage(spec.input.uri, spec.storage), stats, committed.done.values())
    if not committed.done and not committed.redo:
        next(tasks)  # raises PlanError for an empty input
        return _CheckedPlan(todo=1, new=0, redo={}, stats=stats)
    todo = new = 0
    listed: set[str] = set()
    for task in tasks:
        listed.add(task.shard_id)
        previous = committed.done.get(task.shard_id)
        if previous is None:
            todo += 1
            new += task.shard_id not in committed.redo
        elif previous.fingerprint != task.fingerprint():
            raise PlanError(
                f"shard {task.shard_id} ({_describe_task(task)}) was committed from different input than the input "
                "holds now (objects rewritten, or files added inside its key range); write to a new output prefix"
            )
    gone = sorted(set(committed.done) - listed)
    if gone:
        raise PlanError(
            f"{len(gone)} committed shard(s) are no longer in the input (e.g. {gone[0]}): input was removed or "
            "renamed since they were labelled; restore it or write to a new output prefix"
        )
    return _CheckedPlan(todo=todo, new=new, redo=committed.redo, stats=stats)


def skipped_of(stats: PlanStats) -> Skipped:
    return Skipped(excluded=stats.excluded, not_images=stats.not_images, examples=tuple(stats.examples))


def _describe_task(task: ShardTask) -> str:
    return task.keys[0] if len(task.keys) == 1 else f"{task.keys[0]} .. {task.keys[-1]}, {len(task.keys)} keys"


def _summarise(
    spec: LabelJobSpec,
    job_id: str,
    results: dict[str, ShardResult],
    failures: dict[str, str],
    plan: _CheckedPlan,
    stats: PlanStats,
    seconds: float,
    progress: Progress,
) -> JobSummary:
    """The job's outcome: failed beyond its shard limit or its error-row fraction, partial, or succeeded."""
    images = sum(r.rows for r in results.values())
    errors = sum(r.errors for r in results.values())
    status, why = Outcome.SUCCEEDED, None
    if failures:
        status = Outcome.FAILED if len(failures) > spec.max_failed_shards else Outcome.PARTIAL
    if images and errors / images > spec.max_error_fraction:
        kind, rows, example = error_summary(results.values())
        status = Outcome.FAILED
        why = (
            f"{errors} of {images} rows are errors, above max_error_fraction={spec.max_error_fraction:g}; "
            f"commonest: {kind!r} ({rows} rows, e.g. {example!r}); check the input location and format"
        )
    return JobSummary(
        job_id=job_id,
        status=status,
        output=spec.output,
        shards=len(results),
        shards_skipped=len(results) - progress.shards_this_run,
        images=images,
        errors=errors,
        failed_shards=failures,
        seconds=seconds,
        images_this_run=progress.images_this_run,
        shards_new=plan.new,
        shards_redone=plan.redo,
        skipped=skipped_of(stats),
        failure_reason=why,
        stages=StageSeconds.total(results.values()),
    )


def check_top_k(spec: LabelJobSpec) -> None:
    """An explicit top_k must not exceed the model's classes (also checks the model and weights names); the
    default is capped to the classes by the predictor, so a 3-class fine-tuned model needs no --top-k."""
    classes = len(class_names(spec.model, card_of(spec.model, spec.storage)))
    if spec.top_k > classes and "top_k" in spec.model_fields_set:
        raise PlanError(f"top_k={spec.top_k} exceeds the {classes} classes of model {spec.model.name!r}")


def _not_yet_done(
    tasks: Iterator[ShardTask], done: dict[str, ShardResult], results: dict[str, ShardResult], progress: Progress
) -> Iterator[ShardTask]:
    """Skip committed shards (counted into `results`); one whose input changed since the check is an error."""
    for task in tasks:
        progress.planned()
        previous = done.get(task.shard_id)
        if previous is None:
            yield task
        elif previous.fingerprint != task.fingerprint():
            raise PlanError(
                f"shard {task.shard_id} changed while the job ran ({_describe_task(task)}); write to a new output"
            )
        else:
            results[task.shard_id] = previous
            progress.done(previous, earlier=True)
    progress.plan_complete()


def _count_the_rest(pending: Iterator[ShardTask]) -> None:
    """A cancelled job's remaining plan, counted (listed, not labelled) so that its progress says how far it got of
    the whole (7/16), not of what was dispatched (7/7). Bounded: a huge input stops being counted after
    COUNT_REST_S, and its total stays unknown."""
    deadline = time.perf_counter() + COUNT_REST_S
    try:
        for _ in pending:
            if time.perf_counter() > deadline:
                log.info("cancelled: the rest of the plan not counted (listing took over %.0fs)", COUNT_REST_S)
                return
    except PlanError as exc:  # the input changed meanwhile: the next run refuses it; the cancel stands
        log.info("cancelled: the rest of the plan not counted (%s)", exc)


def _own_workers(
    spec: LabelJobSpec, job_id: str, placement: Placement, compiling: CompileDecision, run: LabelRun
) -> WorkerSource:
    """Workers started for this job (or kept from one before it in this process, jobs.label.warm)."""
    worker = WorkerSpec.of(spec, compile=compiling.compile)
    keep_s = keep_seconds_from_env() if run.keep_workers_s is None else run.keep_workers_s
    name = f"bulklabel-{job_id}-{{}}"  # a kept worker keeps the name of the job that started it
    return workers_for(worker, placement, lambda i: start_label_worker(worker, placement, name.format(i)), keep_s)


def _limits(spec: LabelJobSpec, placement: Placement) -> LedgerLimits:
    return LedgerLimits(
        max_attempts=spec.max_attempts,
        shard_timeout_s=spec.shard_timeout_s,
        max_actor_restarts=placement.workers * spec.max_attempts + spec.max_failed_shards * spec.max_attempts,
    )


def _summary_of_manifest(manifest: JobManifest, output: str, stats: PlanStats) -> JobSummary:
    totals = manifest.totals
    return JobSummary(
        job_id=manifest.job_id,
        status=Outcome.ALREADY_COMPLETE,
        output=output,
        shards=totals.shards,
        shards_skipped=totals.shards,
        images=totals.rows,
        errors=totals.errors,
        failed_shards={},
        seconds=0.0,
        images_this_run=0,
        skipped=skipped_of(stats),
    )
