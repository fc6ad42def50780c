"""Scale: cost grows linearly. Throughput at 1k, 10k and 50k images is flat, driver memory and CPU per image do not
grow, and the fixed cost of a shard (scheduling + commit) is measured.

Small generated JPEGs (64x64) and a cheap model with random weights (mobilenet_v3_small) keep 50k images within a
few minutes on 2 cores; the preprocessing is still the model's own (resize 256, crop 224).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.bulklabel_run import run_bulklabel
from bench.cluster import local_ray
from bench.data import synthetic_payloads, upload_tar_shards
from bench.memory import PeakMemory
from bench.models import BenchModel, random_weights_file
from bench.s3server import S3Server, s3_server

log = logging.getLogger(__name__)

BUCKET = "bench-scale"
MODEL = "mobilenet_v3_small"
IMAGE_SIZE = 64
COMMIT_SAMPLES = 20


@dataclass(frozen=True)
class ScaleConfig:
    quick: bool = False
    cpus: int = 2
    repeat: int = 1
    batch_size: int = 32
    images_per_shard: int = 1000
    small_shard: int = 50  # the many-shards job of the overhead measurement

    @property
    def sizes(self) -> tuple[int, ...]:
        return (500, 2000) if self.quick else (1000, 10_000, 50_000)

    @property
    def overhead_images(self) -> int:
        """Images of the two jobs that differ only in shard size (per-shard overhead = their difference)."""
        return 1000 if self.quick else 5000


@dataclass(frozen=True)
class ScalePoint:
    images: int
    shards: int
    seconds: float
    steady_seconds: float  # from the first shard's turn to the last commit
    driver_cpu_s: float
    driver_peak_mib: float
    workers_peak_mib: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def steady_rate(self) -> float:
        """Images per second from the first shard's turn to the last commit: the rate without the job's start-up."""
        return self.images / self.steady_seconds


def run_scale(config: ScaleConfig) -> list[str]:
    """Measure every size (median of `repeat` runs each) and the per-shard overhead; returns the report lines."""
    payloads = synthetic_payloads(IMAGE_SIZE)
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as weights_dir, s3_server(BUCKET) as server:
        model = BenchModel(MODEL, random_weights_file(MODEL, Path(weights_dir)))
        inputs = {n: upload_tar_shards(server, f"s3://{BUCKET}/in-{n}", payloads, n, config.images_per_shard)
                  for n in config.sizes}  # fmt: skip
        n = config.overhead_images
        small = upload_tar_shards(server, f"s3://{BUCKET}/in-small-{n}", payloads, n, config.small_shard)
        big = upload_tar_shards(server, f"s3://{BUCKET}/in-big-{n}", payloads, n, config.images_per_shard)
        with local_ray(config.cpus):
            import jobs.label.runner  # noqa: F401 - imported before any clock starts

            points = [_median_point([_job(server, inputs[size].uri, model, config) for _ in range(config.repeat)])
                      for size in config.sizes]  # fmt: skip
            big_s = statistics.median(_job(server, big.uri, model, config).seconds for _ in range(config.repeat))
            small_s = statistics.median(_job(server, small.uri, model, config).seconds for _ in range(config.repeat))
        commit_ms = _commit_ms(server)
    per_shard_ms = 1000 * (small_s - big_s) / (small.shards - big.shards)
    lines = [
        f"scale {p.images}: shards={p.shards} img/s={p.rate:.1f} steady_img/s={p.steady_rate:.1f} "
        f"seconds={p.seconds:.1f} driver_cpu_s={p.driver_cpu_s:.1f} "
        f"driver_peak_rss_mib={p.driver_peak_mib:.0f} workers_peak_rss_mib={p.workers_peak_mib:.0f}"
        for p in points
    ]
    lines.append(
        f"scale per-shard overhead: {per_shard_ms:.0f} ms/shard ({n} images in {small.shards} vs {big.shards} shards: "
        f"{small_s:.1f}s vs {big_s:.1f}s); one commit timed alone: {commit_ms:.0f} ms (in a job it overlaps the "
        f"next shard's batches)"
    )
    return lines


def _job(server: S3Server, input_uri: str, model: BenchModel, config: ScaleConfig) -> ScalePoint:
    output = f"s3://{BUCKET}/out-{time.time_ns()}"
    cpu = time.process_time()
    with PeakMemory() as peak:
        timing = run_bulklabel(server, input_uri, output, model, config.batch_size)
    point = ScalePoint(timing.images, timing.shards, timing.seconds, timing.steady_seconds, time.process_time() - cpu,
                       peak.driver_mib, peak.mib - peak.driver_mib)  # fmt: skip
    log.info("%d images, %d shards: %.1f img/s, driver %.1f CPU s, peak RSS driver %.0f MiB, workers %.0f MiB",
             point.images, point.shards, point.rate, point.driver_cpu_s, point.driver_peak_mib,
             point.workers_peak_mib)  # fmt: skip
    _wait_idle(config.cpus)
    return point


def _median_point(points: list[ScalePoint]) -> ScalePoint:
    return sorted(points, key=lambda p: p.seconds)[len(points) // 2]


def _wait_idle(cpus: int) -> None:
    import ray

    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)


def _commit_ms(server: S3Server, rows: int = 50, dim: int = 576) -> float:
    """Median time of one shard commit (Parquet write, upload, move, done-marker) to the S3 server."""
    from schemas.shards import ShardTask
    from workers.io.writer import ShardWriter

    rng = np.random.default_rng(0)
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as scratch:
        output = f"s3://{BUCKET}/commit-{time.time_ns()}"
        storage = server_storage(server, output)
        for i in range(COMMIT_SAMPLES):
            task = ShardTask(shard_id=f"c{i:04d}", kind="tar", base_uri=f"s3://{BUCKET}/x", keys=(f"{i}.tar",))
            writer = ShardWriter(task, [f"class{c}" for c in range(1000)], "m:random", "job")
            meta = [(f"k{j}", "src", 64, 64, None) for j in range(rows)]
            indices = rng.integers(0, 1000, (rows, 5)).astype(np.int32)
            scores = rng.random((rows, 5), dtype=np.float32)
            writer.add(meta, indices, scores, rng.random((rows, dim), dtype=np.float32))
            started = time.perf_counter()
            writer.commit(storage, output, scratch, 1, {"bytes_read": 0, "seconds": 0.0})
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def server_storage(server: S3Server, uri: str):
    from workers.io.storage import open_storage

    return open_storage(uri, server.options())


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.scale --shards 10000,100000`: the driver at scale, per shard (bench.driver_scale); the
    per-image figures above are `python -m bench scale`."""
    from bench.driver_scale import main as driver_scale

    return driver_scale(argv)


if __name__ == "__main__":
    raise SystemExit(main())
