"""bulklabel end to end: a label job from S3 tar shards to committed Parquet (top-5 + embeddings) and manifest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bench.models import BenchModel
from bench.s3server import S3Server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobTiming:
    seconds: float  # run_label_job from call to manifest committed
    images: int
    shards: int
    steady_seconds: float  # from the first shard's turn to the last shard's commit: the job without its start-up

    @property
    def startup_seconds(self) -> float:
        """Job start to the first shard's turn (checks, listing, worker start), plus the manifest at the end."""
        return self.seconds - self.steady_seconds


def run_bulklabel(
    server: S3Server, input_uri: str, output_uri: str, model: BenchModel, batch_size: int, num_workers: int = 0
) -> JobTiming:
    """Run one label job (Ray already running); returns its wall time from start to manifest committed."""
    from jobs.label.commit import read_done_markers
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec
    from workers.storage import open_storage

    spec = LabelJobSpec(
        input={"uri": input_uri, "format": "tar"},
        output=output_uri,
        model={"name": model.name, "weights": model.weights, "device": "cpu"},
        storage=server.options(),
        top_k=5,
        embeddings=True,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    started = time.perf_counter()
    summary = run_label_job(spec, show_progress=False)
    seconds = time.perf_counter() - started
    if summary.status != "succeeded" or summary.errors:
        raise RuntimeError(f"bench job did not succeed cleanly: {summary.lines()}")
    markers = read_done_markers(open_storage(output_uri, server.options()), output_uri).values()
    # Shards overlap (the next one's batches follow the last one's into the model), so their times are not summed.
    first_turn = min(m.committed_at.timestamp() - m.seconds for m in markers)
    steady = max(m.committed_at.timestamp() for m in markers) - first_turn
    return JobTiming(seconds, summary.images, summary.shards, steady)
