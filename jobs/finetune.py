"""Run a fine-tune job: check → list → embed → split → (fit the head) → train on Ray (TorchTrainer, DDP) → publish.

Everything that can be checked is checked before a worker starts: the spec, the base model and weights names,
the output location and the whole labelled data set (classes, keys outside the allowed locations, missing keys).
Then one actor reads every image once (workers.finetune.embed): the unreadable ones are left out before the split;
where the split groups or a head is fitted, it also runs the frozen base model over them: content hashes and
embeddings group near-duplicates, which the split keeps on one side; the embeddings give the linear probe by a
convex fit, which is the whole `linear-probe` method and lp-ft's first stage. Ray Train checkpoints every epoch under
`<output>/_checkpoints/<job id>`; starting the same job again (after a kill, a crash, a lost node) continues from
the last checkpoint, and a job that already published its artifact returns it.

No torch here (the job service imports this module): the workers import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ray.train import TrainingFailedError

from jobs.cluster import ClusterResources, ensure_ray
from jobs.label.warm import release_kept
from jobs.locations import finetune_locations
from jobs.review.apply import pin_corrections, read_corrections
from schemas.catalog import check_model
from schemas.finetune import EpochMetrics, Estimate, FinetuneJobSpec, ModelCard, Recipe, RefitInfo, TrainingState
from schemas.outcome import Outcome
from workers import OMP_WAIT_ENV, OMP_WAIT_POLICY
from workers.finetune.artifacts import (
    ROUGH_BELOW,
    VersionClaimFailed,
    checkpoints_uri,
    find_job_artifact,
    publish,
    remove_checkpoints,
    wilson_interval,
)
from workers.finetune.dataplan import DataPlan, Listing, list_data, split_data
from workers.finetune.recipe import PROBE_MAX_ITERATIONS, plan_recipe
from workers.finetune.refit import OutOfFold, folds_for, grouped_folds, l2_grid, refit_recipe, score_out_of_fold
from workers.finetune.remote import EmbeddingActor, train_loop
from workers.finetune.results import Embedded, ProbeFit
from workers.io.storage import Storage, check_writable, join, local_scratch_dir, open_storage, split_s3

if TYPE_CHECKING:
    from workers.finetune.grouping import Groups

# workers.finetune.loop's checkpoint file names, named here so that the driver need not import torch
BEST_FILE = "best.safetensors"
STATE_FILE = "state.json"

log = logging.getLogger(__name__)

RUN_IDENTITY_NAME = "_run.json"  # beside Ray Train's files: what the checkpoints were trained on
HOLDOUT_STATE_NAME = "_holdout.json"  # a refit's finished validation run: its state, so a restart skips it
REFIT_RUN_NAME = "refit"  # a refit's Ray Train run, below the validation run's folder


class FinetuneFailed(RuntimeError):
    """Training failed more often than the spec's max_failures allows, or left nothing to publish."""


class ResumeConflict(RuntimeError):
    """The job's checkpoints were made from a different spec or different data than this run's."""


