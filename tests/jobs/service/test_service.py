"""jobs.service.service: the probe of another cluster (a real GCS, the session's Ray cluster, and a dead port) and
the thread shell around the core."""

from __future__ import annotations

import socket
import time

from jobs.service.ownership import ClusterId, Liveness
from jobs.service.service import RayCluster, probe_cluster


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing listens there


def test_a_cluster_whose_gcs_port_refuses_is_gone_at_once():
    started = time.monotonic()
    assert probe_cluster(ClusterId(f"127.0.0.1:{_dead_port()}", "session_x")) is Liveness.GONE
    assert time.monotonic() - started < 5


def test_a_live_gcs_is_alive_for_its_own_session_and_gone_for_another(ray_cluster):
    ours = RayCluster().identity()
    assert ours.session.startswith("session_") and ours.gcs_address.rsplit(":", 1)[1].isdigit()
    assert probe_cluster(ours) is Liveness.ALIVE
    # A new cluster on the same address (a `ray start` after the old one stopped) is another session.
    assert probe_cluster(ClusterId(ours.gcs_address, "session_2020-01-01_00-00-00_000000_1")) is Liveness.GONE


def test_the_shell_runs_the_cores_rounds_on_its_thread_and_its_stop_records_the_running_jobs(tmp_path):
    """JobService (the actor's class) with fake cluster, pools and runs: its thread admits and starts a job
    submitted through it; `stop` records the job cancelled by the stop and returns it."""
    from jobs.service.records import Cancellation, JobState
    from jobs.service.service import JobService
    from schemas.specs import LabelJobSpec
    from tests.jobs.service.core_fakes import FakeCluster, Harness

    (tmp_path / "photos").mkdir()
    h = Harness(tmp_path / "state", FakeCluster(nodes=[(2.0, 0.0)]))
    service = JobService(h.config, h.cluster, pools=h.new_pool, start_run=h.start_run)
    spec = LabelJobSpec(input={"uri": str(tmp_path / "photos")}, output=str(tmp_path / "out"),
                        model={"name": "mobilenet_v2"})  # fmt: skip
    job = service.submit(spec)
    deadline = time.monotonic() + 30
    while service.status(job)["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.started == [job] and service.describe()["running"] == [job]
    stopped = service.stop()
    assert [r["job_id"] for r in stopped["stopped"]] == [job] and not service._thread.is_alive()
    record = h.store.get(job)
    assert record.state is JobState.CANCELLED and record.cancelled_by is Cancellation.SERVICE_STOPPED
    assert h.pools_made[0].closed
