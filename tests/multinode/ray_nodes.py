"""A real multi-node Ray cluster on this machine: a head (`ray start --head --num-cpus 0`) and worker nodes joined
with `ray start --address`, each its own raylet, object store and agents, as on a fleet of machines.

It is driven from subprocesses only (the CLI with RAY_ADDRESS set): a process connects to one Ray at a time, and the
test session's own is tests/conftest.py's `ray_cluster`. Its processes are found by its temp dir and killed by pid,
never with `ray stop`, which stops every Ray on the machine, other sessions' included.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("bulklabel.tests")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# The least object store Ray accepts is 75 MiB; shard results are a few kB, and the default (30 % of memory per
# node) would let four nodes on one 24 GiB machine claim most of /dev/shm.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
START_TIMEOUT_S = 120


_HANDED_OUT: set[int] = set()


class NodeStartFailed(RuntimeError):
    """`ray start` of a node exited with an error."""


def _free_port() -> int:
    """A port free now and not handed out before by this process: the OS may give a just-closed port again, and two
    components of one node on the same port fail `ray start` (seen: the GCS and the dashboard agent)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class MultiNodeCluster:
    """Start with start(); `address` (GCS) is what RAY_ADDRESS takes, `dashboard` the State API's URL."""

    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node (credentials, ...)
    # The State API (nodes, actors, tasks below) needs the dashboard: about 7 s of CPU on 2 cores for its head and
    # nine module processes. Clusters driven through the CLI alone (the job service) go without it.
    dashboard_on: bool = True
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="blm-", dir="/tmp"))  # short: unix sockets
    address: str = ""
    dashboard: str = ""
    start_seconds: dict[str, float] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # node name → its Prometheus metrics endpoint's port

    def node_env(self) -> dict[str, str]:
        """Every node's environment: project importable (workers are spawned by their raylet, not by the driver),
        no token auth (it would write ~/.ray/auth_token), no RAY_ADDRESS of another cluster."""
        pythonpath = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        return {**env, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": self.temp_dir, "PYTHONPATH": pythonpath,
                **self.env}  # fmt: skip

    def start(self, worker_nodes: int, cpus_per_node: int = 1, attempts: int = 2) -> MultiNodeCluster:
        """The head and `worker_nodes` nodes; a cluster of which a node did not start is stopped and started again
        once, from a new temp dir (seen under load: a raylet not registered within Ray's fixed 30 s)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(worker_nodes, cpus_per_node)
            except NodeStartFailed as exc:
                if attempt == attempts:
                    raise
                log.warning("Ray cluster start failed, starting it again from scratch: %s", str(exc)[:500])
                self.stop()
                self.temp_dir = tempfile.mkdtemp(prefix="blm-", dir="/tmp")
                self.start_seconds.clear()
                self.metrics_ports.clear()
        raise AssertionError("unreachable")

    def _start_once(self, worker_nodes: int, cpus_per_node: int) -> MultiNodeCluster:
        port, dashboard_port = _free_port(), _free_port()
        dashboard = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(dashboard_port)] if self.dashboard_on else ["--include-dashboard", "false"]  # fmt: skip
        self._ray_start("head", ["--head", "--num-cpus", "0", "--num-gpus", "0", "--port", str(port), *dashboard,
                                 "--ray-client-server-port", str(_free_port())])  # fmt: skip
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}" if self.dashboard_on else ""
        # One at a time: each node names its sockets in the shared session folder (raylet, raylet.1, ...) by
        # picking the first free name, which two nodes starting at once could both pick.
        for index in range(worker_nodes):
            self.add_worker_node(f"worker-{index + 1}", cpus_per_node)
        return self

    def add_worker_node(self, name: str, cpus: int = 1) -> None:
        # Every node of this cluster logs into one folder on this one machine: the head's log monitor forwards all of
        # it, and one per worker node would forward each line again (Ray: one log monitor per physical host).
        self._ray_start(name, ["--address", self.address, "--num-cpus", str(cpus), "--num-gpus", "0",
                               "--include-log-monitor", "false"])  # fmt: skip

    def _ray_start(self, name: str, args: list[str]) -> None:
        self.metrics_ports[name] = _free_port()
        command = [RAY, "start", *args, "--temp-dir", self.temp_dir, "--object-store-memory", str(OBJECT_STORE_BYTES),
                   "--metrics-export-port", str(self.metrics_ports[name]),
                   "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats",
                   "--log-style", "record"]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(command, env=self.node_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            raise NodeStartFailed(f"`ray start` of {name} failed ({done.returncode}): {done.stderr[-2000:]}"
                                  f"{self._newest_raylet_log()}")  # fmt: skip
        self.start_seconds[name] = round(time.monotonic() - started, 1)
        log.info("Ray node %s started in %.1f s", name, self.start_seconds[name])

    def _newest_raylet_log(self) -> str:
        """The end of the most recently written raylet log: why a node did not register, when `ray start` cannot
        say (its own error names only the timeout)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/raylet*.out"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return ""
        return f"\n--- {logs[-1].name} (last lines) ---\n" + "\n".join(logs[-1].read_text(errors="replace")
                                                                      .splitlines()[-15:])  # fmt: skip

    def nodes(self) -> list:
        """The cluster's nodes as the State API reports them (node_id, state, is_head_node, resources_total)."""
        from ray.util.state import list_nodes

        return list_nodes(address=self._state_api(), detail=True)

    def worker_actors(self, state: str | None = None) -> list:
        """The label worker actors this cluster ever ran (dead ones too, unless `state` is given)."""
        from ray.util.state import list_actors

        filters = [("class_name", "=", "LabelWorkerActor")] + ([("state", "=", state)] if state else [])
        return list_actors(address=self._state_api(), filters=filters, detail=True, limit=1000)

    def finished_shard_tasks_by_node(self) -> dict[str, int]:
        """How many `label_shard` calls finished on each node (node id → count), from the State API."""
        from ray.util.state import list_tasks

        counts: dict[str, int] = {}
        tasks = list_tasks(address=self._state_api(), filters=[("state", "=", "FINISHED")], detail=True, limit=10000)
        for task in tasks:
            if task.name.endswith("LabelWorkerActor.label_shard"):
                counts[task.node_id] = counts.get(task.node_id, 0) + 1
        return counts

    def _state_api(self) -> str:
        if not self.dashboard:
            raise AssertionError("this cluster was started without its dashboard (dashboard_on=False): no State API")
        return self.dashboard

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL a worker node as a machine would die: its raylet and every process under it (its workers, its
        dashboard and runtime-env agents). Returns the pids killed."""
        raylet = next((p for p in self._daemons() if f"--node_id={node_id}" in (p.info["cmdline"] or [])), None)
        if raylet is None:
            raise AssertionError(f"no raylet of node {node_id} among this cluster's processes")
        victims = [raylet, *raylet.children(recursive=True)]
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        return [proc.pid for proc in victims]

    def _daemons(self) -> list[psutil.Process]:
        """This cluster's GCS, raylets, dashboard and monitor: their command lines name its temp dir."""
        return [p for p in psutil.process_iter(["cmdline"]) if self.temp_dir in " ".join(p.info["cmdline"] or [])]

    def _processes(self) -> list[psutil.Process]:
        """The daemons and their descendants (workers retitle themselves `ray::...`, hiding the temp dir)."""
        daemons = self._daemons()
        found = {p.pid: p for p in daemons}
        for daemon in daemons:
            try:
                found.update({child.pid: child for child in daemon.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def stop(self) -> None:
        """Kill every process of this cluster and remove its temp dir; other Ray clusters are not touched."""
        procs = self._processes()
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=10)
        if alive:
            log.warning("Ray processes still alive 10 s after SIGKILL: %s", [p.pid for p in alive])
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def describe(self) -> str:
        return json.dumps({"address": self.address, "temp_dir": self.temp_dir, "start_s": self.start_seconds})