@dataclass(frozen=True)
class FinetuneSummary:
    """The outcome of a fine-tune job, as returned by the API and printed by the CLI."""

    job_id: str
    status: Outcome  # succeeded | already_complete: a failed run raises FinetuneFailed
    artifact: str  # location of the version folder
    card: ModelCard
    seconds: float

    def lines(self) -> list[str]:
        card, m, data = self.card, self.card.metrics, self.card.dataset
        low, high = m.val_accuracy_ci95
        rough = f"; rough: only {m.val_images} validation images" if m.val_images < ROUGH_BELOW else ""
        groups = (f", split keeping {data.duplicate_groups} near-duplicate group(s) ({data.grouped_images} images) "
                  "whole" if data.groups is not None else "")  # fmt: skip
        out = [
            f"job {self.job_id}: {self.status.value}",
            f"  model:    {card.artifact_id} ({card.architecture} from {card.base_weights or 'random init'}, "
            f"{card.training.method}, {len(card.class_names)} classes)",
            f"  val:      accuracy {m.val_accuracy:.4f} (95% CI {low:.3f}-{high:.3f}{rough}), macro F1 "
            f"{m.macro_f1:.4f}, loss {m.val_loss:.4f} "
            f"(epoch {m.best_epoch} of {card.epochs_run}{', stopped early' if card.stopped_early else ''})",
            f"  data:     {data.train_images} training + {data.val_images} validation images{groups}"
            + (f", {data.skipped_images} unreadable left out" if data.skipped_images else ""),
            f"  time:     {self.seconds:.1f}s this run, {card.train_seconds:.1f}s training in all",
            f"  artifact: {self.artifact}",
        ]
        if data.corrections is not None:
            c = data.corrections
            out.insert(
                -2,
                f"  reviewed: {c.relabelled} label(s) changed, {c.dropped} bad image(s) left out, "
                f"{c.confirmed} kept, by {c.decisions} decision(s) from {', '.join(c.queues)}"
                + (f"; {c.not_in_data} decided image(s) not in the data" if c.not_in_data else ""),
            )
        if data.val_shortfall:
            out.insert(-2, f"  short:    validation has {data.val_shortfall} image(s) fewer than val_fraction asks: "
                           "groups too large for their class's share stayed whole in training")  # fmt: skip
        if data.unvalidated_classes:
            out.insert(-2, f"  not validated: {', '.join(data.unvalidated_classes)} (no validation image; macro F1 "
                           f"is over the other {len(m.macro_f1_classes)} class(es))")  # fmt: skip
        if card.recipe is not None:
            out.insert(3, f"  recipe:   {card.recipe.notes}; label smoothing {card.recipe.label_smoothing:g}")
        if card.recipe is not None and card.recipe.refit is not None:
            r = card.recipe.refit
            what = (f"then {r.epochs} epoch(s) of the recipe on them" if r.epochs else "the head alone"
                    ) if card.training.method.trains else "the head"  # fmt: skip
            estimate = ("the val line is cross-validated: every image scored by a fit that did not see it"
                        if r.estimate is Estimate.CROSS_VALIDATION else "the val line is the same recipe trained "
                        "without the validation images")  # fmt: skip
            out.insert(4, f"  refit:    published model trained on all {r.images} images ({what}, head L2 "
                          f"{r.probe_l2:g} by {r.folds}-fold cross-validation, {r.cv_accuracy:.3f}); {estimate}"
                       )  # fmt: skip
        if card.resumed_after_epochs:
            out.append(f"  resumed after epoch(s) {card.resumed_after_epochs}")
        return out


def resolve_locations(spec: FinetuneJobSpec) -> FinetuneJobSpec:
    """Make local paths absolute, so workers in other processes (and the job id) see the same places."""
    return finetune_locations(spec)


