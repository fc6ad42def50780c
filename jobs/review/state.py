"""What the review app knows and decides, apart from HTTP: the queue's items, the decisions taken, who reviews what
(jobs.review.assign), and the rules a decision must follow before it is committed (jobs.output.corrections)."""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
from bisect import insort
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field

from jobs.errors import BadInput
from jobs.output.corrections import DecisionConflict, Recorded, read_decisions, record_decision
from jobs.output.faultpoints import crash_point
from jobs.output.results import ResultOutput
from jobs.review.assign import LEASE_S, Assignments
from jobs.review.decisions import effective
from jobs.review.items import ReviewItem, class_names, review_items
from schemas.review import (
    DECISION_ID_PATTERN,
    REVIEWER_PATTERN,
    BadReason,
    Decision,
    DecisionRecord,
)
from schemas.specs import Spec
from workers.io.storage import StorageError, open_storage

log = logging.getLogger(__name__)

RATE_WINDOW = timedelta(minutes=10)  # a reviewer's throughput is over their decisions of the last ten minutes


class NotFound(BadInput):
    """An item or decision the queue does not have: 404."""


class Conflict(BadInput):
    """A decision id already recorded as another decision: 409."""


class NextRequest(Spec):
    reviewer: str = Field(pattern=REVIEWER_PATTERN)
    predicted: str | None = Field(default=None, max_length=200, description="Only items the model predicts so.")
    given: str | None = Field(default=None, max_length=200, description="Only items given this label.")


class DecisionRequest(Spec):
    """A decision as the page sends it; the server adds the image, the label shown and the time."""

    decision_id: str = Field(pattern=DECISION_ID_PATTERN)
    reviewer: str = Field(pattern=REVIEWER_PATTERN)
    key: str = Field(max_length=4096)
    decision: Decision
    label: str | None = Field(default=None, max_length=200)
    bad_reason: BadReason | None = None
    undoes: str | None = Field(default=None, pattern=DECISION_ID_PATTERN)


