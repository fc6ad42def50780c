"""A local Ray cluster for the bench, started once, before anything is timed."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """ray.init on this machine with `num_cpus` CPUs and a short private temp dir (Ray's unix sockets need one)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="blb-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token
    if not _importable_without_help():
        # Ray's processes inherit this environment; a job-level runtime_env would work too but slows worker start.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, _temp_dir=temp_dir,
             namespace="bulklabel-bench", log_to_driver=True, configure_logging=False)  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _importable_without_help() -> bool:
    check = subprocess.run([sys.executable, "-c", "import workers.io.storage, schemas.specs, bench"], cwd="/",
                           env=os.environ, capture_output=True)  # fmt: skip
    return check.returncode == 0
