"""The warm mode: the same label jobs submitted to the job service (jobs/service) on a pool that is already warm.

Everything in a `--warm` run, cold jobs and the ceiling included, runs on one local `ray start` cluster (a head with
the bench's CPUs and a private temp dir), since the service is a detached actor on such a cluster. Per model, the
service is started with a private job store, one untimed warm-up job builds the model's pool (and grows it to the
workers the job may use), then the timed job goes from `submit` to its manifest; the service is stopped afterwards
so that the next measurement finds every CPU free.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.bulklabel_run import CommitTimes, commit_times, label_spec
from bench.models import BenchModel
from bench.s3server import S3Server

log = logging.getLogger(__name__)

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 2 * 1024**3  # as a `ray.init` of the plain bench would have room for Ray Data's blocks
POLL_S = 0.2
POOL_READY_TIMEOUT_S = 120


@dataclass(frozen=True)
class ServiceCluster:
    address: str
    temp_dir: str
    raylet_pid: int  # Ray's workers (actors, tasks) descend from it: PeakMemory counts them from here


@dataclass(frozen=True)
class WarmTiming:
    seconds: float  # submit to the manifest's finished_at
    images: int
    first_commit_seconds: float  # submit to the first shard's done-marker
    submit_seconds: float  # how long `submit` itself took (checks on this side, the service's record)
    steady_seconds: float  # the first shard's turn to the last commit
    gaps: tuple[float, ...]  # between successive commits
    service_mib: float  # the service process's RSS after the job (psutil)
    workers_mib: tuple[float, ...]  # each pool worker's RSS after the job
    models_loaded: int  # models the pool's workers loaded during the timed job (0: it was warm)
    compile_seconds: tuple[float | None, ...] = ()  # compiled pools: each worker's compile (in the warm-up job)
    compile_cache: tuple[str | None, ...] = ()  # and whether inductor's on-disk cache held its kernels


@contextmanager
def service_cluster(cpus: int) -> Iterator[ServiceCluster]:
    """A `ray start --head --num-cpus cpus` cluster in a private temp dir, this process connected to it; on exit its
    processes are killed by pid (found by the temp dir), never with `ray stop`."""
    import ray

    from tests.multinode.ray_nodes import MultiNodeCluster

    nodes = MultiNodeCluster()
    env = nodes.node_env()  # project importable, no token auth, RAY_TMPDIR: nothing registered in /tmp/ray
    os.environ.update({k: env[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "PYTHONPATH")})
    port = _free_port()
    command = [RAY, "start", "--head", "--num-cpus", str(cpus), "--num-gpus", "0", "--port", str(port),
               "--temp-dir", nodes.temp_dir, "--object-store-memory", str(OBJECT_STORE_BYTES),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(_free_port()),
               "--ray-client-server-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
               "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats",
               "--log-style", "record"]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed ({done.returncode}): {done.stderr[-3000:]}")
        ray.init(address=f"127.0.0.1:{port}", namespace="bulklabel-bench", log_to_driver=True,
                 configure_logging=False)  # fmt: skip
        yield ServiceCluster(f"127.0.0.1:{port}", nodes.temp_dir, _raylet_pid(nodes.temp_dir))
    finally:
        ray.shutdown()
        nodes.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raylet_pid(temp_dir: str) -> int:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("raylet") and any(temp_dir in arg for arg in cmdline):
            return proc.pid
    raise RuntimeError(f"no raylet of the cluster in {temp_dir}")


@contextmanager
def job_service(state_uri: str) -> Iterator[None]:
    """The job service on the connected cluster, with its own job store; stopped (pools released) on exit."""
    import ray

    from jobs.service.client import service, stop_service
    from jobs.service.config import ServiceConfig

    handle = service(start=True, config=ServiceConfig(state_uri=state_uri, autoscaler=False))
    ray.get(handle.describe.remote())  # constructed, its loop running
    try:
        yield
    finally:
        stop_service()


def run_warm(server: S3Server, warmup_uri: str, input_uri: str, output_uri: str, model: BenchModel,
             batch_size: int, num_workers: int = 0, compile: bool = False) -> WarmTiming:  # fmt: skip
    """One warm-up job (untimed) then the timed one on the same pool, the service already running. `compile`: the
    pool's workers are torch.compile'd, and the warm-up job compiles, as a pool does once for all its jobs."""
    from jobs.service.client import submit, wait

    warmup = label_spec(server, warmup_uri, output_uri + "-warmup", model, batch_size, num_workers, compile)
    _expect_success(wait(submit(warmup), poll_s=POLL_S), "warm-up")
    loaded_before = _models_loaded(_pool_ready(model.name))
    spec = label_spec(server, input_uri, output_uri, model, batch_size, num_workers, compile)
    submitted, started = time.time(), time.perf_counter()
    job_id = submit(spec)
    submit_seconds = time.perf_counter() - started
    record = _expect_success(wait(job_id, poll_s=POLL_S), "timed")
    times = commit_times(server, output_uri)
    pool = _pool_ready(model.name)
    service_mib = _service_rss()
    return WarmTiming(
        seconds=times.manifest - submitted,
        images=record.progress.images,
        first_commit_seconds=times.first_commit - submitted,
        submit_seconds=submit_seconds,
        steady_seconds=times.last_commit - times.first_turn,
        gaps=_gaps(times),
        service_mib=service_mib,
        workers_mib=tuple(_rss_mib(d["pid"]) for d in pool["worker_details"]),
        models_loaded=_models_loaded(pool) - loaded_before,
        compile_seconds=tuple(d.get("compile_seconds") for d in pool["worker_details"]) if compile else (),
        compile_cache=tuple(d.get("compile_cache") for d in pool["worker_details"]) if compile else (),
    )


def _expect_success(record, what: str):
    from jobs.service.records import JobState

    if record.state is not JobState.SUCCEEDED or record.progress.errors:
        raise RuntimeError(f"{what} job {record.job_id} did not succeed cleanly: {record.state.value}, "
                           f"{record.progress.errors} error rows, {record.last_error}")  # fmt: skip
    return record


def _pool_ready(model_name: str) -> dict:
    """The model's pool once every worker it started answers (a worker still loading would make the job cold)."""
    from jobs.service.client import service_status

    deadline = time.monotonic() + POOL_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        pools = [p for p in service_status()["pools"] if p["model"] == model_name]
        if pools and len(pools[0]["worker_details"]) == pools[0]["workers"]:
            return pools[0]
        time.sleep(POLL_S)
    raise RuntimeError(f"the {model_name} pool's workers did not all answer within {POOL_READY_TIMEOUT_S} s")


