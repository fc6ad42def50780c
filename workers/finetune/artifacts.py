"""Model artifacts: versioned folders that fine-tune jobs publish and label jobs load.

Layout of an output prefix:
    v1/, v2/, ...            one per finished fine-tune run; an existing version is never written again
    vN/_claim.json           written first, atomically (create-if-absent): the job that owns vN, so two runs
                             publishing at the same moment get two versions; the owner alone writes into vN
    vN/model.safetensors     weights: `backbone.*` (torchvision <architecture>, last Linear → Identity), `head.*`
    vN/metrics.json          validation accuracy, per-class precision/recall/F1, confusion matrix, curves
    vN/curves.png            loss and accuracy per epoch
    vN/confusion_matrix.png
    vN/split.csv             key, label, split (train | val) of every image used
    vN/model_card.json       written last: a version without a card is incomplete and is never loaded
    _checkpoints/<job id>/   Ray Train's per-epoch checkpoints while a run is unfinished (removed after publishing),
                             and _run.json: what they were trained on, so a resume never mixes specs or data
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

from schemas.finetune import (
    MODEL_CARD_NAME,
    ClassMetrics,
    DatasetInfo,
    EpochMetrics,
    FinetuneJobSpec,
    Metrics,
    ModelCard,
    Recipe,
    TrainingState,
)
from schemas.specs import ModelSpec, StorageOptions
from workers.finetune.dataplan import DataPlan
from workers.io.storage import Storage, join, local_scratch_dir, normalise_uri, open_storage, relative_key

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
CONFUSION_NAME = "confusion_matrix.png"
SPLIT_NAME = "split.csv"
CLAIM_NAME = "_claim.json"
CHECKPOINTS_DIR = "_checkpoints"
CLAIM_ATTEMPTS = 100  # versions tried past the highest one listed before publishing gives up
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_HASH_CHUNK = 1 << 20
MAX_SKIPPED_KEPT = 20  # unreadable images named in the card; the rest are counted


class ArtifactError(ValueError):
    """An artifact location holds no usable model card or weights."""


class VersionClaimFailed(RuntimeError):
    """No version could be claimed under an output: every one tried was claimed by another run first."""


def is_artifact_location(name: str) -> bool:
    """True when a model name is a location (path or URI) rather than a torchvision registry name."""
    return "/" in name


def checkpoints_uri(output: str, job_id: str) -> str:
    return join(output, CHECKPOINTS_DIR, job_id)


# --------------------------------------------------------------------------------------------------- versions


def versions(storage: Storage, output: str) -> dict[int, set[str]]:
    """Each version folder under `output` and the names of the files directly in it, complete or not: a version is
    complete (loadable) only when MODEL_CARD_NAME is among them; one with just a claim is being published or was
    left by a run that died while publishing. Numbering counts them all, loaders skip the incomplete ones."""
    found: dict[int, set[str]] = {}
    for obj in storage.list(output):
        first, _, rest = relative_key(output, obj.uri).partition("/")
        match = _VERSION_DIR.match(first)
        if match and rest:
            found.setdefault(int(match.group(1)), set()).add(rest)
    return found


def claim_version(storage: Storage, output: str, job_id: str) -> int:
    """The version this job publishes into, claimed before anything is written there.

    A version whose claim is this job's and which has no card yet is the job's own unfinished publication (it
    died mid-publish): it is continued. Otherwise the next free number is claimed with an atomic create-if-absent
    of vN/_claim.json; a run that loses the race to another tries N+1, so two runs publishing at the same moment
    get two versions, and no two runs ever write into one folder.
    """
    listed = versions(storage, output)
    for version, names in sorted(listed.items()):
        if CLAIM_NAME in names and MODEL_CARD_NAME not in names:
            claim = _read_claim(storage, join(output, f"v{version}"))
            if claim.get("job_id") == job_id:
                log.info("job %s continues publishing v%d, which it claimed before", job_id, version)
                return version
    first = max(listed, default=0) + 1  # after every folder present, complete or not: none is written twice
    for version in range(first, first + CLAIM_ATTEMPTS):
        claim = {"job_id": job_id, "claimed_at": datetime.now(UTC).isoformat(), "host": socket.gethostname(),
                 "pid": os.getpid()}  # fmt: skip
        if storage.create_exclusive(join(output, f"v{version}", CLAIM_NAME), json.dumps(claim).encode()):
            return version
        log.info("v%d under %s was claimed by another run first; trying v%d", version, output, version + 1)
    raise VersionClaimFailed(
        f"job {job_id}: versions v{first} to v{first + CLAIM_ATTEMPTS - 1} under {output} were all claimed by other "
        "runs first; its checkpoints are kept, so running the same job again publishes once fewer runs race"
    )


def _read_claim(storage: Storage, location: str) -> dict:
    """A version's claim, or {} when it cannot be read as one (a claim is tiny JSON written whole)."""
    try:
        claim = json.loads(storage.read_bytes(join(location, CLAIM_NAME)))
    except (FileNotFoundError, ValueError):
        return {}
    return claim if isinstance(claim, dict) else {}


