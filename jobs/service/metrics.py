"""The service's metrics through Ray's metrics API, so the Ray dashboard and Prometheus (each node's metrics
endpoint) show them: images labelled, error rows, shard seconds, failed shards, jobs ended, queue length, pools."""

from __future__ import annotations

import functools

from schemas.shards import ShardResult


@functools.cache
def _metrics():
    from ray.util.metrics import Counter, Gauge, Histogram  # built in the service's process, on first use

    return {
        "images": Counter("bulklabel_images_labelled", "Images labelled (rows committed)", tag_keys=("job", "model")),
        "errors": Counter(
            "bulklabel_error_rows",
            "Rows that are errors (images that could not be labelled)",
            tag_keys=("job", "model"),
        ),  # fmt: skip
        "shard_s": Histogram(
            "bulklabel_shard_seconds",
            "Seconds per committed shard",
            boundaries=[1, 5, 15, 60, 300, 1800],
            tag_keys=("model",),
        ),  # fmt: skip
        "rate": Gauge("bulklabel_images_per_second", "Images/s of a running job", tag_keys=("job", "model")),
        "ended": Counter("bulklabel_jobs_ended", "Jobs that ended, by kind and state", tag_keys=("kind", "state")),
        "queue": Gauge("bulklabel_queue_length", "Jobs waiting to start"),
        "pool": Gauge("bulklabel_pool_workers", "Workers in a warm pool", tag_keys=("pool",)),
    }


def shard_done(result: ShardResult, model: str) -> None:
    tags = {"job": result.job_id, "model": model}
    m = _metrics()
    m["images"].inc(result.rows, tags)
    if result.errors:
        m["errors"].inc(result.errors, tags)
    m["shard_s"].observe(result.seconds, {"model": model})
    if result.seconds > 0:
        m["rate"].set(result.rows / result.seconds, tags)


def job_ended(kind: str, state: str) -> None:
    _metrics()["ended"].inc(1, {"kind": kind, "state": state})


def queue_length(count: int) -> None:
    _metrics()["queue"].set(count)


def pools(workers_by_pool: dict[str, int]) -> None:
    for key, workers in workers_by_pool.items():
        _metrics()["pool"].set(workers, {"pool": key})
