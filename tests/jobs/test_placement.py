"""How many workers a label job gets and what each asks for: pure logic over the cluster's resources."""

from __future__ import annotations

import pytest

from jobs.cluster import ClusterResources
from jobs.errors import BadInput
from jobs.placement import PlacementError, place_workers
from schemas.specs import LabelJobSpec


def _spec(**fields) -> LabelJobSpec:
    base = {"input": {"uri": "s3://in/photos"}, "output": "s3://out/run", "model": {"name": "mobilenet_v2"}}
    return LabelJobSpec(**{**base, **fields})


def test_too_many_cpu_workers_are_refused_with_the_numbers():
    with pytest.raises(PlacementError) as info:
        place_workers(_spec(num_workers=64), ClusterResources(cpus=2, gpus=0))
    assert "num_workers=64 needs at least 32 CPUs at 0.5 CPU each; the cluster has 2" in str(info.value)
    assert isinstance(info.value, BadInput)  # exit 2: the spec's fault, found before any work


def test_cpu_workers_share_the_cores_down_to_half_a_cpu_each():
    placement = place_workers(_spec(num_workers=4), ClusterResources(cpus=2, gpus=0))
    assert (placement.workers, placement.cpus_per_worker, placement.gpus_per_worker) == (4, 0.5, 0.0)
    assert placement.torch_threads == 1
    with pytest.raises(PlacementError, match="needs at least 2.5 CPUs"):
        place_workers(_spec(num_workers=5), ClusterResources(cpus=2, gpus=0))


def test_explicit_cpus_per_worker_is_taken_at_its_word_within_the_cluster():
    placement = place_workers(_spec(num_workers=8, cpus_per_worker=0.25), ClusterResources(cpus=2, gpus=0))
    assert (placement.workers, placement.cpus_per_worker) == (8, 0.25)
    with pytest.raises(PlacementError, match="exceeds the cluster's 2 CPUs"):
        place_workers(_spec(num_workers=8, cpus_per_worker=0.5), ClusterResources(cpus=2, gpus=0))


def test_default_is_one_cpu_worker_with_every_core():
    placement = place_workers(_spec(), ClusterResources(cpus=16, gpus=0))
    assert (placement.workers, placement.cpus_per_worker, placement.torch_threads) == (1, 16, 16)


def test_gpu_workers_one_per_gpu_and_no_more():
    placement = place_workers(_spec(), ClusterResources(cpus=4, gpus=2))
    assert (placement.workers, placement.cpus_per_worker, placement.gpus_per_worker) == (2, 2, 1.0)
    with pytest.raises(PlacementError, match="needs 3 GPUs; the cluster has 2"):
        place_workers(_spec(num_workers=3), ClusterResources(cpus=4, gpus=2))


def test_cuda_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(PlacementError, match="no GPUs"):
        place_workers(_spec(model={"name": "mobilenet_v2", "device": "cuda"}), ClusterResources(cpus=2, gpus=0))
