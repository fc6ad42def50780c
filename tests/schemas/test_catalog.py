"""schemas.catalog: the torch-free model catalog matches the installed torchvision registry and answers the driver's
checks (names, weights, classes) without loading torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schemas.catalog import UnknownModel, catalog, check_model, class_names, model_gflops
from schemas.finetune import MODEL_CARD_NAME, ModelCard
from schemas.specs import ModelSpec
from workers.finetune.artifacts import ArtifactError, card_of
from workers.models import model_categories, registry_catalog


def test_catalog_file_matches_the_installed_registry():
    assert catalog() == registry_catalog(), "regenerate schemas/model_catalog.json (see workers.models)"


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(name="resnet50", weights="IMAGENET1K_V2"),
        ModelSpec(name="resnet50", weights="ResNet50_Weights.IMAGENET1K_V1"),
        ModelSpec(name="mobilenet_v2"),
        ModelSpec(name="vgg16", weights=None),
        ModelSpec(name="efficientnet_b0", weights="/weights/custom.pth"),
    ],
)
def test_class_names_agree_with_torchvision(spec):
    assert class_names(spec) == model_categories(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec(name="resnet5O"), "unknown model 'resnet5O'"),
        (ModelSpec(name="resnet50", weights="IMAGENET1K_V9"), "has no weights 'IMAGENET1K_V9'; it has: DEFAULT,"),
        (ModelSpec(name="vgg16", weights="IMAGENET1K_FEATURES"), "no classification head"),
    ],
)
def test_bad_names_are_refused_naming_what_exists(spec, message):
    with pytest.raises(UnknownModel, match=message.replace("(", r"\(")):
        class_names(spec)


def test_an_artifact_reads_its_classes_from_the_model_card(tmp_path):
    (tmp_path / MODEL_CARD_NAME).write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(Exception, match="class_names|validation"):  # a card missing its other fields is refused
        card_of(ModelSpec(name=str(tmp_path)))
    with pytest.raises(ArtifactError, match="no model card at"):
        card_of(ModelSpec(name=str(tmp_path / "nothing-here")))
    # Only what the catalog reads of a card (the whole card is tested in tests/workers/finetune/test_artifacts.py).
    card = ModelCard.model_construct(architecture="resnet18", base_weights="IMAGENET1K_V1", class_names=["cat", "dog"])
    spec = ModelSpec(name=str(tmp_path))
    assert class_names(spec, card) == ["cat", "dog"]
    assert model_gflops(spec, card) == model_gflops(ModelSpec(name=card.architecture, weights=card.base_weights))
    with pytest.raises(TypeError, match="pass its model card"):  # schemas reads no storage: the caller reads it
        class_names(spec)
    assert card_of(ModelSpec(name="resnet50")) is None  # a registry model has no card


@pytest.mark.parametrize(
    ("spec", "weights"),
    [
        (ModelSpec(name="resnet50", weights="IMAGENET1K_V1"), "IMAGENET1K_V1"),
        (ModelSpec(name="resnet50"), "IMAGENET1K_V2"),  # DEFAULT
        (ModelSpec(name="vit_b_16", weights="IMAGENET1K_SWAG_E2E_V1"), "IMAGENET1K_SWAG_E2E_V1"),  # its own 384 px
        (ModelSpec(name="mobilenet_v2", weights=None), "IMAGENET1K_V1"),  # random init: the default's figure
        (ModelSpec(name="efficientnet_b0", weights="/weights/custom.pth"), "IMAGENET1K_V1"),
    ],
)
def test_gflops_per_image_are_torchvisions_for_the_weights_run(spec, weights):
    from torchvision.models import get_model_weights

    assert model_gflops(spec) == get_model_weights(spec.name)[weights].meta["_ops"] > 0


def test_checks_leave_torch_unloaded():
    code = (
        "import sys; from schemas.catalog import class_names, check_model; from schemas.specs import ModelSpec;"
        "check_model(ModelSpec(name='resnet50')); class_names(ModelSpec(name='mobilenet_v2'));"
        "from schemas.catalog import model_gflops; model_gflops(ModelSpec(name='resnet50'));"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    check_model(ModelSpec(name="mobilenet_v3_small"))