def run_finetune_job(spec: FinetuneJobSpec, show_progress: bool = True) -> FinetuneSummary:
    """Run (or resume) a fine-tune job to its published artifact and return its summary."""
    spec = pin_corrections(resolve_locations(spec))
    job_id = spec.resolved_job_id()
    clock = time.perf_counter()
    out = open_storage(spec.output, spec.storage)

    # Check: nothing starts unless the model, the output and the data are usable.
    check_model(spec.base)
    published = find_job_artifact(out, spec.output, job_id)
    if published:
        log.info("job %s already published %s; nothing to do", job_id, published[1].artifact_id)
        return FinetuneSummary(job_id, Outcome.ALREADY_COMPLETE, published[0], published[1], 0.0)
    check_writable(out, spec.output)
    listing = list_labelled(spec)
    cluster = ensure_ray()
    release_kept("released for a fine-tune")  # this process's idle label workers would hold the CPUs it trains on

    # Read every image once: unreadable ones are left out before the split; the embeddings give the split's
    # near-duplicate groups and the linear probe (the whole of `linear-probe`).
    probe = refit = None
    with embedding_pass(spec, cluster) as embedder:
        plan, embedded, groups = _plan(spec, listing, embedder)
        recipe = plan_recipe(spec.training, len(plan.train), spec.num_workers, PROBE_MAX_ITERATIONS)
        if spec.refits(len(plan.train) + len(plan.val)):
            refit = _cross_validate(spec, embedder, listing, groups, recipe.label_smoothing)
            recipe = recipe.model_copy(update={"refit": refit.info})
        l2 = refit.info.probe_l2 if refit else None
        probe = _fit_probe(embedder, listing, plan, recipe, l2) if spec.training.method.fits_probe else None
        recipe = _with_probe_steps(recipe, probe)
        if not spec.training.method.trains:
            run = _Run(out, spec, job_id, plan, recipe, cluster, show_progress)
            location, card = _publish_probe(run, embedder, refit.head if refit else probe, embedded, refit)
            return FinetuneSummary(job_id, Outcome.SUCCEEDED, location, card, time.perf_counter() - clock)
    run = _Run(out, spec, job_id, plan, recipe, cluster, show_progress)
    _claim_checkpoints(run)
    planned = time.perf_counter()

    # Train, then publish into a version claimed for this job alone (or the one it claimed before dying mid-publish).
    location, card = _train_and_publish(run, probe, refit)
    done = time.perf_counter()
    log.info("job %s: checked, embedded and planned in %.1fs, trained and published in %.1fs", job_id,
             planned - clock, done - planned)  # fmt: skip
    return FinetuneSummary(job_id, Outcome.SUCCEEDED, location, card, done - clock)


@dataclass(frozen=True)
class _Run:
    """One fine-tune run once planned: where it publishes, what it trains on, how, and on what cluster."""

    out: Storage
    spec: FinetuneJobSpec
    job_id: str
    plan: DataPlan
    recipe: Recipe
    cluster: ClusterResources
    show_progress: bool


def _train_and_publish(run: _Run, probe: ProbeFit | None, refit: _CrossValidated | None) -> tuple[str, ModelCard]:
    out, spec, job_id = run.out, run.spec, run.job_id
    if refit is not None:
        return _train_refit_and_publish(run, probe, refit)
    with _fitted(run, probe) as (folder, state):
        location, card = _publish(run, folder / BEST_FILE, state, run.recipe)
    remove_checkpoints(out, spec.output, job_id)
    return location, card


@contextmanager
def _fitted(run: _Run, probe: ProbeFit | None, refit: bool = False):
    """Train `run` (resuming its checkpoints) and yield the last checkpoint's folder and state."""
    trainer = _trainer(run, probe, refit)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:  # raised once max_failures restarts are spent
        raise FinetuneFailed(
            f"job {run.job_id}: training failed ({exc}); its checkpoints stay at "
            f"{checkpoints_uri(run.spec.output, run.job_id)}, so running the same job again resumes from the last one"
        ) from exc
    if result.checkpoint is None:
        raise FinetuneFailed(f"job {run.job_id}: training finished without a checkpoint to publish")
    with result.checkpoint.as_directory() as folder:
        yield Path(folder), TrainingState.model_validate_json((Path(folder) / STATE_FILE).read_text())


def _publish(run: _Run, weights: Path, state: TrainingState, recipe: Recipe) -> tuple[str, ModelCard]:
    try:
        return publish(run.out, run.spec, run.job_id, run.plan, weights, state, recipe)
    except VersionClaimFailed as exc:
        raise FinetuneFailed(str(exc)) from exc


