"""Every local path in a job spec made absolute where the user stands, before the spec leaves the driver.

Ray workers (and, with $RAY_ADDRESS, a whole other machine's processes) run in their own working directories: a
relative `--weights ./w.pth` resolved there names another file or none. The job id hashes these paths too, so the
same job started from another folder is still the same job. s3:// URIs (and other URIs) are kept as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.specs import LabelJobSpec, ModelSpec
from workers.io.storage import normalise_uri

if TYPE_CHECKING:
    from schemas.finetune import FinetuneJobSpec

_WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors")
# torchvision's weights enum entries: IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1, DEFAULT.
_ENUM_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def label_locations(spec: LabelJobSpec) -> LabelJobSpec:
    """A label spec with its local paths absolute: input, allowed roots, output, model artifact, weights, weights
    folder. (Any kind's spec: jobs.kinds.absolute_locations.)"""
    inp = spec.input.model_copy(
        update={"uri": _path(spec.input.uri), "allowed_roots": tuple(_path(r) for r in spec.input.allowed_roots)}
    )
    # A fine-tuned artifact given as the model is a location (registry names have no '/').
    name = _path(spec.model.name) if _has_separator(spec.model.name) else spec.model.name
    model = _weights(spec.model).model_copy(update={"name": name})
    return spec.model_copy(update={"input": inp, "output": _path(spec.output), "model": model})


def finetune_locations(spec: FinetuneJobSpec) -> FinetuneJobSpec:
    """A fine-tune spec with its local paths absolute: data, validation data, allowed roots, base weights, weights
    folder, output."""
    val = spec.data.validation_uri
    data = spec.data.model_copy(update={"uri": _path(spec.data.uri), "validation_uri": _path(val) if val else val,
                                        "allowed_roots": tuple(_path(r) for r in spec.data.allowed_roots)})  # fmt: skip
    return spec.model_copy(update={"data": data, "base": _weights(spec.base), "output": _path(spec.output),
                                   "corrections": tuple(_path(q) for q in spec.corrections)})  # fmt: skip


def curation_locations(spec):
    """A curation spec (schemas.curation) with its local paths absolute: what it reads, its split, its output."""
    update = {"output": _path(spec.output)}
    for name in ("source", "split", "pool", "work"):
        if getattr(spec, name, None):
            update[name] = _path(getattr(spec, name))
    if hasattr(spec, "sources"):
        update["sources"] = tuple(_path(s) for s in spec.sources)
    if hasattr(spec, "finetune_spec"):  # a labelled set and a base model, as a fine-tune's
        tuned = finetune_locations(spec.finetune_spec())
        update |= {"data": tuned.data, "base": tuned.base}
    return spec.model_copy(update=update)


def _weights(model: ModelSpec) -> ModelSpec:
    weights, folder = model.weights, model.weights_dir
    return model.model_copy(
        update={
            "weights": _path(weights) if weights and is_weights_file(weights) else weights,
            "weights_dir": _path(folder) if folder else folder,
        }
    )


def is_weights_file(weights: str) -> bool:
    """True when `weights` names a file (or URI) rather than a torchvision weights enum entry: it has a path
    separator or a weights suffix, or it is an existing file whose name is not an enum name."""
    if _has_separator(weights) or weights.endswith(_WEIGHTS_SUFFIXES):
        return True
    return not _ENUM_NAME.fullmatch(weights) and Path(weights).expanduser().is_file()


def _has_separator(value: str) -> bool:
    return "/" in value or os.sep in value or value.startswith("~")


def _path(location: str) -> str:
    """A local path made absolute (`~` expanded, as storage resolves it); a URI kept as it is."""
    return location if "://" in location else normalise_uri(location)
