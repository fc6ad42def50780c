"""Job-level commit state in the output prefix: shard done-markers and the job manifest.

Layout of an output prefix:
    part-<shard>.parquet    one per shard (what DuckDB/Spark/Athena read: `<output>/*.parquet`)
    _done/<shard>.json      a shard's done-marker, written after its data file
    _job.json               the job manifest, written last, after every shard
Underscore-prefixed names are skipped by Spark, Hive and Athena when they read the folder.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from schemas.output import LABEL_SCHEMA, LABEL_SCHEMA_VERSION
from schemas.shards import ShardResult
from schemas.specs import LabelJobSpec
from workers.storage import Storage, join

log = logging.getLogger(__name__)

MANIFEST_NAME = "_job.json"
MARKER_READ_THREADS = 16


class OutputConflict(RuntimeError):
    """The output prefix already holds another job's results."""


def manifest_uri(output: str) -> str:
    return join(output, MANIFEST_NAME)


def read_manifest(storage: Storage, output: str) -> dict | None:
    uri = manifest_uri(output)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def read_done_markers(storage: Storage, output: str) -> dict[str, ShardResult]:
    """Every committed shard's marker, read in parallel."""
    prefix = join(output, "_done")
    uris = [o.uri for o in storage.list(prefix) if o.uri.endswith(".json")]

    def load(uri: str) -> ShardResult:
        return ShardResult.model_validate_json(storage.read_bytes(uri))

    with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
        results = list(pool.map(load, uris))
    return {r.shard_id: r for r in results}


def check_output_owner(storage: Storage, output: str, job_id: str) -> None:
    """Refuse to mix two jobs' rows in one prefix (the default job id is derived from what decides the rows)."""
    manifest = read_manifest(storage, output)
    owner = manifest.get("job_id") if manifest else _first_marker_job_id(storage, output)
    if owner and owner != job_id:
        raise OutputConflict(f"output {output} holds rows of job {owner!r}, not {job_id!r}: use a new output prefix")


def _first_marker_job_id(storage: Storage, output: str) -> str | None:
    """The job id of the first done-marker, if any (an interrupted job has markers but no manifest yet)."""
    for obj in storage.list(join(output, "_done")):
        return ShardResult.model_validate_json(storage.read_bytes(obj.uri)).job_id
    return None


def remove_partials(storage: Storage, output: str) -> None:
    """Delete temporary objects left by attempts that died mid-upload. Run only while no shard is in flight."""
    for obj in storage.list(join(output, "_tmp")):
        log.info("removing leftover partial upload %s", obj.uri)
        storage.delete(obj.uri)


def write_manifest(
    storage: Storage,
    spec: LabelJobSpec,
    job_id: str,
    worker: dict,
    shards: dict[str, ShardResult],
    failures: dict[str, str],
    started: datetime,
) -> dict:
    """Write `_job.json` last; a reader that finds it knows every listed shard is committed."""
    finished = datetime.now(UTC)
    status = "succeeded" if not failures else "partial"
    manifest = {
        "job_id": job_id,
        "kind": spec.kind,
        "status": status,
        "spec": json.loads(spec.model_dump_json()),  # SecretStr fields dump as '**********'
        "model": worker,
        "schema_version": LABEL_SCHEMA_VERSION,
        "schema": [{"name": f.name, "type": str(f.type)} for f in LABEL_SCHEMA],
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "totals": {
            "shards": len(shards),
            "rows": sum(r.rows for r in shards.values()),
            "errors": sum(r.errors for r in shards.values()),
            "failed_shards": len(failures),
        },
        "shards": [
            {"shard": r.shard_id, "data": r.data_uri, "rows": r.rows, "errors": r.errors}
            for r in sorted(shards.values(), key=lambda r: r.shard_id)
        ],
        "failed_shards": [{"shard": s, "error": e} for s, e in sorted(failures.items())],
    }
    storage.write_bytes(manifest_uri(spec.output), json.dumps(manifest, indent=2).encode())
    return manifest
