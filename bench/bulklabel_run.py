"""bulklabel end to end: a label job from S3 tar shards to committed Parquet (top-5 + embeddings) and manifest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bench.models import BenchModel
from bench.s3server import S3Server
from schemas.outcome import Outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobTiming:
    seconds: float  # run_label_job from call to manifest committed
    images: int
    shards: int
    steady_seconds: float  # from the first shard's turn to the last shard's commit: the job without its start-up
    first_commit_seconds: float  # from the call (or submit) to the first shard's done-marker

    @property
    def startup_seconds(self) -> float:
        """Job start to the first shard's turn (checks, listing, worker start), plus the manifest at the end."""
        return self.seconds - self.steady_seconds


@dataclass(frozen=True)
class CommitTimes:
    """When an output's shards were committed, from their done-markers (wall clock, this machine)."""

    first_turn: float  # the first shard's commit less its own seconds: when a worker began on it
    first_commit: float
    last_commit: float
    commits: tuple[float, ...]  # every shard's commit time, sorted
    manifest: float  # the manifest's finished_at


def label_spec(server: S3Server, input_uri: str, output_uri: str, model: BenchModel, batch_size: int,
               num_workers: int = 0, compile: bool = False):  # fmt: skip
    """The bench's label job: tar shards from S3, top-5 and embeddings back to S3 (cold and warm runs alike);
    `compile`: on torch.compile'd workers (model.compile)."""
    from schemas.specs import LabelJobSpec

    return LabelJobSpec(
        input={"uri": input_uri, "format": "tar"},
        output=output_uri,
        model={"name": model.name, "weights": model.weights, "device": "cpu", "compile": compile},
        storage=server.options(),
        top_k=5,
        embeddings=True,
        batch_size=batch_size,
        num_workers=num_workers,
    )


def commit_times(server: S3Server, output_uri: str) -> CommitTimes:
    """The committed shards' times (and the manifest's) of the label output at `output_uri`."""
    from jobs.output.manifest import read_manifest
    from jobs.output.markers import read_committed
    from workers.io.storage import open_storage

    storage = open_storage(output_uri, server.options())
    manifest = read_manifest(storage, output_uri)
    if manifest is None:
        raise RuntimeError(f"no manifest at {output_uri}")
    markers = read_committed(storage, output_uri, manifest.job_id, manifest=manifest).done.values()
    commits = sorted(m.committed_at.timestamp() for m in markers)
    finished = manifest.finished_at.timestamp()
    # Shards overlap (the next one's batches follow the last one's into the model), so their times are not summed.
    first_turn = min(m.committed_at.timestamp() - m.seconds for m in markers)
    return CommitTimes(first_turn, commits[0], commits[-1], tuple(commits), finished)


def run_bulklabel(
    server: S3Server, input_uri: str, output_uri: str, model: BenchModel, batch_size: int, num_workers: int = 0
) -> JobTiming:
    """Run one label job (Ray already running); returns its wall time from start to manifest committed."""
    from jobs.label.runner import run_label_job

    spec = label_spec(server, input_uri, output_uri, model, batch_size, num_workers)
    started_wall, started = time.time(), time.perf_counter()
    summary = run_label_job(spec, show_progress=False)
    seconds = time.perf_counter() - started
    if summary.status is not Outcome.SUCCEEDED or summary.errors:
        raise RuntimeError(f"bench job did not succeed cleanly: {summary.lines()}")
    times = commit_times(server, output_uri)
    return JobTiming(seconds, summary.images, summary.shards, times.last_commit - times.first_turn,
                     times.first_commit - started_wall)  # fmt: skip
