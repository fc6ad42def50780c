"""How many label workers to start and what each asks Ray for."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.cluster import ClusterResources
from jobs.errors import BadInput
from schemas.specs import LabelJobSpec

# The least share of the cluster's CPUs a CPU worker is given when the spec leaves cpus_per_worker to us: below it a
# replica decodes and runs its model on a sliver of a core (64 workers on 2 CPUs got 0.03 each) and the job crawls.
MIN_CPUS_PER_CPU_WORKER = 0.5


class PlacementError(BadInput):
    """The spec asks for resources the cluster does not have."""


@dataclass(frozen=True)
class Placement:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    torch_threads: int


def place_workers(spec: LabelJobSpec, cluster: ClusterResources) -> Placement:
    """One worker per GPU when there are GPUs (unless the spec says otherwise), else CPU workers
    that split the cluster's cores; torch gets as many threads as its worker has cores."""
    use_gpu = spec.model.device != "cpu" and cluster.gpus >= 1
    if spec.model.device == "cuda" and not use_gpu:
        raise PlacementError("model.device is 'cuda' but the Ray cluster has no GPUs")
    workers = spec.num_workers or (int(cluster.gpus) if use_gpu else 1)
    if use_gpu and workers > cluster.gpus:
        raise PlacementError(f"num_workers={workers} needs {workers} GPUs; the cluster has {cluster.gpus:g}")
    if not use_gpu and not spec.cpus_per_worker and workers * MIN_CPUS_PER_CPU_WORKER > cluster.cpus + 1e-9:
        raise PlacementError(
            f"num_workers={workers} needs at least {workers * MIN_CPUS_PER_CPU_WORKER:g} CPUs at "
            f"{MIN_CPUS_PER_CPU_WORKER:g} CPU each; the cluster has {cluster.cpus:g}"
            " (fewer workers, or set cpus_per_worker to share the CPUs anyway)"
        )
    cpus = spec.cpus_per_worker or max(cluster.cpus / workers, 0.01)
    if cpus * workers > cluster.cpus + 1e-9:
        raise PlacementError(
            f"num_workers={workers} x cpus_per_worker={cpus:g} exceeds the cluster's {cluster.cpus:g} CPUs"
        )
    return Placement(workers, cpus, 1.0 if use_gpu else 0.0, max(1, math.floor(cpus)))
