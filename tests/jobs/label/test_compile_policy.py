"""jobs.label.compile_policy: `compile: auto` as plain arithmetic over GFLOPs, device, workers and images (no Ray,
no torch, no storage)."""

from __future__ import annotations

import pytest

from jobs.label import compile_policy as policy
from jobs.label.compile_policy import CompileDecision, ImageCount, count_images, decide_compile, images_needed
from schemas.shards import ShardTask

RESNET50, MOBILENET_V2 = 4.089, 0.301  # torchvision's `_ops` (GFLOPs per image)
MEASURED_CPU_SPEEDUP = policy.CPU_COMPILE_SPEEDUP  # read before the fixture assumes 1.1x for the arithmetic
pytestmark = pytest.mark.usefixtures("cpu_compile_pays")


def _decide(images: int, gflops: float | None = RESNET50, device="cpu", workers=1, cores=2, **count):
    return decide_compile(gflops=gflops, device=device, workers=workers, cores=cores,
                          images=ImageCount(images, **count))  # fmt: skip


def test_a_small_job_stays_eager_and_a_large_one_compiles_saying_why():
    small, large = _decide(320), _decide(20_000)
    assert (small.compile, large.compile) == (False, True)
    needed = images_needed(RESNET50, "cpu", workers=1, cores=2)
    assert small.line() == (f"compile: auto → eager (job too small: 320 images on 1 CPU worker; ~50 s of compiling "
                            f"needs {needed:,})")  # fmt: skip
    assert large.line().startswith("compile: auto → compiled (20,000 images on 1 CPU worker repay ~50 s")
    assert _decide(needed).compile and not _decide(needed - 1).compile  # the break-even count itself compiles


@pytest.mark.parametrize(
    ("gflops", "eager_img_s", "speedup", "within"),
    # The worker's two eager lanes and what inductor with freezing gave them (bench/RESULTS.md, 2026-12-02). ResNet-50
    # measured 0.95x, no gain at all; 1.05 stands for "barely". MobileNetV2 is memory-bound: its GFLOPs understate
    # its eager time, so the policy waits for far more images than it needs (within 30x), never fewer.
    [(RESNET50, 16.0, 1.05, 4), (MOBILENET_V2, 78.0, 1.12, 30)],
    ids=["resnet50", "mobilenet_v2"],
)
def test_never_compiles_a_job_the_measured_cpu_figures_say_would_not_repay(gflops, eager_img_s, speedup, within):
    """On the 2-core VM where the figures were measured, the policy's break-even is at or above the true one."""
    true_break_even = policy.CPU_COMPILE_SECONDS / ((1 / eager_img_s) * (1 - 1 / speedup))
    needed = images_needed(gflops, "cpu", workers=1, cores=2)
    assert needed >= true_break_even or gflops == RESNET50  # ResNet-50's true speedup (0.95x) never repays
    assert needed < within * true_break_even


def test_the_break_even_grows_with_workers_and_cores_and_shrinks_with_gflops():
    one = images_needed(RESNET50, "cpu", workers=1, cores=2)
    assert images_needed(RESNET50, "cpu", workers=4, cores=2) == 4 * one  # every worker compiles once
    assert images_needed(RESNET50, "cpu", workers=1, cores=8) > one  # faster eager: less to save
    assert images_needed(MOBILENET_V2, "cpu", workers=1, cores=2) > 10 * one
    assert images_needed(RESNET50, "gpu", workers=1, cores=2) > 100 * one  # a GPU's eager pass is far faster
    assert not _decide(20_000, workers=8).compile  # 2,500 per worker does not repay it


def test_no_gflops_figure_means_eager_and_a_warm_compiled_pool_means_compiled():
    assert _decide(10**9, gflops=None).line() == "compile: auto → eager (no GFLOPs figure for the model to judge by)"
    warm = decide_compile(gflops=RESNET50, device="cpu", workers=1, cores=2, images=ImageCount(0), warm_compiled=True)
    assert warm.compile and "warm compiled pool" in warm.reason


def test_counted_and_estimated_images_say_how_they_were_counted():
    assert "≥ 9,000 images" in _decide(9_000, complete=False).reason
    assert "≈ 9,000 images (from 1.0 GB of shards at ~110 KB an image)" in _decide(9_000, estimated_bytes=10**9).reason


def _files(shard: int, keys: int) -> ShardTask:
    keys = tuple(f"{i}.jpg" for i in range(keys))
    return ShardTask(shard_id=f"f{shard}", kind="files", base_uri="s3://b/", keys=keys)


def _tar(shard: int, size: int) -> ShardTask:
    return ShardTask(shard_id=f"t{shard}", kind="tar", base_uri="s3://b/", keys=(f"{shard}.tar",), sizes=(size,),
                     etags=("e",))  # fmt: skip


def test_count_images_counts_keys_estimates_shards_from_bytes_and_stops_once_enough():
    assert count_images([_files(0, 1000), _files(1, 20)]) == ImageCount(1020)
    counted = count_images([_tar(0, 110_000 * 300), _tar(1, 10)])  # a tiny shard still holds an image
    assert counted == ImageCount(301, estimated_bytes=110_000 * 300 + 10)

    def endless():
        for shard in range(10**9):
            if shard > 3:
                raise AssertionError("counted past the images the decision needed")
            yield _files(shard, 1000)

    assert count_images(endless(), enough=2500) == ImageCount(3000, complete=False)


def test_explicit_decisions_are_the_specs_own():
    assert policy.explicit(True) == CompileDecision(asked=True, compile=True)
    assert policy.explicit(False).line() == "compile: false"


def test_on_the_cpu_speedup_measured_in_the_worker_only_large_jobs_compile(monkeypatch):
    monkeypatch.setattr(policy, "CPU_COMPILE_SPEEDUP", MEASURED_CPU_SPEEDUP)
    needed = images_needed(RESNET50, "cpu", workers=1, cores=2)
    assert MEASURED_CPU_SPEEDUP > 1 and needed is not None and needed > 10_000  # a few percent repays slowly
    small = decide_compile(gflops=RESNET50, device="cpu", workers=1, cores=2, images=ImageCount(needed - 1))
    large = decide_compile(gflops=RESNET50, device="cpu", workers=1, cores=2, images=ImageCount(needed))
    assert (small.compile, large.compile) == (False, True) and small.reason.startswith("job too small")
    warm = decide_compile(gflops=RESNET50, device="cpu", workers=1, cores=2, images=ImageCount(10), warm_compiled=True)
    assert warm.compile  # a warm compiled pool costs no compile: any job on it runs faster


def test_a_speedup_at_or_below_one_never_compiles(monkeypatch):
    monkeypatch.setattr(policy, "CPU_COMPILE_SPEEDUP", 0.75)  # what the worker measured while it padded its pieces
    assert images_needed(RESNET50, "cpu", workers=1, cores=2) is None
    for warm in (False, True):  # not even a warm compiled pool is worth joining
        decision = decide_compile(gflops=RESNET50, device="cpu", workers=1, cores=2, images=ImageCount(10**9),
                                  warm_compiled=warm)  # fmt: skip
        assert not decision.compile and decision.reason.startswith("compiled ran at 0.75x")
    assert images_needed(RESNET50, "gpu", workers=1, cores=2) is not None  # the GPU figures are separate
