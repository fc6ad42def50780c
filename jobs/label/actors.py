"""Start a label worker actor: what it asks Ray for, and what it is built from (a small picklable WorkerSpec)."""

from __future__ import annotations

import ray

from jobs.label.placement import Placement
from schemas.shards import WorkerSpec
from workers.label.remote import LabelWorkerActor

_ACTOR = ray.remote(LabelWorkerActor)


def start_label_worker(spec: WorkerSpec, placement: Placement, name: str | None = None) -> ray.actor.ActorHandle:
    """A new worker; Ray queues it until a node can hold it (so the autoscaler sees the demand)."""
    return _ACTOR.options(
        name=name,
        num_cpus=placement.cpus_per_worker,
        num_gpus=placement.gpus_per_worker,
        max_restarts=0,  # whoever dispatches to it replaces a dead worker itself, and counts it
        max_task_retries=0,
    ).remote(spec, placement.torch_threads)