def find_job_artifact(storage: Storage, output: str, job_id: str) -> tuple[str, ModelCard] | None:
    """The published artifact of `job_id` under `output`, if a finished run of that job wrote one."""
    for version, names in sorted(versions(storage, output).items(), reverse=True):
        if MODEL_CARD_NAME in names:
            location = join(output, f"v{version}")
            card = ModelCard.model_validate_json(storage.read_bytes(join(location, MODEL_CARD_NAME)))
            if card.job_id == job_id:
                return location, card
    return None


# ------------------------------------------------------------------------------------------------- metrics

ROUGH_BELOW = 50  # validation images under which the summary calls the accuracy rough


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % at z = 1.96) of a proportion correct / total: unlike the normal
    approximation it stays inside [0, 1] and is honest at 10/10 or 0/10, which small validation sets give."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def metrics_of(confusion: list[list[int]], class_names: list[str], history: list[EpochMetrics], best_epoch: int
               ) -> Metrics:  # fmt: skip
    """Accuracy, per-class precision/recall/F1 and macro F1 from a confusion matrix (rows true, columns predicted)."""
    n = len(class_names)
    total = sum(map(sum, confusion))
    per_class = []
    for i, name in enumerate(class_names):
        hit, predicted, actual = confusion[i][i], sum(row[i] for row in confusion), sum(confusion[i])
        precision = hit / predicted if predicted else 0.0
        recall = hit / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassMetrics(name=name, precision=precision, recall=recall, f1=f1, support=actual))
    best = next(m for m in history if m.epoch == best_epoch)
    correct = sum(confusion[i][i] for i in range(n))
    validated = [c for c in per_class if c.support > 0]
    return Metrics(
        val_accuracy=correct / total if total else 0.0,
        val_accuracy_ci95=wilson_interval(correct, total),
        val_images=total,
        val_loss=best.val_loss,
        macro_f1=sum(c.f1 for c in validated) / len(validated) if validated else 0.0,
        macro_f1_classes=[c.name for c in validated],
        class_names=class_names,
        per_class=per_class,
        confusion_matrix=confusion,
        best_epoch=best_epoch,
        history=history,
    )


def plot_curves(history: list[EpochMetrics], best_epoch: int, path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, with the published epoch marked."""
    from matplotlib.figure import Figure  # Figure without pyplot renders with Agg: no display, no global state

    epochs = [m.epoch for m in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        ax.plot(epochs, [getattr(m, f"train_{key}") for m in history], marker="o", label="train (augmented)")
        ax.plot(epochs, [getattr(m, f"val_{key}") for m in history], marker="o", label="validation")
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"published (epoch {best_epoch})")
        ax.set(xlabel="epoch", title=title)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path) -> None:
    """The confusion matrix as a heat map with counts; rows are true classes, columns predictions."""
    from matplotlib.figure import Figure

    n = len(class_names)
    side = min(4 + 0.6 * n, 30)
    fig = Figure(figsize=(side, side * 0.85), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="validation confusion matrix")
    if n <= 30:  # beyond that the numbers are unreadable anyway
        peak = max(max(row) for row in confusion) or 1
        for i in range(n):
            for j in range(n):
                colour = "white" if confusion[i][j] > peak / 2 else "black"
                ax.text(j, i, str(confusion[i][j]), ha="center", va="center", color=colour, fontsize=8)
    fig.savefig(path, dpi=100)


def split_csv(plan: DataPlan) -> bytes:
    """key (the image's location), label, split: usable as a label job's manifest."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", "label", "split"])
    writer.writerows(plan.split_rows)
    return out.getvalue().encode()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- publish


