"""workers.finetune.artifacts: versioned publishing on both backends, metrics, plots, loading an artifact to label."""

from __future__ import annotations

import io
import json
import multiprocessing
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model

from schemas.finetune import MODEL_CARD_NAME, EpochMetrics, FinetuneJobSpec, Metrics, TrainingState
from schemas.specs import ModelSpec, PreprocessSpec
from tests.workers.finetune.racers import ListTogether, publish_when_released
from workers.finetune.artifacts import (
    CLAIM_NAME,
    WEIGHTS_NAME,
    ArtifactError,
    VersionClaimFailed,
    claim_version,
    find_job_artifact,
    is_artifact_location,
    metrics_of,
    publish,
    read_card,
    sha256_of,
    versions,
)
from workers.finetune.data import DataPlan
from workers.finetune.loop import Classifier, save_weights
from workers.io.storage import LocalStorage, join, open_storage
from workers.models import build_model, check_model_name, model_categories, split_head, weights_entry

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


def _trained(folder: Path, seed: int) -> tuple[Classifier, Path]:
    """A 'fine-tuned' classifier (random weights from `seed`) and its weights file, as a checkpoint's
    best.safetensors."""
    torch.manual_seed(seed)
    backbone, old_head = split_head(get_model(ARCH, weights=None))
    model = Classifier(backbone, nn.Linear(old_head.in_features, len(CLASSES))).eval()
    path = folder / "best.safetensors"
    save_weights(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Classifier, Path]:
    return _trained(tmp_path_factory.mktemp("ckpt"), seed=0)


@pytest.fixture(scope="module")
def other_trained(tmp_path_factory) -> tuple[Classifier, Path]:
    """A second, different model: racing publishers must each end up beside their own weights."""
    return _trained(tmp_path_factory.mktemp("ckpt-other"), seed=1)


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


def test_macro_f1_averages_only_the_classes_with_validation_images():
    m = metrics_of(((2, 0, 0), (0, 0, 0), (1, 0, 3)), list(CLASSES), list(STATE.history), best_epoch=2)
    healthy, rust, scab = m.per_class
    assert rust.support == 0 and m.macro_f1_classes == ["healthy", "scab"]
    assert m.macro_f1 == pytest.approx((healthy.f1 + scab.f1) / 2)  # not (… + 0.0) / 3


def test_publish_writes_a_complete_version_with_the_card_last(storage_root, trained):
    model, weights = trained
    job = _job(storage_root.uri, storage_root.options)

    location, card = publish(storage_root.storage, job, "ft-test", PLAN, weights, STATE)

    assert location == join(job.output, "v1") and card.artifact_id == "plants:v1"
    names = versions(storage_root.storage, job.output)[1]
    assert names == {CLAIM_NAME, MODEL_CARD_NAME, "model.safetensors", "metrics.json", "curves.png",
                     "confusion_matrix.png", "split.csv"}  # fmt: skip
    claim = json.loads(storage_root.storage.read_bytes(join(location, CLAIM_NAME)))
    assert claim["job_id"] == "ft-test" and {"claimed_at", "host", "pid"} <= set(claim)
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


def _assert_each_card_beside_its_own_weights(root, published: dict[str, str], models: dict[str, Classifier],
                                             cache: Path) -> None:  # fmt: skip
    """Each job's version holds that job's card, weights whose sha256 is the card's, and loads as that job's model."""
    x = torch.rand(2, 3, 64, 64)
    for job_id, location in published.items():
        card = read_card(location, root.options)
        assert card.job_id == job_id and card.artifact_id == f"plants:{location.rsplit('/', 1)[-1]}"
        local = cache / f"{job_id}.safetensors"
        local.write_bytes(root.storage.read_bytes(join(location, WEIGHTS_NAME)))
        assert sha256_of(local) == card.weights_sha256
        loaded = build_model(ModelSpec(name=location), root.options, cache / job_id)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.head(loaded.backbone(x)), models[job_id](x))


def test_two_publishers_racing_get_two_versions_each_with_its_own_weights(storage_root, trained, other_trained,
                                                                          tmp_path):  # fmt: skip
    """Two threads publish different models into one output; both list the versions before either claims one.
    Before claims both were told v1, and one's card sat beside the other's weights (or replaced them on S3)."""
    barrier = threading.Barrier(2, timeout=60)
    racers = {"ft-a": trained, "ft-b": other_trained}
    published: dict[str, str] = {}
    errors: list[BaseException] = []

    def race(job_id: str) -> None:
        storage = ListTogether(open_storage(storage_root.uri, storage_root.options), barrier)
        try:
            job = _job(storage_root.uri, storage_root.options, job_id)
            published[job_id] = publish(storage, job, job_id, PLAN, racers[job_id][1], STATE)[0]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(job_id,)) for job_id in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors

    output = _job(storage_root.uri).output
    assert sorted(p.rsplit("/", 1)[-1] for p in published.values()) == ["v1", "v2"]
    assert set(versions(storage_root.storage, output)) == {1, 2}
    _assert_each_card_beside_its_own_weights(storage_root, published, {j: m for j, (m, _) in racers.items()},
                                             tmp_path)  # fmt: skip


