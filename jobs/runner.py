"""Run a label job: check → plan → dispatch → commit.

Everything that can be checked is checked before a worker starts: the spec (pydantic), the
model and weights names, the input listing and the output location.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import ray

from jobs.cluster import ensure_ray
from jobs.commit import check_output_owner, read_done_markers, read_manifest, remove_partials, write_manifest
from jobs.placement import Placement, place_workers
from jobs.plan import PlanError, plan_shards
from jobs.progress import JobSummary, Progress
from jobs.scheduler import SchedulerLimits, ShardScheduler
from schemas.shards import ShardResult, ShardTask
from schemas.specs import LabelJobSpec
from workers import faults
from workers.label_worker import LabelWorker
from workers.models import model_categories
from workers.storage import check_writable, normalise_uri, open_storage

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """More shards failed than the spec allows; the summary names each one."""

    def __init__(self, summary: JobSummary):
        super().__init__("\n".join(summary.lines()))
        self.summary = summary


def resolve_locations(spec: LabelJobSpec) -> LabelJobSpec:
    """Make local paths absolute, so workers in other processes (and the job id) see the same places."""
    return spec.model_copy(
        update={
            "output": normalise_uri(spec.output),
            "input": spec.input.model_copy(update={"uri": normalise_uri(spec.input.uri)}),
        }
    )


def run_label_job(spec: LabelJobSpec, show_progress: bool = True) -> JobSummary:
    """Run (or resume) a label job to completion and return its summary."""
    spec = resolve_locations(spec)
    job_id = spec.resolved_job_id()
    started_at, clock = datetime.now(UTC), time.perf_counter()
    out = open_storage(spec.output, spec.storage)

    # Check: nothing starts unless model, output and input are usable.
    check_top_k(spec)
    check_output_owner(out, spec.output, job_id)
    manifest = read_manifest(out, spec.output)
    if manifest and manifest.get("status") == "succeeded":
        log.info("job %s already complete at %s; nothing to do", job_id, spec.output)
        return _summary_of_manifest(manifest, spec.output)
    check_writable(out, spec.output)
    remove_partials(out, spec.output)
    done = read_done_markers(out, spec.output)
    tasks = plan_shards(spec.input, open_storage(spec.input.uri, spec.storage))
    first = next(tasks)  # the listing is checked here, before any worker starts

    # Plan and dispatch.
    placement = place_workers(spec, ensure_ray())
    progress = Progress(enabled=show_progress)
    results: dict[str, ShardResult] = dict(done)

    def on_done(result: ShardResult) -> None:
        results[result.shard_id] = result
        progress.done(result)

    scheduler = ShardScheduler(_actor_factory(spec, job_id, placement), placement.workers, _limits(spec, placement))
    try:
        worker = ray.get(scheduler.actors[0].describe.remote())
        log.info("%d worker(s): %s on %s", placement.workers, worker["model_id"], worker["device"])
        failures = scheduler.run(_not_yet_done(_chain(first, tasks), done, progress), on_done)
    finally:
        scheduler.shutdown()
        progress.close()

    # Commit.
    seconds = time.perf_counter() - clock
    status = "failed" if len(failures) > spec.max_failed_shards else ("partial" if failures else "succeeded")
    summary = JobSummary(
        job_id=job_id,
        status=status,
        output=spec.output,
        shards=len(results),
        shards_skipped=len(done),
        images=sum(r.rows for r in results.values()),
        errors=sum(r.errors for r in results.values()),
        failed_shards=failures,
        seconds=seconds,
        images_this_run=progress.images_this_run,
        worker_restarts=scheduler.restarts,
    )
    if status == "failed":
        raise JobFailed(summary)
    remove_partials(out, spec.output)
    write_manifest(out, spec, job_id, worker, results, failures, started_at)
    return summary


def check_top_k(spec: LabelJobSpec) -> None:
    """An explicit top_k must not exceed the model's classes (also checks the model and weights names); the
    default is capped to the classes by the predictor, so a 3-class fine-tuned model needs no --top-k."""
    classes = len(model_categories(spec.model, spec.storage))
    if spec.top_k > classes and "top_k" in spec.model_fields_set:
        raise PlanError(f"top_k={spec.top_k} exceeds the {classes} classes of model {spec.model.name!r}")


def _chain(first: ShardTask, rest: Iterator[ShardTask]) -> Iterator[ShardTask]:
    yield first
    yield from rest


def _not_yet_done(tasks: Iterator[ShardTask], done: dict[str, ShardResult], progress: Progress) -> Iterator[ShardTask]:
    """Skip committed shards; a committed shard whose input changed since is an error, not a silent skip."""
    for task in tasks:
        progress.planned()
        previous = done.get(task.shard_id)
        if previous is None:
            yield task
        elif previous.fingerprint != task.fingerprint():
            raise PlanError(
                f"shard {task.shard_id} was committed from different input than the input lists now; "
                "write to a new output prefix"
            )
        else:
            progress.done(previous, earlier=True)


def _actor_factory(spec: LabelJobSpec, job_id: str, placement: Placement):
    actor_class = ray.remote(LabelWorker)
    fault_env = faults.forwarded_environment()  # empty unless a test turned fault injection on

    def make(index: int) -> ray.actor.ActorHandle:
        return actor_class.options(
            name=f"bulklabel-{job_id}-{index}",
            num_cpus=placement.cpus_per_worker,
            num_gpus=placement.gpus_per_worker,
            max_restarts=0,  # the scheduler replaces dead workers itself, and counts them
            max_task_retries=0,
            runtime_env={"env_vars": fault_env} if fault_env else None,
        ).remote(spec, job_id, placement.torch_threads)

    return make


def _limits(spec: LabelJobSpec, placement: Placement) -> SchedulerLimits:
    return SchedulerLimits(
        max_attempts=spec.max_attempts,
        shard_timeout_s=spec.shard_timeout_s,
        max_actor_restarts=placement.workers * spec.max_attempts + spec.max_failed_shards * spec.max_attempts,
    )


def _summary_of_manifest(manifest: dict, output: str) -> JobSummary:
    totals = manifest["totals"]
    return JobSummary(
        job_id=manifest["job_id"],
        status="already-complete",
        output=output,
        shards=totals["shards"],
        shards_skipped=totals["shards"],
        images=totals["rows"],
        errors=totals["errors"],
        failed_shards={},
        seconds=0.0,
        images_this_run=0,
    )
