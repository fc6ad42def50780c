"""Build a classification model from torchvision's registry, split into backbone and head.

Every torchvision classifier ends in a Linear layer; its input is the penultimate-layer feature
vector users want as the embedding (2048 for ResNet-50, 1280 for MobileNetV2, 4096 for VGG-16).
We swap that last Linear for Identity, so one forward pass yields the embedding and the head turns
it into logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from schemas.finetune import MODEL_CARD_NAME
from schemas.specs import ModelSpec, PreprocessSpec, StorageOptions
from workers import weights as weights_io
from workers.finetune.artifacts import ArtifactError, is_artifact_location, read_card, sha256_of
from workers.io.storage import join, normalise_uri
from workers.vision import models as tv_models

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """The spec names a model or weights that cannot be used."""


@dataclass
class LoadedModel:
    """A model ready for inference: features from `backbone`, logits from `head`."""

    backbone: nn.Module
    head: nn.Linear
    categories: list[str]
    preprocess: PreprocessSpec
    model_id: str  # recorded in every output row: "<arch>:<weights>"

    @property
    def embedding_dim(self) -> int:
        return self.head.in_features


def classification_models() -> list[str]:
    """Names of torchvision's image classification models (the registry, not a hand-kept list)."""
    return tv_models.list_models(module=tv_models)


def check_model_name(name: str) -> None:
    """Fail fast on a name the registry does not know, listing what it does. A fine-tuned artifact's location
    (registry names have no '/') passes; its model card is checked where it is read."""
    if is_artifact_location(name):
        return
    known = classification_models()
    if name not in known:
        import torchvision

        from workers.ship.history import needs

        if elsewhere := needs(name):
            raise ModelError(f"model {name!r} is not in this torchvision ({torchvision.__version__}): it needs "
                             f"{elsewhere}")  # fmt: skip
        raise ModelError(f"unknown model {name!r}; torchvision classification models are: {', '.join(known)}")


def weights_entry(spec: ModelSpec):
    """The torchvision weights enum entry named by the spec, or None for a file or random init."""
    if spec.weights is None or weights_io.looks_like_location(spec.weights) or is_artifact_location(spec.name):
        return None
    enum = tv_models.get_model_weights(spec.name)
    try:
        return enum.verify(spec.weights)
    except (KeyError, ValueError) as exc:
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ModelError(f"model {spec.name!r} has no weights {spec.weights!r}; it has: {names}") from exc


def model_categories(spec: ModelSpec, storage: StorageOptions | None = None) -> list[str]:
    """Class names the model will predict, known without loading it (for checks before a job starts)."""
    if is_artifact_location(spec.name):
        return list(read_card(spec.name, storage).class_names)
    check_model_name(spec.name)
    return list((weights_entry(spec) or tv_models.get_model_weights(spec.name).DEFAULT).meta["categories"])


def preprocess_of(weights_enum_entry) -> PreprocessSpec:
    """The evaluation preset that torchvision attaches to a weights entry."""
    preset = weights_enum_entry.transforms()
    return PreprocessSpec(
        resize_size=int(preset.resize_size[0]),
        crop_size=int(preset.crop_size[0]),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )


def build_model(spec: ModelSpec, storage: StorageOptions, cache_dir: Path) -> LoadedModel:
    """Construct the architecture, load verified weights, and split off the classification head."""
    if is_artifact_location(spec.name):  # a fine-tuned model: architecture, classes, preprocessing from its card
        return load_artifact_model(spec.name, storage, cache_dir)
    check_model_name(spec.name)
    entry = weights_entry(spec)
    # Category names and preprocessing come from weights metadata; files in torchvision's format
    # are assumed to share the architecture's default (ImageNet) metadata.
    meta_entry = entry or tv_models.get_model_weights(spec.name).DEFAULT
    categories = list(meta_entry.meta["categories"])
    model = tv_models.get_model(spec.name, weights=None, num_classes=len(categories))
    weights_id = _load_weights(model, spec, entry, storage, cache_dir)
    model.eval()
    backbone, head = split_head(model)
    return LoadedModel(backbone, head, categories, preprocess_of(meta_entry), f"{spec.name}:{weights_id}")


def _load_weights(model: nn.Module, spec: ModelSpec, entry, storage: StorageOptions, cache_dir: Path) -> str:
    if spec.weights is None:
        log.warning("model %s uses random weights (weights: null): labels will be meaningless", spec.name)
        return "random"
    if entry is not None:
        file_name = entry.url.rsplit("/", 1)[-1]
        path = weights_io.find_named(file_name, entry.url, spec)
        weights_id = entry.name
    else:
        path = weights_io.fetch_location(spec.weights, storage, cache_dir)
        weights_id = path.name
    state = weights_io.load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise weights_io.WeightsError(f"{path} does not fit {spec.name}: {exc}") from exc
    log.info("loaded %s weights from %s", spec.name, path)
    return weights_id


def load_artifact_model(location: str, options: StorageOptions, cache_dir: Path) -> LoadedModel:
    """A LoadedModel from a fine-tuned artifact: architecture, class names and preprocessing from its card
    (workers.finetune.artifacts, torch-free), weights from its safetensors file, checked against the card's sha256.
    Here, on the model side, so that the artifact layout imports no torch."""
    from safetensors.torch import load_file  # torch, which its loader needs imported, is imported above

    location = normalise_uri(location).rstrip("/").removesuffix(f"/{MODEL_CARD_NAME}")
    card = read_card(location, options)
    path = weights_io.fetch_location(join(location, card.weights_file), options, cache_dir)
    actual = sha256_of(path)
    if actual != card.weights_sha256:
        raise ArtifactError(f"{path}: sha256 is {actual[:16]}…, the model card says {card.weights_sha256[:16]}…")
    model = tv_models.get_model(card.architecture, weights=None, num_classes=len(card.class_names))
    backbone, head = split_head(model)
    try:
        nn.ModuleDict({"backbone": backbone, "head": head}).load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path} does not fit {card.architecture} with {len(card.class_names)} classes") from exc
    backbone.eval()
    log.info("loaded %s (%s, %d classes) from %s", card.artifact_id, card.architecture, len(card.class_names),
             location)  # fmt: skip
    return LoadedModel(backbone, head.eval(), list(card.class_names), card.preprocess, card.artifact_id)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Replace the model's last Linear layer with Identity; return (backbone, that Linear)."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise ModelError(f"{type(model).__name__} has no Linear classification head to split off")
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model, last


def registry_catalog() -> dict:
    """The torch-free catalog (schemas/catalog.py) as the installed torchvision's registry has it; after upgrading
    torchvision, regenerate schemas/model_catalog.json from it (tests/schemas/test_catalog.py fails until then):
    `python -c "import json, workers.models as m; print(json.dumps(m.registry_catalog()))" > schemas/model_catalog.json`
    """
    sets: dict[tuple[str, ...], str] = {}
    models = {}
    for name in classification_models():
        enum = tv_models.get_model_weights(name)
        weights, gflops = {}, {}
        for entry in enum:
            categories = entry.meta.get("categories")
            if categories is not None:
                categories = sets.setdefault(tuple(categories), f"set{len(sets)}")
            weights[entry.name] = categories
            # torchvision's GFLOPs per image at the weights' own crop (`_ops`), for `compile: auto`'s cost estimate
            gflops[entry.name] = entry.meta.get("_ops")
        models[name] = {"default": enum.DEFAULT.name, "weights": weights, "gflops": gflops}
    return {"categories": {key: list(names) for names, key in sets.items()}, "models": models}
