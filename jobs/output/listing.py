"""One streamed pass over an output prefix, sorted into what each phase needs: the ownership check (our names,
foreign files, the claim), the done-markers, the data files' sizes and the partial uploads to remove.

Every listing of a run goes through `list_output`: the session lists once to check, once under the writer lease to
start (another writer may have ended between the two), and the reader once to open an output. An output of a million
shards is two million objects; listing it three times per phase was most of a resume's start-up on S3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.layout import (
    DATA_FILE,
    FAILED_NAME,
    LEASE_NAMES,
    LITTER,
    MANIFEST_NAME,
    MARKER,
    OWN_NAMES,
    OWNER_NAME,
    PARTIAL,
    PROBE,
    V1_DATA_FILE,
)
from workers.io.storage import Storage, join, relative_key

FOREIGN_EXAMPLES = 3


@dataclass
class OutputListing:
    """What is under an output prefix, by role. Names are relative to the output."""

    output: str
    objects: int = 0  # every object below the output, of any name
    has_owner: bool = False
    has_manifest: bool = False
    has_failure: bool = False
    ours: list[str] = field(default_factory=list)  # data under our names: parts, markers, manifest (first few)
    foreign: list[str] = field(default_factory=list)  # first few foreign names
    foreign_count: int = 0
    v1_files: int = 0  # data files where layout 1 put them (the top of the prefix)
    markers: dict[str, str] = field(default_factory=dict)  # shard → its done-marker's name
    data: dict[str, int] = field(default_factory=dict)  # data file name → size
    partials: list[str] = field(default_factory=list)  # uploads of attempts that died mid-way (never the lease's)


def list_output(storage: Storage, output: str, under: str | None = None) -> OutputListing:
    """List `output` once (streamed: one page of the listing in memory at a time) and sort every name; `under`, a
    folder of the layout (such as `_tmp`), lists only that folder."""
    listing = OutputListing(output.rstrip("/"))
    for obj in storage.list(join(listing.output, under) if under else listing.output):
        if not obj.uri.startswith(listing.output + "/"):
            continue  # a file named as the output lists as itself: not below it, so not one of its files
        listing.objects += 1
        _sort(listing, relative_key(listing.output, obj.uri), obj.size)
    return listing


def _sort(listing: OutputListing, name: str, size: int) -> None:
    if name == OWNER_NAME:
        listing.has_owner = True
        return
    if PARTIAL.fullmatch(name) or LITTER.fullmatch(name) or PROBE.fullmatch(name) or LEASE_NAMES.fullmatch(name):
        # temporaries (perhaps of a racing job, mid-write), the writer lease, litter: no data, no claim
        if PARTIAL.fullmatch(name) and not LEASE_NAMES.fullmatch(name):
            listing.partials.append(name)
        return
    if not OWN_NAMES.fullmatch(name):
        listing.foreign_count += 1
        if len(listing.foreign) < FOREIGN_EXAMPLES:
            listing.foreign.append(name)
        return
    listing.v1_files += bool(V1_DATA_FILE.fullmatch(name))
    if len(listing.ours) < FOREIGN_EXAMPLES:
        listing.ours.append(name)
    if marker := MARKER.fullmatch(name):
        listing.markers[marker.group(1)] = name
    elif DATA_FILE.fullmatch(name):
        listing.data[name] = size
    elif name == MANIFEST_NAME:
        listing.has_manifest = True
    elif name == FAILED_NAME:
        listing.has_failure = True
