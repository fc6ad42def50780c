"""workers.label.label_worker, in-process: shards that overlap (the next one reads ahead, and enters the lanes while
this
one finishes and commits) and CPU inference lanes give the same rows as one shard at a time on one lane."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from schemas.shards import ShardJob, ShardTask, WorkerSpec
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.io.writer import ShardWriter
from workers.label.label_worker import LabelWorker, inference_lanes


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory) -> list[ShardTask]:
    """3 tar shards of 10 photos each."""
    folder = tmp_path_factory.mktemp("tars")
    files = [IMAGENET_SAMPLE / r["file"] for r in imagenet_labels()[:30]]
    shards = write_tar_shards(files, folder, per_shard=10)
    return [ShardTask(shard_id=p.stem, kind="tar", base_uri=str(folder), keys=(p.name,)) for p in shards]


def _worker(tar_shards: list[ShardTask], out: Path, torch_threads: int) -> tuple[LabelWorker, ShardJob]:
    spec = LabelJobSpec(
        input={"uri": tar_shards[0].base_uri, "format": "tar"},
        output=str(out),
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "device": "cpu"},
        batch_size=4,
    )
    return LabelWorker(WorkerSpec.of(spec), torch_threads), ShardJob.of(spec, "job")


def _rows(out: Path, shard: str) -> list[tuple]:
    table = pq.read_table(out / "data" / f"part-{shard}.parquet", columns=["key", "label_index", "topk_indices"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_inference_lanes_split_cpu_threads_and_keep_one_lane_on_gpu():
    assert inference_lanes(torch.device("cpu"), 2) == (2, 1)
    assert inference_lanes(torch.device("cpu"), 1) == (1, 1)
    assert inference_lanes(torch.device("cpu"), 16) == (4, 4)  # lanes capped: each holds a batch's activations
    assert inference_lanes(torch.device("cuda"), 8) == (1, 8)


@pytest.mark.timeout(300)
def test_overlapping_shards_on_two_lanes_match_one_at_a_time_on_one_lane(tar_shards, tmp_path, monkeypatch):
    one, job_one = _worker(tar_shards, tmp_path / "one", torch_threads=1)
    for task in tar_shards:
        one.label_shard_blocking(task, 1, job_one)
    one.close()

    two, job_two = _worker(tar_shards, tmp_path / "two", torch_threads=2)
    assert two.lanes == 2

    async def all_at_once():
        return await asyncio.gather(*(two.label_shard(task, 1, job_two) for task in tar_shards))

    results = asyncio.run(all_at_once())
    two.close()

    assert [r.rows for r in results] == [10, 10, 10]
    for task in tar_shards:
        assert _rows(tmp_path / "two", task.shard_id) == _rows(tmp_path / "one", task.shard_id)


@pytest.mark.timeout(300)
def test_the_next_shard_enters_the_lanes_before_this_one_commits(tar_shards, tmp_path, monkeypatch):
    worker, job = _worker(tar_shards, tmp_path / "out", torch_threads=2)
    first, second = tar_shards[:2]
    second_predicting = threading.Event()
    predict = worker._predict

    def watching(predictor, pixels, point, rows):
        if point.shard == second.shard_id:
            second_predicting.set()
        return predict(predictor, pixels, point, rows)

    commit = ShardWriter.commit
    overlapped = []

    def commit_once_the_next_shard_predicts(self, *args, **kwargs):
        if self.task.shard_id == first.shard_id:  # a worker that held its turn until here would never see it
            overlapped.append(second_predicting.wait(timeout=60))
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(worker, "_predict", watching)
    monkeypatch.setattr(ShardWriter, "commit", commit_once_the_next_shard_predicts)

    async def both():
        return await asyncio.gather(worker.label_shard(first, 1, job), worker.label_shard(second, 1, job))

    results = asyncio.run(both())
    worker.close()
    assert overlapped == [True]
    assert [r.rows for r in results] == [10, 10]


@pytest.mark.timeout(300)
def test_a_failing_shard_releases_its_turn_to_the_next(tar_shards, tmp_path, monkeypatch):
    worker, job = _worker(tar_shards, tmp_path / "out", torch_threads=1)
    missing = tar_shards[0].model_copy(update={"shard_id": "missing", "keys": ("no-such.tar",)})

    async def both():
        return await asyncio.gather(worker.label_shard(missing, 1, job), worker.label_shard(tar_shards[1], 1, job),
                                    return_exceptions=True)  # fmt: skip

    failed, done = asyncio.run(asyncio.wait_for(both(), timeout=120))
    worker.close()
    assert isinstance(failed, FileNotFoundError | OSError)
    assert done.rows == 10
