"""Test data builders shared by several test modules (fixtures wrapping them live in conftest.py)."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow.dataset as ds
import torch
from torchvision.models import get_model

from jobs.output.lease import LeaseRecord
from schemas.layout import LEASE_FILE

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


def assert_exactly_once(out: Path, photos: Path) -> int:
    """One row per input image, no duplicates, and nothing partial or stray under the output prefix."""
    keys = ds.dataset(out, format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(p.name for p in photos.iterdir())
    leftovers = [p for p in out.rglob("*") if p.is_file() and not _is_committed(out, p)]
    assert leftovers == []
    # The writer lease: one generation left (the history below it pruned), released by the run that finished.
    leases = [p for p in out.rglob("*") if p.is_file() and LEASE_FILE.fullmatch(p.relative_to(out).as_posix())]
    assert len(leases) <= 1 and all(LeaseRecord.model_validate_json(p.read_text()).released for p in leases)
    return len(keys)


def _is_committed(out: Path, path: Path) -> bool:
    rel = path.relative_to(out).as_posix()
    return (
        rel in ("_job.json", "_owner.json")  # the manifest, and the job's claim on the output prefix
        or LEASE_FILE.fullmatch(rel) is not None  # the writer lease (jobs.output.lease), checked by the caller
        or (rel.startswith("data/part-") and rel.endswith(".parquet"))
        or (rel.startswith("_done/") and rel.endswith(".json"))
    )
