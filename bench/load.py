"""Load check for issue 4: a 100k-image job on this machine, and planning over a 1M-key manifest.

    .venv/bin/python -m bench.load --images 100000 --per-shard 1000
    .venv/bin/python -m bench.load --manifest-only --manifest-keys 1000000

Prints images, shards, wall time, throughput and the driver's peak RSS (sampled by bench.memory), so
the driver's memory can be seen not to grow with the number of images or keys.
"""

from __future__ import annotations

import argparse
import io
import logging
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bench.memory import PeakMemory

log = logging.getLogger("bench.load")


def write_small_image_shards(folder: Path, images: int, per_shard: int) -> int:
    """Tar shards of `images` 64x64 JPEGs (16 distinct pictures reused under unique keys)."""
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
        pictures.append(buffer.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, images, per_shard):
        with tarfile.open(folder / f"{shards:06d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                data = pictures[i % len(pictures)]
                info = tarfile.TarInfo(f"img{i:08d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards += 1
    return shards


def run_job(images: int, per_shard: int, model: str, workers: int) -> None:
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        shards = write_small_image_shards(Path(tmp, "in"), images, per_shard)
        spec = LabelJobSpec(
            input={"uri": str(Path(tmp, "in")), "format": "tar"},
            output=str(Path(tmp, "out")),
            model={"name": model, "weights": None},
            num_workers=workers,
            batch_size=64,
            embeddings=True,
        )
        import ray

        ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
        base_mb = psutil.Process().memory_info().rss / 2**20
        with PeakMemory() as rss:
            started = time.perf_counter()
            summary = run_label_job(spec, show_progress=False)
            seconds = time.perf_counter() - started
        ray.shutdown()
        rows, keys = _rows_and_distinct_keys(Path(tmp, "out"))
        print(f"job: images={summary.images} errors={summary.errors} shards={summary.shards}/{shards} "
              f"wall={seconds:.0f}s throughput={summary.images / seconds:.1f} img/s "
              f"driver_rss_before={base_mb:.0f}MB driver_rss_peak={rss.driver_mib:.0f}MB model={model} "
              f"parquet_rows={rows} distinct_keys={keys}")  # fmt: skip
        if rows != images or keys != images:
            raise SystemExit(f"expected {images} rows with distinct keys, read back {rows} rows, {keys} keys")


def _rows_and_distinct_keys(output: Path) -> tuple[int, int]:
    """Read the committed Parquet back with DuckDB, as a user would, rather than trusting the job's own count."""
    import duckdb

    files = str(output / "data" / "part-*.parquet")
    return duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{files}')").fetchall()[0]


def plan_manifest(keys: int, per_shard: int) -> None:
    from jobs.label.plan import plan_shards
    from schemas.specs import InputSpec
    from workers.io.storage import LocalStorage

    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        manifest = Path(tmp, "manifest.parquet")
        pq.write_table(pa.table({"key": [f"images/{i:09d}.jpg" for i in range(keys)]}), manifest)
        base_mb = psutil.Process().memory_info().rss / 2**20
        with PeakMemory() as rss:
            started = time.perf_counter()
            shards = sum(1 for _ in plan_shards(InputSpec(uri=str(manifest), files_per_shard=per_shard),
                                                LocalStorage()))  # fmt: skip
            seconds = time.perf_counter() - started
        print(f"plan: keys={keys} shards={shards} wall={seconds:.1f}s rss_before={base_mb:.0f}MB "
              f"rss_peak={rss.driver_mib:.0f}MB")  # fmt: skip


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--manifest-keys", type=int, default=1_000_000)
    parser.add_argument("--manifest-only", action="store_true")
    args = parser.parse_args()
    plan_manifest(args.manifest_keys, args.per_shard)
    if not args.manifest_only:
        run_job(args.images, args.per_shard, args.model, args.workers)


if __name__ == "__main__":
    main()