class ReviewState:
    """One queue under review: thread-safe, shared by the app's request threads."""

    def __init__(self, queue: ResultOutput, classes: tuple[str, ...] = (), lease_s: float = LEASE_S,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)):  # fmt: skip
        self.queue = queue
        self.items = review_items(queue)
        self.index = {item.key: i for i, item in enumerate(self.items)}
        self.classes = tuple(sorted(set(classes) | set(class_names(self.items))))
        self._now = now
        self._lock = threading.Lock()
        self.decisions: list[DecisionRecord] = []
        self._by_id: dict[str, DecisionRecord] = {}
        self._by_key: dict[str, list[DecisionRecord]] = {}
        self._counted: dict[str, DecisionRecord] = {}  # per item, the decision that counts (kept as each arrives)
        self._mine: Counter[str] = Counter()  # items decided, by reviewer
        self._times: dict[str, list[datetime]] = {}  # when each reviewer decided, for their rate
        self._hashed: dict[str, str | None] = {}  # image_id of items whose file was read to name it
        for decision in read_decisions(queue.storage, queue.uri):
            self._add(decision)
        self.assignments = Assignments([i.key for i in self.items], set(self._counted), lease_s)
        log.info("queue %s: %d item(s), %d decided, %d decision(s) recorded", queue.uri, len(self.items),
                 len(self._counted), len(self.decisions))  # fmt: skip

    # ------------------------------------------------------------------------------------------------ reading

    def next_item(self, ask: NextRequest) -> dict[str, Any] | None:
        """The item `ask.reviewer` should look at now (leased to them), as the page shows it; None when done."""

        def wanted(key: str) -> bool:
            item = self.items[self.index[key]]
            predicted = item.suggestions[0][0] if item.suggestions else None
            return (ask.predicted is None or predicted == ask.predicted) and \
                (ask.given is None or item.given_label == ask.given)  # fmt: skip

        key = self.assignments.next_for(ask.reviewer, wanted)
        return None if key is None else self.shown(key)

    def shown(self, key: str) -> dict[str, Any]:
        i = self.index[key]
        item = self.items[i]
        with self._lock:
            counted = self._counted.get(key)
        decided = None if counted is None else {"decision": counted.decision.value, "label": counted.label,
                                                "decision_id": counted.decision_id}  # fmt: skip
        return {
            "index": i,
            "key": item.key,
            "image": f"/image/{i}",
            "given_label": item.given_label,
            "suggestions": [(label, round(score, 4)) for label, score in item.suggestions],
            "current_label": item.current_label,
            "reason": item.reason,
            "decided": decided,
        }

    def progress(self, reviewer: str | None = None) -> dict[str, Any]:
        with self._lock:
            decided, mine = len(self._counted), self._mine.get(reviewer or "", 0)
            times = self._times.get(reviewer or "", [])
            recent = len(times) - bisect.bisect_left(times, self._now() - RATE_WINDOW)
        return {"total": len(self.items), "decided": decided, "left": len(self.items) - decided, "mine": mine,
                "per_minute": round(recent / (RATE_WINDOW.total_seconds() / 60), 2)}  # fmt: skip

    def item(self, index: int) -> ReviewItem:
        if not 0 <= index < len(self.items):
            raise NotFound(f"no item {index} in this queue")
        return self.items[index]

    # ------------------------------------------------------------------------------------------------ deciding

    def decide(self, ask: DecisionRequest) -> dict[str, Any]:
        """Check and commit one decision (once, whatever the retries), then move the queue on. Returns what the page
        needs: whether it was new, the progress, and for an undo the item it reopened."""
        if ask.key not in self.index:
            raise NotFound(f"no item with key {ask.key!r} in this queue")
        item = self.items[self.index[ask.key]]
        if ask.decision is Decision.LABEL and ask.label not in self.classes:
            raise BadInput(f"unknown label {ask.label!r}: pick one of the queue's {len(self.classes)} classes")
        if ask.decision is Decision.UNDO:
            with self._lock:
                target = self._by_id.get(ask.undoes or "")
            if target is None or target.key != ask.key:
                raise NotFound(f"no decision {ask.undoes} about {ask.key!r} to undo")
        record = DecisionRecord(
            decision_id=ask.decision_id, key=ask.key, image=item.image, image_id=self._image_id(item),
            reviewer=ask.reviewer, decision=ask.decision,
            label=ask.label if ask.decision is Decision.LABEL else None,
            previous_label=item.current_label if ask.decision.decides else None,
            bad_reason=ask.bad_reason if ask.decision is Decision.BAD else None, undoes=ask.undoes,
            decided_at=self._now(),
        )  # fmt: skip
        try:
            recorded = record_decision(self.queue.storage, self.queue.uri, record)
        except DecisionConflict as exc:
            raise Conflict(str(exc)) from exc
        crash_point("review:decision_written")  # committed, not yet answered: the client's retry must record nothing
        if recorded is Recorded.NEW:
            self._apply(record)
        log.info("%s %s %s by %s (%s)", record.decision.value, record.key, record.label or "", record.reviewer,
                 recorded.value)  # fmt: skip
        answer: dict[str, Any] = {"recorded": recorded.value, "progress": self.progress(ask.reviewer)}
        if ask.decision is Decision.UNDO:
            answer["item"] = self.shown(ask.key)
        return answer

    def _image_id(self, item: ReviewItem) -> str | None:
        """The image's content id: its label output's, else the sha256 of its file (a labelled set's images are
        files; a tar member or Parquet row without a label output to name it gets none)."""
        if item.image_id is not None or "#" in item.key:
            return item.image_id
        with self._lock:
            if item.key in self._hashed:
                return self._hashed[item.key]
        try:
            digest = hashlib.sha256(open_storage(item.image, self.queue.options).read_bytes(item.image)).hexdigest()
        except (StorageError, OSError) as exc:
            log.warning("image %s cannot be read to name its content (%s): its decision carries no image_id",
                        item.image, exc)  # fmt: skip
            digest = None
        with self._lock:
            self._hashed[item.key] = digest
        return digest

    def _add(self, record: DecisionRecord) -> bool:
        """Take in a committed decision; True when its item has a decision that counts afterwards."""
        self.decisions.append(record)
        self._by_id[record.decision_id] = record
        mine = self._by_key.setdefault(record.key, [])
        mine.append(record)  # an undo names a decision about the same key (decide() checks): per key suffices
        if record.decision.decides:
            insort(self._times.setdefault(record.reviewer, []), record.decided_at)
        if record.key not in self.index:
            return False
        before, now = self._counted.get(record.key), effective(mine).get(record.key)
        if before is not None:
            self._mine[before.reviewer] -= 1
        if now is not None:
            self._counted[record.key] = now
            self._mine[now.reviewer] += 1
        else:
            self._counted.pop(record.key, None)
        return now is not None

    def _apply(self, record: DecisionRecord) -> None:
        with self._lock:
            still = self._add(record)
        if record.decision is Decision.SKIP:
            self.assignments.skipped(record.key, record.reviewer)
        elif still:
            self.assignments.decided(record.key)
        else:
            self.assignments.reopened(record.key, record.reviewer)
