"""Shared fixtures: a real S3 server (SeaweedFS), per-test storage roots on both backends, and one Ray cluster.

Heavy resources are session-scoped and started lazily: a test run that never asks for S3 or Ray never starts them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.specs import StorageOptions
from tests.s3server import S3Server, WeedServer
from workers.io.storage import Storage, open_storage

log = logging.getLogger("bulklabel.tests")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_BUCKET = "bulklabel-test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when torch sees none")
    config.addinivalue_line("markers", "fault(fault, injected, expected): a row of docs/reliability.md's fault matrix")


FAULT_MATRIX_ENV = "BULKLABEL_FAULT_MATRIX"  # where tests.fault_matrix collects the fault tests' results


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With $BULKLABEL_FAULT_MATRIX set, append each fault test's outcome and measurement as a JSON line."""
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    path = os.environ.get(FAULT_MATRIX_ENV)
    if not (path and marker and report.when == "call"):
        return
    measured = dict(item.user_properties).get("measured", "")
    row = {"test": item.nodeid, **marker.kwargs, "outcome": report.outcome, "seconds": round(report.duration, 1),
           "measured": measured}  # fmt: skip
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): a test process per core, at most 4 (each starts its own Ray cluster and S3
    server; past that, memory rather than cores runs out on a laptop)."""
    return max(1, min(os.cpu_count() or 1, 4))


def _heavy_first(item: pytest.Item) -> int:
    """Modules that start clusters of their own (`multinode`) go out first, then `slow` ones: test processes take
    whole modules (`--dist loadfile`, so a module's cluster starts once), and a long one taken last would leave the
    other processes idle while it runs."""
    return 0 if item.get_closest_marker("multinode") else 1 if item.get_closest_marker("slow") else 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy modules first (a stable sort: the order within a module stays); skip `gpu` tests on machines without
    CUDA, importing torch only when such tests were collected."""
    items.sort(key=_heavy_first)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
        for item in gpu_items:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------- S3 (SeaweedFS)


@pytest.fixture
def cpu_compile_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile: auto` on CPU with an assumed 1.1x speedup, to test its arithmetic (the speedup measured in the
    worker, below 1, never compiles; jobs/label/compile_policy.py)."""
    from jobs.label import compile_policy

    monkeypatch.setattr(compile_policy, "CPU_COMPILE_SPEEDUP", 1.1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server for the whole session: the S3 backend is tested against a real protocol
    implementation, not a mock."""
    weed = WeedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield weed.start()
    finally:
        weed.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    """The one test bucket (name returned); tests keep apart by prefix (see s3_prefix)."""
    return s3_server.create_bucket(TEST_BUCKET)


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest, s3_bucket: str) -> str:
    """A fresh `s3://bulklabel-test/<test name>-<uuid8>` per test: SeaweedFS listings of deleted prefixes can
    linger, so tests never reuse (or clean and reuse) a prefix."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    return f"s3://{s3_bucket}/{name}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class StorageRoot:
    uri: str
    options: StorageOptions | None
    storage: Storage


@pytest.fixture(params=["local", "s3"], ids=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> StorageRoot:
    """An empty root on each backend, so one test checks that both behave alike. The S3 server is only requested
    (and started) by the s3 variant. The local root does not exist yet, like a fresh S3 prefix."""
    if request.param == "local":
        uri, options = str(tmp_path / "root"), None
    else:
        uri, options = request.getfixturevalue("s3_prefix"), request.getfixturevalue("s3_server").options()
    return StorageRoot(uri=uri, options=options, storage=open_storage(uri, options))


# ---------------------------------------------------------------------------------------- generated weights


@pytest.fixture(scope="session")
def torchvision_weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """weights(arch) → a generated torchvision-format `<arch>-<sha8>.pth` (tests.support.write_torchvision_weights),
    made once per session and shared: VGG-16's takes seconds to make and is 528 MB. Treat the file as read-only.
    Deleted at the end of the session."""
    from tests.support import write_torchvision_weights

    folder = tmp_path_factory.mktemp("torchvision-weights")
    made: dict[str, Path] = {}

    def weights(arch: str) -> Path:
        if arch not in made:
            made[arch] = write_torchvision_weights(arch, folder / arch)
        return made[arch]

    try:
        yield weights
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- Ray


def _project_importable_in_fresh_process() -> bool:
    """Whether a new interpreter (as a Ray worker is) can import the project without help: true when the project
    is installed (editable) or PYTHONPATH names it, because Ray's processes inherit this process's environment."""
    check = subprocess.run([sys.executable, "-c", "import workers.io.storage, schemas.specs"], cwd="/", env=os.environ,
                           capture_output=True)  # fmt: skip
    return check.returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster (2 CPUs) for the session; yields ray.init's context. Its temp dir is short because Ray
    puts unix sockets there (108-byte path limit). The dashboard stays on: without it the State API is missing
    and Ray Train logs errors in a loop."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="blr-", dir="/tmp")
    # RAY_AUTH_MODE=disabled: otherwise ray.init turns on token auth and writes a token to ~/.ray/auth_token.
    env_overrides = {"RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                     KEEP_ENV: os.environ.get(KEEP_ENV, KEEP_WORKERS_S)}  # fmt: skip
    saved = {key: os.environ.get(key) for key in env_overrides}
    os.environ.update(env_overrides)
    runtime_env = None
    if not _project_importable_in_fresh_process():
        pythonpath = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    started = time.monotonic()
    try:
        context = ray.init(
            address="local",  # always a fresh cluster: never join one named by RAY_ADDRESS or left by `ray start`
            num_cpus=2,
            include_dashboard=True,
            dashboard_port=_free_port(),  # not 8265: a user's cluster, or another test process's, may hold it
            _temp_dir=temp_dir,
            namespace="bulklabel-tests",
            log_to_driver=True,
            runtime_env=runtime_env,
        )
        log.info("Ray started in %.1f s (temp dir %s, runtime_env %s)", time.monotonic() - started, temp_dir,
                 runtime_env)  # fmt: skip
        yield context
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


# Label jobs this process runs keep their workers for the next test's job on the same model (jobs.label.warm): a
# worker process importing torch and loading a model is most of a small job's time on 2 cores.
KEEP_ENV, KEEP_WORKERS_S = "BULKLABEL_KEEP_WORKERS_S", "20"  # jobs.label.warm.KEEP_ENV (not imported: it loads Ray)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Release this process's kept label workers unless the next test runs jobs on the session cluster in this
    process: they hold the cluster's CPUs, which a subprocess driver, another cluster or a fine-tune would wait for."""
    yield
    if "jobs.label.warm" not in sys.modules:
        return
    names = getattr(nextitem, "fixturenames", ())
    if "ray_cluster" not in names or "ray_cluster_env" in names:
        sys.modules["jobs.label.warm"].release_kept("released between tests")


@pytest.fixture(autouse=True)
def _kept_workers_released_for_other_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver process this test starts on a Ray cluster (`bulklabel label`, `python -m jobs.cli run`) first gets
    the CPUs this process's kept workers hold: else its workers wait until they are released as idle."""
    popen_init = subprocess.Popen.__init__

    def init(self, *args, **kwargs):
        warm = sys.modules.get("jobs.label.warm")
        if warm is not None and "RAY_ADDRESS" in (kwargs.get("env") or os.environ):
            warm.release_kept("released for a driver process")
        popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)


@pytest.fixture
def ray_cluster_env(ray_cluster: Any) -> dict[str, str]:
    """The environment for a subprocess driver (`bulklabel label`, `python -m jobs.cli`) that joins the session's
    cluster through $RAY_ADDRESS instead of starting a private one: a private cluster costs seconds per command on
    2 cores. Only for tests that do not kill the cluster (killing a driver is fine: Ray ends its job's workers)."""
    return {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
