"""The writer lease of a label output: at most one writer at a time (a label job's run, a compaction).

Every writer of an output takes the lease before its first write and holds it until its last: a label job from its
start (after its read-only checks) to its manifest (its own end-of-job compaction and table maintenance included),
`bulklabel compact` from before it reads the manifest to after it deleted the merged files. A second writer waits a
bounded time, then is refused in one line naming the holder (OutputBusy, exit 3); a run of another job finding the
lease held is refused at once as the ownership conflict it is (exit 2).

The lease is a sequence of generation files `_lease/<n>.json` (schemas.layout); the highest one is the lease's
state. Taking it means creating generation n+1 with the storage's atomic create-if-absent (S3 `If-None-Match: *`,
a local `link()`), which is allowed only when generation n is free: released, expired, or held by a process of this
host that is gone. Of two writers taking over the same free (or expired) generation, exactly one creates n+1; the
other reads the winner's record. Nothing is ever deleted to free the lease: release rewrites the holder's own
generation as released, and a new holder prunes the generations below its own. A taker that read the lease just
before such a prune could create a pruned number below the live holder: so a taker lists once more after its
create, and stands aside (its record rewritten released) when a higher generation is there.

The holder renews its generation (a new expiry, rewritten in place: only the holder writes it) from a background
thread every TTL/6, so a renewal stalled up to 5/6 of the TTL (a starved process, a store or disk slow to answer)
still lands in time. A holder that finds a higher generation, or that did not renew before its own expiry (it
stalled: a taker may already have come), has lost the lease: `ensure_held()`, which writers call before each commit
(a manifest, a compaction's switch, a table commit), raises LeaseLost.

Policy (when a lease is free, how long to wait) is plain logic over an injected clock (`standing`, `acquire`'s
`clock`), so it is tested without sleeps.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from jobs.errors import InfrastructureError
from schemas.layout import LEASE_FILE, lease_prefix, lease_uri
from schemas.masking import mask_text
from workers.io.storage import ObjectMissing, Storage, relative_key

log = logging.getLogger(__name__)

TTL_S = 60.0  # a holder that stops renewing (a power cut, a host gone) blocks other writers this long at most
RENEWALS_PER_TTL = 6  # renewal attempts per TTL: one or several may stall or fail before the lease is lost
POLL_S = 1.0  # how often a waiting writer looks at the lease again
TAKE_ATTEMPTS = 20  # creations lost to other writers in one acquire, before it is refused (never loops for ever)


class OutputBusy(InfrastructureError):
    """Another writer holds the output's lease (a job writing it, a compaction): exit 3, nothing was written."""


class LeaseLost(InfrastructureError):
    """This writer's lease expired or was taken over while it wrote: it must stop before its next commit."""


class WriterKind(StrEnum):
    LABEL_JOB = "label job"
    COMPACTION = "compaction"
    CURATION_JOB = "curation job"