def _train_refit_and_publish(run: _Run, probe: ProbeFit | None, refit: _CrossValidated) -> tuple[str, ModelCard]:
    """lp-ft with refit: the usual run with its validation split decides the epochs and gives the card's held-out
    figures; then the same recipe trains on every image for that many epochs (none: the head fitted on every
    image is published, as the validation run's best was its fitted head)."""
    out, spec, job_id = run.out, run.spec, run.job_id
    holdout_uri = join(checkpoints_uri(spec.output, job_id), HOLDOUT_STATE_NAME)
    if out.exists(holdout_uri):  # the validation run finished before this job was interrupted
        held = TrainingState.model_validate_json(out.read_bytes(holdout_uri))
    else:
        with _fitted(run, probe) as (_, held):
            pass
        out.write_bytes(holdout_uri, held.model_dump_json().encode())
    epochs = held.best_epoch
    everything = run.plan.model_copy(update={"train": run.plan.train + run.plan.val, "val": ()})
    recipe = refit_recipe(run.recipe, len(everything.train), epochs, spec.num_workers, spec.training.batch_size)
    info = refit.info.model_copy(update={"estimate": Estimate.HOLDOUT, "epochs": epochs,
                                         "steps": recipe.total_steps})  # fmt: skip
    card_recipe = run.recipe.model_copy(update={"refit": info})
    log.info("refit: the validation run's best was epoch %d (val accuracy %.3f); training on all %d images for %d "
             "epoch(s)", epochs, held.history[epochs].val_accuracy if held.history else 0.0, len(everything.train),
             epochs)  # fmt: skip
    if epochs == 0:
        with embedding_pass(spec, run.cluster) as embedder, tempfile.TemporaryDirectory() as scratch:
            weights = Path(scratch, BEST_FILE)
            weights.write_bytes(embedder("artifact_weights", refit.head.head))
            location, card = _publish(run, weights, held, card_recipe)
    else:
        training = spec.training.model_copy(update={"epochs": epochs, "early_stopping_patience": 0})
        again = _Run(out, spec.model_copy(update={"training": training}), job_id, everything, recipe, run.cluster,
                     run.show_progress)  # fmt: skip
        with _fitted(again, refit.head, refit=True) as (folder, state):
            held = held.model_copy(update={"train_seconds": held.train_seconds + state.train_seconds})
            location, card = _publish(run, folder / BEST_FILE, held, card_recipe)
    remove_checkpoints(out, spec.output, job_id)
    return location, card


def _needs_embeddings(spec: FinetuneJobSpec) -> bool:
    """Whether the pass over the images must embed them (a grouped split, or a fitted head: lp-ft, linear-probe)
    rather than only read and decode them (which every job does, to leave unreadable images out of the split)."""
    grouped = spec.data.group_duplicates and spec.data.validation_uri is None
    return grouped or spec.training.method.needs_embeddings


def list_labelled(spec: FinetuneJobSpec) -> Listing:
    """The labelled images of the spec's data (and validation set), every class checked usable."""
    data = spec.data
    val_storage = open_storage(data.validation_uri, spec.storage) if data.validation_uri else None
    return list_data(data, open_storage(data.uri, spec.storage), val_storage, read_corrections(spec))


@contextmanager
def embedding_pass(spec: FinetuneJobSpec, cluster: ClusterResources, cache: bool = False):
    """An actor holding the frozen base model (and, once it has embedded, the embeddings), killed on exit so that
    its CPUs and GPU go back before Ray Train asks for them. `cache`: reuse (and keep) embeddings in its node's
    cache, by content (workers.finetune.embed.EmbeddingCache)."""
    import ray

    cpus = _cpus_per_worker(spec, cluster)
    actor_class = ray.remote(EmbeddingActor).options(num_cpus=cpus, num_gpus=1 if spec.gpus_per_worker else 0)
    actor = actor_class.remote(spec, max(1, math.floor(cpus)), logging.getLogger("workers").getEffectiveLevel(),
                               cache)  # fmt: skip

    def call(method: str, *args):
        return ray.get(actor.call.remote(method, *args))

    try:
        yield call
    finally:
        try:
            ray.get(actor.call.remote("close"))
        finally:
            ray.kill(actor)


