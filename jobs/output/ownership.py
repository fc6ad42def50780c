"""Who owns an output prefix: the check before any write, and the claim `_owner.json` that makes one job its owner.

What a run trusts of an earlier run is checked, never assumed: an output another job owns, or holding files
bulklabel did not write, is refused before anything is written (jobs.output.errors.OutputConflict, exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime

from pydantic import ValidationError

from jobs.output.errors import OutputConflict
from jobs.output.listing import OutputListing, list_output
from jobs.output.manifest import manifest_job_id
from schemas.layout import LAYOUT_VERSION, OWNER_NAME, join
from schemas.shards import ShardResult
from workers.io.storage import Storage, StorageError

log = logging.getLogger(__name__)


def check_output(
    storage: Storage, output: str, job_id: str, foreign_files: str, listing: OutputListing | None = None
) -> None:
    """Refuse, before anything is written, an output that another job owns or that holds files bulklabel did not
    write (unless `foreign_files="keep"`; even then, a foreign file under one of bulklabel's own names, such as
    another tool's `part-00000.parquet`, is refused: it would be overwritten or read as ours). `listing`: the
    output's listing this phase made (else the output is listed now)."""
    listing = listing if listing is not None else list_output(storage, output)
    output = listing.output
    if listing.foreign and foreign_files == "refuse":
        raise OutputConflict(
            f"output {output} holds {listing.foreign_count} file(s) bulklabel did not write (e.g. "
            f"{', '.join(listing.foreign)}): use an empty prefix, or set foreign_files: keep to leave them untouched"
        )
    if listing.has_owner:
        owner = _owner_job_id(storage, join(output, OWNER_NAME))
        if owner != job_id:
            raise OutputConflict(f"output {output} belongs to job {owner!r}, not {job_id!r}: use a new output prefix")
        _refuse_layout_1(listing)
        return
    legacy = _legacy_owner(storage, listing)
    if legacy is not None and legacy != job_id:
        raise OutputConflict(f"output {output} holds rows of job {legacy!r}, not {job_id!r}: use a new prefix")
    if legacy is not None:
        _refuse_layout_1(listing)
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


def _refuse_layout_1(listing: OutputListing) -> None:
    """Layout 1 outputs stay readable (the reader follows their manifest or markers), but a run would put new shards
    in `data/` beside old ones at the top, and folder readers would see half the rows: refused, naming both layouts."""
    if listing.v1_files:
        raise OutputConflict(
            f"output {listing.output} is in output layout version 1 (data files at the top of the prefix, "
            f"{listing.v1_files} of them); this bulklabel writes layout version {LAYOUT_VERSION} (data files under "
            "data/) and does not extend a layout 1 output: its rows stay readable with bulklabel query, similar and "
            "report; write this run to a new output prefix"
        )


def _legacy_owner(storage: Storage, listing: OutputListing) -> str | None:
    """The job of an output written before owner files existed (its manifest or first marker), if any."""
    if not listing.ours:
        return None
    job_id = manifest_job_id(storage, listing.output) if listing.has_manifest else None
    if job_id is not None:
        return job_id
    for name in listing.markers.values():
        try:
            return ShardResult.model_validate_json(storage.read_bytes(join(listing.output, name))).job_id
        except ValidationError:
            continue
    return None


def _owner_job_id(storage: Storage, owner_uri: str) -> str:
    try:
        return json.loads(storage.read_bytes(owner_uri))["job_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputConflict(f"ownership claim {owner_uri} is unreadable ({exc}): use a new output prefix") from exc
