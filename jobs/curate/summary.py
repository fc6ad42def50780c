"""What a curation job's run returns and prints, for every curation kind; and the run itself around its computation:
the output committed through jobs.output.results (once: a re-run after the end computes nothing)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.output.results import ComputedResult, commit_result, completed
from schemas.curation import ResultManifest
from schemas.outcome import Outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurationSummary:
    """How a curation job's run ended: its output's table, rows and figures."""

    job_id: str
    kind: str
    status: Outcome  # succeeded | already_complete (a failed run raises)
    output: str
    manifest: ResultManifest
    seconds: float
    figure_lines: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        m = self.manifest
        out = [f"job {self.job_id}: {self.status.value}",
               f"  table:    {m.table}, {m.rows} rows at {self.output} (`bulklabel query {self.output} \"SELECT * "
               f"FROM {m.table}\"`)"]  # fmt: skip
        out += [f"  {line}" for line in self.figure_lines]
        if m.sheet:
            out.append(f"  sheet:    {self.output.rstrip('/')}/{m.sheet}")
        out.append(f"  time:     {self.seconds:.1f}s")
        return out


def run_curation(spec, prepare: Callable[[], Callable[[], ComputedResult]],
                 describe: Callable[[dict], list[str]]) -> CurationSummary:  # fmt: skip
    """Run a curation job: nothing when its output is complete already; else `prepare()` reads and checks its
    input (bad input fails here, before anything is written) and returns the computation, whose result is
    committed at the spec's output. `describe(figures)` → the summary's lines of figures."""
    started = time.monotonic()
    job_id = spec.resolved_job_id()
    manifest = completed(spec.output, spec.storage, job_id)
    wrote = False
    if manifest is None:
        compute = prepare()
        manifest, wrote = commit_result(spec.output, spec.storage, job_id, spec.kind, spec, compute)
    status = Outcome.SUCCEEDED if wrote else Outcome.ALREADY_COMPLETE
    return CurationSummary(job_id, spec.kind, status, spec.output, manifest, time.monotonic() - started,
                           tuple(describe(manifest.figures)))  # fmt: skip
