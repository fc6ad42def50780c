"""Whole label jobs on inputs as real producers write them: gzip shards from the `webdataset` library named by a
brace pattern, with samples of several images; img2dataset's parquet and files layouts (see tests/producers.py);
per-stage timings in the done-markers and the summary."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.label.runner import run_label_job
from jobs.progress import JobSummary
from schemas.layout import markers_prefix
from schemas.shards import ShardResult
from schemas.specs import LabelJobSpec
from tests.producers import png_bytes, write_hugging_face_parquet, write_img2dataset, write_webdataset_shards
from tests.support import IMAGENET_SAMPLE, imagenet_labels

pytestmark = pytest.mark.usefixtures("ray_cluster")
TENCH = IMAGENET_SAMPLE / "n01440764_tench.JPEG"
ROBIN = IMAGENET_SAMPLE / "n01558993_robin.JPEG"


def _run(tmp_path, embeddings: bool = False, **input_fields) -> tuple[dict[str, dict], JobSummary]:
    spec = LabelJobSpec(
        input=input_fields,
        output=str(tmp_path / "out"),
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        num_workers=1,
        batch_size=4,
        embeddings=embeddings,
    )
    summary = run_label_job(spec, show_progress=False)
    assert summary.status == "succeeded"
    return {r["key"]: r for r in ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()}, summary


def test_webdataset_gzip_shards_by_brace_pattern_with_several_images_per_sample(tmp_path):
    samples = [
        {"__key__": f"s{i}", "jpg": (TENCH if i % 2 else ROBIN).read_bytes(), "seg.png": png_bytes((i, i, i))}
        for i in range(6)
    ]
    write_webdataset_shards(str(tmp_path / "in" / "train-%04d.tar.gz"), samples, per_shard=2)  # 3 shards

    rows, summary = _run(tmp_path, uri=str(tmp_path / "in" / "train-{0000..0001}.tar.gz"), image_field="jpg;png")

    assert sorted(rows) == ["s0", "s1", "s2", "s3"]  # the pattern names two of the three shards
    assert all(r["error"] is None for r in rows.values())
    assert [rows[k]["label"] for k in ("s1", "s3")] == ["tench", "tench"]
    assert [rows[k]["label"] for k in ("s0", "s2")] == ["robin", "robin"]

    # Per-stage timings: in each done-marker, and summed in the job summary.
    markers = [
        ShardResult.model_validate_json(p.read_bytes())
        for p in Path(markers_prefix(str(tmp_path / "out"))).glob("*.json")
    ]
    assert len(markers) == 2 and all(m.stages is not None for m in markers)
    for m in markers:
        assert m.stages.decode > 0 and m.stages.infer > 0 and m.stages.write > 0 and m.stages.read > 0
        assert m.stages.infer < 60
    assert summary.stages.infer == pytest.approx(sum(m.stages.infer for m in markers), abs=0.01)
    assert any(line.startswith("  stages:   read ") and "infer" in line for line in summary.lines())


@pytest.mark.parametrize("layout", ["parquet", "files"])
def test_img2dataset_layouts_label_under_img2datasets_keys(tmp_path, layout):
    photos = [TENCH.read_bytes(), ROBIN.read_bytes(), TENCH.read_bytes()]
    keys = write_img2dataset(tmp_path / "in", photos, layout, per_shard=2)
    fields = (
        {"format": "parquet", "key_column": "key"}
        if layout == "parquet"
        else {"row_key": "name", "extensions": ["jpg"]}
    )

    rows, _ = _run(tmp_path, uri=str(tmp_path / "in"), **fields)

    assert sorted(rows) == keys == ["000000000", "000000001", "000010000"]
    assert [rows[k]["label"] for k in keys] == ["tench", "robin", "tench"]


@pytest.mark.fault(
    fault="Hugging Face's Parquet layout, every split's file named 0000.parquet (`default/train/0000.parquet`, "
    "`default/test/0000.parquet`), labelled with format: parquet",
    injected="4 photos in the train split, 4 others in the test split, no key column",
    expected="8 rows under 8 keys (`default/train/0000.parquet#0`, ...), each with its split's class; `similar` "
    "finds each by its own key",
)
def test_hugging_face_splits_of_one_file_name_keep_their_rows_apart(tmp_path, record_property):
    from jobs.output.query import similar

    rows = imagenet_labels()[:8]
    photos = [(IMAGENET_SAMPLE / r["file"]).read_bytes() for r in rows]
    splits = {
        "train": [(p, i % 2) for i, p in enumerate(photos[:4])],
        "test": [(p, i % 2) for i, p in enumerate(photos[4:])],
    }
    write_hugging_face_parquet(tmp_path / "in", splits, ["even", "odd"])

    out, _ = _run(tmp_path, embeddings=True, uri=str(tmp_path / "in"), format="parquet")

    keys = [f"default/{split}/0000.parquet#{i}" for split in ("test", "train") for i in range(4)]
    assert sorted(out) == keys
    assert [out[k]["given_label"] for k in keys] == ["even", "odd"] * 4
    assert all(out[k]["error"] is None for k in keys)
    assert {out[k]["source"] for k in keys} == {str(tmp_path / "in/default/test/0000.parquet"),
                                                str(tmp_path / "in/default/train/0000.parquet")}  # fmt: skip
    test_photo = f"default/test/0000.parquet#{1}"
    neighbours = similar(str(tmp_path / "out"), test_photo, k=2, use_index="never")
    assert neighbours[0].key == test_photo and neighbours[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert neighbours[0].label == out[test_photo]["label"]
    record_property("measured", f"{len(out)} rows under {len(set(out))} distinct keys for 8 images; `similar` "
                    f"found {test_photo} first (cosine {neighbours[0].similarity:.4f})")  # fmt: skip
