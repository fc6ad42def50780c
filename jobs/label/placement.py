"""How many label workers to start, what each asks Ray for, and whether they compile (`compile: auto`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from jobs.cluster import ClusterResources, ensure_ray, joins_existing_cluster
from jobs.errors import BadInput
from jobs.label.compile_policy import CompileDecision, ImageCount, count_images, decide_compile, explicit, images_needed
from jobs.label.plan import plan_shards
from jobs.locations import is_weights_file
from jobs.output.markers import read_committed
from schemas.catalog import UnknownModel, model_gflops
from schemas.shards import ShardResult
from schemas.specs import LabelJobSpec
from workers.finetune.artifacts import card_of
from workers.io.storage import open_storage

log = logging.getLogger(__name__)

# The least share of the cluster's CPUs a CPU worker is given when the spec leaves cpus_per_worker to us: below it a
# replica decodes and runs its model on a sliver of a core (64 workers on 2 CPUs got 0.03 each) and the job crawls.
MIN_CPUS_PER_CPU_WORKER = 0.5


class PlacementError(BadInput):
    """The spec asks for resources the cluster does not have."""


class UnreachableLocation(PlacementError):
    """A local path in the spec that the cluster's workers cannot see (other nodes, or a Ray Client driver)."""


@dataclass(frozen=True)
class Placement:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    torch_threads: int


def place_workers(spec: LabelJobSpec, cluster: ClusterResources) -> Placement:
    """One worker per GPU when there are GPUs (unless the spec says otherwise), else CPU workers
    that split the cluster's cores; torch gets as many threads as its worker has cores.

    Every worker must fit on one node: a share of the cluster's total that no node has (1.5 CPUs each on 1-CPU
    nodes) is an actor Ray can never place, and the job would wait for it forever."""
    use_gpu = spec.model.device != "cpu" and cluster.gpus >= 1
    if spec.model.device == "cuda" and not use_gpu:
        raise PlacementError("model.device is 'cuda' but the Ray cluster has no GPUs")
    workers = spec.num_workers or (int(cluster.gpus) if use_gpu else 1)
    if use_gpu and workers > cluster.gpus:
        raise PlacementError(f"num_workers={workers} needs {workers} GPUs; the cluster has {cluster.gpus:g}")
    if not use_gpu and not spec.cpus_per_worker and workers * MIN_CPUS_PER_CPU_WORKER > cluster.cpus + _EPS:
        raise PlacementError(
            f"num_workers={workers} needs at least {workers * MIN_CPUS_PER_CPU_WORKER:g} CPUs at "
            f"{MIN_CPUS_PER_CPU_WORKER:g} CPU each; the cluster has {cluster.cpus:g}"
            " (fewer workers, or set cpus_per_worker to share the CPUs anyway)"
        )
    nodes = cluster.node_resources or ((cluster.cpus, cluster.gpus),)
    if spec.cpus_per_worker:
        cpus = spec.cpus_per_worker
        if cpus * workers > cluster.cpus + _EPS:
            raise PlacementError(
                f"num_workers={workers} x cpus_per_worker={cpus:g} exceeds the cluster's {cluster.cpus:g} CPUs"
            )
        if not _fits(nodes, workers, cpus, use_gpu):
            raise PlacementError(f"{_workers_of(workers, cpus, use_gpu)} do not fit on {_describe_nodes(nodes)}")
    else:
        cpus = _largest_share(nodes, workers, cluster.cpus, use_gpu)
        if cpus is None or (not use_gpu and cpus < MIN_CPUS_PER_CPU_WORKER - _EPS):
            least = MIN_CPUS_PER_CPU_WORKER if not use_gpu else _MIN_SHARE
            raise PlacementError(
                f"{_workers_of(workers, least, use_gpu, at_least=True)} do not fit on {_describe_nodes(nodes)}"
                " (fewer workers, or set cpus_per_worker)"
            )
    return Placement(workers, cpus, 1.0 if use_gpu else 0.0, max(1, math.floor(cpus + _EPS)))


_EPS = 1e-9
_MIN_SHARE = 0.01  # the least CPUs a worker asks for when the cluster's are split


def _fits(nodes: tuple[tuple[float, float], ...], workers: int, cpus: float, use_gpu: bool) -> bool:
    """Whether `workers` actors of `cpus` CPUs (and 1 GPU each with use_gpu) can all be placed on `nodes`."""
    slots = 0
    for node_cpus, node_gpus in nodes:
        by_cpus = math.floor(node_cpus / cpus + _EPS)
        slots += min(by_cpus, math.floor(node_gpus + _EPS)) if use_gpu else by_cpus
    return slots >= workers


def _largest_share(nodes: tuple[tuple[float, float], ...], workers: int, total: float, use_gpu: bool) -> float | None:
    """The most CPUs each worker can have, at most an even split of the cluster, with every worker placed: the
    candidates are the even split and each node's CPUs divided among 1..workers workers."""
    even = total / workers
    candidates = {even} | {node_cpus / k for node_cpus, _ in nodes if node_cpus > 0 for k in range(1, workers + 1)}
    for share in sorted(candidates, reverse=True):
        if _MIN_SHARE - _EPS <= share <= even + _EPS and _fits(nodes, workers, share, use_gpu):
            return share
    return None


