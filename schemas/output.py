"""Arrow schemas of what jobs write. Constants, so writers, readers and docs agree on one definition.

Lists use Arrow's variable-size list type, which Parquet stores in the standard 3-level LIST layout
that Spark, Athena, DuckDB and ClickHouse all read. FixedSizeList would be stored as a LIST plus
Arrow-only metadata that several engines mishandle.
"""

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.layout import RELATIVE_NAMES_SINCE, is_relative
from schemas.outcome import Outcome

# Bump when a column is added, removed or changes meaning; readers check it in the job manifest. Version 2 added
# image_id, error_kind, given_label, sidecar and probabilities (version 1 files read with those columns null).
LABEL_SCHEMA_VERSION = 2

LABEL_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # path relative to the input prefix, or the WebDataset key
        pa.field("source", pa.string(), nullable=False),  # object the image came from (tar shard or image file)
        pa.field("shard", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # top-1 class name; null when error is set
        pa.field("label_index", pa.int32()),
        pa.field("score", pa.float32()),  # top-1 softmax probability
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_indices", pa.list_(pa.int32())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("embedding", pa.list_(pa.float32())),  # penultimate-layer features
        pa.field("width", pa.int32()),  # of the decoded image, after EXIF rotation
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),  # null when the image was labelled
        pa.field("error_kind", pa.string(), nullable=False),  # an ErrorKind: "" when labelled
        pa.field("image_id", pa.string()),  # sha256 hex of the image bytes; null when they could not be read
        pa.field("given_label", pa.string()),  # the input's own label (class folder, .cls, .json label/cls field)
        pa.field("sidecar", pa.string()),  # the WebDataset sample's .json member as JSON text (img2dataset's)
        pa.field("probabilities", pa.list_(pa.float32())),  # the full softmax; null unless `probabilities: true`
        pa.field("model", pa.string(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
    ],
    metadata={"bulklabel.schema_version": str(LABEL_SCHEMA_VERSION)},
)


class ErrorKind(StrEnum):
    """What went wrong with an error row, for filters and counts (`error` keeps the message for people)."""

    NONE = ""  # labelled
    NOT_AN_IMAGE = "not_an_image"  # bytes of no image format (an HTML error page, text, an empty object)
    UNSUPPORTED = "unsupported"  # an image we do not take: a format or member type we refuse, no image in a sample
    TOO_LARGE = "too_large"  # above max_object_bytes or the pixel limit
    CORRUPT = "corrupt"  # an image format whose data does not decode (truncated, damaged)
    READ_FAILED = "read_failed"  # missing, unreadable or malformed key: the bytes never arrived
    DUPLICATE = "duplicate"  # a second image under one WebDataset key


# Today's error messages (workers/io/readers.py, workers/label/decode.py, workers/label/decoders.py) by their start,
# checked in order; anything else an image's decode raised is CORRUPT. The one place messages become kinds.
_ERROR_PREFIXES: tuple[tuple[str, ErrorKind], ...] = (
    ("refused:", ErrorKind.TOO_LARGE),
    ("not an image", ErrorKind.NOT_AN_IMAGE),
    ("empty object", ErrorKind.NOT_AN_IMAGE),
    ("empty:", ErrorKind.READ_FAILED),
    ("missing:", ErrorKind.READ_FAILED),
    ("cannot read", ErrorKind.READ_FAILED),
    ("duplicate key", ErrorKind.DUPLICATE),
    ("member ", ErrorKind.UNSUPPORTED),  # "member 'x' is not a regular file (link or device)"
    ("sample ", ErrorKind.UNSUPPORTED),  # "sample 'k' has no member jpg;png"
    ("unsupported", ErrorKind.UNSUPPORTED),
)


def error_kind_of(error: str | None) -> ErrorKind:
    """The kind of an error message (`ErrorKind.NONE` for a labelled row)."""
    if error is None:
        return ErrorKind.NONE
    if "(content looks like HTML/text" in error:
        return ErrorKind.NOT_AN_IMAGE
    for prefix, kind in _ERROR_PREFIXES:
        if error.startswith(prefix):
            return kind
    return ErrorKind.CORRUPT


# ----------------------------------------------------------------------------------------------- the job manifest
# What `_job.json` holds: written (jobs.output.manifest.write_manifest) and read (jobs.output.reader) as this record.
# Fields a newer bulklabel adds to the manifest without changing the rows are ignored, so a reader keeps working; a
# change to the rows bumps LABEL_SCHEMA_VERSION, which readers check before anything else.


