"""Run a fine-tune job: check → plan the data → train on Ray (TorchTrainer, DDP) → publish the artifact.

Everything that can be checked is checked before a worker starts: the spec, the base model and weights names,
the output location and the whole labelled data set (classes, split, missing keys). Ray Train checkpoints every
epoch under `<output>/_checkpoints/<job id>`; starting the same job again (after a kill, a crash, a lost node)
continues from the last checkpoint, and a job that already published its artifact returns it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray.train import TrainingFailedError

from jobs.cluster import ClusterResources, ensure_ray
from jobs.locations import absolute_locations
from schemas.finetune import FinetuneJobSpec, ModelCard
from workers.models import check_model_name, weights_entry
from workers.storage import Storage, check_writable, join, open_storage, split_s3
from workers.training.artifacts import (
    VersionClaimFailed,
    checkpoints_uri,
    find_job_artifact,
    publish,
    remove_checkpoints,
)
from workers.training.data import DataPlan, plan_data
from workers.training.loop import BEST_FILE, read_state, train_loop

log = logging.getLogger(__name__)

RUN_IDENTITY_NAME = "_run.json"  # beside Ray Train's files: what the checkpoints were trained on


class FinetuneFailed(RuntimeError):
    """Training failed more often than the spec's max_failures allows, or left nothing to publish."""


class ResumeConflict(RuntimeError):
    """The job's checkpoints were made from a different spec or different data than this run's."""


@dataclass(frozen=True)
class FinetuneSummary:
    """The outcome of a fine-tune job, as returned by the API and printed by the CLI."""

    job_id: str
    status: str  # succeeded | already-complete
    artifact: str  # location of the version folder
    card: ModelCard
    seconds: float

    def lines(self) -> list[str]:
        card, m = self.card, self.card.metrics
        out = [
            f"job {self.job_id}: {self.status}",
            f"  model:    {card.artifact_id} ({card.architecture} from {card.base_weights or 'random init'}, "
            f"{card.training.method}, {len(card.class_names)} classes)",
            f"  val:      accuracy {m.val_accuracy:.4f}, macro F1 {m.macro_f1:.4f}, loss {m.val_loss:.4f} "
            f"(epoch {m.best_epoch} of {card.epochs_run}{', stopped early' if card.stopped_early else ''})",
            f"  data:     {card.dataset.train_images} training + {card.dataset.val_images} validation images"
            + (f", {card.dataset.skipped_images} unreadable skipped" if card.dataset.skipped_images else ""),
            f"  time:     {self.seconds:.1f}s this run, {card.train_seconds:.1f}s training in all",
            f"  artifact: {self.artifact}",
        ]
        if card.resumed_after_epochs:
            out.append(f"  resumed after epoch(s) {card.resumed_after_epochs}")
        return out


def resolve_locations(spec: FinetuneJobSpec) -> FinetuneJobSpec:
    """Make local paths absolute, so workers in other processes (and the job id) see the same places."""
    return absolute_locations(spec)


def run_finetune_job(spec: FinetuneJobSpec, show_progress: bool = True) -> FinetuneSummary:
    """Run (or resume) a fine-tune job to its published artifact and return its summary."""
    spec = resolve_locations(spec)
    job_id = spec.resolved_job_id()
    clock = time.perf_counter()
    out = open_storage(spec.output, spec.storage)

    # Check: nothing starts unless the model, the output and the data are usable.
    check_model_name(spec.base.name)
    weights_entry(spec.base)
    published = find_job_artifact(out, spec.output, job_id)
    if published:
        log.info("job %s already published %s; nothing to do", job_id, published[1].artifact_id)
        return FinetuneSummary(job_id, "already-complete", published[0], published[1], 0.0)
    check_writable(out, spec.output)
    plan = _plan(spec)
    _claim_checkpoints(out, spec, job_id, plan)
    planned = time.perf_counter()

    # Train.
    trainer = _trainer(spec, job_id, plan, ensure_ray(), show_progress)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:  # raised once max_failures restarts are spent
        raise FinetuneFailed(
            f"job {job_id}: training failed ({exc}); its checkpoints stay at {checkpoints_uri(spec.output, job_id)}, "
            "so running the same job again resumes from the last one"
        ) from exc
    if result.checkpoint is None:
        raise FinetuneFailed(f"job {job_id}: training finished without a checkpoint to publish")

    trained = time.perf_counter()

    # Publish: into a version claimed for this job alone (or the one it claimed before dying mid-publish).
    with result.checkpoint.as_directory() as folder:
        state = read_state(Path(folder))
        try:
            location, card = publish(out, spec, job_id, plan, Path(folder) / BEST_FILE, state)
        except VersionClaimFailed as exc:
            raise FinetuneFailed(str(exc)) from exc
    remove_checkpoints(out, spec.output, job_id)
    done = time.perf_counter()
    log.info("job %s: checked and planned in %.1fs, trained in %.1fs (Ray Train start included), published in "
             "%.1fs", job_id, planned - clock, trained - planned, done - trained)  # fmt: skip
    return FinetuneSummary(job_id, "succeeded", location, card, done - clock)


