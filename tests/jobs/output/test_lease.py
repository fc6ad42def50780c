"""jobs.output.lease: the writer lease of an output, on a real local folder, with an injected clock (no sleeps):
refusal naming the holder, waiting, expiry and takeover, renewal, release, a dead holder on this host, and many
writers racing for one expired lease (exactly one wins)."""

from __future__ import annotations

import socket
import subprocess
import threading
from datetime import UTC, datetime, timedelta

import pytest

from jobs.errors import EXIT_INFRASTRUCTURE, exit_code_for
from jobs.output.lease import (
    RENEWALS_PER_TTL,
    LeaseLost,
    LeaseRecord,
    OutputBusy,
    Standing,
    Writer,
    WriterKind,
    acquire,
    read_current,
    standing,
)
from schemas.layout import lease_uri
from workers.io.storage import LocalStorage, StorageError

JOB = Writer(WriterKind.LABEL_JOB, "job-a")
COMPACTION = Writer(WriterKind.COMPACTION, "job-a")
TTL = 60.0


class FakeClock:
    """Wall time that moves only when a waiter sleeps or the test says so."""

    def __init__(self):
        self.at = datetime(2026, 12, 6, 23, 10, 5, tzinfo=UTC)
        self.slept = 0.0

    def now(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@pytest.fixture
def out(tmp_path) -> str:
    return str(tmp_path / "out")


def _take(out: str, writer: Writer, clock: FakeClock, wait_s: float = 0.0):
    return acquire(LocalStorage(), out, writer, wait_s, ttl_s=TTL, clock=clock, keep=False)


def test_a_second_writer_is_refused_in_one_line_naming_the_holder_exit_3(out):
    clock = FakeClock()
    held = _take(out, JOB, clock)
    assert held.record.generation == 1 and read_current(LocalStorage(), out) == held.record
    clock.advance(20)
    with pytest.raises(OutputBusy) as refused:
        _take(out, COMPACTION, clock)
    message = str(refused.value)
    assert "\n" not in message and exit_code_for(refused.value) == EXIT_INFRASTRUCTURE
    for fact in ("label job 'job-a'", f"host {socket.gethostname()}", f"pid {held.record.pid}",
                 "since 2026-12-06 23:10:05 UTC", "40 s more"):  # fmt: skip
        assert fact in message, message


def test_a_waiting_writer_takes_over_an_expired_lease_and_the_old_holder_knows_it_lost(out):
    clock = FakeClock()
    stalled = _take(out, JOB, clock)  # never renews: its process hangs
    taken = _take(out, COMPACTION, clock, wait_s=90)
    assert taken.record.generation == 2 and TTL <= clock.slept < TTL + 2  # waited for the expiry, no longer
    with pytest.raises(
        LeaseLost,
        match=r"expired at 23:11:05 UTC before it was renewed; last renewed at 23:10:05, "
        r"then no renewal ran in time \(the process stalled\)",
    ):
        stalled.ensure_held()
    stalled.renew()  # too late: stays lost, and writes nothing over the taker's generation
    assert stalled.lost and read_current(LocalStorage(), out).token == taken.record.token
    stalled.release()
    assert read_current(LocalStorage(), out) == taken.record
    assert not LocalStorage().exists(lease_uri(out, 1))  # the taker pruned the generations below its own


def test_renewal_keeps_others_out_past_the_first_ttl_and_a_waiter_gives_up_at_its_bound(out):
    clock = FakeClock()
    held = _take(out, JOB, clock)
    for _ in range(5):  # renewed every 10 s (TTL/6), as the keeper thread does
        clock.advance(TTL / RENEWALS_PER_TTL)
        held.renew()
    held.ensure_held()
    with pytest.raises(OutputBusy, match="label job 'job-a'"):
        _take(out, COMPACTION, clock, wait_s=30)
    assert clock.slept == pytest.approx(30)
    held.renew()
    held.ensure_held()  # the waiter wrote nothing: the holder still holds it


def test_a_lease_lost_to_failed_renewals_says_what_failed_without_a_credential(out, monkeypatch):
    clock = FakeClock()
    held = _take(out, JOB, clock)
    clock.advance(TTL / 2)
    held.renew()

    def refused(uri, data):
        raise StorageError("PUT refused: {'secret_access_key': 'hunter2'}")

    monkeypatch.setattr(held.storage, "write_bytes", refused)
    monkeypatch.setattr(held._stop, "wait", clock.advance)  # returns None: not stopped
    held._renew_loop()  # as the keeper thread runs it: a failed renewal every TTL/6 until the lease expired
    assert held.lost and "last renewed at 23:10:35, then a renewal failed: StorageError: PUT refused" in held.lost
    assert "hunter2" not in held.lost


def test_a_holder_that_renews_after_a_takeover_finds_it_lost(out):
    clock = FakeClock()
    held = _take(out, JOB, clock)
    clock.advance(TTL + 1)
    _take(out, COMPACTION, clock)
    clock.at = held.record.expires - timedelta(seconds=1)  # a holder whose clock lags: it believes it is in time
    held.renew()
    with pytest.raises(LeaseLost, match="took it over"):
        held.ensure_held()


def test_released_lease_lets_the_next_writer_in_at_once(out):
    clock = FakeClock()
    with _take(out, JOB, clock) as held:
        held.ensure_held()
    assert read_current(LocalStorage(), out).released
    following = _take(out, COMPACTION, clock)
    assert following.record.generation == 2 and clock.slept == 0


def test_a_dead_holder_on_this_host_is_taken_over_at_once(out):
    clock = FakeClock()
    gone = subprocess.Popen(["true"])
    gone.wait()
    late = clock.now() + timedelta(hours=1)
    record = LeaseRecord(generation=1, kind=WriterKind.LABEL_JOB, job_id="job-a", host=socket.gethostname(),
                         pid=gone.pid, token="dead", started=clock.now(), expires=late)  # fmt: skip
    assert LocalStorage().create_exclusive(lease_uri(out, 1), record.model_dump_json().encode())
    taken = _take(out, COMPACTION, clock)
    assert taken.record.generation == 2 and clock.slept == 0


def test_standing_is_plain_logic():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = LeaseRecord(generation=3, kind=WriterKind.COMPACTION, job_id="j", host="elsewhere", pid=1, token="t",
                         started=now, expires=now + timedelta(seconds=5))  # fmt: skip
    assert standing(None, now, lambda r: True) is Standing.FREE
    assert standing(record, now, lambda r: True) is Standing.HELD
    assert standing(record, now, lambda r: False) is Standing.ABANDONED
    assert standing(record, now + timedelta(seconds=5), lambda r: True) is Standing.EXPIRED
    assert standing(record.model_copy(update={"released": True}), now, lambda r: True) is Standing.FREE
    assert "compaction of job 'j' (host elsewhere, pid 1" in record.describe()


def test_many_writers_racing_for_an_expired_lease_exactly_one_wins(out):
    clock = FakeClock()
    _take(out, JOB, clock)
    clock.advance(TTL + 1)
    start, won, refused = threading.Barrier(8), [], []

    def contend(index: int) -> None:
        start.wait()
        try:
            won.append(_take(out, Writer(WriterKind.COMPACTION, f"job-{index}"), clock))
        except OutputBusy as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7
    assert all(won[0].record.job_id in message for message in refused)


class _SlowCreate(LocalStorage):
    """A store whose winning create returns late: the window in which another thread of this process reads the new
    record before its creator has returned."""

    def __init__(self, created: threading.Event, resume: threading.Event):
        super().__init__()
        self.created, self.resume = created, resume

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        won = super().create_exclusive(uri, data)
        if won and threading.current_thread().name == "slow":
            self.created.set()
            self.resume.wait(timeout=10)
        return won


def test_a_thread_reading_a_lease_another_thread_of_its_process_just_took_finds_it_held(out):
    clock = FakeClock()
    _take(out, JOB, clock)
    clock.advance(TTL + 1)
    created, resume, won = threading.Event(), threading.Event(), []
    slow = threading.Thread(
        name="slow",
        target=lambda: won.append(
            acquire(_SlowCreate(created, resume), out, COMPACTION, ttl_s=TTL, clock=clock, keep=False)
        ),
    )
    slow.start()
    assert created.wait(timeout=10)
    try:
        with pytest.raises(OutputBusy, match="compaction of job 'job-a'"):
            _take(out, Writer(WriterKind.COMPACTION, "job-b"), clock)
    finally:
        resume.set()
        slow.join()
    assert len(won) == 1 and read_current(LocalStorage(), out).generation == 2


class _StaleFirstListing(LocalStorage):
    """A store whose first listing of the lease comes back empty, as one does that read the folder just before a new
    generation appeared and stat'ed the one below just after it was pruned."""

    def __init__(self):
        super().__init__()
        self.listings = 0

    def list(self, prefix: str):
        self.listings += 1
        return iter(()) if self.listings == 1 else super().list(prefix)


def test_a_taker_that_read_the_lease_before_a_prune_does_not_win_a_pruned_generation(out):
    clock = FakeClock()
    _take(out, JOB, clock).release()
    held = _take(out, COMPACTION, clock)  # generation 2; generation 1 pruned
    assert held.record.generation == 2 and not LocalStorage().exists(lease_uri(out, 1))
    with pytest.raises(OutputBusy, match="compaction of job 'job-a'"):
        acquire(_StaleFirstListing(), out, Writer(WriterKind.LABEL_JOB, "job-b"), ttl_s=TTL, clock=clock, keep=False)
    assert read_current(LocalStorage(), out) == held.record
    stray = LeaseRecord.model_validate_json(LocalStorage().read_bytes(lease_uri(out, 1)))
    assert stray.released and stray.job_id == "job-b"


def test_the_lease_on_both_backends(storage_root):
    """S3's conditional put (`If-None-Match: *`, SeaweedFS here) and a local `link()` behave alike."""
    clock, storage = FakeClock(), storage_root.storage
    held = acquire(storage, storage_root.uri, JOB, ttl_s=TTL, clock=clock, keep=False)
    with pytest.raises(OutputBusy, match="label job 'job-a'"):
        acquire(storage, storage_root.uri, COMPACTION, ttl_s=TTL, clock=clock, keep=False)
    clock.advance(TTL / 2)
    held.renew()
    held.release()
    following = acquire(storage, storage_root.uri, COMPACTION, ttl_s=TTL, clock=clock, keep=False)
    assert following.record.generation == 2 and not storage.exists(lease_uri(storage_root.uri, 1))
    following.release()
    assert read_current(storage, storage_root.uri).released


def test_refuse_stops_the_wait_at_once_where_waiting_cannot_help(out):
    clock = FakeClock()
    _take(out, JOB, clock)

    def another_jobs(holder: LeaseRecord) -> None:
        raise ValueError(f"output belongs to job {holder.job_id!r}")

    with pytest.raises(ValueError, match="belongs to job 'job-a'"):
        acquire(LocalStorage(), out, Writer(WriterKind.LABEL_JOB, "job-b"), 30, clock=clock, keep=False,
                refuse=another_jobs)  # fmt: skip
    assert clock.slept == 0


class _FullDisk(LocalStorage):
    """A local folder whose disk is full: no file can be written (ENOSPC), as in the full-disk fault row."""

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")


def test_a_lease_this_process_could_not_release_does_not_block_its_next_run(out):
    # Found by the full-disk fault row: the released record did not fit on the disk, so the lease still named this
    # (living) process, and the re-run in the same process (the job service, the Python API) was refused for a TTL.
    clock = FakeClock()
    first = _take(out, JOB, clock)
    first.storage = _FullDisk()
    first.release()  # logs a warning, never raises
    assert not read_current(LocalStorage(), out).released
    second = _take(out, JOB, clock)  # same process, lease not expired: taken over as abandoned
    assert second.record.generation == first.record.generation + 1
    second.release()