class _ManifestPart(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ManifestShard(_ManifestPart):
    """One committed shard: its data file and its row counts. `data` is relative to the output (layout version 3),
    or a URI under the output the job wrote to (before); schemas.layout.name_in reads both."""

    shard: str
    data: str
    rows: int = Field(ge=0)
    errors: int = Field(ge=0)


class ManifestFailedShard(_ManifestPart):
    shard: str
    error: str


class ManifestModel(_ManifestPart):
    """The model the rows came from, as the worker described it."""

    model_id: str
    embedding_dim: int | None = Field(default=None, gt=0)
    num_classes: int | None = Field(default=None, gt=0)
    device: str | None = None
    compiled: bool | None = None  # whether the workers ran torch.compile'd (None in manifests from before)
    compile_decision: str | None = None  # `compile: auto → compiled (...)`: what the driver decided and why
    preprocess: dict[str, Any] | None = None  # the transform the model's inputs went through


class ManifestTotals(_ManifestPart):
    shards: int = Field(ge=0)
    rows: int = Field(ge=0)
    errors: int = Field(ge=0)
    failed_shards: int = Field(ge=0)


class ManifestColumn(_ManifestPart):
    name: str
    type: str


class JobManifest(_ManifestPart):
    """A finished label job's manifest: every shard it lists is committed (its data written before the manifest).

    Written whole with `model_dump_json(by_alias=True)`; a compaction derives its manifest from the one it replaces
    (`model_copy`: every field as it was but the shards it merged and the generation), never rebuilds it.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    job_id: str
    kind: Literal["label"] = "label"
    status: Literal[Outcome.SUCCEEDED, Outcome.PARTIAL]  # a job that failed leaves no manifest: a failure record
    spec: dict[str, Any]  # the job spec as dumped (secrets masked); kept loose so older specs still read
    model: ManifestModel
    schema_version: int
    layout_version: int = 1  # absent in manifests of layout 1 (schemas.layout)
    generation: int = Field(default=0, ge=0)  # compaction generation: 0 until `bulklabel compact` merges files
    columns: tuple[ManifestColumn, ...] = Field(default=(), alias="schema")  # the rows' Arrow schema, for people
    started_at: datetime
    finished_at: datetime
    totals: ManifestTotals
    shards: tuple[ManifestShard, ...]
    failed_shards: tuple[ManifestFailedShard, ...] = ()

    @property
    def output(self) -> str:
        """The output URI the job wrote to (where the output is now may differ: it may have been copied or moved)."""
        return self.spec["output"]

    @property
    def embeddings(self) -> bool:
        """Whether the job stored embeddings (`embeddings: false` leaves the column null)."""
        return bool(self.spec.get("embeddings", True))

    def names(self) -> dict[str, str]:
        """Shard → its data file's name relative to the output. Raises ValueError for an entry outside it."""
        if self.layout_version >= RELATIVE_NAMES_SINCE:
            return {entry.shard: _relative_name(entry) for entry in self.shards}
        # Layouts 1 and 2: URIs under the output the job wrote to (never anywhere else, even if it moved since).
        recorded = str(self.spec.get("output", "")).rstrip("/") + "/"
        names = {}
        for entry in self.shards:
            if not entry.data.startswith(recorded) or recorded == "/":
                raise ValueError(f"{entry.data!r} (shard {entry.shard}) is outside the job's output {recorded[:-1]!r}")
            names[entry.shard] = entry.data[len(recorded) :]
        return names


def _relative_name(entry: ManifestShard) -> str:
    if not is_relative(entry.data) or entry.data.startswith("../") or "/../" in entry.data:
        raise ValueError(f"{entry.data!r} (shard {entry.shard}) is not a name inside the output")
    return entry.data


class JobFailure(_ManifestPart):
    """`_failed.json`: a run of the job failed (too many failed shards, too many error rows, an error on the driver).

    The shards committed before the failure stay committed (a re-run keeps them); this record says why the run
    stopped, for people and for `open_output`. A later run that completes removes it.
    """

    job_id: str
    kind: Literal["label"] = "label"
    status: Literal[Outcome.FAILED] = Outcome.FAILED
    reason: str
    started_at: datetime
    failed_at: datetime
    shards_committed: int = Field(ge=0)
    failed_shards: tuple[ManifestFailedShard, ...] = ()
