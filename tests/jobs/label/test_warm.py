"""Warm workers kept between jobs of one process (jobs/label/warm.py): the policy with stand-in actors, and two real
jobs on the session's cluster sharing one worker process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from jobs.label import warm
from jobs.label.dispatch import PrivateWorkers
from jobs.label.placement import Placement
from jobs.label.runner import LabelRun, run_label_job
from jobs.label.warm import KeptWorkers
from schemas.errors import BadInput
from schemas.shards import WorkerSpec
from schemas.specs import LabelJobSpec, ModelSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels
from workers.faults import ACK_ENV, ACK_VALUE, FAULTS_ENV

ONE = Placement(1, 2.0, 0.0, 2)
TWO = Placement(2, 1.0, 0.0, 1)
MOBILENET = WorkerSpec(model=ModelSpec(name="mobilenet_v2", weights="IMAGENET1K_V1"))
RESNET = WorkerSpec(model=ModelSpec(name="resnet18"))


class Actors:
    """Stand-in actors: numbers, made and killed in order."""

    def __init__(self):
        self.made: list[int] = []
        self.killed: list[int] = []

    def make(self, index: int) -> int:
        self.made.append(len(self.made))
        return self.made[-1]


@pytest.fixture
def actors(monkeypatch: pytest.MonkeyPatch):
    made = Actors()
    monkeypatch.setattr(warm, "_kill", made.killed.append)
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    yield made
    warm.release_kept()


def _job(actors: Actors, spec: WorkerSpec = MOBILENET, placement: Placement = ONE, keep_s: float = 60,
         workers: int = 1, clean: bool = True) -> list:  # fmt: skip
    """One job's use of its source: acquire, end (cleanly or not), release; the actors it had."""
    source = warm.workers_for(spec, placement, actors.make, keep_s)
    held = [source.acquire() for _ in range(workers)]
    if clean:
        source.ended_cleanly()
    source.release(held)
    return held


def test_off_by_default_and_faults_armed_do_not_stop_keeping(actors, monkeypatch):
    assert isinstance(warm.workers_for(MOBILENET, ONE, actors.make, 0), PrivateWorkers)
    # A faulted job's rules travel with its shards (ShardJob.faults), not in its workers' environment: a kept worker
    # serves it as a fresh one would, and one that a fault killed is replaced like any dead worker.
    monkeypatch.setenv(FAULTS_ENV, '[{"action": "slow", "seconds": 0.1}]')
    monkeypatch.setenv(ACK_ENV, ACK_VALUE)
    assert isinstance(warm.workers_for(MOBILENET, ONE, actors.make, 60), KeptWorkers)


def test_the_next_job_on_the_same_model_and_placement_takes_the_kept_workers(actors):
    first = _job(actors, workers=2, placement=TWO)
    assert warm.kept_count() == 2 and actors.killed == []
    second = _job(actors, workers=2, placement=TWO)
    assert sorted(second) == sorted(first) and actors.made == [0, 1]  # nothing new started
    third = _job(actors, workers=3, placement=TWO)  # one more than kept: two kept, one new
    assert sorted(third) == [0, 1, 2] and warm.kept_count() == 3


def test_workers_of_a_job_that_did_not_end_cleanly_are_killed_not_kept(actors):
    held = _job(actors, clean=False)
    assert warm.kept_count() == 0 and actors.killed == held


def test_a_job_on_another_model_or_placement_releases_the_kept_workers_first(actors):
    kept = _job(actors)
    _job(actors, spec=RESNET)
    assert actors.killed == kept and actors.made == [0, 1]
    resnet = warm.kept_workers()
    _job(actors, spec=RESNET, placement=TWO)  # the same model on another placement: other resources per worker
    assert actors.killed == kept + resnet and warm.kept_workers() == [2]


def test_kept_workers_are_released_after_their_idle_time_but_not_while_a_job_uses_them(actors):
    import time

    held = _job(actors, keep_s=0.2)
    time.sleep(0.6)
    assert warm.kept_count() == 0 and actors.killed == held
    source = warm.workers_for(MOBILENET, ONE, actors.make, 0.2)
    _job(actors, keep_s=0.2)
    busy = source.acquire()  # taken from the kept ones: its idle timer stops
    time.sleep(0.6)
    assert busy not in actors.killed


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_keep_setting_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(warm.KEEP_ENV, value)
    with pytest.raises(BadInput, match=r"^\$BULKLABEL_KEEP_WORKERS_S must be .*" + value):
        warm.keep_seconds_from_env()


def test_two_real_jobs_in_one_process_share_a_worker_process(ray_cluster, tmp_path: Path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in imagenet_labels()[:4]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    run = LabelRun(show_progress=False, keep_workers_s=60)
    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    for out in ("a", "b"):
        spec = LabelJobSpec(input={"uri": str(photos), "files_per_shard": 2}, output=str(tmp_path / out),
                            model=model, num_workers=1)  # fmt: skip
        assert run_label_job(spec, run=run).status == "succeeded"
        (worker,) = warm.kept_workers()
        described = ray.get(worker.describe.remote())
        assert described["models_loaded"] == 1
    assert described["jobs_served"] == 2 and described["shards_labelled"] == 4, described
    warm.release_kept()
    assert warm.kept_count() == 0
