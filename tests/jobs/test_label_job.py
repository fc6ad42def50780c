"""End-to-end label jobs on a real local Ray cluster, against local folders and a real S3 server."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray

from jobs.label.runner import run_label_job
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels, webdataset_key, write_tar_shards
from workers.io.storage import join, open_storage

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def imagenet_tars_s3(s3_server, s3_bucket, tmp_path_factory) -> str:
    """The 200 ImageNet sample photos as 8 WebDataset tar shards on the S3 server."""
    rows = imagenet_labels()
    local = tmp_path_factory.mktemp("tars")
    shards = write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows], local, per_shard=25)
    prefix = f"s3://{s3_bucket}/imagenet-tars-{time.time_ns()}"
    storage = open_storage(prefix, s3_server.options())
    for shard in shards:
        storage.upload_file(str(shard), join(prefix, shard.name))
    return prefix


def test_tar_shards_on_s3_two_workers_label_every_photo(imagenet_tars_s3, s3_server, s3_prefix):
    spec = LabelJobSpec(
        input={"uri": imagenet_tars_s3},
        output=s3_prefix,
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        storage=s3_server.options(),
        num_workers=2,
    )
    summary = run_label_job(spec, show_progress=False)
    assert (summary.status, summary.images, summary.errors, summary.shards) == ("succeeded", 200, 0, 8)

    labels = _read_s3_output(s3_server, s3_prefix)
    truth = {webdataset_key(r["file"]): int(r["class_index"]) for r in imagenet_labels()}
    counted = duckdb.sql("SELECT count(*), count(DISTINCT key), count(error) FROM labels").fetchall()[0]
    assert counted == (200, 200, 0)
    hits = duckdb.sql("SELECT key, label_index FROM labels").fetchall()
    accuracy = sum(truth[key] == index for key, index in hits) / len(truth)
    print(f"MobileNetV2 IMAGENET1K_V1 top-1 on imagenet-sample: {accuracy:.3f}")
    assert accuracy >= 0.65
    assert set(labels.column("source").to_pylist()) == {join(imagenet_tars_s3, f"{i:05d}.tar") for i in range(8)}
    assert {len(e) for e in labels.column("embedding").to_pylist()} == {1280}


def _read_s3_output(s3_server, prefix: str):
    """The output's Parquet files through pyarrow's S3 filesystem (DuckDB's httpfs cannot be installed offline)."""
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"),
        scheme="http",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region="us-east-1",
    )
    path = prefix.removeprefix("s3://")
    files = [f.path for f in s3.get_file_info(fs.FileSelector(path, recursive=True)) if f.path.endswith(".parquet")]
    return ds.dataset(files, filesystem=s3, format="parquet").to_table()


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """60 ImageNet photos as loose files (names with spaces and apostrophes kept)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for row in imagenet_labels()[:60]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])
    return folder


def _files_spec(photo_folder: Path, output: Path, **overrides) -> LabelJobSpec:
    fields = {
        "input": {"uri": str(photo_folder), "files_per_shard": 5},
        "output": str(output),
        "model": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        "num_workers": 2,
        "batch_size": 8,
    }
    return LabelJobSpec(**{**fields, **overrides})


def _rows(output: Path) -> list[dict]:
    return ds.dataset(output, format="parquet").to_table(columns=["key", "shard", "label"]).to_pylist()


def test_killing_a_worker_mid_job_loses_and_duplicates_nothing(photo_folder, tmp_path):
    spec = _files_spec(photo_folder, tmp_path / "out")
    job_id = spec.model_copy(update={"output": str(tmp_path / "out")}).resolved_job_id()
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_label_job(spec, show_progress=False)))
    runner.start()
    markers = tmp_path / "out" / "_done"
    deadline = time.monotonic() + 120
    while len(list(markers.glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.kill(ray.get_actor(f"bulklabel-{job_id}-0"), no_restart=True)
    runner.join(timeout=300)
    assert (outcome["summary"].status, outcome["summary"].worker_restarts) == ("succeeded", 1)

    again = run_label_job(spec, show_progress=False)
    assert again.status == Outcome.ALREADY_COMPLETE
    rows = _rows(tmp_path / "out")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 60
    assert set(keys) == {p.name for p in photo_folder.iterdir()}


@pytest.mark.usefixtures("cpu_compile_pays")  # the decision is the driver's, in this process
def test_rerun_of_half_done_job_labels_only_missing_shards(photo_folder, tmp_path):
    out = tmp_path / "out"
    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "compile": "auto"}  # decided per run, on what is left
    spec = _files_spec(photo_folder, out, num_workers=1, input={"uri": str(photo_folder), "files_per_shard": 20},
                       model=model)  # fmt: skip
    first = run_label_job(spec, show_progress=False)
    assert (first.shards, first.images) == (3, 60)
    assert "  compile: auto → eager (job too small: 60 images on 1 CPU worker" in "\n".join(first.lines())
    manifest = json.loads((out / "_job.json").read_text())["model"]
    assert (manifest["compiled"], manifest["compile_decision"]) == (False, first.compile)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("data/*.parquet")}
    # Undo the commit of one shard and of the job, as if the driver had died before them.
    middle = sorted((out / "_done").glob("*.json"))[1].stem
    (out / "_job.json").unlink()
    (out / "_done" / f"{middle}.json").unlink()
    (out / "data" / f"part-{middle}.parquet").unlink()

    second = run_label_job(spec, show_progress=False)
    assert (second.status, second.shards, second.shards_skipped, second.images_this_run) == ("succeeded", 3, 2, 20)
    assert second.compile.startswith("compile: auto → eager (job too small: 20 images on 1 CPU worker")
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("data/*.parquet")}
    assert {name for name in after if after[name] != before.get(name)} == {f"part-{middle}.parquet"}
    assert len({r["key"] for r in _rows(out)}) == len(_rows(out)) == 60


@pytest.mark.parametrize(("arch", "width"), [("resnet50", 2048), ("vgg16", 4096), ("efficientnet_b0", 1280)])
def test_torchvision_format_weight_files_label_with_right_embedding_width(arch, width, photo_folder, tmp_path,
                                                                         torchvision_weights):  # fmt: skip
    weights = torchvision_weights(arch)  # the session's file, which tests/workers/test_models.py builds too
    spec = LabelJobSpec(
        input={"uri": str(photo_folder), "format": "files"},
        output=str(tmp_path / "out"),
        model={"name": arch, "weights": str(weights)},
        num_workers=1,
        batch_size=4,
        top_k=3,
    )
    for extra in list(photo_folder.iterdir())[4:]:
        extra.unlink()  # four photos are enough to check the path; VGG-16 runs at ~4 images/s here
    summary = run_label_job(spec, show_progress=False)
    assert (summary.status, summary.images, summary.errors) == ("succeeded", 4, 0)
    table = pq.read_table(next((tmp_path / "out").glob("data/*.parquet")))
    assert {len(e) for e in table.column("embedding").to_pylist()} == {width}
    assert set(table.column("model").to_pylist()) == {f"{arch}:{weights.name}"}
    assert {len(t) for t in table.column("topk_labels").to_pylist()} == {3}
