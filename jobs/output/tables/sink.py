"""What every table sink shares: its phases (TableSink), the retry budget and error, a shard's rows, the table
properties."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from jobs.errors import InfrastructureError
from jobs.output.reader import fs_path, read_rows
from schemas.output import LABEL_SCHEMA_VERSION
from schemas.specs import StorageOptions

if TYPE_CHECKING:
    from jobs.output.lease import Lease
    from schemas.shards import ShardResult

COMMIT_ATTEMPTS = 5  # a commit or maintenance step that lost a race, tried again on the table's latest state
TABLE_NAME = "labels"


class TableCommitConflict(InfrastructureError):
    """A table commit kept losing races (another writer outside bulklabel's lease?): exit 3."""


class TableSink(Protocol):
    uri: str

    def commit_shards(self, results: Iterable[ShardResult], locations: dict[str, str] | None = None) -> int: ...

    def commit_shard(self, result: ShardResult, location: str | None = None) -> bool: ...

    def flush(self) -> int: ...

    def finish(self, target_bytes: int, compact: bool, lease: Lease | None = None) -> None: ...


def shard_rows(output: str, filesystem, result: ShardResult, location: str | None) -> pa.Table:
    """A committed shard's rows, from its own data file or (`location`) the compacted file that holds them."""
    rows = read_rows(fs_path(location or result.data_in(output)), filesystem)
    if location is not None:  # a compacted file holds several shards
        rows = rows.filter(pc.equal(rows["shard"], result.shard_id))
    return rows


def table_properties(rows: pa.Table, job_id: str) -> dict[str, str]:
    """What every format records about its rows: the model, the job, the label schema version, the embedding width."""
    embedding = next((e for e in rows["embedding"].to_pylist() if e is not None), None)
    return {
        "bulklabel.model": rows["model"][0].as_py() if rows.num_rows else "",
        "bulklabel.job_id": job_id,
        "bulklabel.schema_version": str(LABEL_SCHEMA_VERSION),
        "bulklabel.embedding_dim": str(len(embedding)) if embedding is not None else "none",
    }


def object_store_options(uri: str, options: StorageOptions | None) -> dict[str, str] | None:
    """The Rust `object_store` options (delta-rs and Lance both write through it) for an s3:// table: endpoint,
    region and keys; None for a local one."""
    if not uri.startswith("s3://"):
        return None
    options = options or StorageOptions()
    found: dict[str, str] = {}
    if options.endpoint_url:
        found |= {"aws_endpoint_url": options.endpoint_url, "aws_allow_http": "true"}
    if options.region:
        found["aws_region"] = options.region
    if options.access_key_id is not None:
        found["aws_access_key_id"] = options.access_key_id.get_secret_value()
        found["aws_secret_access_key"] = options.secret_access_key.get_secret_value()
    return found
