"""`compile: auto`: whether torch.compile repays its compile time on this job. Pure: no Ray, no torch, no storage.

The driver decides before it makes the worker spec (and so the pool key: compiled and eager workers never share a
pool), from what it knows: the model's GFLOPs per image (torchvision's `_ops`, in the torch-free catalog), the
device kind and cores of each worker (the placement), and the images the job will label (its plan). The rule:
compile when one worker's expected eager inference time, times the share of it compiling saves, exceeds the
expected compile time; every worker compiles once (a warm pool's workers once for all its jobs), so the images are
counted per worker. jobs.label.placement.resolve_compile gathers the inputs; the runner and the job service call it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from schemas.shards import ShardTask
from schemas.specs import Spec

# CPU: compiled warm pools against eager ones in the worker (`python -m bench --compiled`, bench/RESULTS.md,
# 2026-12-08): 1.01x and 1.05x for MobileNetV2 in two runs, 1.07x for ResNet-50; the median is the figure. (Until
# the worker stopped padding its compiled pieces, workers.label.inference.static_piece, they ran at 0.75x.) At that
# speedup only large jobs repay a cold compile: ~23,000 ResNet-50 images per 2-core worker.
# Tests of the arithmetic set an assumed CPU speedup of 1.1x (tests/conftest.py, cpu_compile_pays).
CPU_COMPILE_SPEEDUP = 1.05
CPU_COMPILE_SECONDS = 50.0
# The eager forward pass per CPU core, in torchvision's GFLOPs: ResNet-50 (4.09 GFLOPs) at the bench's ceiling of
# ~22 img/s on 2 cores (bench/RESULTS.md, run E) is ~45 per core. MobileNetV2 reaches only ~15 (0.30 GFLOPs at ~100
# img/s: depthwise layers are memory-bound), so for light models the eager time is underestimated and auto errs
# towards eager (MobileNetV2 needs ~3x the images it would on its own figures).
CPU_GFLOPS_PER_CORE = 45.0
# GPU: not measured in this project yet (bench/gpu.sh measures eager against compiled on a lent GPU); assumed from
# public torch.compile figures for convnets at bf16: ~1.2x, ~60 s to compile (Triton kernels), and ~20 TFLOP/s of
# eager bf16 forward pass (ResNet-50 at ~5,000 img/s on an H100-class GPU). Replace them once measured.
GPU_COMPILE_SPEEDUP = 1.2
GPU_COMPILE_SECONDS = 60.0
GPU_GFLOPS = 20_000.0
# Tar and Parquet shards are listed, not opened: their images are estimated from the listed bytes at ImageNet's
# mean JPEG size (~110 KB: 140 GB of training images / 1.28 M). Resized datasets (img2dataset at 256 px: 10-30 KB
# per image) hold more images than this counts, so again the estimate errs towards eager.
BYTES_PER_IMAGE = 110_000

Device = Literal["cpu", "gpu"]


class CompileDecision(Spec):
    """What the driver decided for the job's workers, and why (for the summary, the manifest, the job's record)."""

    asked: Literal["auto"] | bool = Field(description="The spec's model.compile.")
    compile: bool = Field(description="Whether the job's workers compile.")
    reason: str = Field(default="", description="Why, for `compile: auto`.")

    def line(self) -> str:
        """`compile: auto → compiled (...)`, `compile: auto → eager (...)`, or `compile: true`/`false`."""
        if self.asked != "auto":
            return f"compile: {str(self.asked).lower()}"
        return f"compile: auto → {'compiled' if self.compile else 'eager'} ({self.reason})"


def explicit(asked: bool) -> CompileDecision:
    """The decision for a spec that says true or false itself."""
    return CompileDecision(asked=asked, compile=asked)


@dataclass(frozen=True)
class CompileCosts:
    """What compiling costs and brings on one worker."""

    speedup: float  # compiled forward pass against eager
    compile_seconds: float
    gflops_per_s: float  # the worker's eager forward pass


def costs_on(device: Device, cores: int) -> CompileCosts:
    """The figures above for a worker on `device` with `cores` torch threads (CPU)."""
    if device == "gpu":
        return CompileCosts(GPU_COMPILE_SPEEDUP, GPU_COMPILE_SECONDS, GPU_GFLOPS)
    return CompileCosts(CPU_COMPILE_SPEEDUP, CPU_COMPILE_SECONDS, CPU_GFLOPS_PER_CORE * max(cores, 1))


def break_even_images(gflops: float, costs: CompileCosts) -> int | None:
    """Images per worker whose eager time, times the share compiling saves, equals the compile time (None: compiling
    is no faster, so no job repays it)."""
    if costs.speedup <= 1:
        return None
    saving = 1 - 1 / costs.speedup
    seconds_per_image = gflops / costs.gflops_per_s
    return math.ceil(costs.compile_seconds / (seconds_per_image * saving))


@dataclass(frozen=True)
class ImageCount:
    """The images a job's plan holds, as far as it was counted."""

    images: int
    estimated_bytes: int = 0  # bytes of tar/Parquet shards whose images were estimated (BYTES_PER_IMAGE)
    complete: bool = True  # False: counting stopped once the count was enough to decide

    def text(self) -> str:
        """`2,400 images`, `≥ 9,000 images`, `≈ 1,200 images (from 0.1 GB of shards at ~110 KB an image)`."""
        sign = "≥ " if not self.complete else ("≈ " if self.estimated_bytes else "")
        size = self.estimated_bytes
        listed = f"{size / 1e9:.1f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"
        where = f" (from {listed} of shards at ~{BYTES_PER_IMAGE // 1000} KB an image)" if size else ""
        return f"{sign}{self.images:,} images{where}"


