"""workers.artifacts: versioned publishing on both backends, metrics, plots, and loading an artifact for labelling."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model

from schemas.finetune import MODEL_CARD_NAME, EpochMetrics, FinetuneJobSpec, Metrics, TrainingState
from schemas.specs import ModelSpec, PreprocessSpec
from workers.artifacts import (
    ArtifactError,
    find_job_artifact,
    is_artifact_location,
    metrics_of,
    publish,
    read_card,
    versions,
)
from workers.finetune_data import DataPlan
from workers.models import build_model, check_model_name, model_categories, split_head, weights_entry
from workers.storage import LocalStorage, join
from workers.training import Classifier, save_weights

ARCH = "mobilenet_v3_small"  # small, and its head is a Linear at the end of a Sequential like most torchvision models
CLASSES = ("healthy", "rust", "scab")
PREPROCESS = PreprocessSpec(resize_size=72, crop_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CONFUSION = ((3, 1, 0), (0, 4, 0), (1, 0, 2))


def _epoch(n: int, val_loss: float, val_accuracy: float) -> EpochMetrics:
    return EpochMetrics(epoch=n, train_loss=1 / n, train_accuracy=0.5 + n / 10, val_loss=val_loss,
                        val_accuracy=val_accuracy, learning_rate=1e-3 / n, seconds=3.0)  # fmt: skip


STATE = TrainingState(
    epochs_done=3,
    history=(_epoch(1, 0.9, 0.5), _epoch(2, 0.6, 0.818), _epoch(3, 0.7, 0.727)),
    best_epoch=2,
    best_val_loss=0.6,
    best_confusion=CONFUSION,
    train_seconds=9.0,
    skipped_images=1,
    skipped_examples=("/data/rust/bad.jpg: UnidentifiedImageError",),
    preprocess=PREPROCESS,
)
PLAN = DataPlan(
    class_names=CLASSES,
    train=tuple((f"/data/{c}/{i}.jpg", n) for n, c in enumerate(CLASSES) for i in range(3)),
    val=tuple((f"/data/{c}/v{i}.jpg", n) for n, c in enumerate(CLASSES) for i in range(4)),
    fingerprint="f" * 64,
    split_rows=(("/data/healthy/0.jpg", "healthy", "train"), ("/data/healthy/v0.jpg", "healthy", "val")),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Classifier, object]:
    """A 'fine-tuned' classifier (random weights) and its weights file, as a checkpoint's best.safetensors."""
    torch.manual_seed(0)
    backbone, old_head = split_head(get_model(ARCH, weights=None))
    model = Classifier(backbone, nn.Linear(old_head.in_features, len(CLASSES))).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    save_weights(model.state_dict(), path)
    return model, path


def _job(root_uri: str, options=None, job_id: str = "ft-test") -> FinetuneJobSpec:
    return FinetuneJobSpec(job_id=job_id, data={"uri": "/data"}, base={"name": ARCH, "weights": None},
                           output=join(root_uri, "plants"), storage=options or {})  # fmt: skip


def test_metrics_from_a_confusion_matrix():
    m = metrics_of(CONFUSION, list(CLASSES), list(STATE.history), best_epoch=2)
    assert m.val_accuracy == pytest.approx(9 / 11) and m.val_loss == 0.6
    healthy, rust, scab = m.per_class
    assert (healthy.precision, healthy.recall, healthy.support) == (pytest.approx(3 / 4), pytest.approx(3 / 4), 4)
    assert (rust.precision, rust.recall) == (pytest.approx(4 / 5), 1.0)
    assert scab.f1 == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert m.macro_f1 == pytest.approx((healthy.f1 + rust.f1 + scab.f1) / 3)
    never_predicted = metrics_of(((0, 2), (0, 2)), ["a", "b"], list(STATE.history[:1]), best_epoch=1)
    assert never_predicted.per_class[0].precision == 0.0 and never_predicted.per_class[0].f1 == 0.0


