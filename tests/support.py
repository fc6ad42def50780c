"""Test data builders shared by several test modules (fixtures wrapping them live in conftest.py)."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import torch
from torchvision.models import get_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"
PLANTS = SHARED_DATA / "plants"


def write_torchvision_weights(arch: str, folder: Path, num_classes: int = 1000, seed: int = 0) -> Path:
    """A randomly initialised state dict saved the way torchvision publishes weights: `<arch>-<sha256[:8]>.pth`.

    Real ResNet/VGG/EfficientNet weights cannot be downloaded here; these exercise the same loading path.
    """
    torch.manual_seed(seed)
    model = get_model(arch, weights=None, num_classes=num_classes)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    path = folder / f"{arch}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def imagenet_labels() -> list[dict]:
    """Rows of imagenet-sample/labels.csv: file, wnid, name, class_index."""
    with open(IMAGENET_SAMPLE / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def webdataset_key(file_name: str) -> str:
    """The WebDataset key we give a photo in test tars: its name without extension, dots and spaces made safe."""
    return file_name.rsplit(".", 1)[0].replace(".", "_")


def write_tar_shards(files: list[Path], folder: Path, per_shard: int, keys: list[str] | None = None) -> list[Path]:
    """WebDataset tar shards of `files` (`<key>.jpg` members plus a `<key>.json` sidecar), `per_shard` each."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = keys or [webdataset_key(f.name) for f in files]
    shards = []
    for start in range(0, len(files), per_shard):
        path = folder / f"{start // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for file, key in zip(files[start : start + per_shard], keys[start : start + per_shard], strict=True):
                _add(tar, f"{key}.jpg", file.read_bytes())
                _add(tar, f"{key}.json", b'{"source": "%s"}' % file.name.encode())
        shards.append(path)
    return shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
