"""Benchmark inputs: WebDataset tar shards of real photos (or small synthetic JPEGs), uploaded to S3."""

from __future__ import annotations

import io
import logging
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.s3server import S3Server
from workers.io.storage import join, open_storage

log = logging.getLogger(__name__)

IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
SYNTHETIC_VARIANTS = 64  # distinct generated images, cycled; JPEG size and decode cost barely vary between them


@dataclass(frozen=True)
class Dataset:
    uri: str  # s3://bucket/prefix holding the tar shards
    images: int
    shards: int


def photo_payloads(folder: Path = IMAGENET_SAMPLE) -> list[bytes]:
    """The sample photos' JPEG bytes, in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise FileNotFoundError(f"no JPEG photos in {folder}")
    return [p.read_bytes() for p in files]


def synthetic_payloads(size: int, count: int = SYNTHETIC_VARIANTS, seed: int = 0) -> list[bytes]:
    """Small generated JPEGs (smooth gradients plus noise, like a downscaled photo)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out = []
    for _ in range(count):
        base = rng.uniform(0, 1, 3) * ramp[:, None, None] + rng.uniform(0, 1, 3) * ramp[None, :, None]
        pixels = np.clip(base / 2 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def upload_tar_shards(server: S3Server, uri: str, payloads: list[bytes], images: int, per_shard: int) -> Dataset:
    """Write `images` samples (cycling `payloads`) as tar shards of `per_shard` under `uri`; one shard on disk at a
    time, so 50k-image sets need no more than one shard of local space."""
    storage = open_storage(uri, server.options())
    shards = 0
    with tempfile.TemporaryDirectory(prefix="bench-tars-") as tmp:
        for start in range(0, images, per_shard):
            path = Path(tmp, f"{shards:06d}.tar")
            _write_tar(path, payloads, range(start, min(start + per_shard, images)))
            storage.upload_file(str(path), join(uri, path.name))
            path.unlink()
            shards += 1
    log.info("uploaded %d images in %d tar shards to %s", images, shards, uri)
    return Dataset(uri=uri, images=images, shards=shards)


def _write_tar(path: Path, payloads: list[bytes], indices: range) -> None:
    with tarfile.open(path, "w") as tar:
        for i in indices:
            _add(tar, f"{i:08d}.jpg", payloads[i % len(payloads)])
            _add(tar, f"{i:08d}.cls", str(i % len(payloads)).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


LARGE_LONG_SIDE = 4032  # a 12 MP phone photo's (4032x3024)


def large_payloads(folder: Path = IMAGENET_SAMPLE, min_short: int = 512, long_side: int = LARGE_LONG_SIDE,
                   quality: int = 90) -> list[bytes]:  # fmt: skip
    """Photos of a phone camera's size, for the decoders' cost on large images: the sample has none above 1,280 px,
    so each sample photo with a short side of `min_short` or more is enlarged (Lanczos) to `long_side` on its long side
    and encoded as a JPEG at `quality`. Decoding cost follows the pixel count and the entropy-coded size, so the CPU
    figures stand for real photos of that size; an enlarged photo holds less fine detail than a native one, so the
    pixel deviations measured on these understate a real photo's."""
    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg")):
        with Image.open(path) as img:
            if min(img.size) < min_short:
                continue
            scale = long_side / max(img.size)
            big = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)),
                                            Image.Resampling.LANCZOS)  # fmt: skip
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    if not out:
        raise FileNotFoundError(f"no photo in {folder} has a short side of {min_short} px or more")
    return out
