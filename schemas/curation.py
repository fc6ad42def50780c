"""Curation jobs: their specs, the Arrow schemas of the tables they write, and the typed manifest of such an output.

A curation job reads what other jobs wrote (label outputs, a fine-tune's split) and writes one table of findings:
`dedupe` (near-duplicate groups and the leakage they cause across a split), `review-queue` (the images a person
should look at first). Its output follows the label output's layout (schemas.layout: `_owner.json`, `data/`, the
lease, `_job.json` written last), so it is committed once and read by `bulklabel query`, DuckDB and Polars alike;
its manifest is a `ResultManifest` (kind, table, files), not a label job's.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.finetune import FinetuneDataSpec, FinetuneJobSpec, Refit, TrainingSpec
from schemas.outcome import Outcome
from schemas.specs import ModelSpec, Spec, StorageOptions, _as_prefix, not_blank

RESULT_SCHEMA_VERSION = 1
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _job_id_of(kind: str, spec: BaseModel, fields: set[str]) -> str:
    """A job id from the fields that decide the output's rows (those at their defaults left out, so a field added
    later keeps the ids, and resumes, of existing jobs)."""
    identity = spec.model_dump(mode="json", include=fields, exclude_defaults=True)
    return f"{kind}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"


class _CurationSpec(Spec):
    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN,
                               description="Defaults to a hash of what determines the output, so a re-run is the "
                                           "same job.")  # fmt: skip
    output: Annotated[str, not_blank("output")] = Field(description="Local folder or s3://bucket/prefix for the "
                                                                    "result table and its manifest.")  # fmt: skip
    storage: StorageOptions = StorageOptions()

    def _refuse_output_among(self, inputs: tuple[str, ...]) -> None:
        out = _as_prefix(self.output)
        for uri in inputs:
            inp = _as_prefix(uri)
            if out.startswith(inp) or inp.startswith(out):
                raise ValueError(f"output {self.output!r} must not overlap input {uri!r}")


class DedupeJobSpec(_CurationSpec):
    """Exact and near-duplicate images across label outputs, and the leakage they cause across a train/validation
    split: one row per image with its group and the group's representative."""

    kind: Literal["dedupe"] = "dedupe"
    sources: tuple[Annotated[str, not_blank("source")], ...] = Field(
        min_length=1, description="Label outputs (folders or s3:// prefixes) whose images are compared, with "
        "embeddings stored (the label job's default).")  # fmt: skip
    threshold: float = Field(
        default=0.83, gt=0, le=1,
        description="Embedding cosine from which two images are near-duplicates (identical bytes always are). On the "
        "ImageNet sample (MobileNetV2), copies halved in size, re-encoded at JPEG quality 35 or cropped 4% scored "
        "0.847-0.986 against their originals; the closest two distinct photos 0.769.",
    )  # fmt: skip
    split: str | None = Field(
        default=None,
        description="A fine-tune artifact's version folder (models/x/v3): each image's side of its split.csv, and "
        "the groups that span train and validation.",
    )
    index: Literal["auto", "exact", "ivf"] = Field(
        default="auto",
        description="Neighbour search: exact inner products, an approximate faiss IVF index, or auto by size.",
    )

    @field_validator("sources")
    @classmethod
    def _distinct(cls, sources: tuple[str, ...]) -> tuple[str, ...]:
        seen = [_as_prefix(s) for s in sources]
        if len(set(seen)) != len(seen):
            raise ValueError("a label output is named twice")
        return sources

    @model_validator(mode="after")
    def _output_apart(self) -> DedupeJobSpec:
        self._refuse_output_among(self.sources + ((self.split,) if self.split else ()))
        return self

    def resolved_job_id(self) -> str:
        return self.job_id or _job_id_of("dedupe", self, {"sources", "output", "threshold", "split"})


