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

from jobs.errors import BadInput
from schemas.finetune import MODEL_CARD_NAME, ModelCard
from schemas.specs import ModelSpec, StorageOptions

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


def class_names(spec: ModelSpec, storage: StorageOptions | None = None) -> list[str]:
    """The classes the model will predict: from the registry's metadata, or a fine-tuned artifact's model card."""
    if is_artifact_location(spec.name):
        return list(_read_card(spec.name, storage).class_names)
    check_model(spec)
    entry = catalog()["models"][spec.name]
    categories = entry["weights"][_weights_name(spec) or entry["default"]]
    if categories is None:
        raise UnknownModel(f"weights {spec.weights!r} of {spec.name!r} have no classification head (features only)")
    return list(catalog()["categories"][categories])


def model_gflops(spec: ModelSpec, storage: StorageOptions | None = None) -> float | None:
    """GFLOPs per image of the model's forward pass, as torchvision's weights metadata gives it (`_ops`): the named
    weights' figure, else the default weights' (random init and weights files run the same architecture); for a
    fine-tuned artifact, its architecture's (at the base weights' crop: a smaller `image_size` costs less). None
    when the registry has no figure."""
    if is_artifact_location(spec.name):
        card = _read_card(spec.name, storage)
        spec = ModelSpec(name=card.architecture, weights=card.base_weights)
    check_model(spec)
    entry = catalog()["models"][spec.name]
    return entry["gflops"].get(_weights_name(spec) or entry["default"])


def _read_card(location: str, storage: StorageOptions | None) -> ModelCard:
    from workers.storage import join, normalise_uri, open_storage  # storage is torch-free; kept out of schemas' imports

    location = normalise_uri(location).rstrip("/")
    uri = location if location.endswith(".json") else join(location, MODEL_CARD_NAME)
    store = open_storage(uri, storage)
    if not store.exists(uri):
        raise UnknownModel(f"model {location!r} is not a fine-tuned artifact: it has no {MODEL_CARD_NAME}")
    return ModelCard.model_validate_json(store.read_bytes(uri))
