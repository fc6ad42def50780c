"""`bulklabel self-train`: a model's confident predictions on unlabelled images as extra training labels.

The job is a recipe over the other kinds, each step a job of its own with an id derived from this one, so a run
killed anywhere and started again finds its finished steps complete and does only the rest:
1. fine-tune on the labelled set (its validation split is the held-out set from here on);
2. label the held-out images and the pool with that version (label jobs, given labels kept for the held-out ones);
3. the threshold: the lowest top-1 score at which the held-out predictions reach `target_precision` with at least
   `min_support` images (none reaches it: the job stops, saying the best it found);
4. pool images at or above it become pseudo-labels, but none that is a near-duplicate of a held-out image (the
   same bytes, or an embedding cosine of `duplicate_cosine` or more), which would leak the held-out set into
   training;
5. fine-tune again on the first version's training images plus the pseudo-labels, validated on the same held-out set;
   the card holds the first version's accuracy beside its own, and the pseudo-labels per class.
Driver-side: no torch (each step's own runner puts the work on the cluster).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from jobs.curate.dedupe import read_images
from jobs.errors import BadInput
from jobs.finetune import FinetuneSummary, run_finetune_job
from jobs.label.runner import run_label_job
from jobs.output.faultpoints import crash_point
from jobs.output.reader import open_output
from schemas.curation import SelfTrainJobSpec
from schemas.finetune import FinetuneJobSpec, SelfTrainingInfo
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec
from workers.curate.neighbours import nearest_cosine, unit_rows
from workers.finetune.artifacts import SPLIT_NAME
from workers.io.storage import join, normalise_uri, open_storage

log = logging.getLogger(__name__)


class PrecisionUnreachable(BadInput):
    """No threshold gives the held-out predictions the precision asked for: the model is not good enough yet."""


@dataclass(frozen=True)
class SelfTrainSummary:
    job_id: str
    status: Outcome
    first: FinetuneSummary
    second: FinetuneSummary
    seconds: float

    def lines(self) -> list[str]:
        info = self.second.card.self_training
        m = self.second.card.metrics
        (b_low, b_high), (a_low, a_high) = info.before_val_accuracy_ci95, m.val_accuracy_ci95
        per_class = ", ".join(f"{c} {n}" for c, n in info.pseudo_labels_per_class.items())
        return [
            f"job {self.job_id}: {self.status.value}",
            f"  before:   {info.started_from} accuracy {info.before_val_accuracy:.4f} (95% CI {b_low:.3f}-"
            f"{b_high:.3f}) on {info.val_images} held-out images",
            f"  after:    {self.second.card.artifact_id} accuracy {m.val_accuracy:.4f} (95% CI {a_low:.3f}-"
            f"{a_high:.3f}) on the same images",
            f"  pseudo:   {sum(info.pseudo_labels_per_class.values())} of {info.pool_images} pool images at score >= "
            f"{info.threshold:.3f} (held-out precision {info.val_precision_at_threshold:.3f} on "
            f"{info.val_images_at_threshold}, target {info.target_precision}); {info.near_validation_excluded} "
            f"near-duplicates of held-out images left out; per class: {per_class}",
            f"  artifact: {self.second.artifact}",
            f"  time:     {self.seconds:.1f}s",
        ]  # fmt: skip


def run_self_train_job(spec: SelfTrainJobSpec, show_progress: bool = True) -> SelfTrainSummary:
    started = time.monotonic()
    job_id = spec.resolved_job_id()
    work = normalise_uri(spec.work_uri()).rstrip("/")
    storage = open_storage(work, spec.storage)
    data_root = _root_of(spec.data.uri)

    first = run_finetune_job(spec.finetune_spec(), show_progress=False)
    log.info("self-train %s: first version %s, held-out accuracy %.4f", job_id, first.card.artifact_id,
             first.card.metrics.val_accuracy)  # fmt: skip
    split = _split(first.artifact, spec)
    held_out = join(work, "held-out", "labels.csv")
    storage.write_bytes(held_out, _labels_csv((key, label) for key, label, side in split if side == "val"))
    val_out, pool_out = join(work, "held-out-labels"), join(work, "pool-labels")
    _label(spec, f"{job_id}-held-out", {"uri": held_out, "format": "manifest", "allowed_roots": [data_root]},
           val_out, first.artifact)  # fmt: skip
    _label(spec, f"{job_id}-pool", {"uri": spec.pool, "format": "files"}, pool_out, first.artifact)
    crash_point("self-train:labelled")

    threshold, precision, support = choose_threshold(_predictions(val_out, spec), spec.target_precision,
                                                     spec.min_support)  # fmt: skip
    pseudo, excluded, pool_images = _pseudo_labels(spec, val_out, pool_out, threshold)
    training = join(work, "round-2", "labels.csv")
    train_rows = [(key, label) for key, label, side in split if side == "train"]
    storage.write_bytes(training, _labels_csv(train_rows + pseudo))
    info = SelfTrainingInfo(
        started_from=first.card.artifact_id, before_val_accuracy=first.card.metrics.val_accuracy,
        before_val_accuracy_ci95=first.card.metrics.val_accuracy_ci95, val_images=first.card.metrics.val_images,
        target_precision=spec.target_precision, threshold=threshold, val_precision_at_threshold=precision,
        val_images_at_threshold=support, pool_images=pool_images, near_validation_excluded=excluded,
        pseudo_labels_per_class=dict(sorted(Counter(label for _, label in pseudo).items())),
    )  # fmt: skip
    data = spec.data.model_copy(update={"uri": training, "validation_uri": held_out, "group_duplicates": False,
                                        "allowed_roots": (data_root, _root_of(spec.pool)), "key_column": "key",
                                        "label_column": "label"})  # fmt: skip
    second = run_finetune_job(_finetune(spec, f"{job_id}-second", data, info), show_progress=False)
    status = Outcome.ALREADY_COMPLETE if second.status is Outcome.ALREADY_COMPLETE else Outcome.SUCCEEDED
    return SelfTrainSummary(job_id, status, first, second, time.monotonic() - started)


def _finetune(spec: SelfTrainJobSpec, job_id: str, data, info: SelfTrainingInfo | None = None) -> FinetuneJobSpec:
    training = spec.finetune_spec().training  # never refitted, as the first
    return FinetuneJobSpec(job_id=job_id, data=data, base=spec.base, training=training, output=spec.output,
                           storage=spec.storage, self_training=info)  # fmt: skip


def _label(spec: SelfTrainJobSpec, job_id: str, source: dict, output: str, model: str) -> None:
    label = LabelJobSpec(job_id=job_id, input=source, output=output, model={"name": model}, storage=spec.storage,
                         shared_storage=spec.shared_storage)  # fmt: skip
    summary = run_label_job(label, show_progress=False)
    log.info("self-train: %s labelled %d images (%s)", job_id, summary.images, summary.status)


def _root_of(uri: str) -> str:
    """The folder of a labels file, or the folder itself: what keys of the data may name."""
    uri = normalise_uri(uri).rstrip("/")
    return uri.rsplit("/", 1)[0] if uri.lower().endswith((".csv", ".parquet")) else uri


def _split(artifact: str, spec: SelfTrainJobSpec) -> list[tuple[str, str, str]]:
    location = join(artifact, SPLIT_NAME)
    text = open_storage(location, spec.storage).read_bytes(location).decode()
    return [(r["key"], r["label"], r["split"]) for r in csv.DictReader(io.StringIO(text))]


def _labels_csv(rows) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", "label"])
    writer.writerows(rows)
    return out.getvalue().encode()


def _predictions(output: str, spec: SelfTrainJobSpec) -> list[tuple[float, bool]]:
    """(top-1 score, whether it is the given label) of each labelled held-out image."""
    rows = open_output(output, spec.storage).to_table(columns=["label", "score", "given_label"]).to_pylist()
    return [(r["score"], r["label"] == r["given_label"]) for r in rows if r["label"] is not None]


def choose_threshold(
    predictions: list[tuple[float, bool]], target: float, min_support: int
) -> tuple[float, float, int]:
    """The lowest score at which the predictions scoring at least it reach `target` precision with `min_support`
    of them at least: (threshold, its precision, how many). None does: PrecisionUnreachable, with the best found."""
    ranked = sorted(predictions, key=lambda p: -p[0])
    best: tuple[float, float, int] | None = None
    right = 0
    for count, (score, correct) in enumerate(ranked, start=1):
        right += correct
        last_of_score = count == len(ranked) or ranked[count][0] != score  # a threshold keeps every equal score
        if last_of_score and count >= min_support and right / count >= target:
            best = (score, right / count, count)
    if best is None:
        top = right / len(ranked) if ranked else 0.0
        raise PrecisionUnreachable(f"no score threshold gives precision {target} on {min_support} or more of the "
                                   f"{len(ranked)} held-out images (all of them: {top:.3f}): label more images, or "
                                   "lower --target-precision / --min-support")  # fmt: skip
    return best


def _pseudo_labels(spec: SelfTrainJobSpec, val_out: str, pool_out: str,
                   threshold: float) -> tuple[list[tuple[str, str]], int, int]:  # fmt: skip
    """(image, predicted label) of the pool images scoring at least `threshold` that are no near-duplicate of a
    held-out image (the same bytes, or an embedding cosine of `duplicate_cosine` or more to one of them: compared
    one to one, not through chains of groups, which on photos of one kind of subject would join nearly everything);
    how many were left out for that; how many pool images were labelled."""
    images = read_images((val_out, pool_out), spec.storage)
    held = np.array([source == val_out for source in images.source])
    unit = unit_rows(images.embeddings)
    closest = nearest_cosine(unit[~held], unit[held & images.has_embedding])
    held_ids = {d for d, h in zip(images.image_id, held, strict=True) if h and d is not None}
    near = {key for key, cos, digest in zip(np.array(images.key)[~held], closest,
                                             np.array(images.image_id, dtype=object)[~held], strict=True)
            if cos >= spec.duplicate_cosine or digest in held_ids}  # fmt: skip
    pool = open_output(pool_out, spec.storage).to_table(columns=["key", "source", "label", "score"]).to_pylist()
    pseudo, excluded = [], 0
    for row in pool:
        if row["label"] is None or row["score"] < threshold:
            continue
        if row["key"] in near:
            excluded += 1
            continue
        pseudo.append((row["source"], row["label"]))
    return sorted(pseudo), excluded, len(pool)
