"""jobs.offline_weights: torch's weights cache found without importing torch, where torch itself looks."""

from __future__ import annotations

import subprocess
import sys

ENVS = [{}, {"XDG_CACHE_HOME": "/var/cache/x"}, {"TORCH_HOME": "~/models/torch", "XDG_CACHE_HOME": "/var/cache/x"}]


def test_the_cache_is_where_torch_looks_and_torch_stays_unloaded(tmp_path):
    # One process (torch's import takes seconds): our answers first, torch's after it is imported, per environment.
    code = f"""
import os, sys
from jobs.offline_weights import hub_dir
def each(find):
    answers = []
    for env in {ENVS!r}:
        for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
            os.environ.pop(name, None)
        os.environ.update(env)
        answers.append(str(find()))
    return answers
ours = each(hub_dir)
assert "torch" not in sys.modules, "torch imported"
import torch.hub
theirs = each(torch.hub.get_dir)
assert ours == theirs, (ours, theirs)
"""
    done = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
