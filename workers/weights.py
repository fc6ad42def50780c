"""Find a model's weight file and load it safely.

Resolution order for a weights *name* (IMAGENET1K_V1, DEFAULT): the spec's `weights_dir`, then
$BULKLABEL_WEIGHTS_DIR, then torch's download cache, then torchvision's download. A weights
*location* (path or s3:// URI) is used as given. Either way, a file named the torchvision way
(`<arch>-<sha256 prefix>.pth`) must match its hash, and every load is `weights_only=True`:
a checkpoint that holds pickled code is refused, never run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from schemas.specs import ModelSpec, StorageOptions
from workers.io.storage import normalise_uri, open_storage

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "BULKLABEL_WEIGHTS_DIR"
# torch.hub's convention: the first hex digits of the file's sha256 follow the last '-' of its name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.(?:pth|pt|safetensors)$")
_HASH_CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """Weights could not be found, verified or loaded."""


def looks_like_location(weights: str) -> bool:
    """True when `weights` names a file rather than a torchvision weights enum entry."""
    return "/" in weights or weights.endswith((".pth", ".pt", ".safetensors"))


def search_dirs(spec: ModelSpec) -> list[Path]:
    """Folders searched, in order, for a named weight file."""
    dirs = [spec.weights_dir, os.environ.get(WEIGHTS_DIR_ENV), os.path.join(torch.hub.get_dir(), "checkpoints")]
    return [Path(d).expanduser() for d in dirs if d]


def verify_hash(path: Path) -> None:
    """Refuse a file whose name carries a sha256 prefix that its content does not match."""
    match = _HASH_IN_NAME.search(path.name)
    if not match:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    expected, actual = match.group(1), digest.hexdigest()
    if not actual.startswith(expected):
        raise WeightsError(
            f"{path}: sha256 starts with {actual[: len(expected)]}, its name says {expected}; refusing it"
        )


def fetch_location(location: str, storage: StorageOptions, cache_dir: Path) -> Path:
    """A local path for a weights file given as a path or s3:// URI (downloaded once into `cache_dir`)."""
    if not location.startswith("s3://"):
        path = Path(normalise_uri(location))
        if not path.is_file():
            raise WeightsError(f"weights file {location} does not exist")
        return path
    target = cache_dir / hashlib.sha256(location.encode()).hexdigest()[:16] / location.rsplit("/", 1)[-1]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(open_storage(location, storage).read_bytes(location))
        tmp.replace(target)
    return target


def find_named(file_name: str, url: str, spec: ModelSpec) -> Path:
    """The local file for torchvision weights `file_name`: a search folder, else torchvision's download."""
    dirs = search_dirs(spec)
    for folder in dirs:
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    log.info("weights %s not in %s; downloading %s", file_name, [str(d) for d in dirs], url)
    try:
        torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same actionable message
        raise WeightsError(
            f"weights file {file_name} is not in any of {[str(d) for d in dirs]} and downloading {url} failed "
            f"({type(exc).__name__}: {exc}). On an air-gapped machine put the file in ${WEIGHTS_DIR_ENV}."
        ) from exc
    return Path(torch.hub.get_dir(), "checkpoints", file_name)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict, never unpickling code."""
    verify_hash(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError and others for unsafe files
        raise WeightsError(f"{path}: refused to load: not a plain state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return state
