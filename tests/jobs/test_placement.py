"""How many workers a label job gets and what each asks for: pure logic over the cluster's resources."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from jobs.cluster import ClusterResources
from jobs.errors import BadInput
from jobs.label import compile_policy
from jobs.label.compile_policy import BYTES_PER_IMAGE, images_needed
from jobs.label.placement import (
    Placement,
    PlacementError,
    UnreachableLocation,
    local_locations,
    place_workers,
    refuse_unshared_local_paths,
    resolve_compile,
)
from jobs.label.plan import shard_id_for
from schemas.layout import data_uri, marker_uri
from schemas.shards import ShardResult, WorkerSpec
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


# ------------------------------------------------------------------ workers must fit on one node each

# A head with no CPUs (as KubeRay and `ray start --head --num-cpus 0` run it) and three 1-CPU worker nodes.
THREE_SMALL_NODES = ClusterResources(cpus=3, gpus=0, nodes=4, node_resources=((0, 0), (1, 0), (1, 0), (1, 0)))


def test_the_cpu_share_is_what_one_node_can_give_not_the_clusters_average():
    # An even split of 3 CPUs is 1.5 each, which no node has: Ray could never place such a worker.
    placement = place_workers(_spec(num_workers=2), THREE_SMALL_NODES)
    assert (placement.workers, placement.cpus_per_worker, placement.torch_threads) == (2, 1.0, 1)
    assert place_workers(_spec(num_workers=4), THREE_SMALL_NODES).cpus_per_worker == 0.5  # 2 on each of 2 nodes
    uneven = ClusterResources(cpus=12, gpus=0, nodes=2, node_resources=((8, 0), (4, 0)))
    assert place_workers(_spec(num_workers=3), uneven).cpus_per_worker == 4  # 2 on the 8-CPU node, 1 on the other


def test_workers_that_fit_no_node_are_refused_naming_the_nodes():
    with pytest.raises(PlacementError) as info:
        place_workers(_spec(num_workers=2, cpus_per_worker=1.5), THREE_SMALL_NODES)
    assert "num_workers=2 x 1.5 CPU each do not fit on the cluster's 4 node(s) (0 CPU, 1 CPU, 1 CPU, 1 CPU)" in str(
        info.value
    )
    # 3 CPUs are enough for 6 workers at half a CPU in total, but these nodes hold only 4 such halves.
    fragmented = ClusterResources(cpus=3, gpus=0, nodes=3, node_resources=((1.2, 0), (0.9, 0), (0.9, 0)))
    with pytest.raises(PlacementError, match=r"num_workers=6 x at least 0.5 CPU each do not fit on the cluster's 3"):
        place_workers(_spec(num_workers=6), fragmented)


def test_gpu_workers_get_the_cpus_of_their_gpu_node():
    # A CPU-only head with 16 CPUs and two GPU nodes of 8 CPUs + 1 GPU: an even split (32/2) fits no GPU node.
    gpu_cluster = ClusterResources(cpus=32, gpus=2, nodes=3, node_resources=((16, 0), (8, 1), (8, 1)))
    placement = place_workers(_spec(), gpu_cluster)
    assert (placement.workers, placement.cpus_per_worker, placement.gpus_per_worker) == (2, 8, 1.0)
    two_gpus_one_node = ClusterResources(cpus=8, gpus=2, nodes=1, node_resources=((8, 2),))
    assert place_workers(_spec(), two_gpus_one_node).cpus_per_worker == 4


# ------------------------------------------------------------------ local paths on a multi-node cluster


def _local_spec(tmp_path, **fields) -> LabelJobSpec:
    return _spec(input={"uri": str(tmp_path / "photos")}, output=str(tmp_path / "labels"), **fields)


def test_local_output_on_a_multi_node_cluster_is_refused_naming_the_path_and_the_fix(tmp_path):
    spec = _spec(output=str(tmp_path / "labels"))  # input on S3, output local
    with pytest.raises(UnreachableLocation) as info:
        refuse_unshared_local_paths(spec, ClusterResources(cpus=2, gpus=0, nodes=3))
    message = str(info.value)
    assert f"output {tmp_path / 'labels'} is a local path" in message
    assert "the Ray cluster has 3 nodes" in message and "cannot see this machine's folders" in message
    assert "shared_storage: true" in message and "s3://" in message
    assert isinstance(info.value, BadInput)  # exit 2: refused before any work


def test_local_input_is_refused_too_and_every_local_path_is_counted(tmp_path):
    with pytest.raises(UnreachableLocation, match=r"input \S+photos is a local path \(and 1 more local path"):
        refuse_unshared_local_paths(_local_spec(tmp_path), ClusterResources(cpus=2, gpus=0, nodes=2))


def test_local_paths_on_one_node_or_declared_shared_are_allowed(tmp_path):
    refuse_unshared_local_paths(_local_spec(tmp_path), ClusterResources(cpus=2, gpus=0, nodes=1))
    shared = _local_spec(tmp_path, shared_storage=True)
    refuse_unshared_local_paths(shared, ClusterResources(cpus=8, gpus=4, nodes=5))


def test_s3_only_jobs_run_on_any_cluster():
    refuse_unshared_local_paths(_spec(), ClusterResources(cpus=8, gpus=4, nodes=5))
    refuse_unshared_local_paths(_spec(), ClusterResources(cpus=8, gpus=4, nodes=1, client=True))


def test_a_ray_client_driver_shares_no_folder_even_with_one_node(tmp_path):
    with pytest.raises(UnreachableLocation, match=r"Ray Client \(ray://\)"):
        refuse_unshared_local_paths(_local_spec(tmp_path), ClusterResources(cpus=2, gpus=0, nodes=1, client=True))


def test_local_model_files_count_but_the_weights_folder_does_not(tmp_path):
    model = {"name": str(tmp_path / "artifact" / "v1"), "weights": str(tmp_path / "w.pth"),
             "weights_dir": str(tmp_path / "weights")}  # fmt: skip
    spec = _spec(model=model)
    assert local_locations(spec) == [("model", model["name"]), ("model.weights", model["weights"])]
    # The weights folder alone is each node's own (image or mount): an S3 job that names one is not refused.
    only_dir = _spec(model={"name": "mobilenet_v2", "weights_dir": str(tmp_path / "weights")})
    assert local_locations(only_dir) == []
    refuse_unshared_local_paths(only_dir, ClusterResources(cpus=2, gpus=0, nodes=3))
    with pytest.raises(UnreachableLocation, match=r"^model \S+v1 is a local path \(and 1 more"):
        refuse_unshared_local_paths(spec, ClusterResources(cpus=2, gpus=0, nodes=3))


def test_allowed_roots_on_local_disk_are_local_paths(tmp_path):
    spec = _spec(input={"uri": "s3://in/keys.csv", "allowed_roots": [str(tmp_path), "s3://other/"]})
    assert local_locations(spec) == [("input.allowed_roots entry", str(tmp_path))]


def test_a_private_local_ray_is_never_asked_and_a_ray_start_cluster_is(tmp_path):
    """Without a cluster to join the check decides without starting Ray (the local Ray started later is one node);
    the address file a `ray start` leaves makes ray.init(address=None) join that cluster, so it counts as one while
    its GCS answers. In a
    fresh interpreter: this one may already be connected to the session's Ray."""
    script = f"""
import ray
from jobs.cluster import joins_existing_cluster
from jobs.label.placement import check_locations_reachable
from schemas.specs import LabelJobSpec
spec = LabelJobSpec(input={{"uri": {str(tmp_path / "in")!r}}}, output={str(tmp_path / "out")!r},
                    model={{"name": "mobilenet_v2"}})
check_locations_reachable(spec)
assert not ray.is_initialized() and not joins_existing_cluster()
import socket
gcs = socket.create_server(("127.0.0.1", 0))  # a live `ray start` answers on its GCS port
(ray_tmp / "ray").mkdir()
(ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{{gcs.getsockname()[1]}}")
assert joins_existing_cluster()
gcs.close()  # its cluster killed: the file left behind is stale, a private cluster will be started
assert not joins_existing_cluster() and not (ray_tmp / "ray" / "ray_current_cluster").exists()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    preamble = f"import pathlib; ray_tmp = pathlib.Path({str(tmp_path)!r})\n"
    done = subprocess.run([sys.executable, "-c", preamble + script], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------- compile: auto


def _tar_input(tmp_path, *sizes: int) -> None:
    """Tar shards of the given sizes, sparse: only their listed sizes matter to the estimate."""
    (tmp_path / "photos").mkdir(exist_ok=True)
    for index, size in enumerate(sizes):
        with open(tmp_path / "photos" / f"shard-{index:02d}.tar", "wb") as shard:
            shard.truncate(size)


CPU_WORKER = Placement(workers=1, cpus_per_worker=2.0, gpus_per_worker=0.0, torch_threads=2)


def _auto_spec(tmp_path) -> LabelJobSpec:
    return _spec(input={"uri": str(tmp_path / "photos"), "format": "tar"}, output=str(tmp_path / "labels"),
                 model={"name": "resnet50", "compile": "auto"})  # fmt: skip


def _committed(spec: LabelJobSpec, key: str, data_bytes: int = 0) -> ShardResult:
    """A done-marker of the tar shard `key`, as an earlier run of `spec` would have written it."""
    shard = shard_id_for(key)
    return ShardResult(shard_id=shard, job_id=spec.resolved_job_id(), fingerprint="0" * 16, rows=1, errors=0,
                       data_uri=data_uri(spec.output, shard), bytes_read=1, seconds=1.0, attempt=1, marker_format=2,
                       data_bytes=data_bytes)  # fmt: skip


@pytest.mark.usefixtures("cpu_compile_pays")
def test_auto_counts_the_input_left_to_label_before_the_worker_spec_is_made(tmp_path):
    needed = images_needed(4.089, "cpu", workers=1, cores=2)  # resnet50's GFLOPs in the catalog
    _tar_input(tmp_path, needed * BYTES_PER_IMAGE, 10 * BYTES_PER_IMAGE)
    spec = _auto_spec(tmp_path)
    decision = resolve_compile(spec, CPU_WORKER, committed=())
    # Counting stops at the first shard, which is enough: "at least".
    assert decision.compile and decision.line().startswith(f"compile: auto → compiled (≥ {needed:,} images (from")
    worker = WorkerSpec.of(spec, compile=decision.compile)
    assert worker.model.compile is True and worker.pool_key() != WorkerSpec.of(spec, compile=False).pool_key()
    # The big shard committed by an earlier run: what is left is too small (the runner passes its markers).
    left = resolve_compile(spec, CPU_WORKER, committed=[_committed(spec, "shard-00.tar")])
    assert left.reason.startswith("job too small: ≈ 10 images")
    # Spread over 2 workers, each would compile for half the images: eager.
    assert "job too small" in resolve_compile(spec, replace(CPU_WORKER, workers=2), committed=()).reason


@pytest.mark.usefixtures("cpu_compile_pays")
def test_auto_reads_the_outputs_done_markers_when_not_given_them(tmp_path):
    _tar_input(tmp_path, 2 * 10**9)
    spec = _auto_spec(tmp_path)
    assert resolve_compile(spec, CPU_WORKER).compile  # nothing committed yet
    result = _committed(spec, "shard-00.tar", data_bytes=3)
    marker = marker_uri(spec.output, result.shard_id)
    for uri, data in ((result.data_in(spec.output), b"PAR"), (marker, result.model_dump_json())):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        with open(uri, "w" if isinstance(data, str) else "wb") as file:
            file.write(data)
    assert resolve_compile(spec, CPU_WORKER).reason.startswith("job too small: 0 images")


def test_auto_stays_eager_without_listing_the_input_where_compiling_never_pays(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_policy, "CPU_COMPILE_SPEEDUP", 1.0)  # a device where compiled ran no faster
    spec = _auto_spec(tmp_path)  # no photos folder: listing it would fail
    decision = resolve_compile(spec, CPU_WORKER, committed=())
    assert decision.line() == "compile: auto → eager (compiled ran at 1.00x eager on CPU workers (bench/RESULTS.md))"


def test_explicit_compile_is_taken_as_it_is_without_listing_anything(tmp_path):
    spec = _local_spec(tmp_path, model={"name": "resnet50", "compile": True})  # the input does not even exist
    assert resolve_compile(spec, CPU_WORKER).line() == "compile: true"
    with pytest.raises(ValueError, match="must be decided on the driver"):
        WorkerSpec.of(_local_spec(tmp_path, model={"name": "resnet50", "compile": "auto"}))
