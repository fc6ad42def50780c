"""Review decisions into a fine-tune: which ones a job applies (pinned when the job is made) and what they are."""

from __future__ import annotations

import logging

from jobs.output.corrections import open_queue, read_decisions
from jobs.review.decisions import corrections
from schemas.finetune import FinetuneJobSpec
from schemas.review import Corrections, DecisionRecord

log = logging.getLogger(__name__)


def _decisions(spec: FinetuneJobSpec) -> list[tuple[str, list[DecisionRecord]]]:
    out = []
    for uri in spec.corrections:
        queue = open_queue(uri, spec.storage)  # a finished queue, or one line saying what it is instead
        out.append((queue.uri, read_decisions(queue.storage, queue.uri)))
    return out


def pin_corrections(spec: FinetuneJobSpec) -> FinetuneJobSpec:
    """The spec with `corrections_as_of` set to its queues' latest decision, unless set: the job's id then says
    which decisions it applies, so running the same command again resumes it until someone decides more."""
    if not spec.corrections or spec.corrections_as_of is not None:
        return spec
    latest = max((d.decided_at for _, decisions in _decisions(spec) for d in decisions), default=None)
    return spec.model_copy(update={"corrections_as_of": latest})


def read_corrections(spec: FinetuneJobSpec) -> Corrections | None:
    """The decisions the job applies (those recorded up to its `corrections_as_of`); None without queues."""
    if not spec.corrections:
        return None
    cutoff = spec.corrections_as_of
    pinned = [(uri, [d for d in decisions if cutoff is not None and d.decided_at <= cutoff])
              for uri, decisions in _decisions(spec)]  # fmt: skip
    return corrections(pinned)
