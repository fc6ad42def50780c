"""Job specifications: frozen, typed, validated before any work starts.

A spec is the whole description of a job. It is small and picklable, so the driver can hand the
parts a worker needs to a Ray actor, which then builds its heavy objects (model, S3 client) itself.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# The column a manifest or parquet input names its images' own labels in, unless the spec says otherwise.
LABEL_COLUMN = "label"
PARQUET_KEYS_VERSION = 2  # how a parquet input's rows are keyed (InputSpec.key_column); part of its jobs' ids


def _normalised_extensions(value: tuple[str, ...]) -> tuple[str, ...]:
    """Lower case, no dot, sorted, unique: `.JPG` and `jpg` are one extension, and a spec hashes the same however its
    extensions were written."""
    return tuple(sorted({ext.lower().lstrip(".") for ext in value}))


# validate_default: the default is normalised too, so a spec read back from a file compares (and hashes) equal.
Extensions = Annotated[
    tuple[str, ...],
    AfterValidator(_normalised_extensions),
    Field(default=IMAGE_EXTENSIONS, min_length=1, validate_default=True),
]


def not_blank(what: str) -> AfterValidator:
    """A validator refusing an empty or all-space string, naming `what` in the error."""

    def check(value: str) -> str:
        if not value.strip():
            raise ValueError(f"{what} is empty")
        return value

    return AfterValidator(check)


# The image decoders of a label job's workers (workers/label/decoders.py). `torchvision` was the name of the torchcodec
# path while it called torchvision.io.decode_jpeg (deprecated in torchvision 0.29): kept, so older specs still run,
# with the same pixels and job id.
DecoderChoice = Literal["auto", "pillow", "pillow-draft", "torchcodec", "nvjpeg", "torchvision"]


class Spec(BaseModel):
    """Base for every spec: immutable, and unknown fields are an error rather than silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageOptions(Spec):
    """How to reach object storage. Credentials default to the standard AWS chain (env, profile, role)."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (SeaweedFS, MinIO); else "
        "$AWS_ENDPOINT_URL_S3 or the AWS chain's.",
    )
    region: str | None = Field(default=None, description="AWS region; defaults to the AWS chain or us-east-1.")
    access_key_id: SecretStr | None = Field(default=None, description="Explicit key; prefer the AWS chain.")
    secret_access_key: SecretStr | None = Field(default=None, description="Given with access_key_id.")

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> StorageOptions:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be given together")
        return self


class InputSpec(Spec):
    """Where the images are and how they are packed."""

    uri: Annotated[str, not_blank("input uri")] = Field(
        description="Local folder/file or s3://bucket/prefix holding the images."
    )
    format: Literal["auto", "tar", "files", "manifest", "parquet"] = Field(
        default="auto",
        description="tar: WebDataset tar shards (.tar, .tar.gz, .tgz; a folder, one shard file, or a brace pattern "
        "such as shard-{000000..000099}.tar); files: loose images grouped into shards; manifest: CSV/Parquet of "
        "keys; parquet: Parquet files holding image bytes in a column (img2dataset's parquet output, Hugging Face "
        "datasets), one shard per file. auto: a brace pattern is tar, a .csv/.parquet uri is a manifest, a prefix "
        "holding tar shards is tar, else files.",
    )
    image_field: str | None = Field(
        default=None,
        description="Tar shards whose samples hold several images (jpg + seg.png, left.jpg + right.jpg): the one "
        "labelled, as webdataset's to_tuple('jpg;png') picks it: the first of these ';'-separated extensions the "
        "sample has (matched whole: 'png' is not 'seg.png'); a sample with none is an error row. Unset: every image "
        "member is a row, and a second image of one sample a 'duplicate key' error row.",
        pattern=r"^[A-Za-z0-9._-]+(;[A-Za-z0-9._-]+)*$",
    )
    row_key: Literal["path", "name"] = Field(
        default="path",
        description="How loose files are keyed in the output: path: relative to the input ('00000/000000000.jpg'); "
        "name: the file name without extension ('000000000'), as img2dataset keys its files layout.",
    )
    image_column: str | None = Field(
        default=None,
        description="parquet input: the column holding the image bytes (binary, or a struct with a 'bytes' field, "
        "as Hugging Face's Image feature stores them). Unset: the first of jpg, png, webp, image, img present.",
    )
    key_column: str | None = Field(
        default=None,
        min_length=1,
        description="parquet input: the column holding each row's own id (img2dataset's 'key', a dataset's 'id'), "
        "used as the row's key; planning reads it from every file and refuses an empty or repeated id, naming both "
        "rows. Unset: the file's path relative to the input and the row number ('default/train/0000.parquet#0'), "
        "unique by construction.",
    )
    files_per_shard: int = Field(default=1000, gt=0, description="Images per shard for loose files and manifests.")
    extensions: Extensions
    manifest_column: str = Field(default="key", description="Manifest column holding object keys or URIs.")
    label_column: str | None = Field(
        default=LABEL_COLUMN,
        min_length=1,
        description="Manifest or parquet input: the column holding each image's own label, kept as the rows' "
        "given_label (a Hugging Face ClassLabel index becomes its class name). The default 'label' is used where "
        "the file has it; another name must be there; null: none.",
    )
    exclude: tuple[str, ...] = Field(
        default=(),
        description="Glob patterns of keys to skip, matched against the key relative to the input and each of its "
        "folder names (e.g. '.thumbs', '*.tmp', 'raw/**'). Nothing else is skipped but the output's own files; "
        "skipped keys are counted in the summary.",
    )
    allowed_roots: tuple[str, ...] = Field(
        default=(),
        description="Locations (folders or s3:// prefixes) that manifest keys may name besides the manifest's own "
        "folder; a key anywhere else refuses the job before it starts.",
    )
    max_object_bytes: int = Field(
        default=256 << 20, gt=0, description="Images (loose files or tar members) larger than this are error rows."
    )


class ModelSpec(Spec):
    """Which model to run: a torchvision registry name or a fine-tuned artifact location."""

    name: str = Field(description="torchvision model name (resnet50, mobilenet_v2, ...) or an artifact uri.")
    weights: str | None = Field(
        default="DEFAULT",
        description="Weights enum name (IMAGENET1K_V1, DEFAULT), a weights file path/uri, or null for random init.",
    )
    weights_dir: str | None = Field(
        default=None, description="Folder holding weight files for air-gapped clusters (also $BULKLABEL_WEIGHTS_DIR)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the model runs: auto: a GPU where the worker has one, else the CPU."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, fp32 on CPU (CPU bf16 is slow without native support)."
    )
    compile: Literal["auto"] | bool = Field(
        default=False,
        description="torch.compile the backbone (static shapes: a batch in equal pieces, any rest eager), once per "
        "worker; the first batch pays the compile time (20-50 s on CPU; seconds when inductor's on-disk cache on the "
        "node, $BULKLABEL_COMPILE_CACHE or ~/.cache/bulklabel/inductor, already holds the kernels), which the worker "
        "reports. Outputs within 3e-5 of eager; warm pools on a 2-core CPU ran 1.01-1.05x (MobileNetV2) and 1.07x "
        "(ResNet-50) eager. auto: compiled when the job is large enough to repay the compile time (its images per "
        "worker against the model's GFLOPs and the device: on CPU, tens of thousands of images), decided on the "
        "driver; the summary and the manifest say why.",
    )


class OutputFormat(StrEnum):
    """Where a label output's rows go besides its Parquet folder: a table format (jobs.output.tables), or none."""

    PARQUET = "parquet"
    DELTA = "delta"
    ICEBERG = "iceberg"
    LANCE = "lance"


