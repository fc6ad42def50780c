"""The ceiling: the model's forward pass alone, on pre-decoded, pre-resized, normalised tensors, in one process.

It runs as one Ray task holding every CPU of the cluster, so it sees the same cores, niceness (Ray workers run at
nice 15) and environment as bulklabel's workers; only the forward passes are timed. Two ways of using the cores
are timed and the faster one is the ceiling: one stream of batches with `cpus` torch threads, and `cpus` streams
(threads) of one torch thread each, which is how bulklabel runs a CPU model. The ceiling is never lowered by
picking the way that suits bulklabel. The forward pass also gets bulklabel's two allocator measures
(`workers.label.inference.keep_freed_memory_for_reuse`, and batches run in chunks of `cpu_chunk_size` images): they make
the forward pass itself faster, so a ceiling without them would not be the model's limit. The task's worker process
exits afterwards (`max_calls=1`), so the allocator setting cannot leak into a later measurement.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench.models import BenchModel
from bench.raydata_reference import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

WARMUP_BATCHES = 1


def forward_rates(model: BenchModel, photos: list[bytes], batch_size: int, batches: int, cpus: int) -> dict[str, float]:
    """Images per second of the forward pass, one stream of `cpus` threads and `cpus` streams of one thread."""
    from workers.label.inference import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    return {
        f"1x{cpus}": forward_rate(model, photos, batch_size, batches, threads=cpus, streams=1),
        f"{cpus}x1": forward_rate(model, photos, batch_size, batches, threads=1, streams=cpus),
    }


def forward_rate(
    model: BenchModel, photos: list[bytes], batch_size: int, batches: int, threads: int, streams: int
) -> float:
    """Images per second of `backbone` + `head` on `batches` batches in all, split between `streams` threads
    (channels_last, inference_mode)."""
    import torch

    from workers.label.inference import cpu_chunk_size

    torch.set_num_threads(threads)
    backbone, head = model.build()
    backbone = backbone.to(memory_format=torch.channels_last)
    chunks = -(-batch_size // cpu_chunk_size(backbone, 224))
    pixels = _predecoded(photos, batch_size)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    x = ((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - mean) / std).contiguous(
        memory_format=torch.channels_last
    )

    @torch.inference_mode()
    def stream(count: int) -> None:
        for _ in range(count):
            head(torch.cat([backbone(part) for part in x.tensor_split(chunks)]))

    stream(WARMUP_BATCHES)
    with ThreadPoolExecutor(streams) as pool:
        started = time.perf_counter()
        per_stream = max(1, batches // streams)
        list(pool.map(stream, [per_stream] * streams))
        seconds = time.perf_counter() - started
    return streams * per_stream * batch_size / seconds


def _predecoded(photos: list[bytes], batch_size: int) -> np.ndarray:
    from schemas.specs import PreprocessSpec
    from workers.label.decode import decode

    preset = PreprocessSpec(resize_size=256, crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = [decode(photos[i % len(photos)], preset).pixels for i in range(batch_size)]
    return np.stack(out)


def run_ceiling(model: BenchModel, photos: list[bytes], batch_size: int, batches: int, cpus: int) -> float:
    """The faster of `forward_rates`, measured in a Ray task that holds all `cpus` CPUs."""
    import ray

    task = ray.remote(num_cpus=cpus, max_calls=1)(forward_rates)
    rates = ray.get(task.remote(model, photos[:batch_size], batch_size, batches, cpus))
    shown = ", ".join(f"{k}={v:.1f}" for k, v in rates.items())
    log.info("ceiling %s: %s img/s (streams x threads)", model.name, shown)
    return max(rates.values())
