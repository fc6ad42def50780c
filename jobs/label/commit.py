"""Job-level commit state in the output prefix: the ownership claim, shard done-markers and the job manifest.

The names of an output prefix are defined in jobs.output.layout (every name there is one bulklabel writes; anything
else is a foreign file); the phases that use these functions in order are jobs.output.session.OutputSession.

What a run trusts of an earlier run is checked, never assumed: markers are parsed only under their own names and
validated (a `.DS_Store` or an empty temporary file in `_done/` is ignored or redone, never a crash), and each
marker's data file must still exist with the size it recorded, else the shard is redone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from jobs.errors import BadInput
from jobs.output.layout import (
    LAYOUT_VERSION,
    LEASE_NAMES,
    LITTER,
    MARKER,
    OWN_NAMES,
    OWNER_NAME,
    PARTIAL,
    PROBE,
    V1_DATA_FILE,
    failed_uri,
    manifest_uri,
    markers_prefix,
)
from schemas.output import LABEL_SCHEMA, LABEL_SCHEMA_VERSION, JobFailure
from schemas.shards import MARKER_FORMAT, ShardResult
from schemas.specs import LabelJobSpec
from workers.storage import ObjectMissing, Storage, StorageError, join, normalise_uri, relative_key

log = logging.getLogger(__name__)

MARKER_READ_THREADS = 16
FOREIGN_EXAMPLES = 3


class OutputConflict(BadInput):
    """The output prefix belongs to another job, holds files bulklabel did not write, or an unusable layout."""


def read_manifest(storage: Storage, output: str) -> dict | None:
    """The job manifest, or None when there is none; an unreadable one is an error naming it."""
    uri = manifest_uri(output)
    try:
        data = json.loads(storage.read_bytes(uri))
    except ObjectMissing:
        return None
    except ValueError as exc:
        raise OutputConflict(f"job manifest {uri} is not valid JSON ({exc}); was it edited by hand?") from exc
    if not isinstance(data, dict) or "job_id" not in data:
        raise OutputConflict(f"job manifest {uri} is not a bulklabel manifest (no job_id)")
    return data


# ----------------------------------------------------------------------------------------------- ownership


def check_output(storage: Storage, output: str, job_id: str, foreign_files: str) -> None:
    """Refuse, before anything is written, an output that another job owns or that holds files bulklabel did not
    write (unless `foreign_files="keep"`; even then, a foreign file under one of bulklabel's own names, such as
    another tool's `part-00000.parquet`, is refused: it would be overwritten or read as ours)."""
    listing = _classify(storage, output)
    if listing.foreign and foreign_files == "refuse":
        raise OutputConflict(
            f"output {output} holds {listing.foreign_count} file(s) bulklabel did not write (e.g. "
            f"{', '.join(listing.foreign)}): use an empty prefix, or set foreign_files: keep to leave them untouched"
        )
    if listing.has_owner:
        owner = _owner_job_id(storage, join(output, OWNER_NAME))
        if owner != job_id:
            raise OutputConflict(f"output {output} belongs to job {owner!r}, not {job_id!r}: use a new output prefix")
        _refuse_layout_1(output, listing)
        return
    legacy = _legacy_owner(storage, output, listing)
    if legacy is not None and legacy != job_id:
        raise OutputConflict(f"output {output} holds rows of job {legacy!r}, not {job_id!r}: use a new prefix")
    if legacy is not None:
        _refuse_layout_1(output, listing)
    if legacy is None and listing.ours:
        raise OutputConflict(
            f"output {output} holds {', '.join(listing.ours)} with no bulklabel owner or manifest: another tool's "
            "files under bulklabel's names would be overwritten or misread; use a new output prefix"
        )


def claim_output(storage: Storage, output: str, job_id: str) -> None:
    """Make `job_id` the one owner of `output` (after `check_output`), or raise OutputConflict.

    The claim is `_owner.json`, created with an atomic create-if-absent (S3 `If-None-Match: *`, a local `link()`):
    of two jobs starting at the same moment exactly one creates it, and the other reads the winner's id and stops.
    """
    owner_uri = join(output, OWNER_NAME)
    claim = {"job_id": job_id, "claimed_at": datetime.now(UTC).isoformat(), "host": socket.gethostname(),
             "pid": os.getpid(), "layout_version": LAYOUT_VERSION}  # fmt: skip
    try:
        created = storage.create_exclusive(owner_uri, json.dumps(claim).encode())
    except StorageError:
        raise
    except OSError as exc:  # a local output below a file, on a read-only disk, without permission
        raise StorageError(f"output {output} is not writable: {type(exc).__name__}: {exc}") from exc
    if created:
        log.info("claimed output %s for job %s", output, job_id)
        return
    owner = _owner_job_id(storage, owner_uri)
    if owner != job_id:
        raise OutputConflict(f"output {output} belongs to job {owner!r}, not {job_id!r}: use a new output prefix")


@dataclass
class _Listing:
    has_owner: bool = False
    ours: list[str] = field(default_factory=list)  # data under our names: parts, markers, manifest (first few)
    foreign: list[str] = field(default_factory=list)  # first few foreign names
    foreign_count: int = 0
    v1_files: int = 0  # data files where layout 1 put them (the top of the prefix)


def _classify(storage: Storage, output: str) -> _Listing:
    listing = _Listing()
    for obj in storage.list(output):
        name = relative_key(output, obj.uri)
        if name == OWNER_NAME:
            listing.has_owner = True
        elif PARTIAL.fullmatch(name) or LITTER.fullmatch(name) or PROBE.fullmatch(name) or LEASE_NAMES.fullmatch(name):
            continue  # temporaries (perhaps of a racing job, mid-write), the writer lease, litter: no data, no claim
        elif OWN_NAMES.fullmatch(name):
            listing.v1_files += bool(V1_DATA_FILE.fullmatch(name))
            if len(listing.ours) < FOREIGN_EXAMPLES:
                listing.ours.append(name)
        else:
            listing.foreign_count += 1
            if len(listing.foreign) < FOREIGN_EXAMPLES:
                listing.foreign.append(name)
    return listing


def _refuse_layout_1(output: str, listing: _Listing) -> None:
    """Layout 1 outputs stay readable (the reader follows their manifest or markers), but a run would put new shards
    in `data/` beside old ones at the top, and folder readers would see half the rows: refused, naming both layouts."""
    if listing.v1_files:
        raise OutputConflict(
            f"output {output} is in output layout version 1 (data files at the top of the prefix, "
            f"{listing.v1_files} of them); this bulklabel writes layout version {LAYOUT_VERSION} (data files under "
            "data/) and does not extend a layout 1 output: its rows stay readable with bulklabel query, similar and "
            "report; write this run to a new output prefix"
        )


def _legacy_owner(storage: Storage, output: str, listing: _Listing) -> str | None:
    """The job of an output written before owner files existed (its manifest or first marker), if any."""
    if not listing.ours:
        return None
    manifest = read_manifest(storage, output)
    if manifest:
        return manifest["job_id"]
    for uri in _marker_uris(storage, output):
        try:
            return ShardResult.model_validate_json(storage.read_bytes(uri)).job_id
        except ValidationError:
            continue
    return None


def _owner_job_id(storage: Storage, owner_uri: str) -> str:
    try:
        return json.loads(storage.read_bytes(owner_uri))["job_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputConflict(f"ownership claim {owner_uri} is unreadable ({exc}): use a new output prefix") from exc


def remove_partials(storage: Storage, output: str) -> None:
    """Delete temporary objects left by attempts that died mid-upload, and nothing else: a foreign file under
    `_tmp/` is left alone, and so is the lease's folder (another writer's create-if-absent may be on its way there).
    Run only while no shard is in flight."""
    for obj in storage.list(output):
        name = relative_key(output, obj.uri)
        if PARTIAL.fullmatch(name) and not LEASE_NAMES.fullmatch(name):
            log.info("removing leftover partial upload %s", obj.uri)
            storage.delete(obj.uri)


# ----------------------------------------------------------------------------------------------- done-markers


@dataclass
class CommittedShards:
    """What an output's done-markers claim, after checking them against the data files."""

    done: dict[str, ShardResult] = field(default_factory=dict)  # verified: data present with its recorded size
    redo: dict[str, str] = field(default_factory=dict)  # shard → why its marker cannot be trusted
    # shard → the file holding its rows where that is not the marker's own file: a compaction merged it (the
    # manifest is the pointer), so a resume keeps it and the next manifest names that file again
    locations: dict[str, str] = field(default_factory=dict)
    generation: int = 0  # the manifest's compaction generation (0: never compacted)


def _marker_uris(storage: Storage, output: str) -> list[str]:
    prefix = markers_prefix(output)
    return [o.uri for o in storage.list(prefix) if MARKER.fullmatch(relative_key(output, o.uri))]


def read_committed(storage: Storage, output: str, job_id: str) -> CommittedShards:
    """Every done-marker, validated, with its data file checked: missing or resized data means the shard is redone.

    Only `_done/<shard>.json` names are read (a `.DS_Store` or a temp file is not a marker). A marker that does not
    parse (a disk that filled up mid-write) or names another job is redone, and named in the log. A shard the
    manifest places in a compacted file is checked against that file instead of its own (deleted) one.
    """
    uris = _marker_uris(storage, output)
    sizes = {o.uri: o.size for o in storage.list(output) if o.uri.endswith(".parquet")}
    manifest = read_manifest(storage, output)
    placed = manifest_locations(manifest, output)

    def load(uri: str) -> tuple[str, ShardResult | str]:
        shard = MARKER.fullmatch(relative_key(output, uri)).group(1)
        try:
            return shard, ShardResult.model_validate_json(storage.read_bytes(uri))
        except ValidationError as exc:
            return shard, f"marker {uri} is unreadable ({exc.errors()[0]['msg']})"
        except ObjectMissing:
            return shard, f"marker {uri} vanished while reading"

    with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
        loaded = list(pool.map(load, uris))
    committed = CommittedShards(generation=int((manifest or {}).get("generation", 0)))
    for shard, marker in loaded:
        moved = None
        if isinstance(marker, ShardResult) and placed.get(shard, marker.data_uri) != marker.data_uri:
            moved = placed[shard]  # compacted (or the output was moved): the manifest's file holds the rows
        problem = marker if isinstance(marker, str) else _marker_problem(marker, shard, job_id, sizes, moved)
        if problem:
            log.warning("shard %s will be labelled again: %s", shard, problem)
            committed.redo[shard] = problem
        else:
            committed.done[shard] = marker
            if moved is not None:
                committed.locations[shard] = moved
    return committed


def manifest_locations(manifest: dict | None, output: str) -> dict[str, str]:
    """Shard → the data file holding its rows, as the manifest lists it, under `output` (the manifest names the
    output the job wrote to; an output moved since reads the same)."""
    if not manifest:
        return {}
    recorded = normalise_uri(str(manifest.get("spec", {}).get("output", output))).rstrip("/")
    located = {}
    for entry in manifest.get("shards", ()):
        try:
            located[entry["shard"]] = join(output, relative_key(recorded, entry["data"]))
        except (KeyError, TypeError, ValueError):
            continue  # a damaged entry places nothing: the shard's own marker decides
    return located


def _marker_problem(
    marker: ShardResult, shard: str, job_id: str, sizes: dict[str, int], moved: str | None = None
) -> str | None:
    if marker.marker_format < MARKER_FORMAT:
        raise OutputConflict(
            f"output holds shards written by an older bulklabel (marker format {marker.marker_format}, shard ids "
            f"and fingerprints have changed since): write to a new output prefix"
        )
    if marker.shard_id != shard or marker.job_id != job_id:
        return f"marker names shard {marker.shard_id!r} of job {marker.job_id!r}"
    if moved is not None:
        return None if moved in sizes else f"the data file {moved} its manifest places it in is gone"
    if marker.data_uri not in sizes:
        return f"its data file {marker.data_uri} is gone"
    size = sizes[marker.data_uri]
    if marker.data_bytes is not None and size != marker.data_bytes:
        return f"its data file {marker.data_uri} is {size} bytes, the marker recorded {marker.data_bytes}"
    return None


# ----------------------------------------------------------------------------------------------- the manifest


def error_summary(shards: Iterable[ShardResult]) -> tuple[str, int, str] | None:
    """(commonest error kind, its rows, an example key) over the shards, or None without errors."""
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for result in shards:
        for kind, count in result.error_kinds.items():
            counts[kind] = counts.get(kind, 0) + count
            examples.setdefault(kind, result.error_examples.get(kind, ""))
    if not counts:
        return None
    kind = max(counts, key=counts.get)
    return kind, counts[kind], examples[kind]


def write_manifest(
    storage: Storage,
    spec: LabelJobSpec,
    job_id: str,
    worker: dict,
    shards: dict[str, ShardResult],
    failures: dict[str, str],
    started: datetime,
    locations: dict[str, str] | None = None,
    generation: int = 0,
) -> dict:
    """Write `_job.json` last; a reader that finds it knows every listed shard is committed.

    `locations` places shards a compaction merged (shard → its compacted file); the others are in their own file.
    """
    locations = locations or {}
    finished = datetime.now(UTC)
    status = "succeeded" if not failures else "partial"
    manifest = {
        "job_id": job_id,
        "kind": spec.kind,
        "status": status,
        "spec": json.loads(spec.model_dump_json()),  # SecretStr fields dump as '**********'
        "model": worker,
        "schema_version": LABEL_SCHEMA_VERSION,
        "layout_version": LAYOUT_VERSION,
        "generation": generation,
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
            {"shard": r.shard_id, "data": locations.get(r.shard_id, r.data_uri), "rows": r.rows, "errors": r.errors}
            for r in sorted(shards.values(), key=lambda r: r.shard_id)
        ],
        "failed_shards": [{"shard": s, "error": e} for s, e in sorted(failures.items())],
    }
    storage.write_bytes(manifest_uri(spec.output), json.dumps(manifest, indent=2).encode())
    return manifest


def write_failure(storage: Storage, output: str, failure: JobFailure) -> None:
    """Write `_failed.json`: the record that a run of the job failed, and why (a later complete run removes it)."""
    storage.write_bytes(failed_uri(output), failure.model_dump_json(indent=2).encode())


def read_failure(storage: Storage, output: str) -> JobFailure | None:
    """The failure record of the last failed run, or None; an unreadable one is logged and ignored (it is advice)."""
    try:
        return JobFailure.model_validate_json(storage.read_bytes(failed_uri(output)))
    except ObjectMissing:
        return None
    except ValidationError as exc:
        log.warning("failure record %s is unreadable: %s", failed_uri(output), exc.errors()[0]["msg"])
        return None


def remove_failure(storage: Storage, output: str) -> None:
    storage.delete(failed_uri(output))