class IcebergCatalog(Spec):
    """The Iceberg catalog a `format: iceberg` output commits through. Absent: a SQL catalog on a SQLite file in the
    output's table folder (local outputs only: SQLite needs a file system with locks)."""

    type: Literal["rest", "sql", "glue"] = Field(default="rest", description="pyiceberg's catalog type.")
    uri: str | None = Field(default=None, description="rest: the catalog's URL; sql: a SQLAlchemy URL.")
    warehouse: str | None = Field(default=None, description="Warehouse location or name (for S3 Tables, its bucket).")
    namespace: str = Field(default="bulklabel", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    table: str = Field(default="labels", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")
    sigv4: bool = Field(default=False, description="rest: sign requests with AWS SigV4 and the job's storage "
                        "keys (AWS S3 Tables, SeaweedFS); otherwise the catalog's own auth (properties).")  # fmt: skip
    signing_name: str = Field(default="s3tables", description="rest with sigv4: the service name signed for.")
    properties: dict[str, str] = Field(
        default_factory=dict,
        description="Further pyiceberg catalog properties (glue: region, ...); S3 and SigV4 keys come from the "
        "job's storage options, never from here.",
    )


class LanceNamespace(Spec):
    """The Lance namespace server (REST) a `format: lance` output's dataset is created and found through, instead of
    `<output>/table`: LanceDB's, or SeaweedFS's (`weed mini -s3.port.lance`)."""

    uri: str = Field(description="The namespace server's URL.", min_length=1)
    table_id: tuple[str, ...] = Field(
        default=("bulklabel", "labels"),
        min_length=1,
        description="The table's identifier in the namespace (SeaweedFS: bucket, namespace, name).",
    )
    properties: dict[str, str] = Field(
        default_factory=dict,
        description="Further REST namespace properties, e.g. `header.x-api-key` for a server that takes a token. The "
        "dataset's S3 keys come from the job's storage options, never from here.",
    )


class OutputOptions(Spec):
    """How a label output is laid out; given as `output: {uri: ..., format: ..., ...}` in a spec (jobs.output)."""

    format: OutputFormat = Field(
        default=OutputFormat.PARQUET,
        description="parquet: a folder of Parquet files (data/) with done-markers and a manifest. delta: the same "
        "files also committed, each shard exactly once, to a Delta Lake table at the output (deltalake). iceberg: "
        "to an Iceberg table (pyiceberg) through `catalog`, by default a SQLite catalog beside a local output. "
        "lance: to a Lance dataset at the output (pylance), the embedding a fixed-size float32 vector.",
    )
    catalog: IcebergCatalog | None = Field(
        default=None, description="iceberg: the catalog (REST, Glue or SQL) that holds the table."
    )
    namespace: LanceNamespace | None = Field(
        default=None, description="lance: the namespace server that holds the dataset (else `<output>/table`)."
    )
    compact: Literal["auto", "never"] = Field(
        default="auto",
        description="auto: at the end of a job whose many data files are small, merge them into files of "
        "target_file_mb (as `bulklabel compact` does); never: keep one file per shard.",
    )
    target_file_mb: int = Field(default=256, ge=1, le=8192, description="Size compaction aims each data file at.")
    table_commit_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="iceberg: committed shards are appended to the table together, at most this often (and at the "
        "end of the job): each commit rewrites the table's metadata. 0: a commit per shard.",
    )
    vector_index: Literal["auto", "never"] = Field(
        default="auto",
        description="lance: auto builds an IVF_PQ index of the embeddings at the end of the job once the dataset "
        "holds enough of them for it to pay (30,000: bench/RESULTS.md), and folds rows added later into it; "
        "`bulklabel similar` searches through it. never: no index.",
    )

    @model_validator(mode="after")
    def _catalog_for_iceberg(self) -> OutputOptions:
        if self.catalog is not None and self.format is not OutputFormat.ICEBERG:
            raise ValueError(f"output catalog is for format iceberg, not {self.format}")
        if self.namespace is not None and self.format is not OutputFormat.LANCE:
            raise ValueError(f"output namespace is for format lance, not {self.format}")
        return self


# What a spec file may give as `output` (the mapping becomes `output` and `output_options` before validation).
_OUTPUT_JSON_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "object",
            "required": ["uri"],
            "additionalProperties": False,
            "properties": {
                "uri": {"type": "string", "minLength": 1},
                "format": {"enum": [f.value for f in OutputFormat]},
                "catalog": {"type": "object"},
                "namespace": {"type": "object"},
                "compact": {"enum": ["auto", "never"]},
                "target_file_mb": {"type": "integer", "minimum": 1, "maximum": 8192},
                "table_commit_seconds": {"type": "number", "minimum": 0, "maximum": 3600},
                "vector_index": {"enum": ["auto", "never"]},
            },
        },
    ]
}


