"""The `bulklabel` command line, run as users run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.cli import main
from tests.support import IMAGENET_SAMPLE, imagenet_labels


def test_bad_spec_file_exits_2_naming_the_field(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("kind: label\ninput: {uri: ./in}\noutput: ./out\nmodel: {name: resnet50}\nbatch_size: -4\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "-4" in err


def test_unknown_model_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code = main(["label", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "resnet5O"])
    assert code == 2
    assert "unknown model 'resnet5O'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_input_fails_fast_with_its_name(tmp_path, capsys):
    code = main(["label", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--model", "resnet18"])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_unwritable_output_fails_fast(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["label", "--input", str(tmp_path / "in"), "--output", str(blocker / "out"), "--model", "resnet18"])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    assert "files_per_shard" in json.loads(capsys.readouterr().out)["$defs"]["InputSpec"]["properties"]


@pytest.mark.slow
def test_label_command_resolves_real_weights_offline(tmp_path):
    """The README's promise: after set-up, this command works with no network, on its own local Ray."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in imagenet_labels()[:6]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos)
    ray_tmp = tempfile.mkdtemp(prefix="blc-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    cli = Path(sys.executable).with_name("bulklabel")
    args = [str(cli), "label", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--quiet",
            "--input", str(photos), "--output", str(tmp_path / "out")]  # fmt: skip
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "succeeded" in done.stdout
    table = ds.dataset(tmp_path / "out", format="parquet").to_table()
    assert table.num_rows == 6
    assert set(table.column("model").to_pylist()) == {"mobilenet_v2:IMAGENET1K_V1"}
    truth = {r["file"]: r["name"].replace("_", " ") for r in imagenet_labels()[:6]}
    hits = sum(truth[k].lower() in [t.lower() for t in top] for k, top in
               zip(table.column("key").to_pylist(), table.column("topk_labels").to_pylist(), strict=True))  # fmt: skip
    assert hits >= 4
