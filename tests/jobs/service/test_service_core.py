"""jobs.service.service's core without Ray: the service on a real job store (a tmp folder) with a fake cluster
(ClusterFacts) and fake runs, in seconds. What needs a real cluster (a service process killed, a cluster lost, two
clusters sharing a store) is in test_service_cli.py."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from jobs.service.kinds import RUNNERS, Outcome

from jobs.cluster import ClusterResources
from jobs.service.admission import Resources
from jobs.service.config import ServiceConfig
from jobs.service.ownership import ClusterId, Liveness
from jobs.service.records import Cancellation, JobKind, JobProgress, JobRecord, JobState, advance, new_record
from jobs.service.service import TICK_S, JobService
from jobs.service.store import JobStore
from schemas.specs import LabelJobSpec

OURS = ClusterId("10.0.0.1:6379", "session_2026-12-06_22-00-00_000001_100")
OTHER = ClusterId("10.0.0.1:6380", "session_2026-12-06_22-30-00_000002_200")
T0 = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)


class FakeCluster:
    """A cluster with no CPUs (every job waits for a node, with its reason) and a view of the other clusters."""

    def __init__(self, others: dict[ClusterId, Liveness] | None = None):
        self.others = others or {}

    def identity(self) -> ClusterId:
        return OURS

    def resources(self) -> ClusterResources:
        return ClusterResources(cpus=0.0, gpus=0.0, nodes=1, node_resources=((0.0, 0.0),))

    def free(self) -> Resources:
        return Resources(0.0, 0.0)

    def request(self, waiting) -> None:
        pass

    def liveness(self, cluster: ClusterId) -> Liveness:
        return self.others[cluster]

    def node_id(self) -> str:
        return "fake-node"


class FakeRun:
    """A running job that ends when told (or, once cancelled, at once, as cancelled)."""

    def __init__(self, progress: JobProgress | None = None):
        self.ended: Outcome | None = None
        self._progress = progress or JobProgress()

    def outcome(self) -> Outcome | None:
        return self.ended

    def cancel(self) -> None:
        self.ended = Outcome(JobState.CANCELLED)

    def progress(self) -> JobProgress:
        return self._progress


def label_record(store: JobStore, job_id: str, tmp_path, state=JobState.QUEUED, cluster=OURS) -> JobRecord:
    spec = LabelJobSpec(input={"uri": str(tmp_path / "photos")}, output=str(tmp_path / job_id),
                        model={"name": "mobilenet_v2"})  # fmt: skip
    record = new_record(job_id, JobKind.LABEL, spec, output=spec.output, seq=store.next_seq(), now=T0,
                        cluster=str(cluster))  # fmt: skip
    if state is not JobState.QUEUED:
        record = advance(record, JobState.RUNNING, T0, cluster=str(cluster))
        record = record if state is JobState.RUNNING else advance(record, state, T0)
    store.put(record)
    return record


@pytest.fixture
def state(tmp_path):
    (tmp_path / "photos").mkdir()
    return tmp_path / "state"


@pytest.fixture
def services():
    started: list[JobService] = []

    def start(state, cluster: FakeCluster | None = None) -> JobService:
        service = JobService(ServiceConfig(state_uri=str(state)), cluster=cluster or FakeCluster())
        started.append(service)
        return service

    yield start
    for service in started:
        if service._thread.is_alive():
            service.stop()


def until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(TICK_S / 5)
    raise AssertionError(f"{what} not reached in {timeout:.0f}s")


def run_here(service: JobService, job_id: str, run: FakeRun) -> None:
    """A job this service runs (as _start leaves it), without Ray."""
    with service._lock:
        record = advance(service.store.get(job_id), JobState.RUNNING, datetime.now(UTC), cluster=service.session)
        service._running[job_id] = run
        service._put(record)


# --------------------------------------------------------------------------------- case 8: one damaged record


@pytest.mark.fault(
    fault="one damaged job record: a running job's record truncated on disk, and a record file of junk beside it",
    injected="the service core running a job (fake run, no Ray); its record cut to 40 bytes and `{not json` "
    "written as another record, then a new job submitted",
    expected="the new job is admitted or given its waiting reason; the damaged files are each warned about once "
    "by name; the running job's record is written whole again and its end recorded",
)
def test_a_damaged_running_record_does_not_wedge_admission_and_is_warned_about_once(
    state, tmp_path, services, caplog, record_property
):
    # Case 8 of issue 21: the loop raised on the running job's truncated record every tick, before admitting.
    store = JobStore(str(state))
    label_record(store, "label-old", tmp_path)
    service = services(state)
    run = FakeRun(JobProgress(shards_total=4, shards_done=1))
    run_here(service, "label-old", run)
    path = state / "jobs" / "label-old.json"
    with caplog.at_level(logging.WARNING):
        path.write_text(path.read_text()[:40])  # truncated on disk
        damaged_other = state / "jobs" / "label-junk.json"
        damaged_other.write_text("{not json")
        label_record(store, "label-new", tmp_path)
        waiting = until(lambda: store.get("label-new").waiting_reason, what="a waiting reason for the new job")
        time.sleep(TICK_S * 4)  # more ticks: the warnings must not repeat
    assert "node" in waiting, waiting
    # The running job's record is written whole again from the service's copy, and its end recorded.
    assert until(lambda: store.get("label-old").state is JobState.RUNNING)
    run.ended = Outcome(JobState.SUCCEEDED)
    ended = until(lambda: (r := store.get("label-old")).state is JobState.SUCCEEDED and r, what="the old job's end")
    assert ended.progress.shards_done == 1
    junk = [r.getMessage() for r in caplog.records if "label-junk.json" in r.getMessage()]
    assert len(junk) == 1 and "skipping job record" in junk[0], junk
    old = [r.getMessage() for r in caplog.records if "label-old" in r.getMessage() and "unreadable" in r.getMessage()]
    assert len(old) == 1, old
    record_property("measured", f"new job given its reason ({waiting!r}); junk record warned about once, the "
                                f"truncated one once; the running job rewritten whole and ended succeeded")  # fmt: skip


def test_a_running_record_removed_by_hand_is_written_again(state, tmp_path, services):
    store = JobStore(str(state))
    label_record(store, "label-old", tmp_path)
    service = services(state)
    run_here(service, "label-old", FakeRun())
    (state / "jobs" / "label-old.json").unlink()
    label_record(store, "label-new", tmp_path)
    assert until(lambda: store.get("label-new").waiting_reason)
    assert until(lambda: store.exists("label-old") and store.get("label-old").state is JobState.RUNNING)


# ------------------------------------------------------------------------------------- case 7: service stop


def test_service_stop_records_its_running_jobs_cancelled_and_they_stay_so_until_resume(state, tmp_path, services):
    # Case 7 of issue 21: the record stayed `running`, and the next service queued the job again on its own.
    store = JobStore(str(state))
    label_record(store, "label-a", tmp_path)
    service = services(state)
    run_here(service, "label-a", FakeRun(JobProgress(shards_total=16, shards_done=7)))
    outcome = service.stop()
    stopped = JobRecord.model_validate(outcome["stopped"][0])
    record = store.get("label-a")
    assert record == stopped and record.state is JobState.CANCELLED
    assert record.cancelled_by is Cancellation.SERVICE_STOPPED and record.progress.shards_done == 7

    again = services(state)  # the next command starts a new service
    time.sleep(TICK_S * 3)
    assert store.get("label-a").state is JobState.CANCELLED
    resumed = JobRecord.model_validate(again.resume("label-a"))
    assert resumed.state is JobState.QUEUED and resumed.cancelled_by is None


def test_a_run_still_busy_when_stop_gives_up_is_recorded_cancelled_too(state, tmp_path, services, monkeypatch):
    from jobs.service import service as service_module

    monkeypatch.setattr(service_module, "STOP_WAIT_S", 1.0)
    store = JobStore(str(state))
    label_record(store, "label-a", tmp_path)
    service = services(state)
    stubborn = FakeRun()
    stubborn.cancel = lambda: None  # its running shards never finish
    run_here(service, "label-a", stubborn)
    service.stop()
    record = store.get("label-a")
    assert record.state is JobState.CANCELLED and record.cancelled_by is Cancellation.SERVICE_STOPPED


def test_a_user_cancel_says_so(state, tmp_path, services):
    store = JobStore(str(state))
    label_record(store, "label-a", tmp_path)
    service = services(state)
    run_here(service, "label-a", FakeRun())
    service.cancel("label-a")
    record = until(lambda: (r := store.get("label-a")).state is JobState.CANCELLED and r)
    assert record.cancelled_by is Cancellation.BY_USER


# ------------------------------------------------------------------------ case 6: two clusters, one store


def test_another_live_clusters_jobs_are_left_alone_and_a_gone_ones_interrupted_or_taken_over(state, tmp_path,
                                                                                           services):  # fmt: skip
    store = JobStore(str(state))
    gone = ClusterId("10.0.0.9:6379", "session_2026-12-01_00-00-00_000009_900")
    label_record(store, "label-live", tmp_path, JobState.RUNNING, cluster=OTHER)
    label_record(store, "label-queued-live", tmp_path, cluster=OTHER)
    label_record(store, "label-lost", tmp_path, JobState.RUNNING, cluster=gone)
    label_record(store, "label-queued-lost", tmp_path, cluster=gone)
    service = services(state, FakeCluster({OTHER: Liveness.ALIVE, gone: Liveness.GONE}))
    adopted = until(lambda: (r := store.get("label-queued-lost")).waiting_reason and "node" in r.waiting_reason and r,
                    what="the gone cluster's queued job admitted here")  # fmt: skip
    assert adopted.cluster == service.session
    live, queued_live, lost = (store.get(j) for j in ("label-live", "label-queued-live", "label-lost"))
    assert live.state is JobState.RUNNING and live.cluster == str(OTHER)
    assert queued_live.state is JobState.QUEUED and queued_live.waiting_reason is None  # not admitted here
    assert lost.state is JobState.INTERRUPTED and lost.last_error == f"interrupted: its cluster {gone} went away"
    with pytest.raises(Exception, match=f"on another cluster \\({OTHER}\\); cancel it there"):
        service.cancel("label-live")
    assert store.get("label-live").state is JobState.RUNNING


def test_another_clusters_job_is_interrupted_once_that_cluster_goes(state, tmp_path, services, monkeypatch):
    from jobs.service import service as service_module

    monkeypatch.setattr(service_module, "RECONCILE_S", 0.5)
    store = JobStore(str(state))
    label_record(store, "label-live", tmp_path, JobState.RUNNING, cluster=OTHER)
    cluster = FakeCluster({OTHER: Liveness.ALIVE})
    services(state, cluster)
    time.sleep(1.5)
    assert store.get("label-live").state is JobState.RUNNING
    cluster.others[OTHER] = Liveness.GONE
    assert until(lambda: store.get("label-live").state is JobState.INTERRUPTED, what="interrupted once gone")


def test_a_late_success_over_an_interruption_is_recorded_when_the_manifest_proves_it(state, tmp_path, services,
                                                                                   monkeypatch):  # fmt: skip
    # The run ends succeeded after another service judged this cluster gone (as the old code did on a live one).
    proofs: list[str] = []

    def finished(record, storage) -> bool:
        proofs.append(record.job_id)
        return record.job_id == "label-proven"

    monkeypatch.setitem(RUNNERS, JobKind.LABEL, replace(RUNNERS[JobKind.LABEL], finished=finished))
    store = JobStore(str(state))
    service = services(state)
    runs = {}
    for job_id in ("label-proven", "label-unproven"):
        label_record(store, job_id, tmp_path)
        runs[job_id] = FakeRun()
        run_here(service, job_id, runs[job_id])
        store.put(advance(store.get(job_id), JobState.INTERRUPTED, datetime.now(UTC), last_error="interrupted: x"))
    for run in runs.values():
        run.ended = Outcome(JobState.SUCCEEDED)
    until(lambda: not service._running, what="both runs settled")
    assert store.get("label-proven").state is JobState.SUCCEEDED
    assert store.get("label-proven").last_error is None
    assert store.get("label-unproven").state is JobState.INTERRUPTED
    assert sorted(proofs) == ["label-proven", "label-unproven"]


def test_a_new_service_records_a_proven_late_success_of_an_interrupted_job(state, tmp_path, services, monkeypatch):
    monkeypatch.setitem(RUNNERS, JobKind.LABEL, replace(RUNNERS[JobKind.LABEL], finished=lambda r, s: True))
    store = JobStore(str(state))
    label_record(store, "label-a", tmp_path, JobState.INTERRUPTED, cluster=OTHER)
    services(state, FakeCluster({OTHER: Liveness.GONE}))
    assert store.get("label-a").state is JobState.SUCCEEDED
