"""What a reviewer is shown: the rows of a queue (or the flagged rows of a label-issues result) as review items, in
the order they should be looked at."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jobs.output.reader import OutputError, open_output
from jobs.output.results import ResultOutput
from schemas.curation import ISSUES_TABLE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReviewItem:
    """One image to review: where it is, what the model suggests, the label it has, why it is in the queue."""

    key: str
    image: str
    suggestions: tuple[tuple[str, float], ...]  # (label, score), best first
    given_label: str | None
    reason: str  # "margin 0.04", "label issue: self-confidence 0.02"
    image_id: str | None = None  # sha256 of its bytes, where its label output recorded it

    @property
    def current_label(self) -> str | None:
        """The label it has now: the given one, else the model's first suggestion."""
        return self.given_label or (self.suggestions[0][0] if self.suggestions else None)


def review_items(queue: ResultOutput) -> list[ReviewItem]:
    """The items of a finished queue output, first to review first (a queue's rank; a label-issues result's flagged
    rows by rank)."""
    rows = queue.to_table().to_pylist()
    if queue.manifest.table == ISSUES_TABLE:
        flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: r["rank"])
        return [ReviewItem(key=r["key"], image=r["image"], given_label=r["given_label"],
                           suggestions=((r["suggested_label"], r["suggested_score"] or 0.0),)
                           if r["suggested_label"] else (),
                           reason=f"label issue: self-confidence {r['self_confidence'] or 0:.3f}")
                for r in flagged]  # fmt: skip
    ordered = sorted(rows, key=lambda r: r["rank"])
    ids = _image_ids(queue, {r["key"] for r in ordered})
    return [ReviewItem(key=r["key"], image=r["image"], given_label=r["given_label"],
                       suggestions=tuple(zip(r["topk_labels"] or (), r["topk_scores"] or (), strict=False)),
                       reason=f"{r['strategy']} {r['uncertainty']:.3f}", image_id=ids.get(r["key"]))
            for r in ordered]  # fmt: skip


def _image_ids(queue: ResultOutput, keys: set[str]) -> dict[str, str]:
    """key → image_id of the queue's rows, from the label output it ranked (one scan of two columns); empty when
    that output is gone (the queue is still reviewable, its decisions then carry no image_id)."""
    if not queue.manifest.sources:
        return {}
    try:
        output = open_output(queue.manifest.sources[0].uri, queue.options)
        table = output.to_table(columns=["key", "image_id"])
    except OutputError as exc:
        log.warning("the label output %s of queue %s cannot be read (%s): decisions will carry no image_id",
                    queue.manifest.sources[0].uri, queue.uri, exc)  # fmt: skip
        return {}
    return {k: i for k, i in zip(table["key"].to_pylist(), table["image_id"].to_pylist(), strict=True)
            if k in keys and i}  # fmt: skip


def class_names(items: list[ReviewItem]) -> tuple[str, ...]:
    """The labels a reviewer may pick: every label the queue shows (given or suggested), sorted."""
    return tuple(sorted({label for i in items for label, _ in i.suggestions} |
                        {i.given_label for i in items if i.given_label}))  # fmt: skip
