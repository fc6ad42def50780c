"""How many label workers to start and what each asks Ray for."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.cluster import ClusterResources
from schemas.specs import LabelJobSpec


class PlacementError(ValueError):
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
    cpus = spec.cpus_per_worker or max(cluster.cpus / workers, 0.01)
    if cpus * workers > cluster.cpus + 1e-9:
        raise PlacementError(
            f"num_workers={workers} x cpus_per_worker={cpus:g} exceeds the cluster's {cluster.cpus:g} CPUs"
        )
    return Placement(workers, cpus, 1.0 if use_gpu else 0.0, max(1, math.floor(cpus)))