def _models_loaded(pool: dict) -> int:
    return sum(d["models_loaded"] for d in pool["worker_details"])


def _service_rss() -> float:
    """The service process's RSS now (psutil), MiB."""
    from jobs.service.client import service_status

    return _rss_mib(service_status()["pid"])


def _rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def _gaps(times: CommitTimes) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(times.commits, times.commits[1:], strict=False))


def describe(name: str, warm: WarmTiming) -> str:
    """One log line: where the warm job's time went."""
    gaps = warm.gaps or (0.0,)
    return (f"warm {name}: {warm.seconds:.1f}s submit->manifest ({warm.images / warm.seconds:.1f} img/s): submit call "
            f"{warm.submit_seconds:.2f}s, first commit at {warm.first_commit_seconds:.1f}s, steady "
            f"{warm.steady_seconds:.1f}s ({warm.images / warm.steady_seconds:.1f} img/s), commit gaps median "
            f"{statistics.median(gaps):.2f}s max {max(gaps):.2f}s; models loaded during the job: "
            f"{warm.models_loaded}; RSS MiB: service {warm.service_mib:.0f}, "
            f"pool workers {' + '.join(f'{m:.0f}' for m in warm.workers_mib)}"
            + (f"; compiled in {warm.compile_seconds} s (on-disk cache: {warm.compile_cache})"
               if warm.compile_seconds else ""))  # fmt: skip


def private_state_dir() -> str:
    """A job store for one bench run (never the user's ~/.bulklabel)."""
    return tempfile.mkdtemp(prefix="bench-service-state-")
