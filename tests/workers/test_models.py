"""workers.models: torchvision models by registry name, weights by name or file, split into backbone and head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import get_model

from schemas.specs import ModelSpec, StorageOptions
from tests.support import IMAGENET_SAMPLE, imagenet_labels
from workers.label.decode import decode
from workers.label.inference import Predictor, PredictorOptions
from workers.models import (
    LoadedModel,
    ModelError,
    build_model,
    check_model_name,
    preprocess_of,
    split_head,
    weights_entry,
)

CPU = torch.device("cpu")
REAL_WEIGHTS = Path(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth")
# Photos the real MobileNetV2 gets right with high confidence (labels.csv: file → class_index).
PHOTOS = ["n01440764_tench.JPEG", "n01558993_robin.JPEG", "n02056570_king_penguin.JPEG", "n01882714_koala.JPEG"]


def _pixels(loaded: LoadedModel, n: int, seed: int = 0) -> np.ndarray:
    size = loaded.preprocess.crop_size
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ real MobileNetV2 ImageNet weights


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> LoadedModel:
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"{REAL_WEIGHTS} missing: run `python -m jobs.offline_weights`")
    spec = ModelSpec(name="mobilenet_v2", weights="IMAGENET1K_V1")
    return build_model(spec, StorageOptions(), tmp_path_factory.mktemp("cache"))


def test_mobilenet_v2_real_weights_metadata(mobilenet):
    assert mobilenet.model_id == "mobilenet_v2:IMAGENET1K_V1"
    assert len(mobilenet.categories) == 1000
    assert mobilenet.categories[0] == "tench"
    assert mobilenet.embedding_dim == 1280 and mobilenet.head.out_features == 1000
    assert (mobilenet.preprocess.resize_size, mobilenet.preprocess.crop_size) == (256, 224)
    assert mobilenet.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert mobilenet.preprocess.std == pytest.approx((0.229, 0.224, 0.225))
    assert not mobilenet.backbone.training


def test_mobilenet_v2_labels_real_photos(mobilenet):
    labels = {row["file"]: row for row in imagenet_labels()}
    decoded = [decode((IMAGENET_SAMPLE / name).read_bytes(), mobilenet.preprocess) for name in PHOTOS]
    assert all(d.error is None for d in decoded), [d.error for d in decoded]
    predictor = Predictor(mobilenet, CPU, PredictorOptions(precision="auto", top_k=5, embeddings=True))
    out = predictor(np.stack([d.pixels for d in decoded]))
    assert out.embeddings.shape == (len(PHOTOS), 1280)
    for name, top5, scores in zip(PHOTOS, out.topk_indices, out.topk_scores, strict=True):
        expected = int(labels[name]["class_index"])
        assert expected in top5.tolist(), (name, top5, [mobilenet.categories[i] for i in top5])
        # The category list from the weights metadata is in ImageNet index order.
        assert mobilenet.categories[expected].replace(" ", "_") == labels[name]["name"]
        assert (np.diff(scores) <= 0).all()
    assert out.topk_indices[0, 0] == 0  # tench is the top-1 for the tench photo


# ---------------------------------------------------------------------- generated torchvision-format weight files


@pytest.fixture(scope="module")
def built(tmp_path_factory, torchvision_weights):
    """build(arch) → LoadedModel from a generated `<arch>-<sha8>.pth` given as a path; each arch built once (the
    file is the session's, which tests/jobs/test_label_job.py labels with too)."""
    cache: dict[str, tuple[LoadedModel, str]] = {}

    def build(arch: str) -> tuple[LoadedModel, str]:
        if arch not in cache:
            path = torchvision_weights(arch)
            cached = tmp_path_factory.mktemp(arch) / "cache"
            cache[arch] = (build_model(ModelSpec(name=arch, weights=str(path)), StorageOptions(), cached), path.name)
        return cache[arch]

    return build


@pytest.mark.parametrize(("arch", "dim"), [("resnet50", 2048), ("vgg16", 4096), ("efficientnet_b0", 1280)])
def test_build_from_file(built, arch, dim):
    loaded, file_name = built(arch)
    assert loaded.embedding_dim == dim
    assert file_name.startswith(f"{arch}-") and file_name in loaded.model_id
    assert loaded.model_id == f"{arch}:{file_name}"
    assert len(loaded.categories) == 1000 == loaded.head.out_features
    assert isinstance(loaded.head, nn.Linear)

    predictor = Predictor(loaded, CPU, PredictorOptions(precision="auto", top_k=5, embeddings=True))
    out = predictor(_pixels(loaded, 2))
    assert out.topk_indices.shape == out.topk_scores.shape == (2, 5)
    assert out.embeddings.shape == (2, dim)
    assert (np.diff(out.topk_scores, axis=1) <= 0).all()
    assert ((out.topk_scores >= 0) & (out.topk_scores <= 1)).all()
    assert ((out.topk_indices >= 0) & (out.topk_indices < 1000)).all()
    assert np.isfinite(out.embeddings).all()


def test_full_softmax_sums_to_one(built):
    loaded, _ = built("efficientnet_b0")
    out = Predictor(loaded, CPU, PredictorOptions(precision="auto", top_k=1000, embeddings=False))(
        _pixels(loaded, 2, seed=1)
    )
    assert out.topk_scores.shape == (2, 1000)
    np.testing.assert_allclose(out.topk_scores.sum(axis=1), 1.0, rtol=1e-4)
    for row in out.topk_indices:
        assert sorted(row.tolist()) == list(range(1000))


def test_file_weights_take_default_metadata(built):
    """A torchvision-format file gets the architecture's DEFAULT weights' categories and preprocessing."""
    loaded, _ = built("efficientnet_b0")
    default = preprocess_of(weights_entry(ModelSpec(name="efficientnet_b0", weights="DEFAULT")))
    assert loaded.preprocess == default
    assert loaded.preprocess.interpolation == "bicubic"


# --------------------------------------------------------------------------------------------------- split_head


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_split_head_backbone_yields_penultimate_features(arch):
    torch.manual_seed(0)
    model = get_model(arch, weights=None).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    hook = last.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    assert len(seen) == 1

    backbone, head = split_head(model)
    assert head is last
    assert not any(m is last for m in backbone.modules())
    with torch.no_grad():
        features = backbone(x)
        torch.testing.assert_close(features, seen[0])
        torch.testing.assert_close(head(features), logits)
    assert features.shape == (2, head.in_features)


def test_split_head_needs_a_linear():
    with pytest.raises(ModelError, match="no Linear"):
        split_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


# --------------------------------------------------------------------------------------------- names and errors


def test_unknown_model_name_lists_known_names(tmp_path):
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(name="resnet5000"), StorageOptions(), tmp_path)
    message = str(info.value)
    assert "resnet5000" in message
    for known in ("resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0"):
        assert known in message
    check_model_name("resnet50")  # a known name passes


