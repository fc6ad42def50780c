"""Why compiled workers ran slower than eager ones: `python -m bench.compiled_pieces [--models ...] [--rounds N]`.

A compiled Predictor runs its graph on one static batch shape. On CPU a batch is cut into pieces of at most
`cpu_chunk_size` images (what keeps each activation in malloc's heap). Until this bench, the compiled graph's shape
was the chunk itself and every short piece was padded with zeros: a batch of 32 in chunks of 10 (MobileNetV2) ran
40 images, in chunks of 15 (ResNet-50) 45, and a shard's short last batch ran a whole piece. The eager path cuts the
same batch into equal pieces (4 x 8) and pads nothing. Now the compiled graph's shape is a divisor of the batch
within the chunk (`workers.label.inference.static_piece`), and what is left over runs through the eager backbone.

In one plain process, in the worker's CPU layout (two lanes of one torch thread each, glibc's allocator kept, the
Predictor itself), each mode labels the same stream: shards of 100 images in batches of 32 (32, 32, 32, 4):
- `eager`: the eager Predictor;
- `compiled, padded`: the compiled Predictor as the worker ran it before (pieces of one chunk, the rest padded);
- `compiled, pieces`: the compiled Predictor now (equal pieces, the leftover eager).
Each row gives images per second, images the backbone computed per image labelled (the padding), and one shard
under torch's profiler: the backbone calls by batch size. Compile time is excluded (one untimed warm-up shard);
inductor compiles with freezing, as the worker does. Random weights: speed does not depend on them.

Then the label worker itself (`LabelWorker`, this process, no Ray), eager and compiled: local tar shards of the bench
photos, all shards handed to it at once (its shard threads overlap them as under Ray), after one untimed shard.
Its rows give images per second and where the CPU went (the done-markers' stage seconds per image): so a gap
between the plain predictor's figures and the worker's shows which stage takes the difference. The load average is
printed first.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import bench  # noqa: F401  (workers' process settings, as a worker has them)

log = logging.getLogger(__name__)

SHARD, BATCH, LANES = 100, 32, 2


def _shard_batches(pixels: np.ndarray) -> list[np.ndarray]:
    return [pixels[start : start + BATCH] for start in range(0, SHARD, BATCH)]


def _predictor(model: str, mode: str):
    import torch

    from schemas.specs import ModelSpec, StorageOptions
    from workers.label.inference import Predictor, PredictorOptions
    from workers.models import build_model

    torch.manual_seed(0)  # the same random weights in every mode, so their embeddings compare
    loaded = build_model(ModelSpec(name=model, weights=None, device="cpu"), StorageOptions(), cache_dir=None)
    compiled = mode != "eager"
    options = PredictorOptions(top_k=5, embeddings=True, precision="fp32", compile=compiled,
                               batch_size=BATCH if compiled else None)  # fmt: skip
    cls = _Padded if mode == "compiled, padded" else Predictor
    return cls(loaded, torch.device("cpu"), options)


def _padded_class():
    from workers.label.inference import Predictor

    class Padded(Predictor):
        """The compiled path before static_piece: pieces of one chunk, the last padded with zeros."""

        def _static_features(self, x):
            import torch

            pieces = []
            for part in x.split(self.chunk):
                short = self.chunk - len(part)
                padded = torch.cat([part, part.new_zeros((short, *part.shape[1:]))]) if short else part
                pieces.append(self.backbone(padded.contiguous(memory_format=torch.channels_last))[: len(part)])
            return torch.cat(pieces)

    return Padded


class _Counted:
    """Wraps a backbone, counting the images it computes (padding included)."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def __call__(self, x):
        self.images += len(x)
        return self.inner(x)


def run_mode(model: str, mode: str, pixels: np.ndarray, rounds: int) -> dict:
    import torch

    predictor = _predictor(model, mode)
    batches = _shard_batches(pixels)
    with ThreadPoolExecutor(LANES) as lanes:
        list(lanes.map(predictor, batches))  # warm-up: compiles (untimed)
        counters = [_Counted(predictor.backbone)]
        predictor.backbone = counters[0]
        if predictor.compiled:
            counters.append(_Counted(predictor.eager_backbone))
            predictor.eager_backbone = counters[1]
        started = time.perf_counter()
        for _ in range(rounds):
            outputs = list(lanes.map(predictor, batches))
        seconds = time.perf_counter() - started
        computed = sum(c.images for c in counters)
    # One shard on this thread under the profiler (it records the calling thread's ops): which batch sizes the
    # model's first convolution saw, one per backbone call, compiled (mkldnn's fused ops) or eager.
    with torch.profiler.profile(record_shapes=True) as profile:
        for batch in batches:
            predictor(batch)
    convolutions, eager_calls = collections.Counter(), collections.Counter()
    for event in profile.events():
        shape = event.input_shapes[0] if event.input_shapes else []
        if len(shape) == 4 and shape[1] == 3:  # the first layer's input: one per backbone call
            if event.name == "aten::mkldnn_convolution":
                convolutions[shape[0]] += 1
            elif event.name == "aten::conv2d":  # the module's own call: eager only (a compiled graph calls the op)
                eager_calls[shape[0]] += 1
    calls = {"compiled": dict(convolutions - eager_calls), "eager": dict(eager_calls)}
    images = rounds * SHARD
    return {
        "mode": mode,
        "images_per_s": images / seconds,
        "computed_per_image": computed / images,
        "piece": predictor.chunk if mode == "compiled, padded" else predictor.piece,
        "chunk": predictor.chunk,
        "compile_s": predictor.compile_seconds,
        "embeddings": np.concatenate([o.embeddings for o in outputs]),
        "profile_calls": dict(calls),
    }


