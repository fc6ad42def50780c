"""workers.label_worker, in-process: shards that overlap (the next one reads ahead) and CPU inference lanes give the
same rows as one shard at a time on one lane."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from schemas.shards import ShardTask
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.label_worker import LabelWorker, inference_lanes


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory) -> list[ShardTask]:
    """3 tar shards of 10 photos each."""
    folder = tmp_path_factory.mktemp("tars")
    files = [IMAGENET_SAMPLE / r["file"] for r in imagenet_labels()[:30]]
    shards = write_tar_shards(files, folder, per_shard=10)
    return [ShardTask(shard_id=p.stem, kind="tar", base_uri=str(folder), keys=(p.name,)) for p in shards]


def _worker(tar_shards: list[ShardTask], out: Path, torch_threads: int) -> LabelWorker:
    spec = LabelJobSpec(
        input={"uri": tar_shards[0].base_uri, "format": "tar"},
        output=str(out),
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "device": "cpu"},
        batch_size=4,
    )
    return LabelWorker(spec, "job", torch_threads)


def _rows(out: Path, shard: str) -> list[tuple]:
    table = pq.read_table(out / f"part-{shard}.parquet", columns=["key", "label_index", "topk_indices"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_inference_lanes_split_cpu_threads_and_keep_one_lane_on_gpu():
    assert inference_lanes(torch.device("cpu"), 2) == (2, 1)
    assert inference_lanes(torch.device("cpu"), 1) == (1, 1)
    assert inference_lanes(torch.device("cpu"), 16) == (4, 4)  # lanes capped: each holds a batch's activations
    assert inference_lanes(torch.device("cuda"), 8) == (1, 8)


@pytest.mark.timeout(300)
def test_overlapping_shards_on_two_lanes_match_one_at_a_time_on_one_lane(tar_shards, tmp_path, monkeypatch):
    one = _worker(tar_shards, tmp_path / "one", torch_threads=1)
    for task in tar_shards:
        one.label_shard_blocking(task, 1)
    one.close()

    two = _worker(tar_shards, tmp_path / "two", torch_threads=2)
    assert two.lanes == 2
    served: list[str] = []
    label_shard = two._label_shard

    def recording(task, attempt, turn):
        result = label_shard(task, attempt, turn)
        served.append(task.shard_id)
        return result

    monkeypatch.setattr(two, "_label_shard", recording)

    async def all_at_once():
        return await asyncio.gather(*(two.label_shard(task, 1) for task in tar_shards))

    results = asyncio.run(all_at_once())
    two.close()

    assert [r.rows for r in results] == [10, 10, 10]
    assert served == [t.shard_id for t in tar_shards]  # committed in arrival order
    for task in tar_shards:
        assert _rows(tmp_path / "two", task.shard_id) == _rows(tmp_path / "one", task.shard_id)


@pytest.mark.timeout(300)
def test_a_failing_shard_releases_its_turn_to_the_next(tar_shards, tmp_path, monkeypatch):
    worker = _worker(tar_shards, tmp_path / "out", torch_threads=1)
    missing = tar_shards[0].model_copy(update={"shard_id": "missing", "keys": ("no-such.tar",)})

    async def both():
        return await asyncio.gather(worker.label_shard(missing, 1), worker.label_shard(tar_shards[1], 1),
                                    return_exceptions=True)  # fmt: skip

    failed, done = asyncio.run(asyncio.wait_for(both(), timeout=120))
    worker.close()
    assert isinstance(failed, FileNotFoundError | OSError)
    assert done.rows == 10

