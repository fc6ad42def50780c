"""The driver side stays light: the CLI, the job service and a label job's runner import neither torch nor
torchvision (which would cost ~900 MB and seconds in a process that only plans and dispatches)."""

from __future__ import annotations

import subprocess
import sys

import pytest

DRIVER_MODULES = ("jobs.cli", "jobs.kinds", "jobs.service.service", "jobs.service.core", "jobs.service.actor",
                  "jobs.service.client", "jobs.service.runs", "jobs.label.runner", "jobs.finetune")  # fmt: skip


@pytest.mark.parametrize("module", DRIVER_MODULES)
def test_driver_modules_leave_torch_out(module):
    script = (f"import sys, {module}; heavy = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
              "sys.exit(f'imported {heavy}' if heavy else 0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:] or done.stdout


def test_the_python_api_is_importable_from_jobs_without_torch():
    script = ("import sys; from jobs import submit, list_jobs, job_status, wait, cancel, resume, logs; "
              "sys.exit('torch' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", script]).returncode == 0
