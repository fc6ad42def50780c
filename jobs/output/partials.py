"""Removing the temporary uploads of attempts that died mid-upload (`_tmp/<shard>.<attempt>.<nonce>.partial`, a
local writer's `.<name>.<nonce>.tmp`), and nothing else."""

from __future__ import annotations

import logging

from jobs.output.listing import OutputListing, list_output
from workers.io.storage import Storage, join

log = logging.getLogger(__name__)


def remove_partials(storage: Storage, output: str, listing: OutputListing | None = None) -> int:
    """Delete the partial uploads under `output` (those `listing`, this phase's listing, found; else it is listed
    now). A foreign file under `_tmp/` is not one, and the lease's folder is
    left alone (another writer's create-if-absent may be on its way there). Run only while no shard is in flight
    (under the writer lease, before dispatch or after the last shard). Returns how many were deleted."""
    listing = listing if listing is not None else list_output(storage, output)
    for name in listing.partials:
        log.info("removing leftover partial upload %s", join(listing.output, name))
        storage.delete(join(listing.output, name))
    return len(listing.partials)
