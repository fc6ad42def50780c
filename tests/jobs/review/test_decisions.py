"""Which review decisions count (jobs.review.decisions): plain logic, no store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from jobs.review.decisions import corrections, effective, review_status
from schemas.review import Decision, DecisionRecord

T0 = datetime(2026, 12, 7, 15, 0, tzinfo=UTC)


def d(n: int, key: str, decision: str, label: str | None = None, undoes: int | None = None, who: str = "ana",
      image: str | None = None, previous: str | None = "cat", at: int | None = None) -> DecisionRecord:  # fmt: skip
    return DecisionRecord(decision_id=f"decision-{n:04d}", key=key, image=image or f"/photos/{key}", reviewer=who,
                          decision=decision, label=label, previous_label=previous,
                          undoes=None if undoes is None else f"decision-{undoes:04d}",
                          decided_at=T0 + timedelta(seconds=n if at is None else at))  # fmt: skip


def test_the_latest_decision_counts_and_skips_change_nothing():
    decisions = [d(1, "a", "label", "dog"), d(2, "a", "label", "fox"), d(3, "b", "bad"), d(4, "c", "skip"),
                 d(5, "b", "skip")]  # fmt: skip
    counted = effective(decisions)
    assert {k: (v.decision, v.label) for k, v in counted.items()} == {"a": (Decision.LABEL, "fox"),
                                                                      "b": (Decision.BAD, None)}  # fmt: skip


def test_an_undo_brings_back_the_decision_before_and_an_undone_undo_restores_its_own():
    assert effective([d(1, "a", "label", "dog"), d(2, "a", "label", "fox"), d(3, "a", "undo", undoes=2)])["a"].label \
        == "dog"  # fmt: skip
    assert "a" not in effective([d(1, "a", "label", "dog"), d(2, "a", "undo", undoes=1)])  # back in the queue
    redone = [d(1, "a", "label", "dog"), d(2, "a", "undo", undoes=1), d(3, "a", "undo", undoes=2)]
    assert effective(redone)["a"].label == "dog"


def test_status_counts_decided_left_changed_kept_and_skipped_by_reviewer():
    decisions = [d(1, "a", "label", "dog", who="ana"), d(2, "b", "label", "cat", who="bo"), d(3, "c", "bad", who="bo"),
                 d(4, "d", "skip", who="ana"), d(5, "e", "label", "owl", who="ana"), d(6, "e", "undo", undoes=5),
                 d(7, "zz", "label", "dog")]  # fmt: skip # zz: not in the queue (another queue's key)
    status = review_status(["a", "b", "c", "d", "e", "f"], decisions)
    assert (status.items, status.decided, status.left, status.skipped, status.decisions) == (6, 3, 3, 1, 7)
    assert status.by_decision == {"label changed": 1, "label kept": 1, "bad": 1}
    assert status.by_reviewer == {"ana": 1, "bo": 2}
    assert status.lines()[0].startswith("3 of 6 image(s) reviewed, 3 left")


def test_a_later_queues_decision_about_the_same_image_wins_only_when_it_was_taken_later():
    first = [d(1, "x", "label", "dog", image="/p/x.jpg", at=10), d(2, "y", "bad", image="/p/y.jpg", at=10)]
    second = [d(3, "k1", "label", "fox", image="/p/x.jpg", at=20, who="bo"),
              d(4, "k2", "label", "owl", image="/p/y.jpg", at=5, who="bo")]  # fmt: skip
    applied = corrections([("q1", first), ("q2", second)])
    assert applied.labels == {"/p/x.jpg": "fox"} and applied.bad == {"/p/y.jpg": "bad"}
    assert applied.decisions == 4 and applied.queues == ("q1", "q2")
    assert applied.keys == {"k1": "/p/x.jpg", "y": "/p/y.jpg"}


@pytest.mark.parametrize("fields", [{"decision": "label"}, {"decision": "bad", "label": "dog"},
                                    {"decision": "undo"}, {"decision": "skip", "undoes": "decision-0001"},
                                    {"decision": "label", "label": "dog", "bad_reason": "blurred"},
                                    {"decision": "bad", "decision_id": "../../etc"}])  # fmt: skip
def test_a_decision_missing_its_fields_or_with_a_bad_id_is_refused(fields):
    base = {"decision_id": "decision-0001", "key": "a", "image": "/p/a", "reviewer": "ana", "decided_at": T0}
    with pytest.raises(ValidationError):
        DecisionRecord(**(base | fields))
