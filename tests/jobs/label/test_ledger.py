"""jobs.label.ledger with a fake clock: order, backoff, attempt bounds, requeue, timeouts, cancel, lazy planning."""

from __future__ import annotations

import pytest

from jobs.errors import WorkersLost
from jobs.label.ledger import Counts, LedgerLimits, Outcome, ShardLedger
from schemas.shards import ShardResult, ShardTask
from workers.io.storage import AccessDenied, StoreUnavailable

LIMITS = LedgerLimits(max_attempts=3, shard_timeout_s=100.0, max_actor_restarts=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def task(i: int) -> ShardTask:
    return ShardTask(shard_id=f"s{i:03d}", kind="files", base_uri="/in", keys=(f"{i}.jpg",))


def result(shard_id: str, attempt: int = 1, rows: int = 10, errors: int = 1) -> ShardResult:
    return ShardResult(shard_id=shard_id, job_id="j", fingerprint="f", data_uri=f"/out/{shard_id}.parquet", rows=rows,
                       errors=errors, bytes_read=1, seconds=0.1, attempt=attempt)  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def ledger_of(clock: FakeClock, n: int = 0, limits: LedgerLimits = LIMITS) -> ShardLedger:
    ledger = ShardLedger(limits, clock)
    ledger.feed(task(i) for i in range(n))
    return ledger


def take(ledger: ShardLedger) -> tuple[str, int] | None:
    ready = ledger.next_ready()
    return None if ready is None else (ready[0].shard_id, ready[1])


def test_backoff_doubles_from_5s_and_caps_at_60s():
    assert [LIMITS.backoff(a) for a in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_all_shards_run_once_and_the_ledger_is_done(clock):
    ledger = ledger_of(clock, 3)
    handed = [take(ledger) for _ in range(3)]
    assert handed == [("s000", 1), ("s001", 1), ("s002", 1)] and take(ledger) is None
    assert not ledger.done()
    for shard_id, _ in handed:
        assert ledger.succeeded(result(shard_id))
    assert ledger.done()
    assert ledger.counts() == Counts(planned=3, planning_done=True, done=3, failed=0, running=0, retrying=0,
                                     images=30, errors=3)  # fmt: skip


def test_the_plan_is_pulled_lazily():
    pulled = []

    def plan():
        for i in range(1_000_000):
            pulled.append(i)
            yield task(i)

    ledger = ShardLedger(LIMITS, FakeClock())
    ledger.feed(plan())
    take(ledger), take(ledger)
    assert len(pulled) == 2 and ledger.counts().planned == 2 and not ledger.counts().planning_done


def test_a_failed_shard_waits_out_its_backoff_and_retries_come_before_new_shards(clock):
    ledger = ledger_of(clock, 3)
    take(ledger)
    assert ledger.failed("s000", 1, StoreUnavailable("store away")) is Outcome.RETRY
    assert ledger.counts().retrying == 1
    assert take(ledger) == ("s001", 1)  # s000 backs off 5 s: new work meanwhile
    assert ledger.next_due_in() == 5.0
    clock.now = 4.9
    assert take(ledger) == ("s002", 1)
    clock.now = 5.0
    assert take(ledger) == ("s000", 2)
    assert ledger.failed("s000", 2, "boom") is Outcome.RETRY
    clock.now = 14.9
    assert take(ledger) is None and not ledger.done()
    clock.now = 15.0  # the second wait is 10 s
    assert take(ledger) == ("s000", 3)


def test_attempts_are_bounded_then_the_shard_fails_for_good(clock):
    ledger = ledger_of(clock, 1)
    for attempt in (1, 2):
        assert take(ledger) == ("s000", attempt)
        assert ledger.failed("s000", attempt, "ValueError: bad shard") is Outcome.RETRY
        clock.now += 60
    assert take(ledger) == ("s000", 3)
    assert ledger.failed("s000", 3, "ValueError: bad shard") is Outcome.FAILED
    assert ledger.failures == {"s000": "ValueError: bad shard"}
    assert ledger.done() and take(ledger) is None and ledger.counts().failed == 1


def test_access_denied_stops_the_job(clock):
    ledger = ledger_of(clock, 5)
    take(ledger), take(ledger)
    ledger.failed("s001", 1, "x")  # backing off
    assert ledger.failed("s000", 1, AccessDenied("access to s3://b/k denied")) is Outcome.FATAL
    assert ledger.fatal == "AccessDenied: access to s3://b/k denied"
    clock.now = 1000
    assert take(ledger) is None and ledger.done()
    assert ledger.failed("s002", 1, "no such attempt") is Outcome.IGNORED


def test_a_lost_worker_costs_its_running_shard_a_try_and_requeued_shards_none(clock):
    ledger = ledger_of(clock, 3)
    take(ledger), take(ledger)  # s000 runs on the worker, s001 waits behind it
    assert ledger.lost("s000", 1, "died") is Outcome.RETRY
    assert ledger.requeue("s001", 1)
    ledger.worker_lost("died")
    assert take(ledger) == ("s001", 1)  # requeued first, same attempt, no wait
    assert take(ledger) == ("s002", 1)
    clock.now = 5
    assert take(ledger) == ("s000", 2)


def test_worker_deaths_are_bounded_by_max_actor_restarts(clock):
    ledger = ledger_of(clock)
    ledger.worker_lost("died")
    ledger.worker_lost("timed out")
    with pytest.raises(WorkersLost, match=r"workers died 2 times; giving up \(max 2\)"):
        ledger.worker_lost("died")


def test_a_committed_shard_renews_the_worker_death_budget(clock):
    """A long job that loses a worker now and then goes on while shards commit between the deaths; deaths with no
    shard committed between them stop it within the bound."""
    ledger = ledger_of(clock, 3)
    for _ in range(3):
        for _ in range(2):
            ledger.worker_lost("died")
        shard, attempt = take(ledger)
        assert ledger.succeeded(result(shard, attempt))
    assert ledger.restarts == 6
    ledger.worker_lost("died")
    ledger.worker_lost("died")
    with pytest.raises(WorkersLost, match=r"workers died 2 times since the last committed shard; giving up"):
        ledger.worker_lost("died")


def test_timeouts_run_from_the_head_of_a_ready_worker_only(clock):
    ledger = ledger_of(clock, 2)
    take(ledger), take(ledger)
    clock.now = 500
    assert ledger.timed_out() == []  # neither has reached the head of a ready worker: the model may be loading
    ledger.started("s000", 1)
    clock.now = 600
    assert ledger.timed_out() == []
    clock.now = 600.5
    assert ledger.timed_out() == ["s000"]
    ledger.started("s001", 1, at=600.5)
    assert ledger.timed_out(now=701) == ["s000", "s001"]
    ledger.lost("s000", 1, "timed out")
    assert ledger.timed_out(now=701) == ["s001"]


def test_cancel_stops_dispatch_but_running_shards_may_still_commit(clock):
    ledger = ledger_of(clock, 10)
    take(ledger), take(ledger), take(ledger)
    ledger.failed("s002", 1, "boom")  # backing off
    ledger.cancel()
    clock.now = 100
    assert take(ledger) is None and not ledger.done()  # s000 and s001 still run
    assert ledger.succeeded(result("s000"))  # committed after the cancel: counted
    assert ledger.failed("s001", 1, "boom") is Outcome.ABANDONED  # not retried, not failed: a resume does it
    assert ledger.done() and ledger.failures == {}
    assert ledger.counts().done == 1 and ledger.counts().retrying == 0


def test_requeue_after_cancel_drops_the_shard(clock):
    ledger = ledger_of(clock, 2)
    take(ledger), take(ledger)
    ledger.cancel()
    assert ledger.requeue("s001", 1)
    ledger.succeeded(result("s000"))
    assert ledger.done() and take(ledger) is None


def test_a_shard_is_counted_done_once_and_stale_events_are_ignored(clock):
    ledger = ledger_of(clock, 1)
    take(ledger)
    ledger.lost("s000", 1, "died")  # presumed dead...
    clock.now = 5
    assert take(ledger) == ("s000", 2)
    assert ledger.succeeded(result("s000", attempt=1))  # ...but attempt 1 had committed: done
    assert not ledger.succeeded(result("s000", attempt=2))  # the retry commits the same file again: counted once
    assert ledger.failed("s000", 2, "late") is Outcome.IGNORED
    assert not ledger.requeue("s000", 2)
    assert ledger.counts().done == 1 and ledger.done()


def test_a_late_success_while_backing_off_settles_the_shard(clock):
    ledger = ledger_of(clock, 1)
    take(ledger)
    ledger.failed("s000", 1, "timeout talking to the store")
    assert ledger.succeeded(result("s000"))
    clock.now = 100
    assert take(ledger) is None and ledger.done() and ledger.next_due_in() is None


def test_added_tasks_come_before_fed_ones_and_count_as_planned(clock):
    ledger = ledger_of(clock, 2)
    ledger.add(task(99))
    assert [take(ledger) for _ in range(3)] == [("s099", 1), ("s000", 1), ("s001", 1)]
    assert ledger.counts().planned == 3