@pytest.mark.slow
def test_two_processes_publishing_at_the_same_moment_get_two_versions(storage_root, trained, other_trained, tmp_path,
                                                                      record_property):  # fmt: skip
    """The realistic race: two processes, no interleaving forced, released together by a barrier."""
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
    barrier = context.Barrier(3)
    racers = {"ft-a": trained, "ft-b": other_trained}
    processes = [
        context.Process(
            target=publish_when_released,
            args=(_job(storage_root.uri, storage_root.options, job_id), PLAN, w, STATE, barrier),
        )
        for job_id, (_, w) in racers.items()
    ]
    for process in processes:
        process.start()
    barrier.wait(timeout=120)  # both children imported and ready
    released = time.monotonic()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]

    output = _job(storage_root.uri).output
    published = {job_id: find_job_artifact(storage_root.storage, output, job_id)[0] for job_id in racers}
    assert sorted(p.rsplit("/", 1)[-1] for p in published.values()) == ["v1", "v2"]
    _assert_each_card_beside_its_own_weights(storage_root, published, {j: m for j, (m, _) in racers.items()},
                                             tmp_path)  # fmt: skip
    claimed = sorted(datetime.fromisoformat(json.loads(storage_root.storage.read_bytes(join(loc, CLAIM_NAME)))[
        "claimed_at"]) for loc in published.values())  # fmt: skip
    backend = "s3" if storage_root.uri.startswith("s3://") else "local"
    outcome = ", ".join(f"{j} -> {loc.rsplit('/', 1)[-1]}" for j, loc in sorted(published.items()))
    apart_ms = (claimed[1] - claimed[0]).total_seconds() * 1000
    record_property("measured", f"{backend}: {outcome}; claims {apart_ms:.0f} ms apart; both published "
                                f"{time.monotonic() - released:.1f} s after release")  # fmt: skip


def test_a_rerun_continues_the_version_it_claimed_and_incomplete_ones_are_not_loaded(storage_root, trained, tmp_path):
    """A run that died mid-publish left its claim and part of its files: the same job publishes into that version
    again; another job's unfinished version is skipped by everyone and explained to a user who names it."""
    _, weights = trained
    storage, output = storage_root.storage, _job(storage_root.uri).output
    publish(storage, _job(storage_root.uri, storage_root.options, "ft-a"), "ft-a", PLAN, weights, STATE)
    for version, job_id in ((2, "ft-b"), (3, "ft-c")):
        assert claim_version(storage, output, job_id) == version
        storage.write_bytes(join(output, f"v{version}", WEIGHTS_NAME), b"partial")  # then the run died

    location, card = publish(storage, _job(storage_root.uri, storage_root.options, "ft-b"), "ft-b", PLAN, weights,
                             STATE)  # fmt: skip

    assert (location, card.version) == (join(output, "v2"), 2)
    assert read_card(location, storage_root.options) == card
    assert build_model(ModelSpec(name=location), storage_root.options, tmp_path / "cache").model_id == "plants:v2"
    assert find_job_artifact(storage, output, "ft-c") is None
    with pytest.raises(ArtifactError, match=r"v3 is an incomplete version: claimed by job ft-c at .* not written"):
        build_model(ModelSpec(name=join(output, "v3")), storage_root.options, tmp_path / "cache")
    later = publish(storage, _job(storage_root.uri, storage_root.options, "ft-d"), "ft-d", PLAN, weights, STATE)
    assert later[1].version == 4


class _AlwaysClaimed(LocalStorage):
    """Local storage on which every claim is lost to some other run: the one failure this test injects."""

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        return False


def test_claiming_gives_up_after_a_bounded_number_of_versions(tmp_path, trained):
    with pytest.raises(VersionClaimFailed, match=r"versions v1 to v100 under .* were all claimed by other runs"):
        publish(_AlwaysClaimed(), _job(str(tmp_path)), "ft-test", PLAN, trained[1], STATE)
    assert not list(tmp_path.iterdir())  # nothing written anywhere


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