def publish(
    storage: Storage,
    job: FinetuneJobSpec,
    job_id: str,
    plan: DataPlan,
    best_weights: Path,
    state: TrainingState,
    recipe: Recipe | None = None,
) -> tuple[str, ModelCard]:
    """Write a run's best weights (a safetensors file), metrics, plots and split as a new version under the job's
    output: the version is claimed first (`claim_version`), the model card goes last, so a version is complete
    exactly when its card exists. Returns (location, card)."""
    scratch = Path(local_scratch_dir())
    try:
        weights = scratch / WEIGHTS_NAME
        shutil.copyfile(best_weights, weights)
        class_names = list(plan.class_names)
        metrics = metrics_of(state.best_confusion, class_names, state.history, state.best_epoch)
        plot_curves(state.history, state.best_epoch, scratch / CURVES_NAME)
        plot_confusion(state.best_confusion, class_names, scratch / CONFUSION_NAME)
        # Claimed only now, once everything to write is ready: a run that fails before leaves no claim behind.
        version = claim_version(storage, job.output, job_id)
        location = join(job.output, f"v{version}")
        card = _card(job, job_id, plan, state, version, metrics, sha256_of(weights))
        card = card.model_copy(update={"recipe": recipe})
        storage.upload_file(str(weights), join(location, WEIGHTS_NAME))
        storage.write_bytes(join(location, METRICS_NAME), metrics.model_dump_json(indent=1).encode())
        storage.upload_file(str(scratch / CURVES_NAME), join(location, CURVES_NAME))
        storage.upload_file(str(scratch / CONFUSION_NAME), join(location, CONFUSION_NAME))
        storage.write_bytes(join(location, SPLIT_NAME), split_csv(plan))
        storage.write_bytes(join(location, MODEL_CARD_NAME), card.model_dump_json(indent=1).encode())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("published %s at %s (val accuracy %.4f)", card.artifact_id, location, metrics.val_accuracy)
    return location, card


def _card(job: FinetuneJobSpec, job_id: str, plan: DataPlan, state: TrainingState, version: int, metrics: Metrics,
          weights_sha256: str) -> ModelCard:  # fmt: skip
    return ModelCard(
        artifact_id=f"{job.artifact_name()}:v{version}",
        version=version,
        architecture=job.base.name,
        base_weights=job.base.weights,
        class_names=list(plan.class_names),
        preprocess=state.preprocess,
        weights_file=WEIGHTS_NAME,
        weights_sha256=weights_sha256,
        training=job.training,
        job_id=job_id,
        num_workers=job.num_workers,
        dataset=_dataset_info(job, plan, state),
        metrics=metrics,
        epochs_run=state.epochs_done,
        stopped_early=state.stopped_early,
        resumed_after_epochs=state.resumed_after_epochs,
        train_seconds=round(state.train_seconds, 2),
        created_at=datetime.now(UTC),
        self_training=job.self_training,
    )


def _dataset_info(job: FinetuneJobSpec, plan: DataPlan, state: TrainingState) -> DatasetInfo:
    return DatasetInfo(
        uri=job.data.uri,
        validation_uri=job.data.validation_uri,
        fingerprint=plan.fingerprint,
        train_images=len(plan.train),
        val_images=len(plan.val),
        train_per_class=plan.counts("train"),
        val_per_class=plan.counts("val"),
        # Left out before the split (the plan), and any that became unreadable between that pass and training.
        skipped_images=len(plan.unreadable) + state.skipped_images,
        skipped_examples=[*plan.unreadable, *state.skipped_examples][:MAX_SKIPPED_KEPT],
        split_file=SPLIT_NAME,
        groups=plan.groups,
        duplicate_groups=plan.duplicate_groups,
        grouped_images=plan.grouped_images,
        val_shortfall=plan.val_shortfall,
        unvalidated_classes=list(plan.unvalidated_classes),
        corrections=plan.corrections,
    )


def remove_checkpoints(storage: Storage, output: str, job_id: str) -> None:
    """Delete a published run's checkpoints: the artifact holds what they were kept for."""
    for obj in storage.list(checkpoints_uri(output, job_id)):
        storage.delete(obj.uri)
    if not output.startswith("s3://"):  # local listings do not show the empty folders left behind
        shutil.rmtree(checkpoints_uri(output, job_id), ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(output, CHECKPOINTS_DIR).rmdir()  # only when no other job's checkpoints are in it


# ---------------------------------------------------------------------------------------------------- load


def read_card(location: str, options: StorageOptions | None = None) -> ModelCard:
    """The model card of the artifact at `location` (a version folder, or the card file itself)."""
    location = normalise_uri(location).rstrip("/")
    uri = location if location.endswith(".json") else join(location, MODEL_CARD_NAME)
    storage = open_storage(uri, options)
    if not storage.exists(uri):
        folder = uri.rsplit("/", 1)[0]
        claim = _read_claim(storage, folder)
        if claim:
            raise ArtifactError(
                f"{folder} is an incomplete version: claimed by job {claim.get('job_id')} at "
                f"{claim.get('claimed_at')} on {claim.get('host')}, but its model card is not written (still "
                "publishing, or that run died while publishing: running the same job again finishes it)"
            )
        raise ArtifactError(f"no model card at {uri}: expected a fine-tuned model folder such as <output>/v1")
    return ModelCard.model_validate_json(storage.read_bytes(uri))


def card_of(spec: ModelSpec, options: StorageOptions | None = None) -> ModelCard | None:
    """The model card of a spec naming a fine-tuned artifact, None for a registry model: what the driver's checks
    (schemas.catalog's class_names, model_gflops) need of an artifact, read without torch."""
    return read_card(spec.name, options) if is_artifact_location(spec.name) else None
