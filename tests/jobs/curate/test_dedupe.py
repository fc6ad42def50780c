"""`bulklabel dedupe` on a real label output (tests/jobs/curate/conftest.py: planted near-copies among ImageNet
photos): every planted pair grouped with its original and no group among the originals, the original as the
representative, leakage across a fine-tune's split, bad input in one line, and a run killed mid-commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main
from jobs.curate.dedupe import _leaking_groups, run_dedupe_job
from jobs.errors import BadInput
from jobs.output.results import open_result
from schemas.curation import DedupeJobSpec
from workers.faults import ACK_ENV, ACK_VALUE, FAULTS_ENV

CLI = str(Path(sys.executable).with_name("bulklabel"))


def _rows(out: Path) -> list[dict]:
    result = open_result(str(out))
    assert result is not None
    return result.to_table().to_pylist()


def test_planted_near_copies_are_grouped_with_their_originals_and_nothing_else_is(planted, tmp_path):
    summary = run_dedupe_job(DedupeJobSpec(sources=(str(planted.out),), output=str(tmp_path / "dupes")))
    assert summary.status == "succeeded"
    rows = _rows(tmp_path / "dupes")
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == len(by_key) == len(planted.originals) + len(planted.copies) + 1  # and corrupt.jpg
    for copy, original in planted.copies.items():  # every planted pair, in one group
        assert by_key[copy]["group"] == by_key[original]["group"], (copy, by_key[copy], by_key[original])
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["key"])
    duplicate_groups = [keys for keys in groups.values() if len(keys) > 1]
    assert len(duplicate_groups) == len(planted.copies)  # one per planted pair: no false group among the originals
    assert all(sum(k in planted.copies for k in keys) == 1 for keys in duplicate_groups)
    for copy, original in planted.copies.items():
        row = by_key[copy]
        assert row["group_size"] == 2 and 0.83 <= row["cosine"] <= 1.0
        if copy.startswith(("copy-half", "copy-crop")):  # the larger image represents the group
            assert row["representative_key"] == original and by_key[original]["representative"]
    exact = by_key["exact-copy.JPEG"]
    assert exact["exact"] and exact["image_id"] == by_key[exact["representative_key"]]["image_id"]
    corrupt = by_key["corrupt.jpg"]
    assert corrupt["group_size"] == 1 and corrupt["cosine"] is None and corrupt["representative"]
    figures = summary.manifest.figures
    assert figures["duplicate_groups"] == len(planted.copies) and figures["exact_duplicate_groups"] == 1
    assert figures["leak_basis"] == "none" and summary.manifest.sources[0].rows == len(rows)


def test_a_split_that_puts_copies_on_both_sides_is_reported_as_leakage(planted, tmp_path, capsys):
    # The artifact's split.csv as a fine-tune writes it (workers.finetune.artifacts.split_csv): key, label, split.
    artifact = tmp_path / "models" / "v1"
    artifact.mkdir(parents=True)
    leaking = sorted(planted.copies)[:3]
    lines = ["key,label,split"]
    lines += [f"{planted.photos / key},x,train" for key in planted.originals]
    lines += [f"{planted.photos / key},x,{'val' if key in leaking else 'train'}" for key in planted.copies]
    (artifact / "split.csv").write_text("\n".join(lines) + "\n")
    assert main(["dedupe", str(planted.out), "--out", str(tmp_path / "dupes"), "--split", str(artifact)]) == 0
    said = capsys.readouterr().out
    assert "leakage:  3 group(s) span train and validation (3 validation image(s) have a copy in training)" in said
    rows = _rows(tmp_path / "dupes")
    assert {r["key"] for r in rows if r["leaks"]} == set(leaking) | {planted.copies[k] for k in leaking}
    assert {r["split"] for r in rows if r["key"] == "corrupt.jpg"} == {None}  # not in the split


def test_groups_spanning_outputs_leak_without_a_split():
    groups = np.array([0, 0, 1, 1, 2])
    sources = ["train", "val", "train", "train", "val"]
    assert _leaking_groups(groups, sources, [None] * 5, by_split=False).tolist() == [True, False, False]


def test_bad_input_is_one_line_before_any_output(planted, tmp_path):
    with pytest.raises(BadInput, match="has no embeddings"):
        run_dedupe_job(DedupeJobSpec(sources=(str(planted.bare),), output=str(tmp_path / "a")))
    with pytest.raises(BadInput, match="--split takes a fine-tune artifact"):
        run_dedupe_job(DedupeJobSpec(sources=(str(planted.out),), output=str(tmp_path / "b"),
                                     split=str(tmp_path / "no-model")))  # fmt: skip
    with pytest.raises(ValueError, match="named twice"):
        DedupeJobSpec(sources=(str(planted.out), str(planted.out) + "/"), output=str(tmp_path / "c"))
    assert not (tmp_path / "a" / "_job.json").exists() and not (tmp_path / "b" / "_job.json").exists()


@pytest.mark.fault(
    fault="a curation job's process SIGKILLed between its table and its manifest",
    injected="SIGKILL of `bulklabel dedupe` / `bulklabel review-queue` right after its data file (and sheet) were "
    "written, then the same command again",
    expected="no row is visible after the kill (a query says the job has not finished); the re-run commits the "
    "table: every image's row exactly once",
)
@pytest.mark.parametrize("command", ["dedupe", "review-queue"])
def test_a_curation_run_killed_before_its_manifest_then_rerun(planted, tmp_path, command, record_property):
    out = tmp_path / "result"
    args = [CLI, command, str(planted.out), "--out", str(out)]
    faults = json.dumps([{"shard": "result:data_written", "action": "exit"}])
    killed = subprocess.run(args, env={**os.environ, FAULTS_ENV: faults, ACK_ENV: ACK_VALUE}, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "data").is_dir() and not (out / "_job.json").exists()
    table = "duplicates" if command == "dedupe" else "queue"
    query = [CLI, "query", str(out), f"SELECT count(*) FROM {table}"]
    refused = subprocess.run(query, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "has not finished" in refused.stderr, refused.stderr
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "succeeded" in rerun.stdout, rerun.stderr[-2000:]
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(rows) and len(rows) >= 20
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("data/")] == [
        f"data/part-{'duplicates' if command == 'dedupe' else 'queue'}.parquet"
    ]
    record_property("measured", f"killed with rc {killed.returncode}, data written and no manifest; query refused "
                                f"(exit 2); re-run succeeded: {len(rows)} rows, each once")  # fmt: skip
