"""GPU benchmark, for a lent device machine (run through bench/gpu.sh): ResNet-50, bf16, channels_last, eager and
`torch.compile`d, end to end from local tar shards to committed Parquet (top-5 + embeddings), each against the same
card's forward-only rate.

Variants (each eager and compiled):
- forward: the model alone on a pre-decoded, pre-normalised batch already on the GPU (the card's rate);
- cpu_decode: bulklabel's worker as it is (`LabelWorker`, Pillow decode on `decode_threads` CPU threads);
- gpu_decode: the same reader, writer and model, but JPEGs decoded on the GPU in batches
  (`torchvision.io.decode_jpeg(..., device="cuda")`), resized and cropped there (a prototype for the worker).
Ray is not used: one process holds the GPU, as one bulklabel worker does; Ray only adds the per-shard dispatch
measured on the CPU bench (`python -m bench scale`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
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
    gpu_lanes: int = 2  # threads that decode + predict batches at once on the GPU-decode path
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
        gpu_lanes=args.gpu_lanes,
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
    parser.add_argument("--gpu-lanes", type=int, default=defaults.gpu_lanes)
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


def run(config: GpuBenchConfig, photos: Path) -> list[Row]:
    import torch

    from bench.data import _write_tar, photo_payloads
    from schemas.shards import ShardJob, ShardTask, WorkerSpec
    from schemas.specs import LabelJobSpec
    from tests.support import write_torchvision_weights
    from workers.label_worker import LabelWorker

    if config.device == "cuda":
        log.info("GPU: %s, torch %s", torch.cuda.get_device_name(), torch.__version__)
        torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    payloads = photo_payloads(photos)
    tasks = _write_shards(tmp / "in", payloads, config, _write_tar, ShardTask)
    weights = write_torchvision_weights(config.model, tmp / "weights")
    spec = LabelJobSpec(
        input={"uri": str(tmp / "in"), "format": "tar"},
        output=str(tmp / "out"),
        model={"name": config.model, "weights": str(weights), "device": config.device, "precision": config.precision},
        batch_size=config.batch_size,
        decode_threads=config.decode_threads,
    )
    worker = LabelWorker(WorkerSpec.of(spec), torch_threads=os.cpu_count() or 1)
    job = ShardJob.of(spec, "gpu-bench")
    worker.predictor = worker._context(job).predictor  # the bench swaps in a compiled backbone below
    blocking = functools.partial(worker.label_shard_blocking, job=job)
    log.info("%d images in %d shards; %d decode threads", config.images, len(tasks), config.decode_threads)
    eager_backbone = worker.predictor.backbone
    rows = []
    for compiled in config.compile_modes:
        worker.predictor.backbone = torch.compile(eager_backbone) if compiled else eager_backbone
        rows.append(Row("forward", compiled, forward_rate(worker, config)))
        rows.append(
            Row(
                "cpu_decode",
                compiled,
                _timed_shards(tasks, config, blocking),
            )
        )
        gpu = GpuDecodeLabeler(worker, job, config.gpu_lanes, str(tmp / "out-gpu-decode"))
        rows.append(Row("gpu_decode", compiled, _timed_shards(tasks, config, gpu.label_shard)))
        for row in rows[-3:]:
            log.info("%s compiled=%s: %.0f img/s", row.variant, row.compiled, row.rate)
    worker.close()
    same, other = _embedding_difference(tmp / "out", tmp / "out-gpu-decode", tasks[-1].shard_id)
    print(f"# gpu_decode vs cpu_decode embeddings, shard {tasks[-1].shard_id}: relative L2 difference {same:.4f} for "
          f"the same image, {other:.4f} between neighbouring images")  # fmt: skip
    return rows


def _embedding_difference(cpu_out: Path, gpu_out: Path, shard: str) -> tuple[float, float]:
    """Mean ‖a−b‖/‖a‖ of the two paths' embeddings for the same image (resizers differ slightly), and, for scale,
    the same between each image and the next one."""
    import numpy as np
    import pyarrow.parquet as pq

    def embeddings(folder: Path) -> np.ndarray:
        table = pq.read_table(folder / "data" / f"part-{shard}.parquet", columns=["key", "embedding"]).sort_by("key")
        return np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)

    a, b = embeddings(cpu_out), embeddings(gpu_out)
    norm = np.linalg.norm(a, axis=1) + 1e-12
    same = np.linalg.norm(a - b, axis=1) / norm
    other = np.linalg.norm(a - np.roll(a, 1, axis=0), axis=1) / norm
    return float(same.mean()), float(other.mean())


def _write_shards(folder: Path, payloads: list[bytes], config: GpuBenchConfig, write_tar, shard_task) -> list:
    folder.mkdir(parents=True)
    tasks = []
    for i, start in enumerate(range(0, config.images, config.images_per_shard)):
        name = f"{i:05d}.tar"
        write_tar(folder / name, payloads, range(start, min(start + config.images_per_shard, config.images)))
        tasks.append(shard_task(shard_id=f"{i:05d}", kind="tar", base_uri=str(folder), keys=(name,)))
    return tasks


def forward_rate(worker, config: GpuBenchConfig) -> float:
    """Images/s of normalise + backbone + head + top-k on a uint8 batch already on the device (median of 5 runs)."""
    import torch

    pixels = torch.randint(0, 256, (config.batch_size, 224, 224, 3), dtype=torch.uint8, device=worker.device)
    for _ in range(3):  # warm-up: cudnn autotuning, compilation
        _predict_tensor(worker.predictor, pixels)
    _sync(worker.device)
    rates = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(max(1, config.forward_batches // 5)):
            out = _predict_tensor(worker.predictor, pixels)
        out[0].cpu()
        _sync(worker.device)
        rates.append(max(1, config.forward_batches // 5) * config.batch_size / (time.perf_counter() - started))
    return statistics.median(rates)


def _timed_shards(tasks: list, config: GpuBenchConfig, label_shard) -> float:
    """Images/s over all shards but the first, which warms up (compilation, cudnn, decoder) untimed."""
    label_shard(tasks[0], 1)
    started = time.perf_counter()
    images = sum(label_shard(task, 1).rows for task in tasks[1:])
    return images / (time.perf_counter() - started)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _predict_tensor(predictor, pixels):
    """Predictor's forward on a uint8 NHWC (or NCHW via permute) tensor already on the device; returns GPU tensors."""
    import contextlib

    import torch

    with torch.inference_mode():
        x = pixels.permute(0, 3, 1, 2) if pixels.shape[-1] == 3 else pixels
        x = (x.float() - predictor.mean) / predictor.std
        x = x.contiguous(memory_format=torch.channels_last)
        amp = predictor.amp_dtype
        ctx = torch.autocast(predictor.device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            features = predictor.backbone(x)
            logits = predictor.head(features)
        scores, indices = torch.topk(torch.softmax(logits.float(), dim=1), predictor.top_k, dim=1)
        return indices.to(torch.int32), scores, features.float()


class GpuDecodeLabeler:
    """A shard through bulklabel's reader and writer, with JPEG decode, resize and crop on the GPU in batches.
    Images nvjpeg cannot decode (PNG, CMYK, corrupt) go through bulklabel's CPU decode, one by one."""

    def __init__(self, worker, job, lanes: int, output: str):
        self.worker, self.job = worker, job
        self.output = output
        self.lanes = ThreadPoolExecutor(lanes, thread_name_prefix="gpu-lane")
        self.lane_count = lanes

    def label_shard(self, task, attempt: int):
        from workers.pipeline import Prefetched
        from workers.readers import bounded_map, read_shard
        from workers.writer import ShardWriter

        w, job = self.worker, self.job
        context = w._context(job)
        writer = ShardWriter(task, w.categories, w.model_id, job.job_id)
        records = read_shard(context.input_storage, task, job.input.extensions, w.fetch_pool)
        chunks = _chunks(records, job.batch_size)
        with Prefetched(chunks, 2) as ahead:
            for meta, (indices, scores, embeddings) in bounded_map(self.lanes, self._batch, ahead, self.lane_count):
                writer.add(meta, indices, scores, embeddings)
        stats = {"bytes_read": 0, "seconds": 0.0}
        return writer.commit(context.output_storage, self.output, w.scratch, attempt, stats)

    def _batch(self, records: list) -> tuple[list, tuple]:
        pixels, meta = self._decode(records)
        if pixels is None:
            return meta, (None, None, None)
        indices, scores, features = _predict_tensor(self.worker.predictor, pixels)
        return meta, (indices.cpu().numpy(), scores.cpu().numpy(), features.cpu().numpy())

    def _decode(self, records: list):
        """((n_ok, 3, crop, crop) uint8 on the device or None, the rows' metadata). JPEGs are decoded in one batch
        and resized in one call per distinct size; anything else, or a batch nvjpeg refuses, takes the CPU path.
        (A prototype: EXIF orientation is not applied on the GPU path.)"""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        from workers.decode import decode

        pre, device = self.worker.preprocess, self.worker.device
        jpeg = [i for i, r in enumerate(records) if r.data and r.data[:2] == b"\xff\xd8"]
        decoded: dict[int, tuple] = {}  # row → (CHW uint8 tensor, needs resize+crop, width, height) or error str
        try:
            datas = [torch.frombuffer(bytearray(records[i].data), dtype=torch.uint8) for i in jpeg]
            for i, img in zip(jpeg, decode_jpeg(datas, mode=ImageReadMode.RGB, device=device), strict=True):
                decoded[i] = (img, True, int(img.shape[2]), int(img.shape[1]))
        except RuntimeError as exc:
            log.warning("GPU decode refused a batch (%s); decoding it on the CPU", exc)
            decoded.clear()
        for i, record in enumerate(records):
            if i in decoded:
                continue
            if record.error is not None:
                decoded[i] = record.error
                continue
            d = decode(record.data, pre)
            ok = d.pixels is not None
            decoded[i] = (
                (torch.from_numpy(d.pixels).permute(2, 0, 1).to(device), False, d.width, d.height) if ok else d.error
            )
        meta, images = [], []
        for i, r in enumerate(records):
            item = decoded[i]
            if isinstance(item, str):
                meta.append((r.key, r.source, None, None, item))
            else:
                meta.append((r.key, r.source, item[2], item[3], None))
                images.append(item[:2])
        return (_resize_crop_batched(images, pre.resize_size, pre.crop_size) if images else None), meta


def _resize_crop_batched(images: list, resize: int, crop: int):
    """Stack (CHW uint8, needs resize) images into (n, 3, crop, crop) uint8: shorter side to `resize` (bilinear,
    antialiased, as Pillow does), centre crop; one interpolate call per distinct size."""
    import torch
    from torch.nn import functional as F

    out = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, (img, needs) in enumerate(images):
        by_size.setdefault((tuple(img.shape[1:]), needs), []).append(i)
    for ((h, w), needs), idx in by_size.items():
        group = torch.stack([images[i][0] for i in idx])
        if needs:
            scale = resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            group = F.interpolate(group.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            top, left = max(0, (size[0] - crop) // 2), max(0, (size[1] - crop) // 2)
            group = group[:, :, top : top + crop, left : left + crop].round_().clamp_(0, 255).to(torch.uint8)
        for j, i in enumerate(idx):
            out[i] = group[j]
    return torch.stack(out)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _print_table(rows: list[Row], config: GpuBenchConfig) -> None:
    forward = {r.compiled: r.rate for r in rows if r.variant == "forward"}
    print(f"# {config.model} {config.precision} channels_last batch={config.batch_size} images={config.images}")
    for r in rows:
        ratio = r.rate / forward[r.compiled]
        print(f"{r.variant:10s} compiled={str(r.compiled):5s} img/s={r.rate:8.0f} vs_forward={ratio:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