def _plan(spec: FinetuneJobSpec, listing: Listing, embedder) -> tuple[DataPlan, Embedded, Groups | None]:
    data = spec.data
    embedded: Embedded = embedder("embed", listing.items(), _needs_embeddings(spec))
    groups = None
    if data.group_duplicates and data.validation_uri is None:
        groups = embedder("groups", len(listing.examples), embedded.sha256s, data.duplicate_cosine)
    plan = split_data(listing, data, spec.training.seed, groups, unreadable_images(listing, embedded))
    log.info(
        "data: %d classes, %d training + %d validation images (%s), %d unreadable left out, fingerprint %s",
        len(plan.class_names), len(plan.train), len(plan.val),
        "given validation set" if data.validation_uri else f"stratified {data.val_fraction:.0%} split"
        + (f", {plan.duplicate_groups} near-duplicate groups of {plan.grouped_images} images kept whole"
           if groups else ", ungrouped"),
        len(plan.unreadable), plan.fingerprint[:12],
    )  # fmt: skip
    return plan, embedded, groups


def unreadable_images(listing: Listing, embedded: Embedded) -> dict[str, str]:
    """uri → why, for every image the embedding pass could not read or decode (its sha256 is None)."""
    uris = [uri for (uri, _), digest in zip(listing.items(), embedded.sha256s, strict=True) if digest is None]
    return dict(zip(uris, embedded.skipped, strict=True))  # both in input order (EmbeddingPass.embed)


def _fit_probe(embedder, listing: Listing, plan: DataPlan, recipe: Recipe, l2: float | None = None) -> ProbeFit:
    """The head fitted on the training rows' embeddings, scored on the validation rows'."""
    row = {}
    for i, (uri, _) in enumerate(listing.items()):
        row.setdefault(uri, i)
    train, val = [row[uri] for uri, _ in plan.train], [row[uri] for uri, _ in plan.val]
    return embedder("fit", train, val, len(plan.class_names), recipe.label_smoothing, l2)


@dataclass(frozen=True)
class _CrossValidated:
    """A refit's choices: the head's L2 by grouped k-fold cross-validation, the out-of-fold scores, and the head
    fitted on every image with it."""

    info: RefitInfo
    scores: OutOfFold
    head: ProbeFit


def _cross_validate(spec: FinetuneJobSpec, embedder, listing: Listing, groups: Groups | None, smoothing: float
                    ) -> _CrossValidated:  # fmt: skip
    """Cross-validate the head's L2 on the embeddings of every readable image, and fit it on all of them."""
    import numpy as np

    labels = np.asarray([label for _, label in listing.items()], dtype=np.int64)
    group_ids = np.asarray(groups.ids if groups else range(len(labels)), dtype=np.int64)
    readable = np.flatnonzero(np.asarray(embedder("readable")))
    folds = np.full(len(labels), -1, dtype=np.int64)
    k = folds_for(labels[readable], group_ids[readable])
    folds[readable] = grouped_folds(labels[readable], group_ids[readable], k, spec.training.seed)
    grid = l2_grid(spec.training.probe_l2)
    probabilities, l2 = embedder("out_of_sample", folds, len(listing.class_names), grid)
    scores = score_out_of_fold(probabilities, labels, readable)
    head = embedder("fit", readable.tolist(), [], len(listing.class_names), smoothing, l2)
    low, high = wilson_interval(scores.correct, scores.images)
    info = RefitInfo(images=len(readable), estimate=Estimate.CROSS_VALIDATION, folds=k, probe_l2=l2,
                     probe_l2_grid=grid, cv_accuracy=round(scores.accuracy, 4), cv_accuracy_ci95=(low, high),
                     cv_log_loss=round(scores.log_loss, 4))  # fmt: skip
    log.info("refit: %d-fold cross-validated head accuracy %.3f (95%% CI %.3f-%.3f) on %d images, L2 %g", k,
             scores.accuracy, low, high, scores.images, l2)  # fmt: skip
    return _CrossValidated(info, scores, head)


def _with_probe_steps(recipe: Recipe, probe: ProbeFit | None) -> Recipe:
    """The recipe with the head stage's L-BFGS iterations as the fit took them (the plan has the cap)."""
    if probe is None:
        return recipe
    stages = tuple(s.model_copy(update={"steps": probe.head.iterations}) if s.name == "head" else s
                   for s in recipe.stages)  # fmt: skip
    return recipe.model_copy(update={"stages": stages})