def _workers_of(workers: int, cpus: float, use_gpu: bool, at_least: bool = False) -> str:
    return f"num_workers={workers} x {'at least ' if at_least else ''}{cpus:g} CPU{' + 1 GPU' if use_gpu else ''} each"


def _describe_nodes(nodes: tuple[tuple[float, float], ...]) -> str:
    sizes = ", ".join(f"{c:g} CPU" + (f" + {g:g} GPU" if g else "") for c, g in nodes)
    return f"the cluster's {len(nodes)} node(s) ({sizes}): a worker runs on one node"


def local_locations(spec: LabelJobSpec) -> list[tuple[str, str]]:
    """(what, path) for every local path the workers read or write. `model.weights_dir` is left out: it is the
    weights folder each node has at the same path (baked into the image or mounted), and a node lacking it fails
    loudly when it loads the model rather than losing rows."""
    found = [("input", spec.input.uri)]
    found += [("input.allowed_roots entry", root) for root in spec.input.allowed_roots]
    found.append(("output", spec.output))
    if "/" in spec.model.name:  # a fine-tuned artifact folder; registry names have no '/'
        found.append(("model", spec.model.name))
    if spec.model.weights and is_weights_file(spec.model.weights):
        found.append(("model.weights", spec.model.weights))
    return [(what, path) for what, path in found if "://" not in path]


def refuse_unshared_local_paths(spec: LabelJobSpec, cluster: ClusterResources) -> None:
    """A local path is refused when workers may run where it does not exist: on a cluster of more than one node,
    or from a Ray Client driver, unless the spec says every node mounts it (shared_storage). Counting nodes, not
    machines, on purpose: raylets on one address can still have separate filesystems (containers on the host's
    network), so only the spec can say that a path is shared."""
    if spec.shared_storage or not (cluster.nodes > 1 or cluster.client):
        return
    local = local_locations(spec)
    if not local:
        return
    what, path = local[0]
    where = (
        "the driver is connected through Ray Client (ray://), so no worker runs on this machine"
        if cluster.client
        else f"the Ray cluster has {cluster.nodes} nodes, and workers on the other nodes cannot see this machine's "
        "folders (they would read nothing, or write to their own disks)"
    )
    others = f" (and {len(local) - 1} more local path(s))" if len(local) > 1 else ""
    raise UnreachableLocation(
        f"{what} {path} is a local path{others}, but {where}; use s3:// locations, or set shared_storage: true in "
        "the spec if every node mounts it at the same path (NFS, a shared volume)"
    )


def check_locations_reachable(spec: LabelJobSpec) -> None:
    """Before any work: refuse local paths the cluster's workers cannot reach (refuse_unshared_local_paths).
    Connects to the cluster only when there is a local path to judge and an existing cluster to join; a private
    local Ray, started later on this machine, is one node that shares every folder with the driver."""
    if spec.shared_storage or not local_locations(spec) or not joins_existing_cluster():
        return
    refuse_unshared_local_paths(spec, ensure_ray())


def resolve_compile(
    spec: LabelJobSpec,
    placement: Placement,
    committed: Iterable[ShardResult] | None = None,
    warm_compiled: bool = False,
) -> CompileDecision:
    """The job's compile setting: the spec's own true or false, or for `compile: auto` the policy's decision
    (jobs.label.compile_policy) for this placement's workers, from the model's GFLOPs and the images left to label.

    Args: `committed`, the done-markers of earlier runs (their shards are not labelled again, and loose files keep
    their committed shards in the plan; None: read from the output); `warm_compiled`, whether a warm compiled pool
    of the model is running (the job service's). Returns the decision, also logged. The plan is counted only as far
    as the decision needs (compile_policy.count_images).
    """
    if spec.model.compile != "auto":
        return explicit(spec.model.compile)
    try:
        gflops = model_gflops(spec.model, card_of(spec.model, spec.storage))
    except UnknownModel:  # an artifact whose card names weights the registry lacks: no figure, eager
        gflops = None
    device = "gpu" if placement.gpus_per_worker else "cpu"
    facts = {"gflops": gflops, "device": device, "workers": placement.workers, "cores": placement.torch_threads}
    needed = images_needed(gflops, device, placement.workers, placement.torch_threads)
    images = ImageCount(0)
    if needed is not None and not warm_compiled:
        if committed is None:
            output = open_storage(spec.output, spec.storage)
            committed = read_committed(output, spec.output, spec.resolved_job_id()).done.values()
        committed = list(committed)
        done = {result.shard_id for result in committed}
        tasks = plan_shards(spec.input, open_storage(spec.input.uri, spec.storage), committed=committed)
        images = count_images((task for task in tasks if task.shard_id not in done), enough=needed)
    decision = decide_compile(**facts, images=images, warm_compiled=warm_compiled)
    log.info("%s", decision.line())
    return decision