class QueueStrategy(StrEnum):
    """How a review queue ranks images: the uncertainty measure, or it weighted by coverage (`diverse`)."""

    MARGIN = "margin"  # 1 - (p1 - p2): two classes nearly tied
    ENTROPY = "entropy"  # of the class distribution, normalised to [0, 1]
    LEAST_CONFIDENCE = "least-confidence"  # 1 - p1
    DIVERSE = "diverse"  # margin, taken in the order of a k-center greedy cover of the embeddings


class ReviewQueueJobSpec(_CurationSpec):
    """The images of a label output a person should look at first: a ranked queue (Parquet) and its contact sheet."""

    kind: Literal["review-queue"] = "review-queue"
    source: Annotated[str, not_blank("source")] = Field(description="The label output to rank.")
    strategy: QueueStrategy = Field(default=QueueStrategy.MARGIN, description="How images are ranked.")
    size: int = Field(default=500, gt=0, le=1_000_000, description="Images in the queue.")
    per_label: bool = Field(default=False,
                            description="Split the queue evenly over the predicted labels (stratified).")  # fmt: skip
    sheet: bool = Field(default=True, description="Also write sheet.html: thumbnails, top-3 with scores, given "
                                                  "label.")  # fmt: skip

    @model_validator(mode="after")
    def _output_apart(self) -> ReviewQueueJobSpec:
        self._refuse_output_among((self.source,))
        return self

    def resolved_job_id(self) -> str:
        return self.job_id or _job_id_of("review-queue", self, {"source", "output", "strategy", "size", "per_label"})


class LabelIssuesJobSpec(_CurationSpec):
    """Which labels of a labelled set are likely wrong: out-of-sample probabilities by k-fold cross-validation of a
    linear probe on the frozen base model's embeddings, then confident learning (cleanlab's `find_label_issues`,
    Northcutt et al. 2021, "Confident Learning: Estimating Uncertainty in Dataset Labels")."""

    kind: Literal["label-issues"] = "label-issues"
    data: FinetuneDataSpec = Field(description="The labelled images: class folders, or a labels file.")
    base: ModelSpec = Field(description="The pre-trained model whose embeddings the probes are fitted on.")
    folds: int = Field(default=5, ge=2, le=20, description="Cross-validation folds (each image is scored by a probe "
                                                           "that never saw it).")  # fmt: skip
    seed: int = Field(default=0, ge=0, description="Seeds the fold assignment.")
    probe_l2: float | None = Field(
        default=None, gt=0,
        description="The probes' L2 penalty (as a fine-tune's: scikit-learn's C = 1/probe_l2 on standardised "
        "features); default: of 1, 10, 100, 300 and 1000, the one whose out-of-sample log-likelihood of the given "
        "labels is best.",
    )  # fmt: skip
    image_size: int | None = Field(default=None, ge=32, le=1024,
                                   description="Embed at this size instead of the model's own crop.")  # fmt: skip
    cpus: float = Field(default=0, ge=0, description="CPUs of the embedding actor; 0: the cluster's.")
    sheet: bool = Field(default=True, description="Also write sheet.html of the flagged images: thumbnails, given "
                                                  "and suggested labels.")  # fmt: skip

    @model_validator(mode="after")
    def _one_set(self) -> LabelIssuesJobSpec:
        if self.data.validation_uri:
            raise ValueError("label-issues scores every image of data.uri; a separate validation set is not used")
        self._refuse_output_among((self.data.uri,))
        return self

    def resolved_job_id(self) -> str:
        return self.job_id or _job_id_of("label-issues", self, {"data", "base", "output", "folds", "seed", "probe_l2",
                                                                "image_size"})  # fmt: skip

    def finetune_spec(self) -> FinetuneJobSpec:
        """The fine-tune spec whose embedding pass (workers.finetune.embed) reads and embeds the images."""
        return FinetuneJobSpec(data=self.data, base=self.base, output=self.output, storage=self.storage,
                               training={"method": "linear-probe", "image_size": self.image_size,
                                         "seed": self.seed},
                               cpus_per_worker=self.cpus)  # fmt: skip


