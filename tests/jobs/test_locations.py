"""Local paths in a spec become absolute where the user stands, before the spec goes to workers elsewhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs.finetune import resolve_locations
from jobs.kinds import absolute_locations
from jobs.locations import is_weights_file
from schemas.finetune import FinetuneJobSpec
from schemas.specs import LabelJobSpec


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """The user's working directory: a folder other than the test's, resolved as storage resolves paths."""
    cwd = tmp_path / "user"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd.resolve()


def test_label_spec_relative_paths_become_absolute(here):
    spec = LabelJobSpec(
        input={"uri": "photos", "format": "manifest", "allowed_roots": ["../shared", "s3://other/ok"]},
        output="./labels/run-1",
        model={"name": "models/plants/v1", "weights": "w/resnet50-11ad3fa6.pth", "weights_dir": "weights"},
    )
    done = absolute_locations(spec)
    assert done.input.uri == str(here / "photos")
    assert done.input.allowed_roots == (str(here.parent / "shared"), "s3://other/ok")
    assert done.output == str(here / "labels/run-1")
    assert done.model.name == str(here / "models/plants/v1")
    assert done.model.weights == str(here / "w/resnet50-11ad3fa6.pth")
    assert done.model.weights_dir == str(here / "weights")
    assert done.resolved_job_id() != spec.resolved_job_id()  # the job id hashes where the data really is


def test_enum_names_registry_names_and_s3_are_untouched(here):
    (here / "DEFAULT").write_text("a file named like an enum entry does not make the entry a file")
    spec = LabelJobSpec(
        input={"uri": "s3://in/photos"}, output="s3://out/run", model={"name": "resnet50", "weights": "DEFAULT"}
    )
    assert absolute_locations(spec) == spec
    for weights in ("IMAGENET1K_V1", "IMAGENET1K_SWAG_E2E_V1", "DEFAULT"):
        assert not is_weights_file(weights)


def test_weights_files_are_recognised(here):
    (here / "my-weights.bin").write_bytes(b"\0")
    for weights in ("resnet50.pth", "model.safetensors", "w.pt", "./x", "~/w.pth", "my-weights.bin"):
        assert is_weights_file(weights), weights
    spec = LabelJobSpec(
        input={"uri": "s3://in/p"}, output="s3://out/r", model={"name": "resnet50", "weights": "my-weights.bin"}
    )
    assert absolute_locations(spec).model.weights == str(here / "my-weights.bin")
    assert not is_weights_file("not-here.bin")


def test_finetune_spec_relative_paths_become_absolute(here):
    spec = FinetuneJobSpec(
        data={"uri": "plants/train", "validation_uri": "plants/val"},
        base={"name": "mobilenet_v2", "weights": "weights/mobilenet_v2-b0353104.pth", "weights_dir": "w"},
        output="models/plants",
    )
    done = resolve_locations(spec)  # what run_finetune_job calls first
    assert (done.data.uri, done.data.validation_uri) == (str(here / "plants/train"), str(here / "plants/val"))
    assert done.base.weights == str(here / "weights/mobilenet_v2-b0353104.pth")
    assert (done.base.weights_dir, done.output) == (str(here / "w"), str(here / "models/plants"))
    assert done.base.name == "mobilenet_v2"


def test_finetune_s3_and_enum_weights_are_untouched(here):
    spec = FinetuneJobSpec(
        data={"uri": "s3://plants/train/"},
        base={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        output="s3://models/plants/",
    )
    assert absolute_locations(spec) == spec


@pytest.mark.fault(
    fault="a relative --weights path given to a job on a cluster the driver joins (RAY_ADDRESS)",
    injected="`bulklabel label --weights weights/<file>.pth` run from the folder holding it, against the test "
    "session's Ray cluster, whose workers start in another directory",
    expected="the path is made absolute on the driver; the workers load that file; the job succeeds",
)
def test_relative_weights_path_works_on_a_joined_cluster(ray_cluster, tmp_path, record_property):
    import shutil
    import subprocess
    import sys

    from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_torchvision_weights

    weights = write_torchvision_weights("mobilenet_v2", tmp_path / "weights")
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in imagenet_labels()[:2]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    cli = Path(sys.executable).with_name("bulklabel")
    command = [str(cli), "label", "--model", "mobilenet_v2", "--weights", f"weights/{weights.name}", "--quiet",
               "--input", "photos", "--output", "out", "--top-k", "3"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert manifest["model"]["model_id"] == f"mobilenet_v2:{weights.name}"
    assert manifest["spec"]["model"]["weights"] == str(weights)
    assert manifest["totals"]["rows"] == 2
    record_property("measured", f"exit 0; workers loaded {manifest['spec']['model']['weights']}; 2/2 rows")
