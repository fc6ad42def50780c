"""What the driver sends a worker (a shard task) and what it gets back (a shard result)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from schemas.layout import join, name_in
from schemas.specs import DecoderChoice, InputSpec, LabelJobSpec, ModelSpec, Spec, StorageOptions

# Version of the done-marker layout. 1: markers written before shard ids carried a hash of their key and before
# fingerprints covered sizes and ETags; outputs holding those are refused on resume (their ids would not match).
# 2: the data file as an absolute URI (`data_uri`). 3: the data file relative to the output (`data`), and the node
# that wrote the marker. Format 2 markers are read and trusted as they are (schemas.layout.name_in places them).
MARKER_FORMAT = 3
OLDEST_MARKER_FORMAT = 2  # the oldest format a run resumes from


class ShardTask(Spec):
    """One unit of work: a tar object, or a list of image objects under a common base."""

    shard_id: str = Field(pattern=r"^[A-Za-z0-9._=-]+$", max_length=120)
    kind: Literal["tar", "files", "parquet"]
    base_uri: str  # keys are relative to it; for tar shards, the input prefix
    keys: tuple[str, ...]  # one tar or parquet key, or the image keys of this shard (relative, or absolute URIs)
    # From the listing, one per key (empty for manifests, which are not listed): what makes the fingerprint notice
    # an object rewritten under the same name.
    sizes: tuple[int, ...] = ()
    etags: tuple[str, ...] = ()
    # A manifest's label column, one per key ('' where a row gives none): the rows' given_label.
    labels: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_label_per_key(self) -> ShardTask:
        if self.labels and len(self.labels) != len(self.keys):
            raise ValueError(f"shard {self.shard_id}: {len(self.labels)} labels for {len(self.keys)} keys")
        return self

    def fingerprint(self) -> str:
        """Identifies the shard's content (keys, sizes, ETags or mtimes, the manifest's labels), so a resumed job
        notices changed input."""
        digest = hashlib.sha256(self.kind.encode())
        for i, key in enumerate(self.keys):
            digest.update(b"\0" + key.encode())
            if self.sizes:
                digest.update(b"\1%d\1" % self.sizes[i] + self.etags[i].encode())
            if self.labels:
                digest.update(b"\2" + self.labels[i].encode())
        return digest.hexdigest()[:16]


class WorkerSpec(Spec):
    """What a label worker is built from: the model it keeps resident. Every job on the same model, device and
    precision can use the same workers (a warm pool), so nothing here is specific to one job."""

    model: ModelSpec
    storage: StorageOptions = StorageOptions()  # to fetch the weights file or the fine-tuned artifact
    decode_threads: int = Field(default=2, gt=0, le=64)

    @field_validator("model")
    @classmethod
    def _compile_decided(cls, model: ModelSpec) -> ModelSpec:
        # `compile: auto` is the driver's to decide (jobs.label.placement.resolve_compile) before the pool key is
        # made: a worker compiled or not, never "maybe", so compiled and eager workers never share a pool.
        if not isinstance(model.compile, bool):
            raise ValueError("model.compile: auto must be decided on the driver before a worker spec is made")
        return model

    @classmethod
    def of(cls, spec: LabelJobSpec, compile: bool | None = None) -> WorkerSpec:
        """The worker spec of a job; `compile` is the driver's decision for `compile: auto` (None: the spec's own
        true or false)."""
        model = spec.model if compile is None else spec.model.model_copy(update={"compile": compile})
        return cls(model=model, storage=spec.storage, decode_threads=spec.decode_threads)

    def pool_key(self) -> str:
        """Jobs whose worker specs share this key share workers. Credentials are left out of the key (they are
        masked in the dump): jobs naming the same model from the same place with other keys share workers too."""
        identity = self.model_dump_json(exclude={"storage": {"access_key_id", "secret_access_key"}})
        return f"{self.model.name.rsplit('/', 1)[-1]}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


class ShardJob(Spec):
    """What a shard needs from its job, sent with each shard: one worker labels shards of any job on its model."""

    job_id: str
    input: InputSpec
    output: str
    storage: StorageOptions = StorageOptions()
    top_k: int = Field(gt=0)
    embeddings: bool = True
    probabilities: bool = False
    batch_size: int = Field(gt=0)
    decoder: DecoderChoice = "auto"
    # Test-only fault rules (workers/faults.py, JSON), set by a driver whose environment armed them; "" otherwise.
    faults: str = ""

    @classmethod
    def of(cls, spec: LabelJobSpec, job_id: str, faults: str = "") -> ShardJob:
        return cls(
            job_id=job_id,
            input=spec.input,
            output=spec.output,
            storage=spec.storage,
            top_k=spec.top_k,
            embeddings=spec.embeddings,
            probabilities=spec.probabilities,
            batch_size=spec.batch_size,
            decoder=spec.decoder,
            faults=faults,
        )


class StageSeconds(Spec):
    """Where a shard's time went, in seconds summed over the threads that ran each stage (so stages that overlap can
    add up to more than the shard's wall time): read (waiting for the reader), decode (decode threads, and a GPU
    decoder's batch step), infer (the model, over its lanes), write (building rows and committing: Parquet, upload,
    publish), wait (the model waiting for a decoded batch)."""

    read: float = Field(default=0, ge=0)
    decode: float = Field(default=0, ge=0)
    infer: float = Field(default=0, ge=0)
    write: float = Field(default=0, ge=0)
    wait: float = Field(default=0, ge=0)

    def plus(self, stage: str, seconds: float) -> StageSeconds:
        return self.model_copy(update={stage: round(getattr(self, stage) + seconds, 3)})

    @classmethod
    def total(cls, results: Iterable[ShardResult]) -> StageSeconds | None:
        """The sum over shards that recorded stages (None if none did: markers from before they existed)."""
        recorded = [r.stages for r in results if r.stages is not None]
        if not recorded:
            return None
        return cls(**{name: round(sum(getattr(s, name) for s in recorded), 3) for name in cls.model_fields})

    def line(self) -> str:
        return ", ".join(f"{name} {getattr(self, name):.1f}s" for name in type(self).model_fields)


class ShardResult(Spec):
    """A committed shard: written by the worker as the shard's done-marker, read back on resume."""

    shard_id: str
    job_id: str
    fingerprint: str
    # The shard's data file relative to the output ("data/part-<shard>.parquet"); in format 2 markers its absolute URI
    # (`data_uri`), read through `data_in`.
    data: str = Field(validation_alias=AliasChoices("data", "data_uri"))
    rows: int = Field(ge=0)
    errors: int = Field(ge=0)
    bytes_read: int = Field(ge=0)
    seconds: float = Field(ge=0)
    attempt: int = Field(ge=1)
    status: Literal["done"] = "done"
    # When the shard's Parquet file was published (UTC), for audits and timelines; None in markers written before
    # this field existed, so old jobs still resume.
    committed_at: datetime | None = None
    marker_format: int = 1  # absent in the oldest markers; see MARKER_FORMAT
    data_bytes: int | None = Field(default=None, ge=0)  # size of the committed Parquet file, checked on resume
    first_key: str | None = None  # the shard's first and last keys: the key range a loose-files shard covers
    last_key: str | None = None
    # Error rows by schemas.output.ErrorKind value, as the rows' `error_kind` column counts them (markers of format 2
    # and before: by the text before the error's first ':'), and kind → one key that had it.
    error_kinds: dict[str, int] = Field(default_factory=dict)
    error_examples: dict[str, str] = Field(default_factory=dict)
    stages: StageSeconds | None = None  # None in markers written before per-stage timings
    host: str | None = None  # the machine whose worker wrote the marker (None before format 3)
    node_id: str | None = None  # its Ray node (None outside Ray, and before format 3)

    def data_name(self, output: str) -> str:
        """The data file's name relative to `output` (the output this marker is in, wherever it was written).
        Raises ValueError for a name that no output of this layout holds."""
        return name_in(output, self.data, shard_id=self.shard_id)

    def data_in(self, output: str) -> str:
        """The data file's URI under `output`: the output this marker is in now, even if copied or moved since."""
        return join(output, self.data_name(output))
