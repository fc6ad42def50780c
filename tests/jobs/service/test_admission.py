"""jobs.service.admission: order, fit, reasons, backfill behind reservations, warm pools, eviction."""

from __future__ import annotations

from jobs.service.admission import (
    Admission,
    ClusterView,
    Needs,
    QueuedJob,
    Resources,
    Start,
    WarmPool,
    admit,
    idle_expired,
    pool_target,
    queue_order,
)

CPU2 = Resources(cpus=2)
GPU1 = Resources(cpus=1, gpus=1)


def job(job_id: str, per: Resources = CPU2, priority: int = 0, seq: int = 0, max_workers: int | None = 1,
        model: str | None = None) -> QueuedJob:  # fmt: skip
    return QueuedJob(job_id, priority, seq, Needs.elastic(per, max_workers), "label", model)


def gang(job_id: str, per: Resources, workers: int, priority: int = 0, seq: int = 0) -> QueuedJob:
    return QueuedJob(job_id, priority, seq, Needs.gang(per, workers), "finetune")


def cluster(*free: float, nodes: tuple[float, ...] | None = None, autoscaler: bool = False) -> ClusterView:
    """A CPU cluster: free CPUs per node, and each node's total (default: as free)."""
    frees = tuple(Resources(cpus=c) for c in free)
    totals = tuple(Resources(cpus=c) for c in nodes) if nodes is not None else frees
    return ClusterView(free=sum(frees, Resources()), nodes=totals, autoscaler=autoscaler, nodes_free=frees)


def started(admission: Admission) -> list[str]:
    return [s.job_id for s in admission.start]


def test_resources_arithmetic_fits_and_counts():
    assert Resources(1, 1) + Resources(0.5) == Resources(1.5, 1) and Resources(1) - Resources(2) == Resources(-1)
    assert Resources(0.1 * 3).fits(Resources(0.3)) and not Resources(0.31).fits(Resources(0.3))
    assert Resources(cpus=0.1).count_in(Resources(cpus=0.3)) == 3  # 0.3/0.1 is 2.9999999999999996
    assert CPU2.count_in(Resources(cpus=7, gpus=1)) == 3 and GPU1.count_in(Resources(cpus=8)) == 0
    assert (str(CPU2), str(GPU1), str(Resources(gpus=0.5)), str(Resources())) == ("2 CPU", "1 GPU + 1 CPU", "0.5 GPU",
                                                                                  "0 CPU")  # fmt: skip


def test_order_is_priority_then_fifo():
    queue = [job("a", seq=0), job("b", priority=10, seq=1), job("c", seq=2), job("d", priority=10, seq=3)]
    assert [j.job_id for j in queue_order(queue)] == ["b", "d", "a", "c"]


def test_jobs_start_while_they_fit_and_the_rest_say_why_they_wait():
    queue = [job("a", seq=0), job("b", seq=1), job("c", seq=2), job("d", seq=3)]
    admission = admit(queue, cluster(4))
    assert started(admission) == ["a", "b"]
    assert admission.start[0] == Start("a", 1, None)
    assert admission.waiting["c"].reason == "needs 1 worker of 2 CPU, 0 CPU free"
    assert admission.waiting["d"].reason == "needs 1 worker of 2 CPU, 0 CPU free; 1 job ahead"
    assert not admission.waiting["d"].never


def test_priority_decides_who_gets_the_capacity():
    queue = [job("early", seq=0), job("urgent", priority=10, seq=1)]
    admission = admit(queue, cluster(2))
    assert started(admission) == ["urgent"] and "early" in admission.waiting


def test_an_elastic_job_takes_what_fits_up_to_its_cap_each_worker_on_one_node():
    assert admit([job("a", max_workers=None)], cluster(3, 3, 1)).start == (Start("a", 2, None),)  # 1.5 per node: no
    assert admit([job("a", max_workers=5)], cluster(8)).start == (Start("a", 4, None),)
    assert admit([job("a", max_workers=2)], cluster(8)).start == (Start("a", 2, None),)


def test_a_gang_starts_only_with_all_its_workers():
    admission = admit([gang("ft", CPU2, 3)], cluster(2, 2, nodes=(4, 4)))
    assert started(admission) == [] and admission.waiting["ft"].reason == "needs 3 workers of 2 CPU at once, 4 CPU free"
    assert admit([gang("ft", CPU2, 3)], cluster(2, 2, 2)).start == (Start("ft", 3, None),)


def test_a_fragmented_cluster_is_named_as_such():
    admission = admit([job("a")], cluster(1, 1, nodes=(4, 4)))
    reason = admission.waiting["a"].reason
    assert reason == "needs 1 worker of 2 CPU, 2 CPU free, but no node has 2 CPU free (at most 1 CPU)"


def test_no_gpu_node_waits_for_the_autoscaler_or_could_never_run():
    gpu_job = job("g", per=GPU1)
    waiting = admit([gpu_job], cluster(4, autoscaler=True)).waiting["g"]
    assert waiting.reason == (
        "needs 1 GPU per worker; no node of this cluster has a GPU - waiting for a node to join (autoscaler)"
    )
    assert not waiting.never
    never = admit([gpu_job], cluster(4)).waiting["g"]
    assert never.never and never.reason.endswith("could never run here")


def test_a_head_with_no_cpus_waits_for_a_worker_node():
    head_only = ClusterView(free=Resources(), nodes=(Resources(),), autoscaler=True)
    waiting = admit([job("a")], head_only).waiting["a"]
    assert waiting.reason == (
        "needs 2 CPU per worker; no node of this cluster has that much (largest: 0 CPU)"
        " - waiting for a node to join (autoscaler)"
    )
    joined = ClusterView(free=Resources(cpus=2), nodes=(Resources(), Resources(cpus=2)), autoscaler=True)
    assert admit([job("a")], joined).start == (Start("a", 1, None),)


