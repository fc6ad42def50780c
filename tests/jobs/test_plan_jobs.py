"""Planning through whole label jobs on real photos: what the plan names is what gets labelled, no more, no less.

Each test is a row of docs/reliability.md's fault matrix (issue 9 cases 2, 3 and 8).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.label.plan import PlanError
from jobs.label.runner import run_label_job
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _photos(count: int) -> list[Path]:
    return [IMAGENET_SAMPLE / row["file"] for row in imagenet_labels()[:count]]


def _spec(input_: dict, out: Path) -> LabelJobSpec:
    return LabelJobSpec(
        input=input_,
        output=str(out),
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        num_workers=1,
        batch_size=4,
        top_k=1,
    )


def _rows(out: Path) -> list[dict]:
    return ds.dataset(out, format="parquet").to_table(columns=["key", "source", "shard", "error"]).to_pylist()


@pytest.mark.fault(
    fault="tar shards whose names are non-ASCII or differ only in punctuation",
    injected="4 tars of 4 photos named 中国.tar, 日本.tar, 'a b.tar', 'a_b.tar'",
    expected="4 distinct shard ids (readable prefix + hash of the full key), 16 rows; a repeated id is refused",
)
def test_tar_names_that_sanitise_alike_are_all_labelled(tmp_path, record_property):
    tars = write_tar_shards(_photos(16), tmp_path / "tars", per_shard=4)
    names = ["中国.tar", "日本.tar", "a b.tar", "a_b.tar"]
    for tar, name in zip(tars, names, strict=True):
        tar.rename(tar.with_name(name))
    summary = run_label_job(_spec({"uri": str(tmp_path / "tars")}, tmp_path / "out"), show_progress=False)
    rows = _rows(tmp_path / "out")
    shards = {row["shard"] for row in rows}
    assert len(rows) == 16 and len({(r["source"], r["key"]) for r in rows}) == 16
    assert len(shards) == 4 and summary.shards == 4
    assert {Path(r["source"]).name for r in rows} == set(names)
    record_property("measured", f"{len(rows)} rows of 16 in {len(shards)} shards ({', '.join(sorted(shards))})")


@pytest.mark.fault(
    fault="loose files named like camera files or in hidden/underscore folders",
    injected="_DSC0001.JPG, _archive/x.jpg, .thumbs/y.jpg, plain.jpg, notes.txt; exclude=['.thumbs']",
    expected="every image labelled but the excluded one; the excluded and the non-image are counted in the summary",
)
def test_camera_names_are_labelled_and_exclusions_counted(tmp_path, record_property):
    photos = tmp_path / "photos"
    sources = _photos(4)
    names = ["_DSC0001.JPG", "_archive/x.jpg", ".thumbs/y.jpg", "plain.jpg"]
    for source, name in zip(sources, names, strict=True):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, photos / name)
    (photos / "notes.txt").write_text("not a photo")
    spec = _spec({"uri": str(photos), "exclude": [".thumbs"], "files_per_shard": 2}, tmp_path / "out")
    summary = run_label_job(spec, show_progress=False)
    rows = _rows(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ["_DSC0001.JPG", "_archive/x.jpg", "plain.jpg"]
    assert all(r["error"] is None for r in rows)
    skipped = getattr(summary, "skipped", None)  # the summary's count of skipped keys
    if skipped is not None:
        assert (skipped.excluded, skipped.not_images) == (1, 1)
        assert set(skipped.examples) == {".thumbs/y.jpg", "notes.txt"}
    record_property("measured", f"{len(rows)} of 3 non-excluded images labelled; summary skipped: {skipped}")


@pytest.mark.fault(
    fault="a manifest naming files outside its folder (/etc/passwd, a photo elsewhere, another bucket)",
    injected="CSV manifest with a good key plus /etc/passwd, ../elsewhere/p.jpg and s3://another-bucket/x.jpg",
    expected="refused before any worker starts (exit 2, names line and count, suggests allowed_roots); with the "
    "photo's folder in allowed_roots it is labelled",
)
def test_manifest_outside_its_folder_is_refused_before_start(tmp_path, record_property):
    inside, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    inside.mkdir()
    elsewhere.mkdir()
    good, outside = _photos(2)
    shutil.copy(good, inside / "ok.jpg")
    shutil.copy(outside, elsewhere / "p.jpg")
    manifest = inside / "m.csv"
    manifest.write_text(
        f"key\nok.jpg\n/etc/passwd\n{elsewhere / 'p.jpg'}\n../elsewhere/p.jpg\ns3://another-bucket/x.jpg\n"
    )
    started = time.perf_counter()
    with pytest.raises(PlanError, match=r"4 key\(s\) lie outside .*first: line 3: '/etc/passwd'.*allowed_roots"):
        run_label_job(_spec({"uri": str(manifest)}, tmp_path / "out"), show_progress=False)
    refused_s = time.perf_counter() - started
    written = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())  # of a missing folder: []
    assert set(written) <= {"_owner.json"}  # nothing but, at most, the claim on the output

    manifest.write_text(f"key\nok.jpg\n{elsewhere / 'p.jpg'}\n")
    allowed = _spec({"uri": str(manifest), "allowed_roots": [str(elsewhere)]}, tmp_path / "out2")
    run_label_job(allowed, show_progress=False)
    rows = _rows(tmp_path / "out2")
    assert sorted(r["key"] for r in rows) == sorted(["ok.jpg", str(elsewhere / "p.jpg")])
    assert all(r["error"] is None for r in rows)
    record_property("measured", f"refused in {refused_s:.1f}s, files written: {written}; allowed: {len(rows)} rows "
                                "of 2, no errors")  # fmt: skip
