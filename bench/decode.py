"""Decode cost per image for each decoder: `python -m bench.decode [--repeat N] [--sets sample,large]`.

Runs each decoder the way a worker's decode thread does (one image per call, then the batch step) on one thread,
over two sets: the 200 imagenet-sample photos (most about 500x375) and large photos (bench.data.large_payloads: the
sample's photos of 512 px or more enlarged to 4032 px on the long side, a 12 MP phone photo's size). It prints the CPU
milliseconds per photo (best of `--repeat`), the photos per second one core decodes, and the largest and mean
difference, in grey levels, from torchvision's `weights.transforms()` (whose pixels Pillow's exact path gives). The
load average is printed first: other engineers share the machine, and a busy one inflates the figures. `nvjpeg` runs
only where torch sees a GPU (its cost is then mostly GPU time, so its row gives wall time per photo too).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.data import large_payloads, photo_payloads
from schemas.specs import PreprocessSpec

MOBILENET_PRESET = PreprocessSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
BATCH = 32
SETS = {"sample": photo_payloads, "large": large_payloads}


def _decoders():
    import torch

    from workers.label.decoders import NvjpegDecoder, PillowDecoder, PillowDraftDecoder, TorchcodecDecoder

    decoders = {"pillow": PillowDecoder(MOBILENET_PRESET), "pillow-draft": PillowDraftDecoder(MOBILENET_PRESET),
                "torchcodec": TorchcodecDecoder(MOBILENET_PRESET)}  # fmt: skip
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


def _load() -> str:
    load = os.getloadavg()
    return f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sets", default="sample,large", help=f"comma-separated, of: {', '.join(SETS)}")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"load average {_load()}; 1 thread; best of {args.repeat}")
    print(f"{'set':<7} {'decoder':<13} {'ms CPU/photo':>12} {'ms wall/photo':>13} {'photos/s/core':>13} "
          f"{'max |diff|':>10} {'mean |diff|':>11}")  # fmt: skip
    for set_name in args.sets.split(","):
        photos = SETS[set_name]()
        reference = _reference(photos)
        for name, decoder in _decoders().items():
            _run(decoder, photos[:BATCH])  # warm-up: first calls load libraries and, on a GPU, its context
            runs = [_run(decoder, photos) for _ in range(args.repeat)]
            cpu, wall = min(r[0] for r in runs), min(r[1] for r in runs)
            diff = np.abs(runs[0][2].astype(int) - reference.astype(int))
            per = 1000 * cpu / len(photos)
            print(f"{set_name:<7} {name:<13} {per:>12.2f} {1000 * wall / len(photos):>13.2f} {1000 / per:>13.0f} "
                  f"{int(diff.max()):>10} {diff.mean():>11.4f}   ({len(photos)} photos)")  # fmt: skip
    print(f"load average after {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
