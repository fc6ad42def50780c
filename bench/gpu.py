"""GPU benchmark, for a lent device machine (run through bench/gpu.sh): ResNet-50, bf16, channels_last, eager and
`torch.compile`d, end to end from local tar shards to committed Parquet (top-5 + embeddings), each against the same
card's forward-only rate. Everything measured is the product's own path: `LabelWorker` with the spec's `decoder`
and `model.compile`, and its `Predictor`; nothing here decodes or runs the model itself.

Variants (each eager and compiled):
- forward: the worker's Predictor on a uint8 batch already on the GPU (the card's rate, top-k copied back);
- decoder=pillow / torchvision: the worker decoding on `decode_threads` CPU threads;
- decoder=nvjpeg: the worker decoding each batch's JPEGs on the GPU, resizing and cropping there.
Ray is not used: one process holds the GPU, as one bulklabel worker does; Ray only adds the per-shard dispatch
measured on the CPU bench (`python -m bench scale`).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PHOTOS = (Path(".bench-gpu/photos"), Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample")


@dataclass(frozen=True)
class GpuBenchConfig:
    model: str = "resnet50"
    images: int = 20_480
    images_per_shard: int = 2048  # a multiple of the batch size: compiled graphs see one shape
    batch_size: int = 256
    decode_threads: int = max(1, (os.cpu_count() or 2) - 2)
    forward_batches: int = 40
    device: str = "cuda"
    precision: str = "bf16"
    compile_modes: tuple[bool, ...] = (False, True)


@dataclass(frozen=True)
class Row:
    variant: str
    compiled: bool
    rate: float


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GpuBenchConfig(
        images=args.images,
        images_per_shard=args.images_per_shard,
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        forward_batches=args.forward_batches,
        device=args.device,
        precision=args.precision,
        compile_modes=(False,) if args.no_compile else (False, True),
    )
    rows = run(config, _photos_dir(args.photos))
    _print_table(rows, config)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    defaults = GpuBenchConfig()
    parser.add_argument("--photos", type=Path, help="folder of JPEGs to cycle (default: .bench-gpu/photos)")
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--images-per-shard", type=int, default=defaults.images_per_shard)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--decode-threads", type=int, default=defaults.decode_threads)
    parser.add_argument("--forward-batches", type=int, default=defaults.forward_batches)
    parser.add_argument("--device", default=defaults.device, help="cuda (cpu only for a dry run of the script)")
    parser.add_argument("--precision", default=defaults.precision, choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--no-compile", action="store_true")
    return parser


def _photos_dir(given: Path | None) -> Path:
    for folder in [given] if given else DEFAULT_PHOTOS:
        if folder.is_dir() and any(folder.glob("*.JPEG")) or folder.is_dir() and any(folder.glob("*.jpg")):
            return folder
    raise FileNotFoundError(f"no photos in {given or DEFAULT_PHOTOS}: run bench/gpu_prepare.sh first")


DECODERS = ("pillow", "torchcodec", "nvjpeg")


def run(config: GpuBenchConfig, photos: Path) -> list[Row]:
    import torch

    from bench.data import _write_tar, photo_payloads
    from schemas.shards import ShardTask
    from tests.support import write_torchvision_weights

    if config.device == "cuda":
        log.info("GPU: %s, torch %s", torch.cuda.get_device_name(), torch.__version__)
        torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    tasks = _write_shards(tmp / "in", photo_payloads(photos), config, _write_tar, ShardTask)
    weights = write_torchvision_weights(config.model, tmp / "weights")
    log.info("%d images in %d shards; %d decode threads", config.images, len(tasks), config.decode_threads)
    rows = []
    for compiled in config.compile_modes:
        worker = None
        for decoder in DECODERS:
            spec = _spec(config, tmp, weights, decoder, compiled)
            worker = worker or _worker(spec)  # one worker per compile mode: it compiles once, as a pool does
            if decoder == DECODERS[0]:
                rows.append(Row("forward", compiled, forward_rate(worker, spec, config)))
            rows.append(Row(f"decoder={decoder}", compiled, _timed_shards(worker, spec, tasks)))
            log.info("%s compiled=%s: %.0f img/s", rows[-1].variant, compiled, rows[-1].rate)
        print(f"# compiled={compiled}: compile_seconds={worker.describe().get('compile_seconds')}")
        worker.close()
    return rows


def _spec(config: GpuBenchConfig, tmp: Path, weights: Path, decoder: str, compiled: bool):
    from schemas.specs import LabelJobSpec

    return LabelJobSpec(
        input={"uri": str(tmp / "in"), "format": "tar"},
        output=str(tmp / f"out-{decoder}-{'compiled' if compiled else 'eager'}"),
        model={
            "name": config.model,
            "weights": str(weights),
            "device": config.device,
            "precision": config.precision,
            "compile": compiled,
        },
        batch_size=config.batch_size,
        decode_threads=config.decode_threads,
        decoder=decoder,
    )


def _worker(spec):
    from schemas.shards import WorkerSpec
    from workers.label.label_worker import LabelWorker

    return LabelWorker(WorkerSpec.of(spec), torch_threads=os.cpu_count() or 1)


def _write_shards(folder: Path, payloads: list[bytes], config: GpuBenchConfig, write_tar, shard_task) -> list:
    folder.mkdir(parents=True)
    tasks = []
    for i, start in enumerate(range(0, config.images, config.images_per_shard)):
        name = f"{i:05d}.tar"
        write_tar(folder / name, payloads, range(start, min(start + config.images_per_shard, config.images)))
        tasks.append(shard_task(shard_id=f"{i:05d}", kind="tar", base_uri=str(folder), keys=(name,)))
    return tasks


def forward_rate(worker, spec, config: GpuBenchConfig) -> float:
    """Images/s of the job's own Predictor (normalise, backbone, head, top-k, embeddings copied back) on a uint8
    batch already on the device (median of 5 runs, after warm-up: cudnn autotuning, compilation)."""
    import torch

    from schemas.shards import ShardJob

    predictor = worker._context(ShardJob.of(spec, "gpu-bench")).predictor
    pixels = torch.randint(0, 256, (config.batch_size, 224, 224, 3), dtype=torch.uint8, device=worker.device)
    for _ in range(3):
        predictor(pixels)
    rates = []
    for _ in range(5):
        started = time.perf_counter()
        batches = max(1, config.forward_batches // 5)
        for _ in range(batches):
            predictor(pixels)
        rates.append(batches * config.batch_size / (time.perf_counter() - started))
    return statistics.median(rates)


def _timed_shards(worker, spec, tasks: list) -> float:
    """Images/s over all shards but the first, which warms up (compilation, cudnn, decoder) untimed."""
    from schemas.shards import ShardJob

    job = ShardJob.of(spec, "gpu-bench")
    worker.label_shard_blocking(tasks[0], 1, job=job)
    started = time.perf_counter()
    images = sum(worker.label_shard_blocking(task, 1, job=job).rows for task in tasks[1:])
    return images / (time.perf_counter() - started)


def _print_table(rows: list[Row], config: GpuBenchConfig) -> None:
    forward = {r.compiled: r.rate for r in rows if r.variant == "forward"}
    print(f"# {config.model} {config.precision} channels_last batch={config.batch_size} images={config.images}")
    for r in rows:
        ratio = r.rate / forward[r.compiled]
        print(f"{r.variant:10s} compiled={str(r.compiled):5s} img/s={r.rate:8.0f} vs_forward={ratio:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
