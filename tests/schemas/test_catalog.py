"""schemas.catalog: the torch-free model catalog matches the installed torchvision registry and answers the driver's
checks (names, weights, classes) without loading torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schemas.catalog import UnknownModel, catalog, check_model, class_names
from schemas.finetune import MODEL_CARD_NAME
from schemas.specs import ModelSpec
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
        class_names(ModelSpec(name=str(tmp_path)))
    with pytest.raises(UnknownModel, match="not a fine-tuned artifact"):
        class_names(ModelSpec(name=str(tmp_path / "nothing-here")))


def test_checks_leave_torch_unloaded():
    code = (
        "import sys; from schemas.catalog import class_names, check_model; from schemas.specs import ModelSpec;"
        "check_model(ModelSpec(name='resnet50')); class_names(ModelSpec(name='mobilenet_v2'));"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    check_model(ModelSpec(name="mobilenet_v3_small"))
