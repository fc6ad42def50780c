"""Fine-tune jobs: the spec (what to train, on what, where to put it) and the model card (what came out).

A fine-tune job turns a pre-trained torchvision backbone and a small labelled image set into a versioned
artifact folder that label jobs accept as their model. The card is the artifact's contract: label jobs read
the architecture, class names and preprocessing from it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from schemas.specs import Extensions, ModelSpec, PreprocessSpec, Spec, StorageOptions, _as_prefix, not_blank

LABELS_FILE_SUFFIXES = (".csv", ".parquet")
MODEL_CARD_NAME = "model_card.json"
CARD_FORMAT_VERSION = 1


class FinetuneDataSpec(Spec):
    """The labelled images: one sub-folder per class, or a labels file naming each image's class."""

    uri: Annotated[str, not_blank("data uri")] = Field(
        description="Folder or s3:// prefix with one sub-folder per class, or a CSV/Parquet labels file whose "
        "keys are relative to the file's folder (or absolute locations under it or under allowed_roots)."
    )
    validation_uri: str | None = Field(
        default=None, description="A separate validation set in the same layout; without it, a stratified split."
    )
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each class held out for validation.")
    group_duplicates: bool = Field(
        default=True,
        description="Keep near-duplicate images (same content sha256, or embedding cosine >= duplicate_cosine) on "
        "one side of the train/validation split, so validation never scores a copy of a training image.",
    )
    duplicate_cosine: float = Field(
        default=0.93,
        gt=0,
        le=1,
        description="Embedding cosine (the base model's frozen features) from which two images of one class count "
        "as the same subject. On the plants sample (MobileNetV2) photos of one leaf scored 0.938-0.963, the closest "
        "distinct leaves 0.925 and below.",
    )
    allowed_roots: tuple[str, ...] = Field(
        default=(),
        description="Locations (folders or s3:// prefixes) that labels-file keys may name besides the labels file's "
        "own folder, as a label manifest's input.allowed_roots: a key anywhere else refuses the job before it starts.",
    )
    key_column: str = Field(default="key", description="Labels-file column holding the image keys.")
    label_column: str = Field(default="label", description="Labels-file column holding the class names.")
    extensions: Extensions


class CorrectionsApplied(Spec):
    """What a fine-tune made of review decisions (its card's `dataset.corrections`)."""

    queues: tuple[str, ...] = Field(description="The queue outputs whose corrections were read.")
    decisions: int = Field(ge=0, description="Decisions read, every kind (undone ones and skips included).")
    images_decided: int = Field(ge=0, description="Images whose latest decision is a label or bad.")
    relabelled: int = Field(ge=0, description="Images of the data whose label a decision changed.")
    dropped: int = Field(ge=0, description="Images of the data left out as bad.")
    confirmed: int = Field(ge=0, description="Images of the data whose label a decision kept.")
    not_in_data: int = Field(ge=0, description="Decided images that are not in the fine-tune's data.")
    per_reviewer: dict[str, int] = Field(default_factory=dict, description="Decided images by reviewer.")


class FinetuneMethod(StrEnum):
    """How a fine-tune job trains; what each method does is read from its properties, never by comparing names."""

    LP_FT = "lp-ft"
    FULL = "full"
    LINEAR_PROBE = "linear-probe"

    @property
    def fits_probe(self) -> bool:
        """Fits the new head on frozen features (the convex linear probe)."""
        return self is not FinetuneMethod.FULL

    @property
    def needs_embeddings(self) -> bool:
        """Embeds every image with the frozen base model before training (the probe's features)."""
        return self.fits_probe

    @property
    def trains(self) -> bool:
        """Trains the network with SGD after (or instead of) the probe; linear-probe stops at the probe."""
        return self is not FinetuneMethod.LINEAR_PROBE

    @property
    def trains_from_probe(self) -> bool:
        """Starts training from the probe's head (lp-ft) rather than from a random one (full)."""
        return self.fits_probe and self.trains


