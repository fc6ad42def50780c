"""The driver or the whole Ray cluster dies mid-job; running the same command again finishes only what is missing.

These run the real CLI in a subprocess. A driver that is killed joins the test session's cluster (killing a driver
leaves its cluster running; Ray ends the job's workers); a cluster that is killed is the driver's own private one,
so killing it cannot harm the session's. Re-runs join the session's cluster: a private cluster costs seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.support import IMAGENET_SAMPLE, assert_exactly_once, imagenet_labels

pytestmark = pytest.mark.slow  # real processes killed and clusters stopped: long, so sent out first


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for row in imagenet_labels()[:48]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])
    return folder


def _label_command(photos: Path, out: Path) -> list[str]:
    cli = Path(sys.executable).with_name("bulklabel")
    return [str(cli), "label", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--quiet",
            "--input", str(photos), "--output", str(out), "--files-per-shard", "3", "--batch-size", "1"]  # fmt: skip


def _start(command: list[str], ray_tmp: str) -> subprocess.Popen:
    """The command on a private local cluster with its temp dir in `ray_tmp`."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",
           # A driver whose cluster is gone gives up after 10 s instead of Ray's default minute.
           "RAY_gcs_rpc_server_reconnect_timeout_s": "10"}  # fmt: skip
    return _start_in(command, env)


def _start_in(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_markers(out: Path, count: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0
        if done >= count:
            return done
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} shards committed in {timeout}s")


def _ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Every process of this cluster: GCS, raylet and dashboard (their command lines name its temp dir) and
    their descendants, the workers (which retitle themselves `ray::...`, hiding the temp dir)."""
    daemons = [p for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    found = {p.pid: p for p in daemons}
    for daemon in daemons:
        try:
            found.update({child.pid: child for child in daemon.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _finish(command: list[str], env: dict[str, str]) -> str:
    rerun = _start_in(command, env)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    return stdout


def _kill_tree_leftovers(ray_tmp: str) -> None:
    for proc in _ray_processes(ray_tmp):
        proc.kill()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.fault(
    fault="driver process SIGKILLed mid-job, then the same command run again",
    injected="SIGKILL to the `bulklabel label` process after 3 of 16 shards were committed",
    expected="the re-run skips committed shards and labels only the missing ones; rows in = rows out",
)
def test_driver_killed_then_rerun_finishes_only_missing_shards(photos, tmp_path, ray_cluster_env, record_property):
    out = tmp_path / "out"
    command = _label_command(photos, out)
    driver = _start_in(command, ray_cluster_env)
    try:
        _wait_for_markers(out, 3, driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    committed_before = len(list((out / "_done").glob("*.json")))
    assert committed_before < 16 and not (out / "_job.json").exists()
    stdout = _finish(command, ray_cluster_env)
    # Workers may still commit the shards they held for a moment after their driver died: those count as done.
    skipped = int(re.search(r"(\d+) already done before this run", stdout).group(1))
    assert "succeeded" in stdout and committed_before <= skipped < 16
    rows = assert_exactly_once(out, photos)
    record_property("measured", f"{committed_before}/16 shards committed before the kill; re-run did the rest; "
                                f"{rows}/48 rows, no duplicates")  # fmt: skip


@pytest.mark.fault(
    fault="the local Ray cluster stopped mid-job, then the same command run again",
    injected="SIGKILL to every process of the driver's local cluster (GCS, raylet, workers) after 3 of 16 shards",
    expected="the driver exits with an error; the re-run labels only the missing shards; rows in = rows out",
)
def test_ray_cluster_stopped_then_rerun_finishes(photos, tmp_path, ray_cluster_env, record_property):
    out, ray_tmp = tmp_path / "out", tempfile.mkdtemp(prefix="blr-", dir="/tmp")
    command = _label_command(photos, out)
    try:
        driver = _start(command, ray_tmp)
        _wait_for_markers(out, 3, driver)
        cluster = _ray_processes(ray_tmp)
        assert len(cluster) >= 3, "the driver's cluster processes were not found"
        for proc in cluster:
            proc.kill()
        killed_at = time.monotonic()
        try:
            driver.wait(timeout=120)
        except subprocess.TimeoutExpired:
            driver.kill()  # a driver that cannot notice its cluster is gone is killed, as a user would
            driver.wait()
        assert driver.returncode != 0
        noticed = time.monotonic() - killed_at
        committed_before = len(list((out / "_done").glob("*.json")))
        assert committed_before < 16 and not (out / "_job.json").exists()
        stdout = _finish(command, ray_cluster_env)
    finally:
        _kill_tree_leftovers(ray_tmp)
    skipped = int(re.search(r"(\d+) already done before this run", stdout).group(1))
    assert "succeeded" in stdout and committed_before <= skipped < 16
    rows = assert_exactly_once(out, photos)
    measured = (
        f"driver exited {driver.returncode} {noticed:.0f}s after the cluster died; "
        f"{committed_before}/16 shards were committed; re-run did the rest; {rows}/48 rows"
    )
    record_property("measured", measured)