def test_publish_writes_a_complete_version_with_the_card_last(storage_root, trained):
    model, weights = trained
    job = _job(storage_root.uri, storage_root.options)

    location, card = publish(storage_root.storage, job, "ft-test", PLAN, weights, STATE)

    assert location == join(job.output, "v1") and card.artifact_id == "plants:v1"
    names = versions(storage_root.storage, job.output)[1]
    assert names == {MODEL_CARD_NAME, "model.safetensors", "metrics.json", "curves.png", "confusion_matrix.png",
                     "split.csv"}  # fmt: skip
    stored = read_card(location, storage_root.options)
    assert stored == card
    assert (card.architecture, card.base_weights, card.class_names) == (ARCH, None, list(CLASSES))
    assert card.preprocess == PREPROCESS and card.metrics.best_epoch == 2
    assert card.dataset.train_per_class == {"healthy": 3, "rust": 3, "scab": 3} and card.dataset.skipped_images == 1
    metrics = Metrics.model_validate_json(storage_root.storage.read_bytes(join(location, "metrics.json")))
    assert metrics == card.metrics and metrics.confusion_matrix == [list(row) for row in CONFUSION]
    for plot in ("curves.png", "confusion_matrix.png"):
        with Image.open(io.BytesIO(storage_root.storage.read_bytes(join(location, plot)))) as image:
            assert image.format == "PNG" and image.width >= 400
    split = storage_root.storage.read_bytes(join(location, "split.csv")).decode().splitlines()
    assert split == ["key,label,split", "/data/healthy/0.jpg,healthy,train", "/data/healthy/v0.jpg,healthy,val"]


def test_versions_are_never_overwritten_and_incomplete_ones_are_skipped(storage_root, trained):
    _, weights = trained
    storage = storage_root.storage
    output = _job(storage_root.uri).output
    first = publish(storage, _job(storage_root.uri, storage_root.options, "ft-a"), "ft-a", PLAN, weights, STATE)[0]
    card_v1 = storage.read_bytes(join(first, MODEL_CARD_NAME))
    # A run that died while publishing leaves a version without a card.
    storage.write_bytes(join(first.removesuffix("v1"), "v2", "model.safetensors"), b"partial")

    location, card = publish(storage, _job(storage_root.uri, storage_root.options, "ft-b"), "ft-b", PLAN, weights,
                             STATE)  # fmt: skip

    assert (location.rsplit("/", 1)[-1], card.version, card.artifact_id) == ("v3", 3, "plants:v3")
    assert storage.read_bytes(join(first, MODEL_CARD_NAME)) == card_v1
    assert find_job_artifact(storage, output, "ft-a")[1].version == 1
    assert find_job_artifact(storage, output, "ft-b")[0] == location
    assert find_job_artifact(storage, output, "ft-c") is None


def test_label_jobs_load_an_artifact_by_its_location(storage_root, trained, tmp_path):
    model, weights = trained
    job = _job(storage_root.uri, storage_root.options)
    location, card = publish(storage_root.storage, job, "ft-test", PLAN, weights, STATE)
    spec = ModelSpec(name=location + "/")

    check_model_name(spec.name)
    assert weights_entry(spec) is None
    assert model_categories(spec, storage_root.options) == list(CLASSES)
    loaded = build_model(spec, storage_root.options, tmp_path / "cache")

    assert (loaded.model_id, loaded.categories, loaded.preprocess) == ("plants:v1", list(CLASSES), PREPROCESS)
    assert loaded.embedding_dim == model.head.in_features and not loaded.backbone.training
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.head(loaded.backbone(x)), model(x))


def test_an_artifact_whose_weights_do_not_match_its_card_is_refused(tmp_path, trained):
    _, weights = trained
    location, _ = publish(LocalStorage(), _job(str(tmp_path / "out")), "ft-test", PLAN, weights, STATE)
    card = json.loads((tmp_path / "out" / "plants" / "v1" / MODEL_CARD_NAME).read_text())
    card["weights_sha256"] = "0" * 64
    (tmp_path / "out" / "plants" / "v1" / MODEL_CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="sha256 is .* the model card says 0000"):
        build_model(ModelSpec(name=location), None, tmp_path / "cache")


def test_a_location_without_a_card_is_explained(tmp_path):
    (tmp_path / "v1").mkdir()
    with pytest.raises(ArtifactError, match="no model card at .*v1/model_card.json"):
        build_model(ModelSpec(name=str(tmp_path / "v1")), None, tmp_path / "cache")


def test_registry_names_are_not_locations():
    assert not is_artifact_location("resnet50")
    assert all(map(is_artifact_location, ["./models/v1", "/models/plants/v2", "s3://models/plants/v1/"]))
