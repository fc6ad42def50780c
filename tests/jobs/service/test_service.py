"""jobs.service.service's probe of another cluster: a real GCS (the session's Ray cluster) and a dead port."""

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
