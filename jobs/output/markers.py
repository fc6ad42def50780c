"""What an output's done-markers (`_done/<shard>.json`) say is committed, each checked against its data file.

Markers are parsed only under their own names and validated (a `.DS_Store` or an empty temporary file in `_done/`
is ignored or redone, never a crash), and each marker's data file must still exist with the size it recorded, else
the shard is redone. A marker names its data file relative to the output (format 3), so an output copied or moved
elsewhere is trusted whole; format 2 markers name an absolute URI, found under the output where it is now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import ValidationError

from jobs.output.errors import OutputConflict
from jobs.output.listing import OutputListing, list_output
from jobs.output.manifest import manifest_locations, read_manifest
from schemas.layout import join
from schemas.output import JobManifest
from schemas.shards import OLDEST_MARKER_FORMAT, ShardResult
from workers.io.storage import ObjectMissing, Storage

log = logging.getLogger(__name__)

MARKER_READ_THREADS = 16


@dataclass
class CommittedShards:
    """What an output's done-markers claim, after checking them against the data files."""

    done: dict[str, ShardResult] = field(default_factory=dict)  # verified: data present with its recorded size
    redo: dict[str, str] = field(default_factory=dict)  # shard → why its marker cannot be trusted
    # shard → the URI of the file holding its rows, under the output where it is now
    files: dict[str, str] = field(default_factory=dict)
    # shard → the file holding its rows where that is not the marker's own file: a compaction merged it (the
    # manifest is the pointer), so a resume keeps it and the next manifest names that file again
    locations: dict[str, str] = field(default_factory=dict)
    generation: int = 0  # the manifest's compaction generation (0: never compacted)


def read_committed(
    storage: Storage,
    output: str,
    job_id: str,
    listing: OutputListing | None = None,
    manifest: JobManifest | None = None,
) -> CommittedShards:
    """Every done-marker, validated, with its data file checked: missing or resized data means the shard is redone.

    `listing`: the output's listing this phase made (else the output is listed now); `manifest`: its manifest, if
    the caller read it already. A marker that does not parse (a disk that filled up mid-write) or names another job
    is redone, and named in the log. A shard the manifest places in a compacted file is checked against that file
    instead of its own (deleted) one.
    """
    output = output.rstrip("/")
    listing = listing if listing is not None else list_output(storage, output)
    if manifest is None and listing.has_manifest:
        manifest = read_manifest(storage, output)
    placed = manifest_locations(manifest, output)

    def load(item: tuple[str, str]) -> tuple[str, ShardResult | str]:
        shard, name = item
        try:
            return shard, ShardResult.model_validate_json(storage.read_bytes(join(output, name)))
        except ValidationError as exc:
            return shard, f"marker {join(output, name)} is unreadable ({exc.errors()[0]['msg']})"
        except ObjectMissing:
            return shard, f"marker {join(output, name)} vanished while reading"

    with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
        loaded = list(pool.map(load, sorted(listing.markers.items())))
    committed = CommittedShards(generation=manifest.generation if manifest is not None else 0)
    for shard, marker in loaded:
        problem = marker if isinstance(marker, str) else _marker_problem(marker, shard, job_id, listing, placed)
        if problem:
            log.warning("shard %s will be labelled again: %s", shard, problem)
            committed.redo[shard] = problem
            continue
        committed.done[shard] = marker
        own = marker.data_in(output)
        committed.files[shard] = placed.get(shard, own)
        if placed.get(shard, own) != own:  # compacted: the manifest's file holds the rows
            committed.locations[shard] = placed[shard]
    return committed


def _marker_problem(
    marker: ShardResult, shard: str, job_id: str, listing: OutputListing, placed: dict[str, str]
) -> str | None:
    if marker.marker_format < OLDEST_MARKER_FORMAT:
        raise OutputConflict(
            f"output holds shards written by an older bulklabel (marker format {marker.marker_format}, shard ids "
            f"and fingerprints have changed since): write to a new output prefix"
        )
    if marker.shard_id != shard or marker.job_id != job_id:
        return f"marker names shard {marker.shard_id!r} of job {marker.job_id!r}"
    try:
        own = marker.data_name(listing.output)
    except ValueError:
        return f"its data file {marker.data} is not a file of this output"
    moved = placed.get(shard)
    if moved is not None and moved != join(listing.output, own):
        name = moved[len(listing.output) + 1 :]
        return None if name in listing.data else f"the data file {moved} its manifest places it in is gone"
    if own not in listing.data:
        return f"its data file {join(listing.output, own)} is gone"
    size = listing.data[own]
    if marker.data_bytes is not None and size != marker.data_bytes:
        return f"its data file {join(listing.output, own)} is {size} bytes, the marker recorded {marker.data_bytes}"
    return None


def error_summary(shards: Iterable[ShardResult]) -> tuple[str, int, str] | None:
    """(commonest error kind, its rows, an example key) over the shards' markers, or None without errors."""
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