class LabelJobSpec(Spec):
    """Bulk inference: image shards → one committed Parquet file per shard."""

    kind: Literal["label"] = "label"
    job_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Defaults to a hash of what determines the output, so a re-run is the same job.",
    )
    input: InputSpec
    output: Annotated[str, WithJsonSchema(_OUTPUT_JSON_SCHEMA)] = Field(
        description="Local folder or s3://bucket/prefix for the Parquet files and the job manifest; in a spec file "
        "also {uri: ..., format: parquet|delta|iceberg|lance, catalog: {...}, compact: auto|never, "
        "target_file_mb: 256}."
    )
    output_options: OutputOptions = OutputOptions()
    model: ModelSpec
    storage: StorageOptions = StorageOptions()
    top_k: int = Field(default=5, gt=0, description="Classes kept per image; checked against the model's classes.")
    embeddings: bool = Field(default=True, description="Store penultimate-layer features per image.")
    probabilities: bool = Field(
        default=False,
        description="Store the full softmax vector per image (float32 list, one per class; null otherwise), for "
        "label-error detection. About 4 bytes per class per image before compression.",
    )
    batch_size: int = Field(default=32, gt=0, le=4096, description="Images per forward pass on each worker.")
    num_workers: int = Field(default=0, ge=0, description="Model replicas (Ray actors); 0 = one per GPU, or 1 on CPU.")
    cpus_per_worker: float = Field(default=0, ge=0, description="0 = the cluster's CPUs split between the workers.")
    decode_threads: int = Field(default=2, gt=0, le=64, description="Threads decoding images on each worker.")
    decoder: DecoderChoice = Field(
        default="auto",
        description="pillow: Pillow, pixels identical to torchvision's weights.transforms(); torchcodec: torchcodec's "
        "decode_jpeg plus the tensor resize on the CPU (faster, within 2 grey levels); pillow-draft: Pillow with JPEGs "
        "at least 4x the model's resize decoded at a reduced DCT scale (fastest on large photos, within 15 grey "
        "levels); nvjpeg: the batch's JPEGs decoded and resized on the GPU; auto: nvjpeg on a GPU worker, else "
        "torchcodec; torchvision: torchcodec's former name (the same pixels). PNGs, CMYK, progressive and corrupt "
        "JPEGs always go to Pillow, one image at a time.",
    )
    max_attempts: int = Field(
        default=5, gt=0, le=20, description="Tries per shard before it counts as failed (retries back off 5-60 s)."
    )
    max_failed_shards: int = Field(default=0, ge=0, description="More failed shards than this fails the job.")
    max_error_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A job whose rows are more than this fraction errors ends failed, naming the commonest error.",
    )
    foreign_files: Literal["refuse", "keep"] = Field(
        default="refuse",
        description="refuse: an output prefix holding files bulklabel did not write is refused before work starts. "
        "keep: they are left untouched (never read, overwritten or deleted); names bulklabel uses are still refused.",
    )
    shard_timeout_s: float = Field(default=3600, gt=0, description="A shard taking longer is retried elsewhere.")
    shared_storage: bool = Field(
        default=False,
        description="Local paths (input, output, model files) are on storage every Ray node mounts at the same path "
        "(NFS, a shared volume). Without it, a job with a local path on a cluster of more than one node is refused "
        "before work starts: workers on other nodes would not see this machine's folders.",
    )

    @model_validator(mode="before")
    @classmethod
    def _output_mapping(cls, data: object) -> object:
        """`output: {uri, format, ...}` becomes `output` (the URI, a string for every reader) and `output_options`."""
        if isinstance(data, dict) and isinstance(data.get("output"), dict):
            options = dict(data["output"])
            if "uri" not in options:
                raise ValueError("output: a mapping needs uri (a local folder or s3://bucket/prefix)")
            if "output_options" in data:
                raise ValueError("give the output's options in output: {uri: ...} or in output_options, not both")
            data = {**data, "output": options.pop("uri"), "output_options": options}
        return data

    @field_validator("output")
    @classmethod
    def _output_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output uri is empty")
        return value

    @model_validator(mode="after")
    def _output_outside_input(self) -> LabelJobSpec:
        inp, out = _as_prefix(self.input.uri), _as_prefix(self.output)
        if out.startswith(inp) or inp.startswith(out):
            raise ValueError(f"output {self.output!r} must not overlap input {self.input.uri!r}")
        return self

    @model_validator(mode="after")
    def _iceberg_catalog_reachable(self) -> LabelJobSpec:
        options = self.output_options
        if options.format is OutputFormat.ICEBERG and options.catalog is None and "://" in self.output:
            raise ValueError(f"output {self.output!r}: format iceberg on object storage needs output.catalog (a REST "
                             "or Glue catalog): the default SQLite catalog needs a local folder")  # fmt: skip
        return self

    def resolved_job_id(self) -> str:
        """The job id: given, or derived from the fields that decide the output rows."""
        if self.job_id:
            return self.job_id
        # Fields at their defaults are left out, so an option added later leaves the ids of existing jobs (and the
        # resume of their outputs) as they were.
        identity = self.model_dump(mode="json", include={"input", "output", "model", "top_k", "embeddings",
                                                         "probabilities"}, exclude_defaults=True)  # fmt: skip
        if self.input.format == "parquet":
            # Parquet rows were keyed `<file stem>/<row>` before keys version 2 (`<path>#<row>`): a new id, so an
            # output of the old keys is never resumed into a mix of both.
            identity["parquet_keys"] = PARQUET_KEYS_VERSION
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return f"label-{digest[:12]}"


def _as_prefix(uri: str) -> str:
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    return uri.rstrip("/") + "/"


class PreprocessSpec(Spec):
    """Evaluation preprocessing: resize the shorter side, centre-crop, normalise (torchvision's preset)."""

    resize_size: int = Field(gt=0)
    crop_size: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