def count_images(tasks: Iterable[ShardTask], enough: int | None = None) -> ImageCount:
    """Images in the tasks: keys for loose files and manifests, listed bytes / BYTES_PER_IMAGE (at least one per
    shard) for tar and Parquet shards. Stops once `enough` are counted, so a job of a million keys is not listed
    whole to learn that it is large."""
    images = estimated = 0
    for task in tasks:
        if task.kind == "files":
            images += len(task.keys)
        else:
            size = sum(task.sizes)
            estimated += size
            images += max(1, size // BYTES_PER_IMAGE)
        if enough is not None and images >= enough:
            return ImageCount(images, estimated, complete=False)
    return ImageCount(images, estimated)


def images_needed(gflops: float | None, device: Device, workers: int, cores: int) -> int | None:
    """The images the job needs for compiling to pay (None: the model has no GFLOPs figure, or compiling never pays
    on `device`)."""
    per_worker = break_even_images(gflops, costs_on(device, cores)) if gflops else None
    return None if per_worker is None else per_worker * max(workers, 1)


def decide_compile(
    *, gflops: float | None, device: Device, workers: int, cores: int, images: ImageCount, warm_compiled: bool = False
) -> CompileDecision:
    """`compile: auto` for a job of `images` on `workers` workers of `cores` each (see the module's docstring).

    `warm_compiled`: the job service already holds a warm compiled pool for this model, so compiling costs nothing.
    """
    costs = costs_on(device, cores)
    if costs.speedup <= 1:  # not even a warm compiled pool is worth joining
        reason = f"compiled ran at {costs.speedup:.2f}x eager on {device.upper()} workers (bench/RESULTS.md)"
        return CompileDecision(asked="auto", compile=False, reason=reason)
    if warm_compiled:
        return CompileDecision(asked="auto", compile=True, reason="a warm compiled pool of the model is running")
    needed = images_needed(gflops, device, workers, cores)
    if needed is None:
        return CompileDecision(asked="auto", compile=False, reason="no GFLOPs figure for the model to judge by")
    per = f"{workers} {device.upper()} worker{'s' if workers != 1 else ''}"
    if images.images >= needed:
        reason = f"{images.text()} on {per} repay ~{costs.compile_seconds:.0f} s of compiling; needs {needed:,}"
        return CompileDecision(asked="auto", compile=True, reason=reason)
    reason = f"job too small: {images.text()} on {per}; ~{costs.compile_seconds:.0f} s of compiling needs {needed:,}"
    return CompileDecision(asked="auto", compile=False, reason=reason)
