"""Connect to a Ray cluster: the one in $RAY_ADDRESS (KubeRay, `ray start`), else a local one.

Which cluster is decided before ray.init, by a short TCP connect to its GCS port: ray.init against a dead address
retries for minutes without a word, so an unreachable $RAY_ADDRESS fails the command at once (exit 3), and the
address file a killed `ray start` cluster leaves behind is forgotten in favour of a private local cluster.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import ray

from jobs.errors import InfrastructureError

log = logging.getLogger(__name__)

# A live GCS accepts a connection in milliseconds; a refused port fails at once. The bound is for a host that drops
# packets (a firewall, a machine gone): long enough for a loaded network, short against ray.init's minutes.
PROBE_TIMEOUT_S = 5.0


class ClusterUnreachable(InfrastructureError):
    """$RAY_ADDRESS names a cluster that does not answer."""


class ClusterSource(enum.Enum):
    CONNECTED = "already connected"
    ENVIRONMENT = "$RAY_ADDRESS"
    ADDRESS_FILE = "the latest `ray start` on this machine"
    PRIVATE = "a private local cluster"
    STALE_ADDRESS_FILE = "a private local cluster (the latest `ray start` here is gone)"


@dataclass(frozen=True)
class ClusterChoice:
    """Where ray.init goes: `address` None starts a private local cluster."""

    source: ClusterSource
    address: str | None = None
    stale_address: str | None = None  # the dead `ray start` address the address file named

    @property
    def joins_existing(self) -> bool:
        return self.source in (ClusterSource.CONNECTED, ClusterSource.ENVIRONMENT, ClusterSource.ADDRESS_FILE)


def gcs_reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at the address's host:port (a GCS, or a Ray Client server for
    ray://). An address that names no port (`auto`, a bare name) is not probed: ray.init resolves it."""
    target = _host_port(address)
    if target is None:
        return True
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return True
    except OSError:
        return False


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def choose_cluster(
    connected: bool, env_address: str | None, file_address: str | None, reachable: Callable[[str], bool]
) -> ClusterChoice:
    """The cluster to use: the connected one, $RAY_ADDRESS (refused in one line when it does not answer), the
    latest `ray start` here if its GCS answers, else a private local one (naming a stale address file)."""
    if connected:
        return ClusterChoice(ClusterSource.CONNECTED)
    if env_address:
        if not reachable(env_address):
            raise ClusterUnreachable(
                f"the Ray cluster at RAY_ADDRESS={env_address} does not answer (no connection within "
                f"{PROBE_TIMEOUT_S:.0f} s); start it, or unset RAY_ADDRESS to run on a local cluster"
            )
        return ClusterChoice(ClusterSource.ENVIRONMENT, env_address)
    if file_address:
        if reachable(file_address):
            return ClusterChoice(ClusterSource.ADDRESS_FILE, file_address)
        return ClusterChoice(ClusterSource.STALE_ADDRESS_FILE, stale_address=file_address)
    return ClusterChoice(ClusterSource.PRIVATE)


def find_cluster() -> ClusterChoice:
    """choose_cluster on this process and machine; a stale address file is removed (and said so), so that neither
    this command nor the next one, nor Ray's own `ray.init()`, waits on the dead cluster."""
    choice = choose_cluster(ray.is_initialized(), os.environ.get("RAY_ADDRESS"), _address_file(), gcs_reachable)
    if choice.source is ClusterSource.STALE_ADDRESS_FILE:
        log.warning("the Ray cluster last started here with `ray start` (%s) is gone; forgetting its address file "
                    "and starting a private local cluster", choice.stale_address)  # fmt: skip
        _forget_address_file(choice.stale_address)
    return choice


def _address_file() -> str | None:
    """The address the latest `ray start` on this machine wrote (Ray's own lookup for ray.init(address=None))."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # moved in another Ray version: no file known, ray.init decides
        return None
    return find_bootstrap_address(None) or None


def _forget_address_file(address: str | None) -> None:
    """Remove Ray's address file if it still names `address` (a `ray start` since then wrote a live one)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:
        return
    path = get_ray_address_file(None)
    try:
        with open(path) as fh:
            if fh.read().strip() == address:
                os.remove(path)
    except OSError:  # gone already, or not ours to remove: ray.init(address="local") ignores it anyway
        return


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
    choice = find_cluster()
    if choice.source is not ClusterSource.CONNECTED:
        if not choice.joins_existing:
            # A private local cluster needs no token; Ray would otherwise write ~/.ray/auth_token.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        log.info("starting Ray (%s)", choice.address or choice.source.value)
        # "local": a new cluster even where an address file names another (ray.init(address=None) would join it).
        ray.init(address=choice.address or "local", log_to_driver=True, configure_logging=False)
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
    private one on this machine: already connected, $RAY_ADDRESS set, or the latest live `ray start` here."""
    return find_cluster().joins_existing
