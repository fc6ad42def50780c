"""Who reviews which image (jobs/review/assign.py): plain logic on a fake clock."""

from __future__ import annotations

from jobs.review.assign import Assignments


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_lease_not_renewed_returns_the_image_and_a_renewed_one_keeps_it():
    clock = Clock()
    queue = Assignments(["a", "b", "c"], lease_s=60, clock=clock)
    assert queue.next_for("ana") == "a" and queue.next_for("bo") == "b"
    clock.t = 50
    assert queue.next_for("ana") == "a"  # asking again renews it
    clock.t = 100
    assert queue.holder("b") is None  # bo went to lunch at t=0
    assert queue.next_for("cy") == "b" and queue.holder("a") == "ana"


def test_decided_images_leave_and_an_undone_one_comes_back_to_whoever_undid_it():
    clock = Clock()
    queue = Assignments(["a", "b"], decided={"b"}, clock=clock)
    assert queue.open_count == 1 and queue.next_for("ana") == "a"
    queue.decided("a")
    assert queue.next_for("ana") is None and queue.open_count == 0
    queue.reopened("a", "bo")
    assert queue.next_for("ana") is None and queue.next_for("bo") == "a"


def test_a_skipped_image_goes_to_the_others_first_and_back_to_the_skipper_when_nothing_else_is_left():
    clock = Clock()
    queue = Assignments(["a", "b"], clock=clock)
    assert queue.next_for("ana") == "a"
    queue.skipped("a", "ana")
    assert queue.next_for("ana") == "b" and queue.next_for("bo") == "a"
    queue.decided("b")
    clock.t = 1000
    assert queue.next_for("ana") == "a"  # bo's lease ran out; nothing else is left for ana


def test_filters_choose_among_the_open_images():
    queue = Assignments(["a1", "b1", "a2"], clock=Clock())
    assert queue.next_for("ana", lambda key: key.startswith("b")) == "b1"
    assert queue.next_for("ana", lambda key: key.startswith("a")) == "a1"  # her lease does not match: the next
    assert queue.holder("b1") is None  # one image per reviewer: b1 went back
