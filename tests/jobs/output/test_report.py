"""`bulklabel report` on real label jobs' outputs (MobileNetV2 on real photos, a corrupt file and hostile file names
among them), rendered in headless Chromium: what the page shows, thumbnails decoded, nothing from the data run as
code; and on S3, tar shards in and out."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from jobs.cli import main
from jobs.output.reader import open_output
from jobs.output.report import THUMB_LABELS, THUMBS_PER_LABEL
from jobs.output.report_page import CSP, write_report
from tests.conftest import PROJECT_ROOT
from tests.pages import PROBE, Dom, render, screenshot_kept
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.io.storage import join, open_storage

# Names that would run script (or add elements) if the page put them in unescaped: '/' cannot be in a file name.
HOSTILE = ["<img src=x onerror=window.__pwned=1>.jpg", "\"'><svg onload=window.__pwned=2>.jpg"]
PHOTOS = 8
REPEATS = 3  # the first photo also under three more names: one label with 4 images


def _photo_folder(folder: Path) -> Path:
    files = [IMAGENET_SAMPLE / row["file"] for row in imagenet_labels()[:PHOTOS]]
    folder.mkdir(parents=True)
    for file in files:
        shutil.copy(file, folder / file.name)
    for i in range(REPEATS):
        shutil.copy(files[0], folder / f"again-{i}.jpg")
    shutil.copy(files[1], folder / HOSTILE[0])
    shutil.copy(files[2], folder / HOSTILE[1])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG at all" * 20)
    return folder


def _label(input_uri: str, output: str, files_per_shard: int = 4, storage=None) -> None:
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    spec = LabelJobSpec(
        input={"uri": input_uri, "files_per_shard": files_per_shard},
        output=output,
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        num_workers=1,
        batch_size=8,
        **({"storage": storage} if storage else {}),
    )
    summary = run_label_job(spec, show_progress=False)
    assert summary.status == "succeeded" and summary.errors == 1, summary.lines()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_cluster) -> Path:
    root = tmp_path_factory.mktemp("report")
    _label(str(_photo_folder(root / "photos")), str(root / "out"))
    return root / "out"


@pytest.fixture(scope="module")
def rows(labelled):
    return open_output(str(labelled)).to_table().to_pylist()


@pytest.fixture(scope="module")
def report(labelled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    assert main(["report", str(labelled), "--out", str(out)]) == 0
    return out


def test_report_in_chromium_shows_the_jobs_figures(labelled, rows, report, tmp_path):
    page = report.read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    # A copy with a probe script (the CSP lifted for it alone) writes what Chromium decoded into the DOM.
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace(CSP, CSP.replace("default-src 'none'", "script-src 'unsafe-inline'"))
                      .replace("</body>", PROBE + "</body>"))  # fmt: skip
    dom = Dom(render(probed, tmp_path, "--dump-dom"))
    body = dom.find("body")[0]
    assert body["data-probed"] == "yes" and body["data-pwned"] == "0"  # escaping alone stops the hostile names

    labelled_rows = [r for r in rows if r["error"] is None]
    bars = {a["data-label"]: int(a["data-count"]) for a in dom.find("g", **{"class": "label-bar"})}
    assert bars == Counter(r["label"] for r in labelled_rows)
    assert max(bars.values()) == 1 + REPEATS
    bins = [int(a["data-count"]) for a in dom.find("rect", **{"class": "score-bin"})]
    assert len(bins) == 20 and sum(bins) == len(labelled_rows)
    assert [int(a["data-count"]) for a in dom.find("tr", **{"class": "error-kind"})] == [1]
    (corrupt,) = [r for r in rows if r["error"]]
    assert corrupt["key"] == "corrupt.jpg"
    assert dom.find("tr", **{"class": "error-kind"})[0]["data-kind"] == corrupt["error_kind"] == "corrupt"
    text = "".join(dom.text)
    assert corrupt["error"][:60] in text and HOSTILE[0] in text and HOSTILE[1] in text  # shown as text
    assert len(dom.find("tr", **{"class": "slow-shard"})) == open_output(str(labelled)).manifest.totals.shards == 4
    assert dom.find("polyline", id="cumulative")

    commonest = sorted(bars.items(), key=lambda item: (-item[1], item[0]))[:THUMB_LABELS]
    assert [a["data-label"] for a in dom.find("h3")] == [label for label, _ in commonest]
    images = dom.find("img", **{"class": "thumb"})
    expected = sum(min(n, THUMBS_PER_LABEL) for n in sorted(bars.values(), reverse=True)[:THUMB_LABELS])
    assert len(images) == len(dom.find("img")) == expected  # no element came from a key
    sizes = [tuple(map(int, a["data-natural"].split("x"))) for a in images]
    assert all(0 < w <= 160 and 0 < h <= 160 and max(w, h) == 160 for w, h in sizes), sizes
    assert {a["data-key"] for a in images} >= {f"again-{i}.jpg" for i in range(REPEATS)}


def test_report_page_runs_nothing_and_screenshot_is_kept(report, tmp_path):
    dom = Dom(render(report, tmp_path, "--dump-dom"))  # the page as shipped: CSP on, no script
    assert not dom.find("script") and dom.find("section", id="uncertain")
    shot = screenshot_kept(report, tmp_path, "report", 3600)
    sys.stdout.write(f"\nreport screenshot: {shot}\n")


def _thumbnails_decoded(page: str) -> list[tuple[int, int]]:
    found = re.findall(r"src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)'", page)
    sizes = []
    for data in found:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.load()
            sizes.append(image.size)
    return sizes


def test_report_of_an_s3_output_of_tar_shards(tmp_path_factory, ray_cluster, s3_server, s3_prefix):
    """Input tars and output on a real S3 server: thumbnails come out of the tar members by key."""
    root = tmp_path_factory.mktemp("report-s3")
    files = [IMAGENET_SAMPLE / row["file"] for row in imagenet_labels()[PHOTOS : PHOTOS + 6]]
    (root / "bad.jpg").write_bytes(b"not an image")
    tars = write_tar_shards(files + [root / "bad.jpg"], root / "tars", per_shard=4)
    storage = open_storage(s3_prefix, s3_server.options())
    for tar in tars:
        storage.upload_file(str(tar), join(s3_prefix, "in", tar.name))
    output = join(s3_prefix, "out")
    _label(join(s3_prefix, "in"), output, storage=s3_server.options())
    data = write_report(output, root / "report.html", s3_server.options())
    assert (data.rows, data.errors, data.shards, data.complete) == (7, 1, 2, True)
    assert [(k.kind, k.rows, k.examples[0][0]) for k in data.error_kinds] == [(data.error_kinds[0].kind, 1, "bad")]
    sizes = _thumbnails_decoded((root / "report.html").read_text())
    assert len(sizes) == THUMB_LABELS and all(max(s) == 160 for s in sizes)
    assert all(t.problem is None for thumbs in data.thumbnails.values() for t in thumbs)


@pytest.mark.fault(
    fault="`bulklabel report` on outputs labelled from gzip tar shards (.tar.gz, .tgz) and from Hugging Face's "
    "Parquet layout",
    injected="two jobs of 4 photos: one tar input of a .tar.gz and a .tgz shard, one `default/{train,test}/"
    "0000.parquet` input",
    expected="every thumbnail read back through the job's own reader: decoded images in the page, no problem noted",
)
def test_report_thumbnails_from_gzip_tars_and_parquet(tmp_path, ray_cluster, record_property):
    import gzip

    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec
    from tests.producers import write_hugging_face_parquet

    files = [IMAGENET_SAMPLE / row["file"] for row in imagenet_labels()[PHOTOS : PHOTOS + 4]]
    tars = write_tar_shards(files, tmp_path / "plain", per_shard=2)
    (tmp_path / "tars").mkdir()
    for tar, suffix in zip(tars, [".tar.gz", ".tgz"], strict=True):
        (tmp_path / "tars" / (tar.stem + suffix)).write_bytes(gzip.compress(tar.read_bytes()))
    photos = [(f.read_bytes(), 0) for f in files]
    write_hugging_face_parquet(tmp_path / "hf", {"train": photos[:2], "test": photos[2:]}, ["photo"])
    found = {}
    for name, input_fields in [("tar", {"uri": str(tmp_path / "tars")}),
                               ("parquet", {"uri": str(tmp_path / "hf"), "format": "parquet"})]:  # fmt: skip
        spec = LabelJobSpec(input=input_fields, output=str(tmp_path / f"out-{name}"), num_workers=1, batch_size=4,
                            model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, embeddings=False)  # fmt: skip
        assert run_label_job(spec, show_progress=False).images == 4
        page = tmp_path / f"{name}.html"
        data = write_report(spec.output, page)
        thumbs = [t for group in data.thumbnails.values() for t in group]
        assert [t.problem for t in thumbs] == [None] * 4, name
        sizes = _thumbnails_decoded(page.read_text())
        assert len(sizes) == 4 and all(max(size) == 160 for size in sizes), name
        found[name] = len(sizes)
    record_property("measured", f"thumbnails decoded from the page: {found['tar']}/4 from .tar.gz/.tgz shards, "
                    f"{found['parquet']}/4 from Parquet; no problem noted")  # fmt: skip


def test_report_of_an_output_whose_input_is_gone_says_so(labelled, tmp_path):
    copy = Path(shutil.copytree(labelled, tmp_path / "out"))
    input_folder = Path(str(open_output_input(copy)))
    hidden = tmp_path / "hidden"
    shutil.move(input_folder, hidden)
    try:
        data = write_report(str(copy), tmp_path / "r.html")
    finally:
        shutil.move(hidden, input_folder)
    problems = [t.problem for thumbs in data.thumbnails.values() for t in thumbs]
    assert problems and all(p and "cannot read" in p for p in problems)
    assert "no thumbnail: cannot read" in (tmp_path / "r.html").read_text()


def open_output_input(output: Path) -> str:
    return open_output(str(output)).manifest.spec["input"]["uri"]


def test_report_module_imports_no_torch_or_ray():
    modules = "jobs.output.report_page, jobs.output.index"
    script = f"import sys, {modules}; sys.exit('torch' in sys.modules or 'ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    assert subprocess.run([sys.executable, "-c", script], timeout=60, env=env).returncode == 0
