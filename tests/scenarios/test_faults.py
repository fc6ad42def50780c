"""What a label job survives: each fault is injected for real and rows are counted against the input.

Every test here carries a `fault` marker; docs/reliability.md is generated from these tests by
`python -m tests.fault_matrix`, so the published matrix cannot drift from what is tested.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.label.plan import files_shard_id
from jobs.label.runner import JobFailed, run_label_job
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, assert_exactly_once, imagenet_labels
from workers import faults

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


@pytest.fixture
def photos(tmp_path) -> Path:
    """40 real photos as loose files."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for row in imagenet_labels()[:40]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])
    return folder


def _spec(photos: Path, out: Path, **overrides) -> LabelJobSpec:
    fields = {
        "input": {"uri": str(photos), "files_per_shard": 2},
        "output": str(out),
        "model": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        "num_workers": 2,
        "batch_size": 4,
        "top_k": 3,
    }
    return LabelJobSpec(**{**fields, **overrides})


def _shard(photos: Path, index: int, per_shard: int = 2) -> str:
    """The id planning gives the `index`-th shard of `photos` (shards follow key order; ids derive from first keys)."""
    return files_shard_id(sorted(p.name for p in photos.iterdir())[index * per_shard])


def _inject(monkeypatch, *rules: dict) -> None:
    monkeypatch.setenv(faults.FAULTS_ENV, json.dumps(list(rules)))
    monkeypatch.setenv(faults.ACK_ENV, faults.ACK_VALUE)


@pytest.mark.fault(
    fault="worker actor killed mid-shard, 5 times in a 20-shard job",
    injected="BULKLABEL_FAULTS exit (os._exit) after the first row of 5 shards",
    expected="dead workers replaced, their shards retried; rows in = rows out",
)
def test_worker_killed_five_times(photos, tmp_path, monkeypatch, record_property):
    victims = [_shard(photos, i) for i in (2, 5, 9, 13, 17)]
    _inject(monkeypatch, *({"shard": s, "attempt": 1, "after_rows": 1, "action": "exit"} for s in victims))
    summary = run_label_job(_spec(photos, tmp_path / "out", batch_size=1), show_progress=False)
    rows = assert_exactly_once(tmp_path / "out", photos)
    # At least the 5 injected deaths; Ray's memory monitor may kill a worker too on a loaded machine.
    assert (summary.status, summary.shards) == ("succeeded", 20) and summary.worker_restarts >= 5
    record_property("measured", f"20/20 shards, {rows}/40 rows, {summary.worker_restarts} workers replaced, "
                                f"{summary.seconds:.0f}s")  # fmt: skip


@pytest.mark.fault(
    fault="worker hangs inside a shard",
    injected="BULKLABEL_FAULTS hang on one shard's first attempt; shard_timeout_s=15",
    expected="worker killed and replaced after the timeout; shard retried; rows in = rows out",
)
def test_hanging_worker_is_replaced_after_timeout(photos, tmp_path, monkeypatch, record_property):
    _inject(monkeypatch, {"shard": _shard(photos, 4), "attempt": 1, "action": "hang"})
    summary = run_label_job(_spec(photos, tmp_path / "out", shard_timeout_s=15), show_progress=False)
    rows = assert_exactly_once(tmp_path / "out", photos)
    assert (summary.status, summary.worker_restarts) == ("succeeded", 1)
    record_property("measured", f"{rows}/40 rows, 1 worker replaced, {summary.seconds:.0f}s")


@pytest.mark.fault(
    fault="a shard that fails every time, max_failed_shards=0",
    injected="BULKLABEL_FAULTS raise on every attempt of one shard",
    expected="job fails naming the shard and error; every other shard committed; no manifest",
)
def test_shard_failing_every_time_fails_the_job(photos, tmp_path, monkeypatch, record_property):
    victim = _shard(photos, 7)
    _inject(monkeypatch, {"shard": victim, "action": "raise"})
    with pytest.raises(JobFailed) as info:
        run_label_job(_spec(photos, tmp_path / "out", max_attempts=2), show_progress=False)
    assert info.value.summary.failed_shards.keys() == {victim}
    assert victim in str(info.value) and "injected failure" in str(info.value)
    out = tmp_path / "out"
    assert len(list(out.glob("data/part-*.parquet"))) == 19 and not (out / "_job.json").exists()
    record_property("measured", "status failed, 19/20 shards committed, failed shard named with its error")


