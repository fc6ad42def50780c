"""What the driver knows about torchvision's models without importing torch: a catalog generated from the registry.

The driver (CLI, job service, planning) checks a model and weights name and an explicit top_k before any work starts,
and must not load torch to do it (~900 MB and seconds of imports in a process that only schedules). The catalog,
`model_catalog.json` beside this module, lists the registry's classification models, their weights names and default,
and each weights entry's categories and GFLOPs per image; `workers.models.registry_catalog()` regenerates it and a
test checks that it matches the installed torchvision, so it cannot silently go stale.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from schemas.errors import BadInput
from schemas.finetune import ModelCard
from schemas.specs import ModelSpec

CATALOG_FILE = "model_catalog.json"


class UnknownModel(BadInput):
    """The spec names a model or weights that the registry does not have."""


@functools.cache
def catalog() -> dict:
    """{"categories": {set name: [class names]},
    "models": {name: {"default": weights, "weights": {name: set|None}, "gflops": {name: GFLOPs per image|None}}}}"""
    return json.loads((resources.files("schemas") / CATALOG_FILE).read_text())


def is_artifact_location(name: str) -> bool:
    """A model name that is a location (path or URI) of a fine-tuned artifact; registry names have no '/'."""
    return "/" in name


def looks_like_weights_file(weights: str) -> bool:
    """A weights value naming a file (path or URI) rather than an enum entry such as IMAGENET1K_V2 (the rule of
    workers.weights.looks_like_location, which the worker applies)."""
    return "/" in weights or weights.endswith((".pth", ".pt", ".safetensors"))


def check_model(spec: ModelSpec) -> None:
    """Refuse an unknown registry name or weights name, listing what exists."""
    if is_artifact_location(spec.name):
        return
    models = catalog()["models"]
    if spec.name not in models:
        raise UnknownModel(f"unknown model {spec.name!r}; torchvision classification models are: {', '.join(models)}")
    _weights_name(spec)


def _weights_name(spec: ModelSpec) -> str | None:
    """The registry weights entry the spec names (None: random init or a weights file, which use the default's
    metadata). Accepts what torchvision's `Weights.verify` does: DEFAULT, IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V1.
    """
    if spec.weights is None or looks_like_weights_file(spec.weights):
        return None
    entry = catalog()["models"][spec.name]
    name = spec.weights.rsplit(".", 1)[-1]
    name = entry["default"] if name == "DEFAULT" else name
    if name not in entry["weights"]:
        names = ", ".join(["DEFAULT", *entry["weights"]])
        raise UnknownModel(f"model {spec.name!r} has no weights {spec.weights!r}; it has: {names}")
    return name


def class_names(spec: ModelSpec, card: ModelCard | None = None) -> list[str]:
    """The classes the model will predict: from the registry's metadata, or a fine-tuned artifact's model card
    (`card`, read by the caller: schemas reads no storage; workers.finetune.artifacts.card_of)."""
    if is_artifact_location(spec.name):
        return list(_card_of(spec, card).class_names)
    check_model(spec)
    entry = catalog()["models"][spec.name]
    categories = entry["weights"][_weights_name(spec) or entry["default"]]
    if categories is None:
        raise UnknownModel(f"weights {spec.weights!r} of {spec.name!r} have no classification head (features only)")
    return list(catalog()["categories"][categories])


def model_gflops(spec: ModelSpec, card: ModelCard | None = None) -> float | None:
    """GFLOPs per image of the model's forward pass, as torchvision's weights metadata gives it (`_ops`): the named
    weights' figure, else the default weights' (random init and weights files run the same architecture); for a
    fine-tuned artifact, its architecture's (at the base weights' crop: a smaller `image_size` costs less). None
    when the registry has no figure. `card`: as for class_names."""
    if is_artifact_location(spec.name):
        card = _card_of(spec, card)
        spec = ModelSpec(name=card.architecture, weights=card.base_weights)
    check_model(spec)
    entry = catalog()["models"][spec.name]
    return entry["gflops"].get(_weights_name(spec) or entry["default"])


def _card_of(spec: ModelSpec, card: ModelCard | None) -> ModelCard:
    if card is None:  # a caller's bug: an artifact's facts are on its card, which the caller reads
        raise TypeError(f"model {spec.name!r} is a fine-tuned artifact: pass its model card")
    return card
