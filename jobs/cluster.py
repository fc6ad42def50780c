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
    return ClusterResources(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)))