def _plan(spec: FinetuneJobSpec) -> DataPlan:
    data = spec.data
    val_storage = open_storage(data.validation_uri, spec.storage) if data.validation_uri else None
    plan = plan_data(data, open_storage(data.uri, spec.storage), spec.training.seed, val_storage)
    log.info(
        "data: %d classes, %d training + %d validation images (%s), fingerprint %s",
        len(plan.class_names), len(plan.train), len(plan.val),
        "given validation set" if data.validation_uri else f"stratified {data.val_fraction:.0%} split",
        plan.fingerprint[:12],
    )  # fmt: skip
    return plan


def _claim_checkpoints(storage: Storage, spec: FinetuneJobSpec, job_id: str, plan: DataPlan) -> None:
    """Record what this job trains on beside its checkpoints, and refuse to resume checkpoints of other data or
    another spec (possible when a job id is given by hand and the spec or the data changed since)."""
    identity = {
        "spec": spec.training_identity(),
        "data": plan.fingerprint,
    }
    uri = join(checkpoints_uri(spec.output, job_id), RUN_IDENTITY_NAME)
    if storage.exists(uri):
        earlier = json.loads(storage.read_bytes(uri))
        if earlier != identity:
            changed = " and ".join(k if k == "spec" else "data" for k in identity if earlier.get(k) != identity[k])
            raise ResumeConflict(
                f"job {job_id} has checkpoints at {checkpoints_uri(spec.output, job_id)} from a different {changed}; "
                "use another job_id, or delete that folder to start over"
            )
        log.info("job %s was interrupted before; resuming from its last checkpoint", job_id)
    else:
        storage.write_bytes(uri, json.dumps(identity).encode())


def _trainer(spec: FinetuneJobSpec, job_id: str, plan: DataPlan, cluster: ClusterResources, show_progress: bool):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = _cpus_per_worker(spec, cluster)
    resources = {"CPU": cpus, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}
    storage_path, filesystem = run_storage(spec)
    log_level = logging.getLogger("workers").getEffectiveLevel()
    config = {
        "spec": spec,  # the pydantic object, pickled: a JSON dump would mask the storage secrets
        "plan": plan,
        "torch_threads": max(1, math.floor(cpus)),
        "show_progress": show_progress,
        "log_level": log_level,
    }
    log.info("training %s on %d worker(s) with %s each", spec.base.name, spec.num_workers, resources)
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            # Only the last epoch's checkpoint is needed: it carries the best weights so far as well.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # Ray Train's INFO lines repeat every epoch's metrics dict; ours say the same in one line.
            logging_config=LoggingConfig(log_level="INFO" if log_level <= logging.DEBUG else "WARNING"),
        ),
    )


def _cpus_per_worker(spec: FinetuneJobSpec, cluster: ClusterResources) -> float:
    """The spec's CPUs per worker, or the cluster's CPUs split between the workers (at least one each)."""
    gpus = spec.gpus_per_worker * spec.num_workers
    if gpus > cluster.gpus:
        raise FinetuneFailed(
            f"{spec.num_workers} worker(s) x {spec.gpus_per_worker:g} GPU need {gpus:g} GPUs; "
            f"the Ray cluster has {cluster.gpus:g}"
        )
    cpus = spec.cpus_per_worker or max(1.0, math.floor(cluster.cpus / spec.num_workers))
    if cpus * spec.num_workers > cluster.cpus:
        raise FinetuneFailed(
            f"{spec.num_workers} worker(s) x {cpus:g} CPUs exceed the Ray cluster's {cluster.cpus:g} CPUs"
        )
    return cpus


def run_storage(spec: FinetuneJobSpec):
    """Ray Train's (storage_path, storage_filesystem) for the job's checkpoints under `<output>/_checkpoints`.

    Ray Train writes through pyarrow filesystems; an S3-compatible endpoint (SeaweedFS, MinIO) needs an explicit
    S3FileSystem because pyarrow ignores $AWS_ENDPOINT_URL, and then the path is given without its scheme.
    """
    root = join(spec.output, "_checkpoints")
    if not root.startswith("s3://"):
        return root, None
    from pyarrow import fs

    opts = spec.storage
    endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": opts.region or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs |= {"endpoint_override": host.rstrip("/"), "scheme": scheme}
    if opts.access_key_id is not None:
        kwargs |= {
            "access_key": opts.access_key_id.get_secret_value(),
            "secret_key": opts.secret_access_key.get_secret_value(),
        }
    bucket, key = split_s3(root)
    return f"{bucket}/{key}", fs.S3FileSystem(**kwargs)
