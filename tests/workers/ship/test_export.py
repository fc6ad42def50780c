"""workers/ship/export.py: ONNX and TorchScript files that give bulklabel's labels, checked at export on sample images
(an artifact's own validation photos), with a sidecar an app can use alone; a failed check leaves nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.export_parity import app_probabilities
from jobs.cli import main
from schemas.finetune import PreprocessSpec
from tests.support import IMAGENET_SAMPLE, PLANTS
from tests.workers.finetune.test_artifacts import CLASSES, PLAN, STATE, _job, _trained
from workers.finetune.artifacts import publish
from workers.io.storage import LocalStorage
from workers.ship import export as export_module
from workers.ship.predict import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """A (randomly initialised) mobilenet_v3_small artifact whose split names real plant photos as validation."""
    root = tmp_path_factory.mktemp("models")
    photos = sorted(p for p in (PLANTS / "Potato___healthy").iterdir())[:6]
    rows = tuple((str(p), CLASSES[i % 3], "val") for i, p in enumerate(photos))
    _, weights = _trained(root, seed=5)
    location, _ = publish(LocalStorage(), _job(str(root)), "ft-test", PLAN.model_copy(update={"split_rows": rows}),
                          weights, STATE)  # fmt: skip
    return location


def app_labels(model_file, images) -> list[str]:
    """What an app does with the ONNX file and its sidecar alone: the README's lines (bench.export_parity's copy)."""
    meta = json.loads(model_file.with_name(model_file.name + ".json").read_text())
    return [meta["class_names"][i] for i in app_probabilities(model_file, [str(p) for p in images]).argmax(1)]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_artifact_exports_checked_on_its_own_validation_photos(artifact, tmp_path, fmt, capsys):
    out = tmp_path / f"plants.{'onnx' if fmt == 'onnx' else 'pt'}"

    assert main(["export", artifact, "--format", fmt, "--out", str(out)]) == 0

    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["file"] == out.name and sidecar["class_names"] == list(CLASSES)
    assert sidecar["model_id"] == "plants:v1" and PreprocessSpec(**sidecar["input"]["preprocess"]) == STATE.preprocess
    parity = sidecar["parity"]
    assert parity["images"] == 6 and "validation image(s) of" in parity["sample_from"]
    assert parity["top1_equal"] and parity["max_probability_diff"] <= 1e-4
    assert (sidecar["opset"] == 18) == (fmt == "onnx")
    assert "top-1 equal" in capsys.readouterr().out


def test_a_zoo_model_in_onnx_labels_the_imagenet_photos_as_bulklabel_does(tmp_path):
    photos = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:10]
    samples = tmp_path / "samples"
    samples.mkdir()
    for photo in photos:
        shutil.copy(photo, samples / photo.name)
    out = tmp_path / "mnv2.onnx"

    assert main(["export", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--format", "onnx", "--out", str(out),
                 "--samples", str(samples)]) == 0  # fmt: skip

    with load_model("mobilenet_v2", "IMAGENET1K_V1", top_k=1) as model:
        ours = [p.label for p in model.predict(photos)]
    assert app_labels(out, photos) == ours


def test_an_export_that_disagrees_with_the_model_is_refused_and_leaves_nothing(artifact, tmp_path, monkeypatch, capsys):
    real = export_module._run_torchscript

    def drifted(path, pixels):
        got, runtime = real(path, pixels)
        return got + 2e-4, runtime  # as a lossy conversion would

    monkeypatch.setattr(export_module, "_run_torchscript", drifted)
    out = tmp_path / "plants.pt"
    assert main(["export", artifact, "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "largest probability difference 2.00e-04 (limit 1e-04); nothing written" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_zoo_model_without_samples_is_refused_in_one_line(tmp_path, capsys):
    assert main(["export", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --samples" in err[0] and not (tmp_path / "m.onnx").exists()
