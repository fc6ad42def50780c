"""workers/__init__.py: every process that imports worker code gets OpenMP's passive wait policy before torch loads
(bench/omp_wait.py measures why), and keeps a policy the user set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

# What a label worker's process does first: Ray imports the actor's module, which imports torch through it.
PROBE = (
    "import sys, os; import workers.label.label_worker; "
    "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_a_worker_process_has_the_wait_policy_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    # torch is loaded by then (the label worker's module imports it), after the package set the variable
    assert done.stdout.split() == [expected, "True"]


def test_the_package_sets_it_before_any_torch_import():
    """The package's own module imports nothing heavy: no torch before the variable is set."""
    probe = "import sys; import workers; print('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "False"