def _publish_probe(run: _Run, embedder, probe: ProbeFit, embedded: Embedded, refit: _CrossValidated | None
                   ) -> tuple[str, ModelCard]:  # fmt: skip
    """`linear-probe`: the base model with the fitted head, published as any trained run is. Refitted, the head
    saw every image and the scores are the cross-validation's out-of-fold ones."""
    val_loss, val_accuracy, confusion = (
        (refit.scores.log_loss, refit.scores.accuracy, refit.scores.confusion) if refit
        else (probe.val_loss, probe.val_accuracy, probe.confusion)
    )  # fmt: skip
    metrics = EpochMetrics(epoch=0, train_loss=probe.train_loss, train_accuracy=probe.train_accuracy,
                           val_loss=val_loss, val_accuracy=val_accuracy, learning_rate=0.0,
                           seconds=round(embedded.seconds + probe.seconds, 2))  # fmt: skip
    state = TrainingState(history=(metrics,), best_epoch=0, best_val_loss=val_loss, best_confusion=confusion,
                          train_seconds=metrics.seconds, preprocess=embedded.preprocess)  # fmt: skip
    scratch = Path(local_scratch_dir())
    try:
        weights = scratch / BEST_FILE
        weights.write_bytes(embedder("artifact_weights", probe.head))
        return _publish(run, weights, state, run.recipe)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _claim_checkpoints(run: _Run) -> None:
    """Record what this job trains on beside its checkpoints, and refuse to resume checkpoints of other data or
    another spec (possible when a job id is given by hand and the spec or the data changed since)."""
    storage, spec, job_id, plan = run.out, run.spec, run.job_id, run.plan
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


def _trainer(run: _Run, probe: ProbeFit | None, refit: bool = False):
    """Ray Train's trainer for `run`; a refit's checkpoints go below the validation run's, under `refit`."""
    spec, recipe = run.spec, run.recipe
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = _cpus_per_worker(spec, run.cluster)
    resources = {"CPU": cpus, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}
    storage_path, filesystem = run_storage(spec, run.job_id if refit else "")
    log_level = logging.getLogger("workers").getEffectiveLevel()
    config = {
        "spec": spec,  # the pydantic object, pickled: a JSON dump would mask the storage secrets
        "plan": run.plan,
        "recipe": recipe,
        "probe": probe if spec.training.method.trains_from_probe else None,
        "torch_threads": max(1, math.floor(cpus)),
        "show_progress": run.show_progress,
        "log_level": log_level,
        "refit": refit,
    }
    log.info("training %s on %d worker(s) with %s each", spec.base.name, spec.num_workers, resources)
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=REFIT_RUN_NAME if refit else run.job_id,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            # Only the last epoch's checkpoint is needed: it carries the best weights so far as well.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # Ray Train's INFO lines repeat every epoch's metrics dict; ours say the same in one line.
            logging_config=LoggingConfig(log_level="INFO" if log_level <= logging.DEBUG else "WARNING"),
            # Ray Train's workers import torch before our loop's module (workers/__init__.py), so they get the
            # OpenMP wait policy in their environment at start, on any cluster (a `ray start` node's too).
            worker_runtime_env={"env_vars": {OMP_WAIT_ENV: os.environ.get(OMP_WAIT_ENV, OMP_WAIT_POLICY)}},
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


def run_storage(spec: FinetuneJobSpec, below: str = ""):
    """Ray Train's (storage_path, storage_filesystem) for the job's checkpoints under `<output>/_checkpoints`
    (and `below` it).

    Ray Train writes through pyarrow filesystems; an S3-compatible endpoint (SeaweedFS, MinIO) needs an explicit
    S3FileSystem because pyarrow ignores $AWS_ENDPOINT_URL, and then the path is given without its scheme.
    """
    root = join(spec.output, "_checkpoints", *filter(None, [below]))
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
