"""Racing publishers for the artifact-version tests, each run in a spawned process. This module imports no torch,
torchvision or Ray (a spawned child imports the module of its target): a child starts in well under a second
instead of the seconds a test module's imports take on 2 cores."""

from __future__ import annotations

import logging
from pathlib import Path

from schemas.finetune import FinetuneJobSpec, TrainingState
from workers.finetune.artifacts import publish
from workers.finetune.dataplan import DataPlan
from workers.io.storage import open_storage


class ListTogether:
    """A racer's storage whose first listing returns only once every racer has listed (a cross-process barrier)."""

    def __init__(self, storage, listed):
        self._storage, self._listed, self._waited = storage, listed, False

    def list(self, prefix: str):
        found = list(self._storage.list(prefix))
        if not self._waited:
            self._waited = True
            self._listed.wait(timeout=120)  # a threading or a multiprocessing barrier
        return iter(found)

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


def publish_when_released(spec: FinetuneJobSpec, plan: DataPlan, weights: Path, state: TrainingState, start,
                          listed=None, log_file: Path | None = None) -> None:  # fmt: skip
    """Publish `spec`'s run once `start` releases every racer; with `listed`, each racer first lists the versions
    and waits until all have (the interleaving that gave two runs the same version, made certain)."""
    if log_file is not None:
        logging.basicConfig(filename=log_file, level=logging.INFO)
    storage = open_storage(spec.output, spec.storage)
    if listed is not None:
        storage = ListTogether(storage, listed)
    start.wait(timeout=120)
    publish(storage, spec, spec.resolved_job_id(), plan, weights, state)