class Refit(StrEnum):
    """Whether the published model is trained again on every labelled image once the recipe's settings are chosen."""

    AUTO = "auto"  # for small sets (under REFIT_MAX_IMAGES readable images) with no separate validation set
    ALWAYS = "always"
    NEVER = "never"


REFIT_MAX_IMAGES = 2_000  # below this, holding a fifth out costs more accuracy than the held-out score is worth


class TrainingSpec(Spec):
    """How to train. The defaults are the usual recipe for a few hundred to a few thousand images."""

    method: FinetuneMethod = Field(
        default=FinetuneMethod.LP_FT,
        description="lp-ft: fit the new head on frozen features (the linear probe), then train every layer at a "
        "low learning rate from there (Kumar et al., ICLR 2022); full: train every layer from a random head, the "
        "backbone at a lower learning rate; linear-probe: one forward pass for embeddings, then a convex fit "
        "(multinomial logistic regression) of the head alone.",
    )
    epochs: int = Field(
        default=5, ge=1, le=1000, description="Evaluations (and checkpoints); each covers the data at least once."
    )
    min_steps: int = Field(
        default=200,
        ge=0,
        le=1_000_000,
        description="Optimizer steps at least (lp-ft, full): a small set is seen several times per epoch instead "
        "of training for a handful of steps (130 images x 5 epochs at batch 32 is 20 steps).",
    )
    batch_size: int = Field(default=32, ge=2, le=4096, description="Per worker.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1, description="Peak AdamW learning rate of the new head.")
    backbone_lr_scale: float = Field(
        default=0.1, gt=0, le=1, description="full: the backbone's learning rate is learning_rate times this."
    )
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay.")
    warmup_epochs: float = Field(
        default=0.5,
        ge=0,
        description="Linear warm-up before the cosine decay; keeps a random head from "
        "sending large gradients into a pre-trained backbone in the first steps.",
    )
    label_smoothing: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="null: by size (0 under 1,000 training images, 0.05 to 10,000, 0.1 above): smoothing calibrates "
        "large sets but on tiny ones flattens every score.",
    )
    probe_l2: float = Field(
        default=1.0,
        gt=0,
        description="L2 strength of the convex head fit (linear-probe, lp-ft's first stage): mean loss + "
        "probe_l2 / (2n) |W|^2 on standardised features, as scikit-learn's C = 1/probe_l2.",
    )
    early_stopping_patience: int = Field(
        default=3, ge=0, description="Stop after this many epochs without a lower validation loss; 0 = never."
    )
    class_weights: Literal["none", "balanced"] = Field(
        default="none", description="balanced: weight each class's loss by n / (classes x n_class), for imbalance."
    )
    image_size: int | None = Field(
        default=None,
        ge=32,
        le=1024,
        description="Crop side for training, evaluation and the artifact's label jobs "
        "(the weights' resize/crop ratio is kept); defaults to the base weights' eval crop. Smaller is faster.",
    )
    min_crop_scale: float = Field(
        default=0.25, gt=0, le=1, description="Smallest share of the image a random training crop may cover."
    )
    seed: int = Field(default=0, ge=0, description="Seeds the split, the head's init, shuffling and augmentation.")
    refit: Refit = Field(
        default=Refit.AUTO,
        description=f"Train the published model on every labelled image: the head's L2 is chosen by grouped k-fold "
        f"cross-validation on the frozen embeddings, lp-ft's epochs by the validation split; the card reports those "
        f"estimates. auto: under {REFIT_MAX_IMAGES:,} images and without a validation_uri; needs lp-ft or "
        f"linear-probe (the methods with frozen embeddings).",
    )

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainingSpec:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})")
        if self.refit is Refit.ALWAYS and not self.method.fits_probe:
            raise ValueError(f"refit always needs frozen embeddings to cross-validate on: method {self.method} has "
                             "none; use lp-ft or linear-probe, or refit never")  # fmt: skip
        return self