def run_worker(model: str, compiled: bool, shards: list, output: str) -> dict:
    """The label worker on `shards` (after one warm-up shard), in this process: images per second and stage seconds
    per image."""
    import asyncio
    import resource

    from schemas.shards import ShardJob, WorkerSpec
    from schemas.specs import LabelJobSpec
    from workers.label.label_worker import LabelWorker

    spec = LabelJobSpec(input={"uri": shards[0].base_uri, "format": "tar"}, output=f"{output}/{model}-{int(compiled)}",
                        model={"name": model, "weights": None, "device": "cpu", "compile": compiled},
                        batch_size=BATCH)  # fmt: skip
    worker, job = LabelWorker(WorkerSpec.of(spec), torch_threads=LANES), ShardJob.of(spec, f"bench-{int(compiled)}")
    try:
        worker.label_shard_blocking(shards[0], 1, job)  # warm-up: builds the predictor, compiles

        async def all_at_once():
            return await asyncio.gather(*(worker.label_shard(task, 2, job) for task in shards[1:]))

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        results = asyncio.run(all_at_once())
        seconds = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        worker.close()
    images = sum(r.rows for r in results)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    stages = {stage: sum(getattr(r.stages, stage) for r in results) / images * 1000 for stage in STAGE_NAMES}
    return {"images_per_s": images / seconds, "cpu_ms_per_image": cpu / images * 1000, "stages": stages}


STAGE_NAMES = ("read", "decode", "infer", "write", "wait")


def _tar_shards(folder: str, count: int) -> list:
    from bench.data import _write_tar, photo_payloads
    from schemas.shards import ShardTask

    payloads = photo_payloads()
    tasks = []
    for index in range(count):
        path = f"{folder}/{index:05d}.tar"
        _write_tar(Path(path), payloads, range(index * SHARD, (index + 1) * SHARD))
        tasks.append(ShardTask(shard_id=f"{index:05d}", kind="tar", base_uri=folder, keys=(Path(path).name,)))
    return tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--rounds", type=int, default=4, help="timed passes over the shard, per mode")
    parser.add_argument("--worker-shards", type=int, default=7, help="shards of 100 photos for the worker part")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    from workers.label.inference import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {LANES} lanes x 1 torch thread; shards of {SHARD} "
          f"in batches of {BATCH}; {args.rounds} timed shards per mode")  # fmt: skip
    global _Padded
    _Padded = _padded_class()
    pixels = np.random.default_rng(0).integers(0, 256, (SHARD, 224, 224, 3), dtype=np.uint8)
    for model in args.models:
        rows = [
            run_mode(model, mode, pixels, args.rounds) for mode in ("eager", "compiled, padded", "compiled, pieces")
        ]
        eager = rows[0]
        for row in rows:
            # relative to the largest embedding value: random-init ResNet-50's reach 1e5
            deviation = float(np.abs(row["embeddings"] - eager["embeddings"]).max() / np.abs(eager["embeddings"]).max())
            ratio = row["images_per_s"] / eager["images_per_s"]
            print(f"{model:13s} {row['mode']:17s} {row['images_per_s']:6.1f} img/s  {ratio:.2f}x eager  "
                  f"{row['computed_per_image']:.2f} images computed per image  chunk {row['chunk']} "
                  f"piece {row['piece']}  compile {row['compile_s']} s  embeddings within {deviation:.0e} of "
                  "eager (relative)")  # fmt: skip
            print(f"{'':31s} one shard, backbone calls by batch size (torch's profiler): {row['profile_calls']}")
    with tempfile.TemporaryDirectory(prefix="bench-pieces-") as folder:
        Path(folder, "in").mkdir()
        shards = _tar_shards(f"{folder}/in", args.worker_shards)
        for model in args.models:
            eager = None
            for compiled in (False, True):
                row = run_worker(model, compiled, shards, f"{folder}/out")
                eager = eager or row
                stages = "  ".join(f"{stage} {ms:.1f}" for stage, ms in row["stages"].items())
                print(f"{model:13s} worker, {'compiled' if compiled else 'eager':8s} {row['images_per_s']:6.1f} img/s  "
                      f"{row['images_per_s'] / eager['images_per_s']:.2f}x eager  process CPU "
                      f"{row['cpu_ms_per_image']:.1f} ms/image; stages, ms per image: {stages}")  # fmt: skip


_Padded = None

if __name__ == "__main__":
    main()
