"""Decode cost per image for each decoder: `python -m bench.decode [--repeat N]`.

Runs each decoder the way a worker's decode thread does (one image per call, then the batch step) over the
imagenet-sample photos on one thread, and prints the CPU milliseconds per photo (best of `--repeat`), the images per
second one core decodes, and the largest difference from torchvision's `weights.transforms()`. The load average is
printed first: other engineers share the machine, and a busy one inflates the figures. `nvjpeg` runs only where
torch sees a GPU (its cost is then mostly GPU time, so its row gives wall time per photo too).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.data import photo_payloads
from schemas.specs import PreprocessSpec

MOBILENET_PRESET = PreprocessSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
BATCH = 32


def _decoders():
    import torch

    from workers.label.decoders import NvjpegDecoder, PillowDecoder, TorchvisionDecoder

    decoders = {"pillow": PillowDecoder(MOBILENET_PRESET), "torchvision": TorchvisionDecoder(MOBILENET_PRESET)}
    if torch.cuda.is_available():
        decoders["nvjpeg"] = NvjpegDecoder(MOBILENET_PRESET, torch.device("cuda"))
    return decoders


def _run(decoder, photos: list[bytes]) -> tuple[float, float, np.ndarray]:
    """(CPU seconds, wall seconds, pixels) for all photos, in batches of BATCH."""
    import torch

    cpu, wall = time.process_time(), time.perf_counter()
    out = []
    for start in range(0, len(photos), BATCH):
        _, pixels = decoder.batch([decoder.decode(data) for data in photos[start : start + BATCH]])
        out.append(pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall, np.concatenate(out)


def _reference(photos: list[bytes]) -> np.ndarray:
    from workers.label.decoders import PillowDecoder

    return _run(PillowDecoder(MOBILENET_PRESET), photos)[2]  # Pillow's pixels are the reference's (tested)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    photos = photo_payloads()
    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {len(photos)} photos; 1 thread; best of {args.repeat}"
    )
    reference = _reference(photos)
    print(f"{'decoder':<12} {'ms CPU/photo':>12} {'ms wall/photo':>13} {'img/s/core':>10} {'max |diff|':>10}")
    for name, decoder in _decoders().items():
        _run(decoder, photos[:BATCH])  # warm-up: first calls load libraries and, on a GPU, its context
        runs = [_run(decoder, photos) for _ in range(args.repeat)]
        cpu, wall = min(r[0] for r in runs), min(r[1] for r in runs)
        diff = int(np.abs(runs[0][2].astype(int) - reference.astype(int)).max())
        per = 1000 * cpu / len(photos)
        print(f"{name:<12} {per:>12.2f} {1000 * wall / len(photos):>13.2f} {1000 / per:>10.0f} {diff:>10}")
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