class SelfTrainingInfo(Spec):
    """How a self-trained version came to be (bulklabel self-train): the version it started from, its accuracy on
    the held-out set this version is scored on too (the card's metrics), and the pseudo-labels it added."""

    started_from: str = Field(description="The artifact whose predictions gave the pseudo-labels (`<name>:v<N>`).")
    before_val_accuracy: float
    before_val_accuracy_ci95: tuple[float, float]
    val_images: int = Field(ge=0, description="The held-out set both are scored on: the first version's validation "
                            "split.")  # fmt: skip
    target_precision: float
    threshold: float = Field(description="Pseudo-labels are predictions scoring at least this.")
    val_precision_at_threshold: float = Field(description="On the held-out set, at the threshold.")
    val_images_at_threshold: int
    pool_images: int = Field(ge=0, description="Images of the pool labelled (error rows included).")
    near_validation_excluded: int = Field(ge=0, description="Pool images left out as near-duplicates of held-out "
                                          "images.")  # fmt: skip
    pseudo_labels_per_class: dict[str, int]


class FinetuneJobSpec(Spec):
    """Fine-tuning: a torchvision backbone + labelled images → a versioned model artifact under `output`."""

    kind: Literal["finetune"] = "finetune"
    job_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Defaults to a hash of what determines the model, so a re-run resumes or finds the same job.",
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="The artifact's name in its id (`<name>:v<N>`); defaults to the output folder's name.",
    )
    data: FinetuneDataSpec
    base: ModelSpec = Field(description="The pre-trained model to start from (weights: null = random init).")
    training: TrainingSpec = TrainingSpec()
    output: str = Field(description="Folder or s3:// prefix; each finished run adds a new v1, v2, ... below it.")
    storage: StorageOptions = StorageOptions()
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks).")
    gpus_per_worker: float = Field(default=0, ge=0, le=8, description="0 trains on CPU.")
    cpus_per_worker: float = Field(default=0, ge=0, description="0 = the cluster's CPUs split between the workers.")
    max_failures: int = Field(default=2, ge=0, le=100, description="Worker failures survived, each from the last "
                              "checkpoint, before the run fails.")  # fmt: skip
    self_training: SelfTrainingInfo | None = Field(
        default=None, description="Set by `bulklabel self-train` on its second fine-tune; copied to the card."
    )
    corrections: tuple[Annotated[str, not_blank("corrections")], ...] = Field(
        default=(), description="Review queues (outputs of `bulklabel review-queue` or `label-issues`) whose review "
        "decisions apply: the latest decision per image wins; a relabel replaces its label, an image marked bad is "
        "left out. The card counts both.",
    )  # fmt: skip
    corrections_as_of: datetime | None = Field(
        default=None, description="Decisions recorded up to this time apply. Set when the job is made (to the latest "
        "decision then), so a re-run resumes the same job and new decisions make a new one.",
    )  # fmt: skip

    @field_validator("output")
    @classmethod
    def _output_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output uri is empty")
        return value

    @model_validator(mode="after")
    def _refit_without_validation_set(self) -> FinetuneJobSpec:
        if self.training.refit is Refit.ALWAYS and self.data.validation_uri:
            raise ValueError("refit always trains on every labelled image, and a validation_uri is kept apart to be "
                             "scored on: drop one of them")  # fmt: skip
        return self

    def refits(self, images: int) -> bool:
        """Whether a run on `images` readable labelled images trains its published model on all of them."""
        refit = self.training.refit
        if refit is Refit.NEVER or not self.training.method.fits_probe or self.data.validation_uri:
            return False
        return refit is Refit.ALWAYS or images < REFIT_MAX_IMAGES

    @model_validator(mode="after")
    def _output_outside_data(self) -> FinetuneJobSpec:
        out = _as_prefix(self.output)
        for uri in filter(None, (self.data.uri, self.data.validation_uri)):
            inp = _as_prefix(uri.rsplit("/", 1)[0] if uri.lower().endswith(LABELS_FILE_SUFFIXES) else uri)
            if out.startswith(inp) or inp.startswith(out):
                raise ValueError(f"output {self.output!r} must not overlap the data at {uri!r}")
        return self

    def resolved_job_id(self) -> str:
        """The job id: given, or derived from the output and every field that decides the trained weights."""
        return self.job_id or f"finetune-{self.training_identity(with_output=True)[:12]}"

    def training_identity(self, with_output: bool = False) -> str:
        """sha256 of the fields that decide the trained weights (data, base model, training, number of ranks)."""
        fields = {"data", "base", "training", "num_workers"} | ({"output"} if with_output else set())
        if self.corrections:  # absent otherwise, so the ids of jobs made before corrections existed stay the same
            fields |= {"corrections", "corrections_as_of"}
        identity = self.model_dump(mode="json", include=fields)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def artifact_name(self) -> str:
        """`name`, or the output folder's last path component."""
        if self.name:
            return self.name
        last = self.output.rstrip("/").rsplit("/", 1)[-1]
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in last).lstrip("._-") or "model"


