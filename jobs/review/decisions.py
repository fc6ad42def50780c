"""Which review decisions count, as plain logic over the committed ones (jobs.output.corrections): per image, the
latest decision that is neither a skip nor undone. An undo cancels the decision it names, so the one before it (if
any) counts again; an undone undo restores its decision."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas.review import Corrections, Decision, DecisionRecord


def undone(decisions: Sequence[DecisionRecord]) -> set[str]:
    """Ids of the decisions that do not count: undone by an undo that itself counts."""
    by_id = {d.decision_id: d for d in decisions}
    cancelled: set[str] = set()
    for d in reversed(decisions):  # the latest undo first: an undo undone cancels nothing
        if d.decision is Decision.UNDO and d.decision_id not in cancelled and d.undoes in by_id:
            cancelled.add(d.undoes)
    return cancelled


def effective(decisions: Sequence[DecisionRecord]) -> dict[str, DecisionRecord]:
    """Per queue key, the decision that counts (a label or bad; an image with none is left out). `decisions` in
    the order they were recorded."""
    cancelled = undone(decisions)
    out: dict[str, DecisionRecord] = {}
    for d in decisions:
        if d.decision.decides and d.decision_id not in cancelled:
            out[d.key] = d
    return out


def corrections(queues: Iterable[tuple[str, Sequence[DecisionRecord]]]) -> Corrections:
    """What a fine-tune applies from these queues' decisions; a later queue's decision about the same image wins
    over an earlier queue's only when it was taken later."""
    latest: dict[str, DecisionRecord] = {}
    names, count = [], 0
    for uri, decisions in queues:
        names.append(uri)
        count += len(decisions)
        for d in effective(decisions).values():
            if d.image not in latest or latest[d.image].decided_at <= d.decided_at:
                latest[d.image] = d
    return Corrections(
        queues=tuple(names), decisions=count,
        labels={image: d.label for image, d in latest.items() if d.decision is Decision.LABEL and d.label},
        bad={image: (d.bad_reason.value if d.bad_reason else "bad") for image, d in latest.items()
             if d.decision is Decision.BAD},
        keys={d.key: image for image, d in latest.items()},
        reviewers={image: d.reviewer for image, d in latest.items()},
    )  # fmt: skip


@dataclass(frozen=True)
class ReviewStatus:
    """`bulklabel review status`: how far the review of a queue is."""

    items: int
    decided: int
    by_decision: dict[str, int]  # of the decisions that count: label (changed / kept), bad
    by_reviewer: dict[str, int]  # decided images
    skipped: int  # images skipped and not decided since
    decisions: int  # every decision recorded (skips, undos and undone ones included)

    @property
    def left(self) -> int:
        return self.items - self.decided

    def lines(self) -> list[str]:
        out = [f"{self.decided} of {self.items} image(s) reviewed, {self.left} left ({self.decisions} decision(s) "
               f"recorded, {self.skipped} image(s) skipped and still open)"]  # fmt: skip
        out += [f"  {name}: {n}" for name, n in sorted(self.by_decision.items())]
        out += [f"  reviewer {name}: {n}" for name, n in sorted(self.by_reviewer.items(), key=lambda kv: -kv[1])]
        return out


def review_status(keys: Sequence[str], decisions: Sequence[DecisionRecord]) -> ReviewStatus:
    """The status of a queue of `keys` (its items) given its committed decisions."""
    wanted = set(keys)
    counted = {k: d for k, d in effective(decisions).items() if k in wanted}
    by_decision: Counter[str] = Counter()
    for d in counted.values():
        if d.decision is Decision.BAD:
            by_decision["bad"] += 1
        else:
            by_decision["label kept" if d.label == d.previous_label else "label changed"] += 1
    cancelled = undone(decisions)
    skipped = {d.key for d in decisions if d.decision is Decision.SKIP and d.decision_id not in cancelled}
    return ReviewStatus(items=len(wanted), decided=len(counted), by_decision=dict(by_decision),
                        by_reviewer=dict(Counter(d.reviewer for d in counted.values())),
                        skipped=len((skipped & wanted) - set(counted)), decisions=len(decisions))  # fmt: skip
