"""`bulklabel label-issues` on real leaf photos (plants sample, class folders) with labels planted wrong: photos
moved into another class's folder are flagged, an unreadable one is a row with its error, bad input is one line
before anything is written, and the sheet of flagged images renders in Chromium. Quality at scale:
bench/label_issues.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.output.results import open_result
from tests.pages import Dom, render, screenshot_kept
from tests.support import PLANTS
from workers.faults import ACK_ENV, ACK_VALUE, FAULTS_ENV

CLI = str(Path(sys.executable).with_name("bulklabel"))

CLASSES = ("Pepper__bell___healthy", "Potato___Early_blight", "Potato___healthy")
PER_CLASS = 20
MOVED = {0: 5, 1: 9, 2: 13}  # class → the photo of it put in the next class's folder: its label is wrong


def _data(folder: Path) -> tuple[Path, set[str]]:
    moved = set()
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
    for index, name in enumerate(CLASSES):
        for n, photo in enumerate(sorted((PLANTS / name).iterdir())[:PER_CLASS]):
            target = CLASSES[(index + 1) % len(CLASSES)] if MOVED[index] == n else name
            shutil.copy(photo, folder / target / photo.name)
            if target != name:
                moved.add(f"{target}/{photo.name}")
    (folder / CLASSES[1] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG" * 10)
    return folder, moved


@pytest.fixture(scope="module")
def issues(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("issues")
    data, moved = _data(root / "plants")
    args = ["label-issues", "--data", str(data), "--base", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
            "--out", str(root / "out")]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0  # again: complete already, nothing computed
    return root / "out", moved


def test_labels_moved_to_another_class_are_flagged_first(issues):
    out, moved = issues
    result = open_result(str(out))
    rows = result.to_table().to_pylist()
    assert len(rows) == PER_CLASS * len(CLASSES) + 1 and result.manifest.table == "issues"
    flagged = [r for r in rows if r["flagged"]]
    assert moved <= {r["key"] for r in flagged}, (moved, [(r["key"], r["self_confidence"]) for r in flagged])
    assert len(flagged) <= len(moved) + 2  # and little else
    assert [r["rank"] for r in flagged] == list(range(1, len(flagged) + 1)) == [r["rank"] for r in rows[: len(flagged)]]
    for row in flagged:
        if row["key"] in moved:  # the class it came from is suggested
            assert CLASSES.index(row["suggested_label"]) == (CLASSES.index(row["given_label"]) - 1) % len(CLASSES)
    broken = next(r for r in rows if r["key"].endswith("broken.jpg"))
    assert broken["error"] and not broken["flagged"] and broken["suggested_label"] is None
    assert result.manifest.figures["unreadable"] == 1 and result.manifest.figures["probe_l2"] > 0


def test_the_sheet_of_flagged_images_renders_with_thumbnails(issues, tmp_path):
    out, moved = issues
    sheet = out / "sheet.html"
    dom = Dom(render(sheet, tmp_path, "--dump-dom"))
    assert {a["data-key"] for a in dom.find("img")} == moved
    assert not dom.find("script") and any("given: " in t for t in dom.text)
    screenshot_kept(sheet, tmp_path, "label-issues", 1000)


def test_one_class_is_one_line_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "data" / "only").mkdir(parents=True)
    shutil.copy(next((PLANTS / CLASSES[0]).iterdir()), tmp_path / "data" / "only" / "a.jpg")
    code = main(["label-issues", "--data", str(tmp_path / "data"), "--base", "mobilenet_v2", "--out",
                 str(tmp_path / "out")])  # fmt: skip
    said = capsys.readouterr().err
    assert code == 2 and "found one class ('only')" in said and "needs two at least" in said, said
    assert not (tmp_path / "out").exists()


@pytest.mark.fault(
    fault="a label-issues run SIGKILLed between its table and its manifest",
    injected="SIGKILL of `bulklabel label-issues` right after its data file and sheet were written (after the "
    "embedding pass and the probes), then the same command again",
    expected="no row is visible after the kill; the re-run embeds again and commits the table: every image once, "
    "the same images flagged as an uninterrupted run",
)
def test_a_label_issues_run_killed_before_its_manifest_then_rerun(issues, tmp_path, ray_cluster_env,
                                                                 record_property):  # fmt: skip
    done, _ = issues
    data = Path(open_result(str(done)).manifest.spec["data"]["uri"])
    out = tmp_path / "out"
    args = [CLI, "label-issues", "--data", str(data), "--base", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
            "--out", str(out)]  # fmt: skip
    faults = json.dumps([{"shard": "result:data_written", "action": "exit"}])
    # The commands join the session's cluster (a private one would start Ray twice over).
    killed = subprocess.run(args, env={**ray_cluster_env, FAULTS_ENV: faults, ACK_ENV: ACK_VALUE},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9 and not (out / "_job.json").exists(), killed.stderr[-2000:]
    assert (out / "data" / "part-issues.parquet").exists()
    rerun = subprocess.run(args, env=ray_cluster_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = open_result(str(out)).to_table().to_pylist()
    expected = open_result(str(done)).to_table().to_pylist()
    assert len({r["key"] for r in rows}) == len(rows) == len(expected)
    assert {r["key"] for r in rows if r["flagged"]} == {r["key"] for r in expected if r["flagged"]}
    flagged = sum(r["flagged"] for r in rows)
    record_property("measured", f"killed with rc {killed.returncode} (table written, no manifest); re-run: "
                                f"{len(rows)} rows once, {flagged} flagged as uninterrupted")  # fmt: skip