# ------------------------------------------------------------------------------------------- what comes out


class Stage(Spec):
    """One stage of a recipe, as the card reports it."""

    name: Literal["head", "full"] = Field(description="head: the new head alone, on frozen features; full: all layers.")
    optimizer: str
    steps: int = Field(ge=0, description="Optimizer steps (L-BFGS iterations for the convex fit).")
    head_lr: float | None = None
    backbone_lr: float | None = None


class Estimate(StrEnum):
    """Where a refitted model's accuracy figure comes from: it saw every image, so none can score it directly."""

    CROSS_VALIDATION = "cross-validation"  # linear-probe: out-of-fold predictions of the same fit on every image
    HOLDOUT = "holdout"  # lp-ft: the same recipe trained without the validation split, scored on it


class RefitInfo(Spec):
    """How a refitted model was made, and what its card's accuracy estimates (the card's metrics are that estimate)."""

    images: int = Field(ge=0, description="Labelled images the published model trained on: all readable ones.")
    estimate: Estimate
    folds: int = Field(ge=2, description="Cross-validation folds (near-duplicate groups kept within one).")
    probe_l2: float = Field(description="The head's L2, chosen by cross-validated log loss from probe_l2_grid.")
    probe_l2_grid: tuple[float, ...]
    cv_accuracy: float = Field(description="Out-of-fold accuracy of the head on frozen features, every image "
                               "scored once by a fit that did not see it.")  # fmt: skip
    cv_accuracy_ci95: tuple[float, float]
    cv_log_loss: float
    epochs: int = Field(default=0, ge=0, description="lp-ft: epochs trained on every image, the validation run's "
                        "best; 0: the head alone (the validation run's best was its fitted head).")  # fmt: skip
    steps: int = Field(default=0, ge=0, description="Optimizer steps of that training.")


class Recipe(Spec):
    """What a run does, decided on the driver from the spec and the data's size before any worker starts."""

    method: FinetuneMethod
    train_images: int = Field(ge=0)
    stages: tuple[Stage, ...]
    epochs: int = Field(ge=0, description="Evaluations of the trained stage (each one checkpointed).")
    steps_per_epoch: int = Field(ge=0)
    samples_per_epoch: int = Field(ge=0, description="Per rank: more than its images when a small set repeats.")
    warmup_steps: int = Field(ge=0)
    label_smoothing: float
    notes: str = Field(description="Why the recipe looks as it does, in a sentence.")
    refit: RefitInfo | None = Field(default=None, description="Set when the published model trained on every image.")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class ClassMetrics(Spec):
    name: str
    precision: float
    recall: float
    f1: float
    support: int = Field(ge=0, description="Validation images of this class.")


class EpochMetrics(Spec):
    """One line of the training curves."""

    epoch: int = Field(ge=0, description="0: the head fitted on frozen features, before any layer was trained.")
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float = Field(description="The head's learning rate at the end of the epoch.")
    seconds: float = Field(ge=0)