class SelfTrainJobSpec(Spec):
    """Self-training: fine-tune on the labelled set, label an unlabelled pool with that model, keep the predictions
    confident enough for `target_precision` on the held-out set (near-duplicates of held-out images left out), and
    fine-tune again on both, scored on the same held-out set: a new version whose card holds both accuracies."""

    kind: Literal["self-train"] = "self-train"
    job_id: str | None = Field(
        default=None, pattern=JOB_ID_PATTERN, description="Defaults to a hash of what determines the result."
    )
    data: FinetuneDataSpec = Field(description="The labelled images: class folders, or a labels file.")
    pool: Annotated[str, not_blank("pool")] = Field(
        description="Folder or s3:// prefix of unlabelled images (loose files)."
    )
    base: ModelSpec = Field(description="The pre-trained model both fine-tunes start from.")
    training: TrainingSpec = TrainingSpec()
    output: Annotated[str, not_blank("output")] = Field(
        description="The models folder: the first fine-tune adds a version, the second the next."
    )
    work: str | None = Field(
        default=None,
        description="Where the intermediate label outputs and labels files go; default: beside the output, "
        "`<output>.self-train/<job id>`.",
    )
    target_precision: float = Field(
        default=0.95, ge=0.5, lt=1, description="Precision the pseudo-labels must reach on the held-out set."
    )
    min_support: int = Field(
        default=20, ge=1,
        description="Held-out images the threshold must keep, at least, for its precision to mean something.",
    )  # fmt: skip
    duplicate_cosine: float = Field(
        default=0.93, gt=0, le=1,
        description="Pool images this close (embedding cosine, the first version's backbone) to a held-out image are "
        "never pseudo-labelled: as a fine-tune's duplicate_cosine, from the plants sample, where photos of one leaf "
        "scored 0.938-0.963 and the closest distinct leaves 0.925.",
    )  # fmt: skip
    shared_storage: bool = Field(
        default=False,
        description="Local paths (data, pool, output, work) are on storage every Ray node mounts at the same path; "
        "its label jobs are refused on a cluster of several nodes without it (as `label --shared-storage`).",
    )
    storage: StorageOptions = StorageOptions()

    @model_validator(mode="after")
    def _apart(self) -> SelfTrainJobSpec:
        if self.data.validation_uri:
            raise ValueError("self-train holds out the first fine-tune's validation split; give no validation set")
        if self.training.refit is Refit.ALWAYS:
            raise ValueError("self-train never refits: the first fine-tune's validation split is the held-out set "
                             "both versions are scored on, so neither may train on it")  # fmt: skip
        out, pool = _as_prefix(self.output), _as_prefix(self.pool)
        for name, uri in (("data", self.data.uri), ("pool", self.pool), ("work", self.work_uri())):
            if name != "pool" and (pool.startswith(_as_prefix(uri)) or _as_prefix(uri).startswith(pool)):
                raise ValueError(f"pool {self.pool!r} must not overlap {name} {uri!r}")
            if out.startswith(_as_prefix(uri)) or _as_prefix(uri).startswith(out):
                raise ValueError(f"output {self.output!r} must not overlap {name} {uri!r}")
        return self

    def resolved_job_id(self) -> str:
        fields = {"data", "pool", "base", "training", "output", "target_precision", "min_support", "duplicate_cosine"}
        return self.job_id or _job_id_of("self-train", self, fields)

    def finetune_spec(self) -> FinetuneJobSpec:
        """Its first step: the fine-tune on the labelled set alone, never refitted (its validation split is the
        held-out set both versions are scored on)."""
        training = self.training.model_copy(update={"refit": Refit.NEVER})
        return FinetuneJobSpec(job_id=f"{self.resolved_job_id()}-first", data=self.data, base=self.base,
                               training=training, output=self.output, storage=self.storage)  # fmt: skip

    def work_uri(self) -> str:
        return self.work or f"{self.output.rstrip('/')}.self-train/{self.resolved_job_id()}"