class LeaseRecord(BaseModel):
    """One generation of an output's lease: who holds it, since when, until when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int
    kind: WriterKind
    job_id: str  # the label job whose output this is (a compaction names the job it compacts)
    host: str
    pid: int
    pid_started: float | None = None  # the process's start time, so a reused pid is not taken for the holder
    token: str  # this holder's own, so renewals and releases touch nothing of another's
    started: datetime
    expires: datetime
    released: bool = False

    def describe(self) -> str:
        """`label job 'x' (host h, pid 12, since 2026-12-06 23:10:05 UTC)`: who to look for."""
        of = " of job" if self.kind is WriterKind.COMPACTION else ""
        what = f"{self.kind}{of} {self.job_id!r}"
        return f"{what} (host {self.host}, pid {self.pid}, since {self.started:%Y-%m-%d %H:%M:%S} UTC)"


class Standing(Enum):
    FREE = "free"  # no lease, or released
    EXPIRED = "expired"  # its holder stopped renewing it
    ABANDONED = "abandoned"  # its holder was a process of this host that is gone
    HELD = "held"


class Clock(Protocol):
    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def standing(current: LeaseRecord | None, now: datetime, alive: Callable[[LeaseRecord], bool]) -> Standing:
    """Whether `current` (the highest generation) keeps other writers out at `now`."""
    if current is None or current.released:
        return Standing.FREE
    if current.expires <= now:
        return Standing.EXPIRED
    if not alive(current):
        return Standing.ABANDONED
    return Standing.HELD


# Tokens of the leases this process holds and has not released. A record naming this very process whose token is
# not here is one it failed to release (a full disk refused the released record) or lost track of: the job service
# and the Python API run label jobs one after another in one process, so "the pid is alive" proves nothing there.
_HELD_HERE: set[str] = set()
_HELD_HERE_LOCK = threading.Lock()


def holder_alive(record: LeaseRecord) -> bool:
    """False only when the holder was a process of this host that is gone (or whose pid another process has now),
    or is this process and no longer holds it; a holder on another host is taken to be alive until its lease
    expires."""
    if record.host != socket.gethostname():
        return True
    if record.pid == os.getpid():
        with _HELD_HERE_LOCK:
            return record.token in _HELD_HERE
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with Ray; without it only the pid is checked
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        process = psutil.Process(record.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return record.pid_started is None or abs(process.create_time() - record.pid_started) < 1.0
    except psutil.NoSuchProcess:
        return False


def _this_process_started() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:  # pragma: no cover
        return None


@dataclass(frozen=True)
class Writer:
    """Who asks for the lease: what kind of writer, for which job."""

    kind: WriterKind
    job_id: str


def _generations(storage: Storage, output: str) -> list[int]:
    names = [relative_key(output, o.uri) for o in storage.list(lease_prefix(output))]
    return sorted(int(m.group(1)) for n in names if (m := LEASE_FILE.fullmatch(n)))


def read_current(storage: Storage, output: str) -> LeaseRecord | None:
    """The highest generation's record, or None without one. A damaged record (a disk that filled mid-write) reads
    as a released generation: it holds nothing, and the next taker goes above it."""
    for _ in range(3):  # a generation pruned between the listing and the read: list again
        generations = _generations(storage, output)
        if not generations:
            return None
        top = generations[-1]
        try:
            return LeaseRecord.model_validate_json(storage.read_bytes(lease_uri(output, top)))
        except ObjectMissing:
            continue
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            log.warning("lease %s is unreadable (%s): taken as released", lease_uri(output, top), why)
            now = datetime.now(UTC)
            return LeaseRecord(generation=top, kind=WriterKind.LABEL_JOB, job_id="?", host="?", pid=0, token="",
                               started=now, expires=now, released=True)  # fmt: skip
    return None


def acquire(
    storage: Storage,
    output: str,
    writer: Writer,
    wait_s: float = 0.0,
    *,
    ttl_s: float = TTL_S,
    clock: Clock | None = None,
    alive: Callable[[LeaseRecord], bool] = holder_alive,
    keep: bool = True,
    advice: str = "",
    refuse: Callable[[LeaseRecord], None] | None = None,
) -> Lease:
    """Take the output's lease for `writer`, waiting up to `wait_s` for a holder to let go; else raise OutputBusy
    naming the holder (with `advice` appended). `keep`: renew it from a background thread until released.
    `refuse(holder)`, called for a live holder, may raise at once where waiting cannot help (another job's output)."""
    clock = clock or WallClock()
    deadline = clock.now() + timedelta(seconds=wait_s)
    for _ in range(TAKE_ATTEMPTS):
        while True:
            current = read_current(storage, output)
            now = clock.now()
            state = standing(current, now, alive)
            if state is not Standing.HELD:
                break
            if refuse is not None:
                refuse(current)
            if now >= deadline:
                left = (current.expires - now).total_seconds()
                raise OutputBusy(
                    f"output {output} is being written by {current.describe()}; its lease runs {left:.0f} s more "
                    f"unless renewed" + (f": {advice}" if advice else "")
                )
            clock.sleep(min(POLL_S, (deadline - now).total_seconds()))
        generation = (current.generation if current else 0) + 1
        record = LeaseRecord(generation=generation, kind=writer.kind, job_id=writer.job_id, host=socket.gethostname(),
                             pid=os.getpid(), pid_started=_this_process_started(), token=uuid.uuid4().hex,
                             started=now, expires=now + timedelta(seconds=ttl_s))  # fmt: skip
        # The token is this process's before the record exists: a thread of this process that reads the new
        # record must find its holder alive, not take it for a lease this process let go of.
        with _HELD_HERE_LOCK:
            _HELD_HERE.add(record.token)
        created = False
        try:
            created = storage.create_exclusive(lease_uri(output, generation), record.model_dump_json().encode())
        finally:
            if not created:
                with _HELD_HERE_LOCK:
                    _HELD_HERE.discard(record.token)
        if created and _generations(storage, output)[-1] > generation:
            # Its number was free only because a holder above had pruned it: this writer read the lease before that
            # holder took it (a listing that missed the new generation, then the pruned one). Stand aside.
            _stand_aside(storage, output, record)
            continue
        if created:
            if state is not Standing.FREE:
                log.warning("output %s: took over the lease of %s (%s)", output, current.describe(), state.value)
            lease = Lease(storage, output, record, ttl_s, clock)
            lease.prune()
            if keep:
                lease.keep_renewed()
            log.debug("output %s: lease generation %d taken by %s", output, generation, record.describe())
            return lease
        # another writer created that generation first: look at what it holds
    raise OutputBusy(f"output {output}: {TAKE_ATTEMPTS} other writers took its lease first; try again")


def _stand_aside(storage: Storage, output: str, record: LeaseRecord) -> None:
    with _HELD_HERE_LOCK:
        _HELD_HERE.discard(record.token)
    log.debug("output %s: generation %d was below the lease's state; released at once", output, record.generation)
    storage.write_bytes(
        lease_uri(output, record.generation), record.model_copy(update={"released": True}).model_dump_json().encode()
    )


class Lease:
    """A lease this process holds. Use `ensure_held()` before each commit, `release()` at the end (or `with`)."""

    def __init__(self, storage: Storage, output: str, record: LeaseRecord, ttl_s: float, clock: Clock):
        self.storage, self.output, self.record = storage, output, record
        self.ttl_s, self.clock = ttl_s, clock
        self.lost: str | None = None  # why, once lost
        self.released = False
        self.renewed_at = record.started  # the last expiry this holder wrote, for the reason it gives when lost
        self._renew_error: str | None = None  # why the last renewal failed, if it did
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return lease_uri(self.output, self.record.generation)

    def ensure_held(self) -> None:
        """Raise LeaseLost if another writer may have the output now."""
        with self._lock:
            if self.lost is None and self.clock.now() >= self.record.expires:
                self.lost = self._expired()
            if self.lost is not None:
                raise LeaseLost(f"output {self.output}: this writer's lease was lost ({self.lost}); stopped before "
                                "writing more: run it again")  # fmt: skip

    def renew(self) -> None:
        """Push the expiry TTL ahead; marks the lease lost when it expired first or a taker went above it."""
        with self._lock:
            if self.lost is not None or self.released:
                return
            now = self.clock.now()
            if now >= self.record.expires:  # stalled past expiry: a taker may hold it, so writing is unsafe
                self.lost = self._expired()
                return
            if self._taken_over():
                return
            record = self.record.model_copy(update={"expires": now + timedelta(seconds=self.ttl_s)})
            self.storage.write_bytes(self.uri, record.model_dump_json().encode())
            self.record, self.renewed_at, self._renew_error = record, now, None
            self._taken_over()  # a taker that read the old expiry just before this write

    def release(self) -> None:
        """Let the next writer in at once. Never raises: the writer may be on its way out with another error."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self.released:
                return
            self.released = True
            with _HELD_HERE_LOCK:  # even if the record below cannot be written: this process holds it no more
                _HELD_HERE.discard(self.record.token)
            if self.lost is not None:
                return
            try:
                if not self._taken_over():
                    released = self.record.model_copy(update={"released": True, "expires": self.clock.now()})
                    self.storage.write_bytes(self.uri, released.model_dump_json().encode())
            except Exception as exc:  # noqa: BLE001 - the lease then expires on its own within TTL_S
                log.warning("could not release the lease %s (it expires by itself in %.0f s): %s", self.uri,
                            self.ttl_s, exc)  # fmt: skip

    def prune(self) -> None:
        """Delete generations below this one: the highest is the state, the others are history."""
        for obj in self.storage.list(lease_prefix(self.output)):
            match = LEASE_FILE.fullmatch(relative_key(self.output, obj.uri))
            if match and int(match.group(1)) < self.record.generation:
                self.storage.delete(obj.uri)

    def keep_renewed(self) -> None:
        """Renew from a daemon thread every TTL/6 until released (it dies with the process, as the lease should)."""
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.record.job_id}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / RENEWALS_PER_TTL):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - the store may come back before the expiry; else lost then
                self._renew_error = mask_text(f"{type(exc).__name__}: {exc}")
                log.warning("could not renew the lease %s: %s", self.uri, exc)
            if self.lost is not None:
                log.error("output %s: lease lost (%s)", self.output, self.lost)
                return

    def _expired(self) -> str:
        """Why an expired lease is lost, with what tells a stalled holder from a store that refused its renewals."""
        why = (
            f"it expired at {self.record.expires:%H:%M:%S} UTC before it was renewed; last renewed at "
            f"{self.renewed_at:%H:%M:%S}"
        )
        return why + (
            f", then a renewal failed: {self._renew_error}"
            if self._renew_error
            else ", then no renewal ran in time (the process stalled)"
        )

    def _taken_over(self) -> bool:
        successor = lease_uri(self.output, self.record.generation + 1)
        if self.storage.exists(successor):
            self.lost = "another writer took it over"
            return True
        return False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