def test_unknown_weights_name_lists_valid_names(tmp_path):
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(name="resnet50", weights="IMAGENET9K_V9"), StorageOptions(), tmp_path)
    message = str(info.value)
    assert "IMAGENET9K_V9" in message
    for valid in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        assert valid in message


def test_random_init(tmp_path):
    loaded = build_model(ModelSpec(name="mobilenet_v3_small", weights=None), StorageOptions(), tmp_path)
    assert loaded.model_id == "mobilenet_v3_small:random"
    assert loaded.model_id.endswith(":random")
    assert len(loaded.categories) == 1000 and loaded.embedding_dim == 1024
    assert not list(tmp_path.iterdir())  # nothing fetched or cached


def test_efficientnet_b3_preset_from_weights_meta():
    entry = weights_entry(ModelSpec(name="efficientnet_b3", weights="IMAGENET1K_V1"))
    pre = preprocess_of(entry)
    assert (pre.resize_size, pre.crop_size) == (320, 300)
    assert pre.interpolation == "bicubic"
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))


def test_weights_entry_default_and_locations():
    assert weights_entry(ModelSpec(name="resnet50", weights="DEFAULT")).name == "IMAGENET1K_V2"
    assert weights_entry(ModelSpec(name="resnet50", weights=None)) is None
    assert weights_entry(ModelSpec(name="resnet50", weights="/models/resnet50-0123abcd.pth")) is None
    assert weights_entry(ModelSpec(name="resnet50", weights="s3://bucket/fine-tuned.pth")) is None
