"""jobs.service.core without Ray: the service's rounds driven one at a time on a real job store (a tmp folder), with
a fake clock, cluster, pools and runs (core_fakes.py). What needs a real cluster (the service process killed, a
cluster lost, a node joining, token auth) is in test_service_cli.py."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from jobs import kinds
from jobs.errors import EXIT_BAD_INPUT, exit_code_for
from jobs.service.core import LEASE_LOST_ATTEMPTS, PROGRESS_WRITE_S, RECONCILE_S, STOP_WAIT_S, TICK_S, ServiceCore
from jobs.service.ownership import ClusterId, Liveness
from jobs.service.records import Cancellation, IllegalTransition, JobProgress, JobRecord, JobState, advance, new_record
from jobs.service.store import JobStore, UnknownJob
from schemas.finetune import FinetuneJobSpec
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec
from tests.jobs.service.core_fakes import OTHER, OURS, T0, FakeRun, Harness

TWO_CPUS = [(2.0, 0.0)]


def label_spec(tmp_path, name: str, model: str = "mobilenet_v2", **fields) -> LabelJobSpec:
    return LabelJobSpec(input={"uri": str(tmp_path / "photos")}, output=str(tmp_path / name), model={"name": model},
                        **fields)  # fmt: skip


def finetune_spec(tmp_path, name: str = "model", **fields) -> FinetuneJobSpec:
    return FinetuneJobSpec(data={"uri": str(tmp_path / "plants")}, base={"name": "mobilenet_v2"},
                           output=str(tmp_path / name), **fields)  # fmt: skip


def label_record(store: JobStore, job_id: str, tmp_path, state=JobState.QUEUED, cluster=OURS) -> JobRecord:
    spec = label_spec(tmp_path, job_id)
    record = new_record(job_id, "label", spec, output=spec.output, seq=store.next_seq(), now=T0,
                        cluster=str(cluster))  # fmt: skip
    if state is not JobState.QUEUED:
        record = advance(record, JobState.RUNNING, T0, cluster=str(cluster))
        record = record if state is JobState.RUNNING else advance(record, state, T0)
    store.put(record)
    return record


def run_here(core: ServiceCore, job_id: str, run: FakeRun) -> None:
    """A job this service runs (as _start leaves it), started by hand."""
    core.running[job_id] = run
    core.put(advance(core.store.get(job_id), JobState.RUNNING, core.clock.now(), cluster=core.session))


@pytest.fixture
def h(tmp_path) -> Harness:
    (tmp_path / "photos").mkdir()
    return Harness(tmp_path / "state")


# --------------------------------------------------------------------------------- case 8: one damaged record


@pytest.mark.fault(
    fault="one damaged job record: a running job's record truncated on disk, and a record file of junk beside it",
    injected="the service core running a job (fake run, no Ray); its record cut to 40 bytes and `{not json` "
    "written as another record, then a new job submitted",
    expected="the new job is admitted or given its waiting reason; the damaged files are each warned about once "
    "by name; the running job's record is written whole again and its end recorded",
)
def test_a_damaged_running_record_does_not_wedge_admission_and_is_warned_about_once(h, tmp_path, caplog,
                                                                                    record_property):  # fmt: skip
    # Case 8 of issue 21: the loop raised on the running job's truncated record every tick, before admitting.
    label_record(h.store, "label-old", tmp_path)
    core = h.core()
    run = FakeRun(progress=JobProgress(shards_total=4, shards_done=1))
    run_here(core, "label-old", run)
    path = h.state / "jobs" / "label-old.json"
    with caplog.at_level(logging.WARNING):
        path.write_text(path.read_text()[:40])  # truncated on disk
        (h.state / "jobs" / "label-junk.json").write_text("{not json")
        label_record(h.store, "label-new", tmp_path)
        h.rounds(core, 6, seconds=PROGRESS_WRITE_S)  # several rounds: the warnings must not repeat
    waiting = h.store.get("label-new").waiting_reason
    assert waiting and "node" in waiting, waiting
    # The running job's record is written whole again from the service's copy, and its end recorded.
    assert h.store.get("label-old").state is JobState.RUNNING
    run.finish(Outcome.SUCCEEDED)
    h.rounds(core)
    ended = h.store.get("label-old")
    assert ended.state is JobState.SUCCEEDED and ended.progress.shards_done == 1
    junk = [r.getMessage() for r in caplog.records if "label-junk.json" in r.getMessage()]
    assert len(junk) == 1 and "skipping job record" in junk[0], junk
    old = [r.getMessage() for r in caplog.records if "label-old" in r.getMessage() and "unreadable" in r.getMessage()]
    assert len(old) == 1, old
    record_property("measured", f"new job given its reason ({waiting!r}); junk record warned about once, the "
                                f"truncated one once; the running job rewritten whole and ended succeeded")  # fmt: skip


def test_a_running_record_removed_by_hand_is_written_again(h, tmp_path):
    label_record(h.store, "label-old", tmp_path)
    core = h.core()
    run_here(core, "label-old", FakeRun())
    (h.state / "jobs" / "label-old.json").unlink()
    label_record(h.store, "label-new", tmp_path)
    h.rounds(core, 2, seconds=PROGRESS_WRITE_S)
    assert h.store.get("label-new").waiting_reason
    assert h.store.get("label-old").state is JobState.RUNNING


# ------------------------------------------------------------------------------------- case 7: service stop


def test_service_stop_records_its_running_jobs_cancelled_and_they_stay_so_until_resume(h, tmp_path):
    # Case 7 of issue 21: the record stayed `running`, and the next service queued the job again on its own.
    label_record(h.store, "label-a", tmp_path)
    core = h.core()
    run_here(core, "label-a", FakeRun(progress=JobProgress(shards_total=16, shards_done=7)))
    stopping = core.stop()
    core.settle_stopped(sleep=h.clock.advance)
    outcome = core.stopped(stopping)
    stopped = JobRecord.model_validate(outcome["stopped"][0])
    record = h.store.get("label-a")
    assert record == stopped and record.state is JobState.CANCELLED
    assert record.cancelled_by is Cancellation.SERVICE_STOPPED and record.progress.shards_done == 7

    again = h.core()  # the next command starts a new service
    h.rounds(again, 3)
    assert h.store.get("label-a").state is JobState.CANCELLED
    resumed = JobRecord.model_validate(again.resume("label-a"))
    assert resumed.state is JobState.QUEUED and resumed.cancelled_by is None


def test_a_run_still_busy_when_stop_gives_up_is_recorded_cancelled_too(h, tmp_path):
    label_record(h.store, "label-a", tmp_path)
    core = h.core()
    stubborn = FakeRun()
    stubborn.stubborn = True  # its running shards never finish
    run_here(core, "label-a", stubborn)
    core.stop()
    started = h.clock.monotonic()
    core.settle_stopped(sleep=h.clock.advance)
    assert h.clock.monotonic() - started == pytest.approx(STOP_WAIT_S, abs=TICK_S)  # it waited the whole time
    record = h.store.get("label-a")
    assert record.state is JobState.CANCELLED and record.cancelled_by is Cancellation.SERVICE_STOPPED


def test_a_user_cancel_says_so(h, tmp_path):
    label_record(h.store, "label-a", tmp_path)
    core = h.core()
    run_here(core, "label-a", FakeRun())
    core.cancel("label-a")
    h.rounds(core)
    record = h.store.get("label-a")
    assert record.state is JobState.CANCELLED and record.cancelled_by is Cancellation.BY_USER


def test_a_queued_job_cancelled_never_starts(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    core.cancel(job)
    h.rounds(core, 3)
    assert h.store.get(job).state is JobState.CANCELLED and h.started == []


# ------------------------------------------------------------------------ case 6: two clusters, one store


def test_another_live_clusters_jobs_are_left_alone_and_a_gone_ones_interrupted_or_taken_over(h, tmp_path):
    gone = ClusterId("10.0.0.9:6379", "session_2026-12-01_00-00-00_000009_900")
    label_record(h.store, "label-live", tmp_path, JobState.RUNNING, cluster=OTHER)
    label_record(h.store, "label-queued-live", tmp_path, cluster=OTHER)
    label_record(h.store, "label-lost", tmp_path, JobState.RUNNING, cluster=gone)
    label_record(h.store, "label-queued-lost", tmp_path, cluster=gone)
    h.cluster.others = {OTHER: Liveness.ALIVE, gone: Liveness.GONE}
    core = h.core()
    h.rounds(core)
    adopted = h.store.get("label-queued-lost")
    assert adopted.cluster == core.session and "node" in adopted.waiting_reason  # admitted here: waits for a node
    live, queued_live, lost = (h.store.get(j) for j in ("label-live", "label-queued-live", "label-lost"))
    assert live.state is JobState.RUNNING and live.cluster == str(OTHER)
    assert queued_live.state is JobState.QUEUED and queued_live.waiting_reason is None  # not admitted here
    assert lost.state is JobState.INTERRUPTED and lost.last_error == f"interrupted: its cluster {gone} went away"
    with pytest.raises(IllegalTransition, match=f"on another cluster \\({OTHER}\\); cancel it there"):
        core.cancel("label-live")
    assert h.store.get("label-live").state is JobState.RUNNING


def test_another_clusters_job_is_interrupted_once_that_cluster_goes(h, tmp_path):
    label_record(h.store, "label-live", tmp_path, JobState.RUNNING, cluster=OTHER)
    h.cluster.others = {OTHER: Liveness.ALIVE}
    core = h.core()
    h.rounds(core, 3)
    assert h.store.get("label-live").state is JobState.RUNNING
    h.cluster.others[OTHER] = Liveness.GONE
    h.rounds(core, 2)  # not yet looked at again: the store is probed every RECONCILE_S
    assert h.store.get("label-live").state is JobState.RUNNING
    h.clock.advance(RECONCILE_S)
    h.rounds(core)
    assert h.store.get("label-live").state is JobState.INTERRUPTED


def test_a_late_success_over_an_interruption_is_recorded_when_the_manifest_proves_it(h, tmp_path, monkeypatch):
    # The run ends succeeded after another service judged this cluster gone (as the old code did on a live one).
    proofs: list[str] = []

    def finished(record, storage) -> bool:
        proofs.append(record.job_id)
        return record.job_id == "label-proven"

    monkeypatch.setitem(kinds._KINDS, "label", replace(kinds.LABEL, finished=finished))
    core = h.core()
    runs = {}
    for job_id in ("label-proven", "label-unproven"):
        label_record(h.store, job_id, tmp_path)
        runs[job_id] = FakeRun()
        run_here(core, job_id, runs[job_id])
        h.store.put(advance(h.store.get(job_id), JobState.INTERRUPTED, h.clock.now(), last_error="interrupted: x"))
    for run in runs.values():
        run.finish(Outcome.SUCCEEDED)
    h.rounds(core)
    assert not core.running
    assert h.store.get("label-proven").state is JobState.SUCCEEDED
    assert h.store.get("label-proven").last_error is None
    assert h.store.get("label-unproven").state is JobState.INTERRUPTED
    assert sorted(proofs) == ["label-proven", "label-unproven"]


def test_a_new_service_records_a_proven_late_success_of_an_interrupted_job(h, tmp_path, monkeypatch):
    monkeypatch.setitem(kinds._KINDS, "label", replace(kinds.LABEL, finished=lambda r, s: True))
    label_record(h.store, "label-a", tmp_path, JobState.INTERRUPTED, cluster=OTHER)
    h.cluster.others = {OTHER: Liveness.GONE}
    h.core()
    assert h.store.get("label-a").state is JobState.SUCCEEDED


# ----------------------------------------------------------------------------- admission, pools, priorities


def test_a_higher_priority_job_starts_first_and_the_other_waits_for_cpus(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    label = core.submit(label_spec(tmp_path, "out-a"))
    tune = core.submit(finetune_spec(tmp_path), priority=5)  # a gang of 1 worker of both CPUs
    h.rounds(core)
    assert h.started == [tune]
    waiting = h.store.get(label).waiting_reason
    assert h.store.get(label).state is JobState.QUEUED and "CPU" in waiting, waiting
    assert [label] in h.cluster.requested  # the autoscaler is told what waits
    h.runs[tune].finish(Outcome.SUCCEEDED, "published v1")
    h.rounds(core, 2)
    assert h.started == [tune, label] and h.store.get(tune).state is JobState.SUCCEEDED
    assert "published v1" in h.store.read_log(tune, 0)[0] and "succeeded" in h.store.read_log(tune, 0)[0]


def test_jobs_on_one_model_share_its_warm_pool_and_a_later_one_loads_no_model(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    first = core.submit(label_spec(tmp_path, "out-a"))
    same_model = core.submit(label_spec(tmp_path, "out-b"))
    h.rounds(core)
    assert h.started == [first, same_model] and len(h.pools_made) == 1  # the second joined the first one's pool
    pool = h.pools_made[0]
    assert pool.jobs == {first, same_model}
    for job in (first, same_model):
        h.runs[job].finish(Outcome.SUCCEEDED)
    h.rounds(core)
    assert pool.jobs == set() and not pool.closed  # idle, warm for the next job
    later = core.submit(label_spec(tmp_path, "out-c"))
    h.rounds(core)
    assert h.started[-1] == later and len(h.pools_made) == 1 and pool.jobs_served == 3
    assert h.store.get(later).model_key == pool.key == h.store.get(first).model_key


def test_a_job_on_another_model_waits_for_the_warm_pools_cpus_then_evicts_the_idle_pool(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    first = core.submit(label_spec(tmp_path, "out-a"))  # one worker of both CPUs
    h.rounds(core)
    other = core.submit(label_spec(tmp_path, "out-c", model="mobilenet_v3_small"))
    h.rounds(core)
    assert "CPU" in h.store.get(other).waiting_reason and len(h.pools_made) == 1
    h.runs[first].finish(Outcome.SUCCEEDED)
    h.rounds(core, 2)
    assert h.started == [first, other] and len(h.pools_made) == 2
    assert h.pools_made[0].closed and h.pools_made[0].key not in core.pools  # released early for the waiting job


def test_an_idle_pool_is_released_after_its_idle_time(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    h.rounds(core)
    h.runs[job].finish(Outcome.SUCCEEDED)
    h.rounds(core)
    pool = h.pools_made[0]
    h.clock.advance(h.config.pool_idle_s - 5)
    h.rounds(core)
    assert not pool.closed
    h.clock.advance(10)
    h.rounds(core)
    assert pool.closed and not core.pools


def test_a_pool_grows_to_its_jobs_workers_when_a_node_joins(h, tmp_path):
    core = h.core()  # no CPUs: the job waits for a node
    job = core.submit(label_spec(tmp_path, "out", num_workers=2))
    h.rounds(core)
    record = h.store.get(job)
    assert record.state is JobState.QUEUED and "node" in record.waiting_reason, record.waiting_reason
    h.cluster.nodes = [(4.0, 0.0)]  # a node joins
    h.rounds(core, 2)
    assert h.store.get(job).state is JobState.RUNNING
    assert h.runs[job].start.placement.workers == 1  # it starts on one worker ...
    assert h.pools_made[0].workers == 2  # ... and the pool grows to the two it may use


def test_a_running_fine_tune_holds_its_workers_until_it_ends(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    first = core.submit(finetune_spec(tmp_path, "model-a"))
    second = core.submit(finetune_spec(tmp_path, "model-b"))
    h.rounds(core, 3)
    assert h.started == [first] and "CPU" in h.store.get(second).waiting_reason
    assert h.runs[first].start.lease is None and h.pools_made == []  # no pool: it holds its needs itself
    h.runs[first].finish(Outcome.SUCCEEDED)
    h.rounds(core, 2)
    assert h.started == [first, second]


# --------------------------------------------------------------------------------------- records and outcomes


def test_progress_is_written_at_most_every_few_seconds(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    h.rounds(core)
    run = h.runs[job]
    run._progress = JobProgress(shards_total=8, shards_done=3)
    h.rounds(core, 2, seconds=PROGRESS_WRITE_S / 4)
    assert h.store.get(job).progress.shards_done == 0  # written less than PROGRESS_WRITE_S ago
    h.clock.advance(PROGRESS_WRITE_S)
    h.rounds(core)
    assert h.store.get(job).progress.shards_done == 3


@pytest.mark.parametrize(("outcome", "state"), [(Outcome.SUCCEEDED, JobState.SUCCEEDED),
                                                (Outcome.ALREADY_COMPLETE, JobState.SUCCEEDED),
                                                (Outcome.PARTIAL, JobState.PARTIAL),
                                                (Outcome.FAILED, JobState.FAILED),
                                                (Outcome.CANCELLED, JobState.CANCELLED)])  # fmt: skip
def test_a_runs_outcome_is_recorded_as_its_job_state(h, tmp_path, outcome, state):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    h.rounds(core)
    h.runs[job].finish(outcome)
    h.rounds(core)
    assert h.store.get(job).state is state


def test_an_outcome_no_state_maps_is_recorded_as_an_internal_failure_never_a_success(h, tmp_path):
    # service/kinds.py recorded any summary status it did not know (a new kind's, a misspelt one) as succeeded.
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    h.rounds(core)
    h.runs[job].finish("succeded")
    h.rounds(core)
    record = h.store.get(job)
    assert record.state is JobState.FAILED, record.state
    assert record.last_error.startswith("internal error: a job run ended with 'succeded'")
    assert record.last_error.endswith("(exit code 4)") and not core.running


def test_a_run_that_lost_its_lease_is_queued_again_a_bounded_number_of_times(h, tmp_path):
    # CI: a label job whose service stalled past its lease's expiry stopped before its manifest and was recorded
    # failed; a stall is the cluster's trouble, not the job's, and the next run labels only what is left.
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    lost = "LeaseLost: output out: this writer's lease was lost (it expired ...); stopped before writing more"
    for attempt in range(1, LEASE_LOST_ATTEMPTS + 1):
        h.rounds(core)
        assert h.store.get(job).attempts == attempt and h.store.get(job).state is JobState.RUNNING
        h.runs[job].finish(Outcome.FAILED, error=lost, lease_lost=True)
        h.rounds(core)
    record = h.store.get(job)
    assert record.state is JobState.FAILED and record.last_error == lost, record
    h.store.flush_logs()
    assert h.store.read_log(job)[0].count("queued again: LeaseLost") == LEASE_LOST_ATTEMPTS - 1


def test_submitting_a_job_again_returns_it_and_queues_an_ended_one_again(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    spec = label_spec(tmp_path, "out")
    job = core.submit(spec)
    assert core.submit(spec) == job and [r.job_id for r in h.store.list()] == [job]
    h.rounds(core)
    h.runs[job].finish(Outcome.PARTIAL)
    h.rounds(core)
    assert h.store.get(job).state is JobState.PARTIAL
    assert core.submit(spec, priority=3) == job
    again = h.store.get(job)
    assert again.state is JobState.QUEUED and again.priority == 3 and again.last_error is None


def test_the_services_refusals_are_bad_input_naming_the_job(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    core = h.core()
    job = core.submit(label_spec(tmp_path, "out"))
    h.rounds(core)
    h.runs[job].finish(Outcome.SUCCEEDED)
    h.rounds(core)
    with pytest.raises(IllegalTransition, match=f"job {job} is succeeded: only an interrupted") as refused:
        core.resume(job)
    with pytest.raises(UnknownJob, match="no job 'label-20260101-0000-abcd' in the job store") as unknown:
        core.cancel("label-20260101-0000-abcd")
    assert exit_code_for(refused.value) == exit_code_for(unknown.value) == EXIT_BAD_INPUT


def test_a_job_whose_spec_held_credentials_waits_for_resume_with_its_spec(h, tmp_path):
    h.cluster.nodes = TWO_CPUS
    spec = label_spec(tmp_path, "out", storage={"access_key_id": "AKIAEXAMPLE0001", "secret_access_key": "s3cr3t!"})
    first = h.core()
    job = first.submit(spec)
    restarted = h.core()  # a new service has no spec in memory, and the record holds none of the credentials
    h.rounds(restarted, 2)
    assert h.started == [] and h.store.get(job).state is JobState.QUEUED
    restarted.cancel(job)
    restarted.resume(job, spec)
    h.rounds(restarted)
    assert h.started == [job] and h.runs[job].start.spec.storage.secret_access_key.get_secret_value() == "s3cr3t!"