class Metrics(Spec):
    """Validation metrics of the published weights (the epoch with the lowest validation loss): metrics.json."""

    val_accuracy: float
    val_accuracy_ci95: tuple[float, float] = Field(description="Wilson score interval of val_accuracy.")
    val_images: int = Field(ge=0)
    val_loss: float
    macro_f1: float = Field(description="Mean F1 over macro_f1_classes: a class without validation images has no "
                            "F1 to average (counting it as 0 would blame the model for a split's gap).")  # fmt: skip
    macro_f1_classes: list[str] = Field(
        default_factory=list, description="The classes macro_f1 averages over: those with validation images."
    )
    class_names: list[str]
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]] = Field(description="Rows: true class; columns: predicted class.")
    best_epoch: int = Field(ge=0)
    history: list[EpochMetrics]


class TrainingState(Spec):
    """Where a training run stands: state.json in every checkpoint, so a restarted run continues from it."""

    epochs_done: int = 0
    history: tuple[EpochMetrics, ...] = ()
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_confusion: tuple[tuple[int, ...], ...] = ()
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    resumed_after_epochs: tuple[int, ...] = ()
    train_seconds: float = 0.0
    skipped_images: int = 0
    skipped_examples: tuple[str, ...] = ()
    preprocess: PreprocessSpec | None = None  # the base weights' evaluation preprocessing, for the model card

    def finished(self, epochs: int) -> bool:
        return self.stopped_early or self.epochs_done >= epochs


class DatasetInfo(Spec):
    """Which images the model saw, so a card can be checked against its data."""

    uri: str
    validation_uri: str | None
    fingerprint: str = Field(description="sha256 over every (key, class, size), train and validation.")
    train_images: int
    val_images: int
    train_per_class: dict[str, int]
    val_per_class: dict[str, int]
    skipped_images: int = Field(description="Unreadable images left out of training and validation (before the split).")
    skipped_examples: list[str] = Field(description="Up to 20 of them, with the reason.")
    split_file: str = Field(description="File in the artifact listing each image, its class and its split.")
    groups: int | None = Field(
        default=None, description="Groups the split kept whole (an image alone is a group); null: not grouped."
    )
    duplicate_groups: int = Field(default=0, description="Groups of two or more near-duplicate images.")
    grouped_images: int = Field(default=0, description="Images in those groups.")
    val_shortfall: int = Field(
        default=0,
        description="Validation images val_fraction asked for that the split could not hold out: near-duplicate "
        "groups larger than what was left of their class's share stay whole in training, so validation is smaller.",
    )
    unvalidated_classes: list[str] = Field(
        default_factory=list,
        description="Classes with no validation image (all held-out candidates unreadable, or every near-duplicate "
        "group too large): their recall is not measured and the macro averages leave them out.",
    )
    corrections: CorrectionsApplied | None = Field(
        default=None, description="Review decisions applied to the labels (fine-tune --corrections): how many "
        "labels were changed and images dropped, and from which queues.",
    )  # fmt: skip


class ModelCard(Spec):
    """model_card.json: everything a label job (or a person) needs to use and trust the artifact."""

    format_version: Literal[1] = CARD_FORMAT_VERSION
    artifact_id: str = Field(description="`<name>:v<N>`, recorded as `model` in label outputs.")
    version: int = Field(ge=1)
    architecture: str = Field(description="torchvision registry name.")
    base_weights: str | None = Field(description="The weights fine-tuning started from; null = random init.")
    class_names: list[str] = Field(min_length=2, description="In output-index order.")
    preprocess: PreprocessSpec = Field(description="Evaluation preprocessing; label jobs use exactly this.")
    weights_file: str = Field(description="Safetensors state dict for get_model(architecture, num_classes=N).")
    weights_sha256: str
    training: TrainingSpec
    recipe: Recipe | None = Field(default=None, description="What the run did: stages, steps, learning rates.")
    job_id: str
    num_workers: int
    dataset: DatasetInfo
    metrics: Metrics
    epochs_run: int = Field(ge=0)
    stopped_early: bool
    resumed_after_epochs: list[int] = Field(description="Epochs after which an interrupted run was resumed.")
    train_seconds: float = Field(description="Wall time of the training loops, summed over resumed runs.")
    created_at: datetime
    self_training: SelfTrainingInfo | None = Field(
        default=None, description="A self-trained version's start, before-accuracy and pseudo-labels per class."
    )