def test_a_gang_larger_than_the_whole_cluster_could_never_run():
    waiting = admit([gang("ft", CPU2, 3)], cluster(4)).waiting["ft"]
    assert waiting.never
    assert waiting.reason == "needs 3 workers of 2 CPU at once; this cluster holds 2 at most - could never run here"


def test_a_job_that_could_never_run_reserves_nothing():
    queue = [job("g", per=GPU1, priority=5), job("cpu", seq=1)]
    assert started(admit(queue, cluster(2, autoscaler=True))) == ["cpu"]


def test_small_jobs_do_not_starve_a_big_one_that_waits():
    # 3 of 4 CPUs are busy; the 4-CPU gang waits and reserves; 1-CPU jobs behind it do not take the last CPU.
    queue = [gang("big", Resources(cpus=4), 1, seq=0)] + [job(f"s{i}", Resources(cpus=1), seq=i + 1) for i in range(3)]
    admission = admit(queue, cluster(1, nodes=(4,)))
    assert started(admission) == []
    assert admission.waiting["big"].reason == "needs 1 worker of 4 CPU, 1 CPU free"
    assert admission.waiting["s0"].reason == "needs 1 worker of 1 CPU, 1 CPU free, held for the 1 job ahead"


def test_backfill_uses_what_the_waiting_jobs_cannot():
    # The first job waits for a GPU that is busy; a CPU job behind it may use the CPUs beyond its reservation.
    view = ClusterView(free=Resources(cpus=3), nodes=(Resources(cpus=4, gpus=1),), nodes_free=(Resources(cpus=3),))
    admission = admit([job("gpu", per=GPU1, seq=0), job("cpu", seq=1), job("cpu2", seq=2)], view)
    assert started(admission) == ["cpu"]
    assert admission.waiting["gpu"].reason == "needs 1 worker of 1 GPU + 1 CPU, 0 GPU + 3 CPU free"
    assert admission.waiting["cpu2"].reason == "needs 1 worker of 2 CPU, 1 CPU free; 1 job ahead"
    assert admission.spare == Resources()


def test_a_warm_pool_lets_a_job_start_without_free_resources():
    pool = WarmPool("mobilenet_v2/cpu", workers=2, per_worker=CPU2, busy=1)
    admission = admit([job("second", model="mobilenet_v2/cpu"), job("other", seq=1, model="resnet50/cpu")],
                      cluster(0, nodes=(4,)), [pool])  # fmt: skip
    assert admission.start == (Start("second", 0, "mobilenet_v2/cpu"),)
    assert "other" in admission.waiting


def test_a_full_pool_has_no_room():
    pool = WarmPool("m", workers=1, per_worker=CPU2, busy=1, max_jobs=1)
    assert started(admit([job("a", model="m")], cluster(0, nodes=(2,)), [pool])) == []


def test_jobs_on_one_model_in_one_round_share_the_pool_the_first_creates():
    admission = admit([job("a", model="m", max_workers=2), job("b", seq=1, model="m")], cluster(4))
    assert admission.start == (Start("a", 2, "m"), Start("b", 0, "m"))


def test_idle_pools_are_evicted_for_a_waiting_job_oldest_first():
    pools = [WarmPool("old", 1, CPU2, idle_since=10.0), WarmPool("new", 1, CPU2, idle_since=50.0),
             WarmPool("busy", 1, CPU2, busy=1)]  # fmt: skip
    admission = admit([job("a", model="resnet50")], cluster(0, nodes=(6,)), pools)
    assert admission.evict == ("old",)
    assert admission.waiting["a"].reason == "needs 1 worker of 2 CPU, 0 CPU free; releasing idle pool old for it"

    needs_two = admit([gang("ft", CPU2, 2)], cluster(0, nodes=(6,)), pools)
    assert needs_two.evict == ("old", "new")


def test_no_eviction_when_it_would_not_be_enough_or_the_pool_is_in_use():
    pools = [WarmPool("idle", 1, CPU2, idle_since=0.0), WarmPool("m", 1, CPU2, idle_since=0.0)]
    assert admit([gang("ft", Resources(cpus=6), 1)], cluster(0, nodes=(8,)), pools).evict == ()
    # "m" gets a job in this round: only "idle" may go for the second job.
    admission = admit([job("on-m", model="m"), job("x", seq=1, model="other")], cluster(0, nodes=(4,)), pools)
    assert started(admission) == ["on-m"] and admission.evict == ("idle",)


def test_pool_target_grows_to_the_largest_cap_within_spare():
    pool = WarmPool("m", workers=1, per_worker=CPU2, busy=2)
    users = [job("a", model="m", max_workers=2), job("b", model="m", max_workers=4)]
    assert pool_target(pool, users) == 4
    assert pool_target(pool, users, spare=Resources(cpus=4)) == 3  # 1 + 2 more that fit
    assert pool_target(pool, [job("a", model="m", max_workers=None)], spare=Resources(cpus=6)) == 4
    assert pool_target(WarmPool("m", 4, CPU2, busy=1), [job("a", model="m", max_workers=2)]) == 2  # gives 2 back
    assert pool_target(WarmPool("m", 3, CPU2), []) == 3  # idle: kept until it expires


def test_idle_pools_expire_after_idle_s():
    idle = WarmPool("m", 1, CPU2, busy=0, idle_since=100.0)
    assert not idle_expired(idle, now=399.0) and idle_expired(idle, now=400.0)
    assert idle_expired(idle, now=110.0, idle_s=10.0)
    assert not idle_expired(WarmPool("m", 1, CPU2, busy=1, idle_since=None), now=1e9)
