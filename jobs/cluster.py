"""Connect to a Ray cluster: the one in $RAY_ADDRESS (KubeRay, `ray start`), else a local one."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    # Alive Ray nodes (raylets). More than one: workers may run on other machines, which do not see this one's
    # folders. One node is the driver's own machine (a driver joins a cluster through a raylet on its machine).
    nodes: int = 1
    # Connected through Ray Client (ray://): the driver is on no node at all, so no worker shares its folders.
    client: bool = False
    # (CPUs, GPUs) of each alive node; empty: one node holding everything. A worker must fit on one node.
    node_resources: tuple[tuple[float, float], ...] = ()


def ensure_ray() -> ClusterResources:
    """Use the running Ray connection, or join $RAY_ADDRESS, or start a local cluster on this machine."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            # A private local cluster needs no token; Ray would otherwise write ~/.ray/auth_token.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        log.info("starting Ray (%s)", address or "local cluster")
        ray.init(address=address or None, log_to_driver=True, configure_logging=False)
    resources = ray.cluster_resources()
    alive = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    return ClusterResources(
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
        nodes=len(alive),
        client=ray.util.client.ray.is_connected(),
        node_resources=tuple((float(node.get("CPU", 0)), float(node.get("GPU", 0))) for node in alive),
    )


def joins_existing_cluster() -> bool:
    """Whether ensure_ray() would use a cluster that already runs (so it may have other nodes) rather than start a
    private one on this machine: already connected, $RAY_ADDRESS set, or, as ray.init(address=None) does, the
    latest `ray start` on this machine (Ray's address file)."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_bootstrap_address  # Ray's own lookup for ray.init(address=None)
    except ImportError:  # moved in another Ray version: assume a cluster may be there; connecting tells
        return True
    return find_bootstrap_address(None) is not None