# -------------------------------------------------------------------------------------------------- tables

DUPLICATES_TABLE = "duplicates"
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # the label output the row came from
        pa.field("key", pa.string(), nullable=False),  # its key there
        pa.field("image", pa.string(), nullable=False),  # the object the image came from (label row's `source`)
        pa.field("image_id", pa.string()),  # sha256 of the bytes
        pa.field("label", pa.string()),  # the label output's top-1
        pa.field("given_label", pa.string()),
        pa.field("group", pa.int64(), nullable=False),  # numbered from 0; an image alone is a group of one
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("representative", pa.bool_(), nullable=False),  # the group's largest image (ties: first by key)
        pa.field("representative_source", pa.string(), nullable=False),
        pa.field("representative_key", pa.string(), nullable=False),
        pa.field("cosine", pa.float32()),  # to the representative (1 for itself; null without an embedding)
        pa.field("exact", pa.bool_(), nullable=False),  # the same bytes as the representative
        pa.field("split", pa.string()),  # train | val per the split.csv given; null when not in it
        pa.field("leaks", pa.bool_(), nullable=False),  # the group spans train and validation (or several sources)
    ],
    metadata={"bulklabel.schema_version": str(RESULT_SCHEMA_VERSION)},
)

QUEUE_TABLE = "queue"
QUEUE_SCHEMA = pa.schema(
    [
        pa.field("rank", pa.int32(), nullable=False),  # 1 first
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("given_label", pa.string()),
        pa.field("uncertainty", pa.float32(), nullable=False),  # of the strategy's measure, higher first
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("measured_on", pa.string(), nullable=False),  # probabilities | topk: what the measure was taken on
    ],
    metadata={"bulklabel.schema_version": str(RESULT_SCHEMA_VERSION)},
)

ISSUES_TABLE = "issues"
ISSUES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the image's location relative to the data (or its URI)
        pa.field("image", pa.string(), nullable=False),  # its location
        pa.field("given_label", pa.string(), nullable=False),
        pa.field("suggested_label", pa.string()),  # the out-of-sample argmax; null when unreadable
        pa.field("self_confidence", pa.float32()),  # out-of-sample probability of the given label
        pa.field("suggested_score", pa.float32()),  # ... of the suggested one
        pa.field("flagged", pa.bool_(), nullable=False),  # confident learning finds its label likely wrong
        pa.field("rank", pa.int32()),  # 1: the likeliest wrong label; null when not flagged
        pa.field("error", pa.string()),  # why the image could not be read; null when it was
    ],
    metadata={"bulklabel.schema_version": str(RESULT_SCHEMA_VERSION)},
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {DUPLICATES_TABLE: DUPLICATES_SCHEMA, QUEUE_TABLE: QUEUE_SCHEMA,
                                       ISSUES_TABLE: ISSUES_SCHEMA}  # fmt: skip


# -------------------------------------------------------------------------------------------------- manifest


class ResultFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str  # relative to the output: data/<table>.parquet
    rows: int


class ResultSource(BaseModel):
    """What the job read: an input and the job (and manifest generation) that wrote it, for an audit."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    uri: str
    job_id: str | None = None
    generation: int | None = None
    rows: int = 0


class ResultManifest(BaseModel):
    """The `_job.json` of a curation job's output, written last: its one table's files, what it read, its figures."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: str
    kind: str  # the job kind ("dedupe", "review-queue")
    status: Literal[Outcome.SUCCEEDED]
    table: str  # the table's name: `bulklabel query`'s view
    schema_version: int = RESULT_SCHEMA_VERSION
    layout_version: int
    spec: dict[str, Any]  # as dumped (secrets masked)
    sources: tuple[ResultSource, ...] = ()
    files: tuple[ResultFile, ...]
    sheet: str | None = None  # the HTML sheet's name relative to the output, when one was written
    figures: dict[str, Any] = {}  # the kind's summary figures (groups, leaking groups, ...)
    started_at: datetime
    finished_at: datetime

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)
