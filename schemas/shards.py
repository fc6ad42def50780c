"""What the driver sends a worker (a shard task) and what it gets back (a shard result)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.specs import Spec


class ShardTask(Spec):
    """One unit of work: a tar object, or a list of image objects under a common base."""

    shard_id: str = Field(pattern=r"^[A-Za-z0-9._=-]+$")
    kind: Literal["tar", "files"]
    base_uri: str  # keys are relative to it; for tar shards, the input prefix
    keys: tuple[str, ...]  # one tar key, or the image keys of this shard

    def fingerprint(self) -> str:
        """Identifies the shard's content, so a resumed job notices an input that changed under it."""
        digest = hashlib.sha256(self.kind.encode())
        for key in self.keys:
            digest.update(b"\0" + key.encode())
        return digest.hexdigest()[:16]


class ShardResult(Spec):
    """A committed shard: written by the worker as the shard's done-marker, read back on resume."""

    shard_id: str
    job_id: str
    fingerprint: str
    data_uri: str
    rows: int = Field(ge=0)
    errors: int = Field(ge=0)
    bytes_read: int = Field(ge=0)
    seconds: float = Field(ge=0)
    attempt: int = Field(ge=1)
    status: Literal["done"] = "done"
    # When the shard's Parquet file was published (UTC), for audits and timelines; None in markers written before
    # this field existed, so old jobs still resume.
    committed_at: datetime | None = None
