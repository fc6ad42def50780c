"""Which cluster a command uses (jobs/cluster.py): the probe and the decision as plain logic, then the CLI against
an unreachable $RAY_ADDRESS and against the address file a hard-killed `ray start` cluster leaves behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from jobs.cluster import ClusterSource, ClusterUnreachable, choose_cluster, gcs_reachable
from tests.multinode.ray_nodes import MultiNodeCluster
from tests.support import IMAGENET_SAMPLE, assert_exactly_once, imagenet_labels

CLI = str(Path(sys.executable).with_name("bulklabel"))
# A refused connection is answered at once; the bound is for a loaded 2-core machine starting Python and the CLI.
FAIL_WITHIN_S = 15.0


def _dead_address() -> str:
    """host:port of a port that was just bound and closed: nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_the_probe_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        live = f"127.0.0.1:{listening.getsockname()[1]}"
        assert gcs_reachable(live) and gcs_reachable(f"ray://{live}")
    started = time.monotonic()
    assert not gcs_reachable(_dead_address())
    assert time.monotonic() - started < 1.0
    assert gcs_reachable("auto")  # no port to probe: ray.init resolves it


def test_the_decision():
    def up(address: str) -> bool:
        return address == "10.0.0.1:6379"

    assert choose_cluster(True, "10.0.0.2:6379", None, up).source is ClusterSource.CONNECTED
    joined = choose_cluster(False, "10.0.0.1:6379", "10.0.0.2:6379", up)
    assert (joined.source, joined.address, joined.joins_existing) == (ClusterSource.ENVIRONMENT, "10.0.0.1:6379", True)
    with pytest.raises(ClusterUnreachable, match=r"RAY_ADDRESS=10\.0\.0\.2:6379 does not answer"):
        choose_cluster(False, "10.0.0.2:6379", "10.0.0.1:6379", up)
    started = choose_cluster(False, None, "10.0.0.1:6379", up)
    assert (started.source, started.address) == (ClusterSource.ADDRESS_FILE, "10.0.0.1:6379")
    stale = choose_cluster(False, None, "10.0.0.2:6379", up)
    assert (stale.source, stale.address, stale.stale_address, stale.joins_existing) == (
        ClusterSource.STALE_ADDRESS_FILE, None, "10.0.0.2:6379", False)  # fmt: skip
    assert choose_cluster(False, "", None, up).source is ClusterSource.PRIVATE


def _photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for row in imagenet_labels()[:count]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])
    return folder


def _label_args(photos: Path, out: Path) -> list[str]:
    return ["label", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--input", str(photos), "--output",
            str(out), "--files-per-shard", "2", "--batch-size", "1", "--quiet"]  # fmt: skip


@pytest.mark.fault(
    fault="RAY_ADDRESS names a cluster that is not there (a closed port)",
    injected="`bulklabel list`, `submit` and `label` with RAY_ADDRESS=127.0.0.1:<a port bound and closed>",
    expected="each fails within seconds with one line naming the address, exit 3 (infrastructure); no hang",
)
def test_an_unreachable_ray_address_fails_each_command_in_seconds(tmp_path, record_property):
    photos, dead = _photos(tmp_path / "photos", 2), _dead_address()
    env = {**os.environ, "RAY_ADDRESS": dead, "RAY_TMPDIR": tempfile.mkdtemp(prefix="blc-", dir="/tmp"),
           "BULKLABEL_STATE": str(tmp_path / "state")}  # fmt: skip
    commands = {"list": ["list"], "submit": ["submit", *_label_args(photos, tmp_path / "out-s")],
                "label": _label_args(photos, tmp_path / "out-l")}  # fmt: skip
    seconds = {}
    try:
        for name, args in commands.items():
            started = time.monotonic()
            done = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=120)
            seconds[name] = time.monotonic() - started
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 3, (name, done.returncode, done.stderr[-2000:])
            assert len(lines) == 1 and lines[0].startswith("error: ") and dead in lines[0], (name, done.stderr)
            assert seconds[name] < FAIL_WITHIN_S, (name, seconds[name])
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert not (tmp_path / "out-l").exists() and not (tmp_path / "state").exists()
    record_property("measured", "exit 3, one line, in " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


@pytest.mark.slow
@pytest.mark.fault(
    fault="the `ray start` cluster of this machine killed hard, its address file left behind, then a plain `label`",
    injected="SIGKILL to every process of a `ray start --head` cluster; `bulklabel label` with no RAY_ADDRESS",
    expected="the stale address file is noticed and removed, a private local cluster started and said so; "
    "the job succeeds with one row per image",
)
def test_a_stale_ray_start_address_file_gets_a_private_cluster(tmp_path, record_property):
    photos = _photos(tmp_path / "photos", 4)
    # RAY_TMPDIR is where Ray looks for the address file (<RAY_TMPDIR>/ray/ray_current_cluster); the `ray start`
    # cluster's temp dir is that `ray` folder, so it writes the file where this machine's ray.init looks.
    ray_tmp = tempfile.mkdtemp(prefix="bls-", dir="/tmp")
    old = MultiNodeCluster(temp_dir=os.path.join(ray_tmp, "ray"), env={"RAY_TMPDIR": ray_tmp})
    address_file = Path(ray_tmp, "ray", "ray_current_cluster")
    try:
        old.start(worker_nodes=0)
        recorded = address_file.read_text().strip()  # the node's IP and the GCS port
        assert recorded.endswith(f":{old.address.rsplit(':', 1)[1]}"), recorded
        victims = old._processes()
        for proc in victims:
            proc.kill()
        psutil.wait_procs(victims, timeout=10)
        assert address_file.exists() and not gcs_reachable(recorded)
        env = {**old.node_env(), "RAY_TMPDIR": ray_tmp}
        started = time.monotonic()
        done = subprocess.run([CLI, *_label_args(photos, tmp_path / "out")], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        seconds = time.monotonic() - started
        file_left = address_file.exists()
    finally:
        old.stop()  # kills what is left (the private cluster ends with its command) and removes the temp dir
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "is gone" in line]
    assert len(said) == 1 and recorded in said[0] and "private local cluster" in said[0], done.stderr[-3000:]
    assert not file_left
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"address file of the killed cluster ({recorded}) noticed and removed; "
                                f"a private cluster labelled {rows}/4 rows in {seconds:.0f} s")  # fmt: skip
