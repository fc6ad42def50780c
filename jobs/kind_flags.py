"""The label, fine-tune and curation commands' flags: each flag's field in its job spec (jobs.flags derives the rest).

Every flag name users typed before these tables is kept; a boolean's table name is its positive spelling, and
`--no-x` comes with it (`--no-embeddings`, `--no-group-duplicates`).
"""

from __future__ import annotations

from jobs.flags import Flag, FlagTable, SpecFlags
from schemas.curation import DedupeJobSpec, LabelIssuesJobSpec, ReviewQueueJobSpec, SelfTrainJobSpec
from schemas.finetune import FinetuneJobSpec
from schemas.specs import LabelJobSpec

_NONE = "none"  # `--weights none`: random initialisation, null in a spec file

LABEL_FLAGS: FlagTable = {
    "--input": Flag("input.uri", metavar="URI"),
    "--output": Flag("output", metavar="URI"),
    "--output-format": "output_options.format",
    "--compact": "output_options.compact",
    "--target-file-mb": "output_options.target_file_mb",
    "--model": "model.name",
    "--weights": Flag("model.weights", none=_NONE),
    "--weights-dir": "model.weights_dir",
    "--format": "input.format",
    "--image-field": "input.image_field",
    "--decoder": "decoder",
    "--files-per-shard": "input.files_per_shard",
    "--top-k": "top_k",
    "--batch-size": "batch_size",
    "--workers": "num_workers",
    "--device": "model.device",
    "--compile": "model.compile",
    "--embeddings": "embeddings",
    "--probabilities": "probabilities",
    "--shared-storage": "shared_storage",
    "--endpoint-url": "storage.endpoint_url",
    "--job-id": "job_id",
}

FINETUNE_FLAGS: FlagTable = {
    "--data": Flag("data.uri", metavar="URI"),
    "--base": "base.name",
    "--weights": Flag("base.weights", none=_NONE),
    "--weights-dir": "base.weights_dir",
    "--output": Flag("output", metavar="URI"),
    "--method": "training.method",
    "--epochs": "training.epochs",
    "--min-steps": "training.min_steps",
    "--group-duplicates": "data.group_duplicates",
    "--duplicate-cosine": "data.duplicate_cosine",
    "--batch-size": "training.batch_size",
    "--lr": "training.learning_rate",
    "--image-size": "training.image_size",
    "--val-data": "data.validation_uri",
    "--val-fraction": "data.val_fraction",
    "--key-column": "data.key_column",
    "--label-column": "data.label_column",
    "--class-weights": "training.class_weights",
    "--seed": "training.seed",
    "--refit": "training.refit",
    "--corrections": Flag("corrections", metavar="QUEUE"),
    "--workers": "num_workers",
    "--gpus-per-worker": "gpus_per_worker",
    "--endpoint-url": "storage.endpoint_url",
    "--job-id": "job_id",
    "--name": "name",
}

DEDUPE_FLAGS: FlagTable = {
    "OUTPUT": Flag("sources", positional=True, metavar="OUTPUT"),
    "--out": Flag("output", metavar="URI"),
    "--threshold": "threshold",
    "--split": Flag("split", metavar="ARTIFACT"),
    "--index": "index",
    "--endpoint-url": "storage.endpoint_url",
    "--job-id": "job_id",
}

REVIEW_QUEUE_FLAGS: FlagTable = {
    "OUTPUT": Flag("source", positional=True, metavar="OUTPUT"),
    "--out": Flag("output", metavar="URI"),
    "--strategy": "strategy",
    "--size": Flag("size", short="-n"),
    "--per-label": "per_label",
    "--sheet": "sheet",
    "--endpoint-url": "storage.endpoint_url",
    "--job-id": "job_id",
}

LABEL_ISSUES_FLAGS: FlagTable = {
    "--data": Flag("data.uri", metavar="URI"),
    "--base": "base.name",
    "--weights": Flag("base.weights", none=_NONE),
    "--weights-dir": "base.weights_dir",
    "--out": Flag("output", metavar="URI"),
    "--folds": "folds",
    "--seed": "seed",
    "--image-size": "image_size",
    "--key-column": "data.key_column",
    "--label-column": "data.label_column",
    "--cpus": "cpus",
    "--sheet": "sheet",
    "--endpoint-url": "storage.endpoint_url",
    "--job-id": "job_id",
}

SELF_TRAIN_FLAGS: FlagTable = {
    "--data": Flag("data.uri", metavar="URI"),
    "--pool": Flag("pool", metavar="URI"),
    "--base": "base.name",
    "--weights": Flag("base.weights", none=_NONE),
    "--weights-dir": "base.weights_dir",
    "--output": Flag("output", metavar="URI"),
    "--work": Flag("work", metavar="URI"),
    "--target-precision": "target_precision",
    "--min-support": "min_support",
    "--duplicate-cosine": "duplicate_cosine",
    "--method": "training.method",
    "--epochs": "training.epochs",
    "--image-size": "training.image_size",
    "--seed": "training.seed",
    "--key-column": "data.key_column",
    "--label-column": "data.label_column",
    "--shared-storage": "shared_storage",
    "--endpoint-url": "storage.endpoint_url",
    "--job-id": "job_id",
}

# What the job kind registry (jobs.kinds) takes as each kind's `flags`.
LABEL_SPEC_FLAGS = SpecFlags(LabelJobSpec, LABEL_FLAGS)
FINETUNE_SPEC_FLAGS = SpecFlags(FinetuneJobSpec, FINETUNE_FLAGS)
DEDUPE_SPEC_FLAGS = SpecFlags(DedupeJobSpec, DEDUPE_FLAGS)
REVIEW_QUEUE_SPEC_FLAGS = SpecFlags(ReviewQueueJobSpec, REVIEW_QUEUE_FLAGS)
LABEL_ISSUES_SPEC_FLAGS = SpecFlags(LabelIssuesJobSpec, LABEL_ISSUES_FLAGS)
SELF_TRAIN_SPEC_FLAGS = SpecFlags(SelfTrainJobSpec, SELF_TRAIN_FLAGS)
