"""What the user sees while a job runs (a progress bar) and after (a summary)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from schemas.outcome import Outcome
from schemas.shards import ShardResult, StageSeconds


@dataclass(frozen=True)
class Skipped:
    """Keys the plan listed but did not label: matched an `exclude` pattern, or not an image extension."""

    excluded: int = 0
    not_images: int = 0
    examples: tuple[str, ...] = ()

    def line(self) -> str | None:
        if not (self.excluded or self.not_images):
            return None
        example = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return f"  skipped:  {self.excluded} excluded by pattern, {self.not_images} not images{example}"


@dataclass(frozen=True)
class JobSummary:
    """The outcome of a job, as returned by the API and printed by the CLI."""

    job_id: str
    status: Outcome
    output: str
    shards: int
    shards_skipped: int
    images: int
    errors: int
    failed_shards: dict[str, str]
    seconds: float
    images_this_run: int
    worker_restarts: int = 0  # workers that died or hung and were replaced
    shards_new: int = 0  # shards added to the input since an earlier run finished (incremental labelling)
    shards_redone: dict[str, str] = field(default_factory=dict)  # committed shards labelled again → why
    skipped: Skipped = Skipped()
    failure_reason: str | None = None  # why a job whose shards all committed still failed (error rows)
    stages: StageSeconds | None = None  # where the shards' time went, summed over shards (see StageSeconds)
    compile: str | None = None  # what `compile: auto` decided and why (jobs.label.compile_policy)

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"job {self.job_id}: {self.status.value}",
            f"  images:   {self.images} ({self.errors} with errors) in {self.shards} shards"
            + (f", {self.shards_skipped} already done before this run" if self.shards_skipped else ""),
            f"  time:     {self.seconds:.1f}s, {self.images_per_second:.1f} images/s this run",
            f"  output:   {self.output}",
        ]
        if self.stages is not None:
            out.append(f"  stages:   {self.stages.line()} (summed over shards and threads)")
        if self.compile:
            out.append(f"  {self.compile}")
        if self.shards_new:
            out.append(f"  new:      {self.shards_new} shards added to the input since the last run, labelled now")
        for shard, why in sorted(self.shards_redone.items()):
            out.append(f"  redone:   shard {shard}: {why}")
        if skipped := self.skipped.line():
            out.append(skipped)
        if self.worker_restarts:
            out.append(f"  workers replaced after dying or hanging: {self.worker_restarts}")
        if self.failure_reason:
            out.append(f"  FAILED: {self.failure_reason}")
        for shard, error in sorted(self.failed_shards.items()):
            out.append(f"  FAILED shard {shard}: {error}")
        return out


class ProgressListener(Protocol):
    """Who else follows a job's progress (the job service, to keep the job's record current)."""

    def planned(self, count: int) -> None: ...

    def plan_complete(self) -> None:
        """Every shard of the plan has been counted by planned(): their count is the job's total."""

    def done(self, result: ShardResult, earlier: bool) -> None: ...


class Progress:
    """A progress bar over shards that also shows images, images/s and an ETA."""

    def __init__(self, enabled: bool = True, listener: ProgressListener | None = None):
        self.listener = listener
        self.started = time.perf_counter()
        self.images = 0  # all committed shards, including those done before this run
        self.images_this_run = 0
        self.shards_this_run = 0
        self._bar = tqdm(total=0, unit="shard", desc="shards", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def planned(self, count: int = 1) -> None:
        self._bar.total += count
        self._bar.refresh()
        if self.listener:
            self.listener.planned(count)

    def plan_complete(self) -> None:
        if self.listener:
            self.listener.plan_complete()

    def done(self, result: ShardResult, earlier: bool = False) -> None:
        """Count a committed shard; `earlier` when it was committed by a previous run."""
        self.images += result.rows
        self.images_this_run += 0 if earlier else result.rows
        self.shards_this_run += 0 if earlier else 1
        rate = self.images_this_run / max(time.perf_counter() - self.started, 1e-9)
        self._bar.set_postfix(images=self.images, img_s=f"{rate:.1f}", refresh=False)
        self._bar.update(1)
        if self.listener:
            self.listener.done(result, earlier)

    def close(self) -> None:
        self._bar.close()
