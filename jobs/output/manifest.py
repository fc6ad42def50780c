"""The job manifest `_job.json`: read and written as the typed record schemas.output.JobManifest, never a raw dict.

Written last by a run (every shard it lists is committed) and rewritten whole by a compaction (the one atomic switch
of a generation). Names in it are relative to the output (layout version 3); manifests of layouts 1 and 2 named URIs
under the output the job wrote to, and read the same (JobManifest.names).
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError

from jobs.output.errors import OutputError, UnsupportedSchemaVersion
from schemas.layout import LAYOUT_VERSION, manifest_uri
from schemas.output import LABEL_SCHEMA_VERSION, JobManifest
from workers.io.storage import ObjectMissing, Storage, join

log = logging.getLogger(__name__)


def read_manifest(storage: Storage, output: str) -> JobManifest | None:
    """The job manifest, or None when there is none. One that is not JSON, not a label job's, of a schema version
    this bulklabel does not read, or damaged, raises OutputError naming it (UnsupportedSchemaVersion for a version)."""
    uri = manifest_uri(output)
    raw = read_raw(storage, uri)
    if raw is None:
        return None
    kind = raw.get("kind", "label")
    if kind != "label":
        raise OutputError(f"{uri} is the manifest of a {kind!r} job, not of a label job")
    check_schema_version(raw.get("schema_version"), uri)
    try:
        manifest = JobManifest.model_validate(raw)
        manifest.names()  # every entry inside the output, checked once here
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        raise OutputError(f"job manifest {uri} is damaged: {field}: {err['msg']}") from exc
    except ValueError as exc:
        raise OutputError(f"job manifest {uri} is damaged: it lists {exc}") from exc
    return manifest


def manifest_job_id(storage: Storage, output: str) -> str | None:
    """Only the job id of the manifest (None without one): whose output it is, read from manifests of every version,
    even those of a bulklabel older than the fields JobManifest requires."""
    raw = read_raw(storage, manifest_uri(output))
    return None if raw is None else str(raw["job_id"])


def read_raw(storage: Storage, uri: str) -> dict | None:
    """The manifest at `uri` as JSON (None: absent); not JSON, or no job id: OutputError naming it."""
    try:
        raw = json.loads(storage.read_bytes(uri))
    except ObjectMissing:
        return None
    except ValueError as exc:
        raise OutputError(f"job manifest {uri} is not valid JSON ({exc}); was it edited by hand?") from exc
    if not isinstance(raw, dict) or "job_id" not in raw:
        raise OutputError(f"job manifest {uri} is not a bulklabel manifest (no job_id)")
    return raw


def write_manifest(storage: Storage, output: str, manifest: JobManifest) -> None:
    """Write `_job.json` whole (readers see the old manifest or this one, never a part)."""
    storage.write_bytes(manifest_uri(output), manifest.model_dump_json(by_alias=True, indent=2).encode())


def manifest_locations(manifest: JobManifest | None, output: str) -> dict[str, str]:
    """Shard → the URI under `output` (where the output is now) of the data file holding its rows."""
    if manifest is None:
        return {}
    return {shard: join(output, name) for shard, name in manifest.names().items()}


def switched(manifest: JobManifest, names: dict[str, str], generation: int) -> JobManifest:
    """The manifest of a compaction's new generation: `names` (shard → new data file, relative to the output)
    replace those shards' entries; everything else, including fields this bulklabel does not know, as it was. The
    names of a layout 1 or 2 manifest become relative with it: the rewritten manifest is layout 3 throughout."""
    current = manifest.names()
    shards = tuple(e.model_copy(update={"data": names.get(e.shard, current[e.shard])}) for e in manifest.shards)
    layout = max(manifest.layout_version, LAYOUT_VERSION)
    return manifest.model_copy(update={"shards": shards, "generation": generation, "layout_version": layout})


def check_schema_version(version: object, where: str) -> None:
    """Refuse rows whose meaning this bulklabel does not know: a newer version, or no usable version at all."""
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= LABEL_SCHEMA_VERSION:
        newer = isinstance(version, int) and version > LABEL_SCHEMA_VERSION
        raise UnsupportedSchemaVersion(
            f"{where} was written in label schema version {version!r}; this bulklabel reads version "
            f"{LABEL_SCHEMA_VERSION}" + (": upgrade bulklabel to read it" if newer else " (unknown version)")
        )