@pytest.mark.fault(
    fault="a shard that fails every time, max_failed_shards=1",
    injected="BULKLABEL_FAULTS raise on every attempt of one shard",
    expected="job ends partial; manifest lists the failed shard and its error; others committed",
)
def test_shard_failing_every_time_gives_partial_when_allowed(photos, tmp_path, monkeypatch, record_property):
    _inject(monkeypatch, {"shard": _shard(photos, 7), "action": "raise"})
    summary = run_label_job(_spec(photos, tmp_path / "out", max_attempts=2, max_failed_shards=1), show_progress=False)
    manifest = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert (summary.status, manifest["status"], manifest["totals"]["rows"]) == ("partial", "partial", 38)
    assert [f["shard"] for f in manifest["failed_shards"]] == [_shard(photos, 7)]
    record_property("measured", "status partial, 19/20 shards, 38/40 rows, failure listed in _job.json")


@pytest.mark.fault(
    fault="out of memory in a batch",
    injected="BULKLABEL_FAULTS oom for batches larger than 1 image",
    expected="batches split in halves down to the size that fits; same labels as without the fault",
)
def test_out_of_memory_batches_are_split(photos, tmp_path, monkeypatch, record_property):
    spec = _spec(photos, tmp_path / "plain", batch_size=8, input={"uri": str(photos), "files_per_shard": 20})
    run_label_job(spec, show_progress=False)
    _inject(monkeypatch, {"action": "oom", "oom_above": 1})
    oom_spec = spec.model_copy(update={"output": str(tmp_path / "oom")})
    summary = run_label_job(oom_spec, show_progress=False)
    assert summary.status == "succeeded"
    assert_exactly_once(tmp_path / "oom", photos)

    def labels(out: Path) -> dict:
        table = ds.dataset(out, format="parquet").to_table(columns=["key", "label"])
        return dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist(), strict=True))

    assert labels(tmp_path / "oom") == labels(tmp_path / "plain")
    record_property("measured", "40/40 rows, labels identical to the run without the fault")


@pytest.mark.fault(
    fault="out of memory on CPU in a batch (torch raises a RuntimeError there, not torch.OutOfMemoryError)",
    injected="BULKLABEL_FAULTS oom with oom_kind=cpu: torch's DefaultCPUAllocator error for batches larger than 2",
    expected="recognised as out-of-memory and the batches split in halves; same labels as without the fault",
)
def test_cpu_out_of_memory_batches_are_split(tmp_path, monkeypatch, record_property):
    photos = tmp_path / "eight"
    photos.mkdir()
    for row in imagenet_labels()[:8]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    spec = _spec(photos, tmp_path / "plain", num_workers=1, batch_size=8,
                 input={"uri": str(photos), "files_per_shard": 8})  # fmt: skip
    run_label_job(spec, show_progress=False)
    _inject(monkeypatch, {"action": "oom", "oom_above": 2, "oom_kind": "cpu"})
    summary = run_label_job(spec.model_copy(update={"output": str(tmp_path / "oom")}), show_progress=False)
    assert (summary.status, summary.errors, summary.worker_restarts) == ("succeeded", 0, 0)
    assert_exactly_once(tmp_path / "oom", photos)

    def labels(out: Path) -> dict:
        table = ds.dataset(out, format="parquet").to_table(columns=["key", "label"])
        return dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist(), strict=True))

    assert labels(tmp_path / "oom") == labels(tmp_path / "plain")
    record_property("measured", "8/8 rows, batch of 8 split to 2s, no shard retried, labels identical to the run "
                                "without the fault")  # fmt: skip


def test_faults_stay_off_without_the_acknowledgement(monkeypatch):
    monkeypatch.setenv(faults.FAULTS_ENV, json.dumps([{"action": "exit"}]))
    monkeypatch.delenv(faults.ACK_ENV, raising=False)
    faults.active_rules.cache_clear()
    try:
        assert faults.forwarded_environment() == {} and faults.active_rules() == ()
        faults.inject("files-000000", 1, 10)  # would exit the test process if it were on
    finally:
        faults.active_rules.cache_clear()


def test_driver_waits_for_nothing_when_job_is_done(photos, tmp_path):
    """Re-running a finished job writes nothing: not a file is touched."""
    spec = _spec(photos, tmp_path / "out", num_workers=1, input={"uri": str(photos), "files_per_shard": 40})
    run_label_job(spec, show_progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    time.sleep(0.01)
    assert run_label_job(spec, show_progress=False).status == Outcome.ALREADY_COMPLETE
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before


__all__ = ["assert_exactly_once", "threading"]
