"""The durable job store: one record per job, an index, and per-job logs, on a local folder or an s3:// prefix.

Layout under the state location (`default_state_uri()` unless told otherwise):
    jobs/<job_id>.json    the JobRecord, rewritten whole at every change (local: temp file + rename; S3: one PUT,
                          which is atomic), so a reader sees the old record or the new one, never half of one
    index.json            {"version": 1, "jobs": {job_id: {kind, state, priority, seq, submitted_at, output}}}
    logs/<job_id>.log     the job's log (see append_log)

The records are the truth; the index is a summary for listing without reading every record. `put` writes the
record first, then the index, so only a writer dying between the two leaves the index behind: readers rebuild it
(in memory) when its job ids differ from the records', and a writer rebuilds it from the records on its first
write, which also repairs a state left behind by a writer that died. One writer (the service) at a time; any number
of readers. Records never hold credentials (JobRecord refuses an unmasked spec).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from pydantic import AwareDatetime, ValidationError

from jobs.errors import BadInput
from jobs.service.records import JOB_ID_PATTERN, JobRecord, JobState
from schemas.specs import Spec, StorageOptions
from workers.io.storage import ObjectMissing, Storage, join, normalise_uri, open_storage

log = logging.getLogger(__name__)

STATE_ENV = "BULKLABEL_STATE"
INDEX_VERSION = 1
LOG_FLUSH_S = 5.0  # S3 logs: the object is rewritten at most this often while a job appends to it
READ_LOG_MAX_BYTES = 1 << 20
_READ_THREADS = 16  # records are small: reading them is latency-bound on S3
_ID_RE = re.compile(JOB_ID_PATTERN.strip("^$"))  # fullmatch: "$" alone would let a trailing newline through


def default_state_uri() -> str:
    """$BULKLABEL_STATE, else ~/.bulklabel/state."""
    return normalise_uri(os.environ.get(STATE_ENV) or "~/.bulklabel/state")


def new_job_id(kind: str, now: datetime | None = None) -> str:
    """A readable id that sorts by submission time, e.g. `label-20261202-0143-3f9a` (16 random bits; the store
    checks it is unused, see JobStore.new_job_id)."""
    now = now or datetime.now(UTC)
    return f"{kind}-{now.astimezone(UTC):%Y%m%d-%H%M}-{secrets.token_hex(2)}"


class UnknownJob(BadInput, KeyError):
    """No job by that id in this store."""

    def __init__(self, job_id: str, uri: str, why: str = ""):
        # All three in args: the service raises this in its actor, and Ray pickles it to the caller, which rebuilds
        # it as cls(*args).
        super().__init__(job_id, uri, why)
        why = why or f"in the job store at {uri}"
        self.message = f"no job {job_id!r} {why}; `bulklabel list` shows the jobs there"

    def __str__(self) -> str:
        return self.message


class CorruptRecord(RuntimeError):
    """A record file that is not a valid JobRecord (hand-edited, truncated by a foreign tool, wrong job id)."""


class IndexEntry(Spec):
    """What `bulklabel list` needs of a job without reading its record."""

    kind: str
    state: JobState
    priority: int
    seq: int
    submitted_at: AwareDatetime
    output: str

    @classmethod
    def of(cls, record: JobRecord) -> IndexEntry:
        return cls(kind=record.kind, state=record.state, priority=record.priority, seq=record.seq,
                   submitted_at=record.submitted_at, output=record.output)  # fmt: skip


class JobStore:
    """Job records, index and logs under `uri` (a local folder or an s3:// prefix)."""

    def __init__(self, uri: str, storage: StorageOptions | None = None, clock: Callable[[], float] = time.monotonic):
        self.uri = normalise_uri(uri)
        self._storage: Storage = open_storage(self.uri, storage)
        self._local = not self.uri.startswith("s3://")
        self._clock = clock
        self._index: dict[str, IndexEntry] | None = None  # the writer's copy, built from the records on first write
        self._next_seq: int | None = None
        self._spools: dict[str, _Spool] = {}  # S3 logs only
        self._spool_dir: str | None = None
        self._skipped: set[str] = set()  # damaged records already warned about

    # ------------------------------------------------------------------------------------------- records

    def record_uri(self, job_id: str) -> str:
        return join(self.uri, "jobs", f"{_checked_id(job_id)}.json")

    def put(self, record: JobRecord) -> None:
        """Write `record` (atomically), then the index if the record's summary changed."""
        data = record.model_dump_json(indent=1).encode()
        self._storage.write_bytes(self.record_uri(record.job_id), data)
        index = self._writer_index()
        entry = IndexEntry.of(record)
        if index.get(record.job_id) != entry:
            index[record.job_id] = entry
            self._write_index(index)

    def get(self, job_id: str) -> JobRecord:
        """The job's record; UnknownJob if there is none, CorruptRecord if its file is not a valid record."""
        uri = self.record_uri(job_id)
        try:
            data = self._storage.read_bytes(uri)
        except ObjectMissing:
            raise UnknownJob(job_id, self.uri) from None
        try:
            record = JobRecord.model_validate_json(data)
        except ValidationError as exc:
            raise CorruptRecord(f"{uri} is not a valid job record ({exc.error_count()} errors)") from exc
        if record.job_id != job_id:
            raise CorruptRecord(f"{uri} holds the record of another job ({record.job_id!r})")
        return record

    def list(self, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        """Every readable record (in `states`, if given) in submission order. Corrupt records are skipped with a
        warning naming their file (once per damage): one bad file must not hide every other job. The writer, whose
        index is the truth of its own writes, reads only the records in `states` and those it has no entry for (the
        service lists queued jobs often)."""
        wanted = None if states is None else frozenset(JobState(s) for s in states)
        if wanted is not None and self._index is not None:
            # Records another writer added (the service of another cluster sharing this store) are read too, and
            # taken into the index, so they are not missed for ever.
            on_disk = set(self._job_ids())
            for gone in set(self._index) - on_disk:
                del self._index[gone]
            ids = [job_id for job_id, entry in self._index.items() if entry.state in wanted]
            ids += sorted(on_disk - set(self._index))
        else:
            ids = self._job_ids()
        read = self._read_all(ids)
        if self._index is not None:
            self._index.update((r.job_id, IndexEntry.of(r)) for r in read)
        records = [r for r in read if wanted is None or r.state in wanted]
        return sorted(records, key=lambda r: r.seq)

    def exists(self, job_id: str) -> bool:
        return self._storage.exists(self.record_uri(job_id))

    def new_job_id(self, kind: str, now: datetime | None = None) -> str:
        """new_job_id(), retried until unused in this store (16 random bits per minute of submissions)."""
        for _ in range(32):
            job_id = new_job_id(kind, now)
            if not self.exists(job_id):
                return job_id
        raise RuntimeError(f"no unused job id for {kind} at {now}: the store at {self.uri} is full for that minute")

    def next_seq(self) -> int:
        """The next submission number (FIFO order within a priority); never hands out the same number twice."""
        if self._next_seq is None:
            self._next_seq = max((e.seq for e in self._writer_index().values()), default=-1) + 1
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq

    # --------------------------------------------------------------------------------------------- index

    def index(self) -> dict[str, IndexEntry]:
        """job_id → summary. From index.json when it names exactly the jobs that have records; otherwise rebuilt
        from the records (not written: only the writer writes)."""
        index = self._read_index()
        ids = set(self._job_ids())
        if index is None or set(index) != ids:
            log.info("job index at %s is missing or stale; rebuilding it from %d records", self.uri, len(ids))
            index = {r.job_id: IndexEntry.of(r) for r in self._read_all(ids)}
        return dict(sorted(index.items(), key=lambda item: item[1].seq))

    def rebuild_index(self) -> dict[str, IndexEntry]:
        """Rebuild index.json from the records and write it (the writer does this on its first write)."""
        self._index = {r.job_id: IndexEntry.of(r) for r in self._read_all(self._job_ids())}
        self._write_index(self._index)
        return dict(self._index)

    def _writer_index(self) -> dict[str, IndexEntry]:
        if self._index is None:
            self.rebuild_index()
        return self._index

    def _write_index(self, index: dict[str, IndexEntry]) -> None:
        jobs = {job_id: entry.model_dump(mode="json") for job_id, entry in index.items()}
        data = json.dumps({"version": INDEX_VERSION, "jobs": jobs}, indent=1, sort_keys=True).encode()
        self._storage.write_bytes(join(self.uri, "index.json"), data)

    def _read_index(self) -> dict[str, IndexEntry] | None:
        try:
            raw = json.loads(self._storage.read_bytes(join(self.uri, "index.json")))
            if raw.get("version") != INDEX_VERSION:
                return None
            return {job_id: IndexEntry.model_validate(entry) for job_id, entry in raw["jobs"].items()}
        except ObjectMissing:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValidationError is a ValueError
            log.warning("job index %s is unreadable (%s); rebuilding it", join(self.uri, "index.json"), exc)
            return None

    def _job_ids(self) -> list[str]:
        """Ids of the record files (hidden temporary files and foreign names are not records)."""
        ids = []
        for info in self._storage.list(join(self.uri, "jobs")):
            name = info.uri.rsplit("/", 1)[-1]
            job_id = name.removesuffix(".json")
            if name.endswith(".json") and not name.startswith(".") and _valid_id(job_id):
                ids.append(job_id)
        return ids

    def _read_all(self, ids: Iterable[str]) -> list[JobRecord]:
        def read(job_id: str) -> JobRecord | None:
            try:
                return self.get(job_id)
            except CorruptRecord as exc:
                # Once per damage: the service lists records every tick, and a log repeating it says nothing new.
                if str(exc) not in self._skipped:
                    self._skipped.add(str(exc))
                    log.warning("skipping job record: %s", exc)
            except UnknownJob:  # deleted between the listing and the read
                pass
            return None

        ids = list(ids)
        if self._local or len(ids) < 2:
            return [r for r in map(read, ids) if r is not None]
        with ThreadPoolExecutor(min(_READ_THREADS, len(ids))) as pool:
            return [r for r in pool.map(read, ids) if r is not None]

    # ---------------------------------------------------------------------------------------------- logs

    def log_uri(self, job_id: str) -> str:
        return join(self.uri, "logs", f"{_checked_id(job_id)}.log")

    def append_log(self, job_id: str, text: str) -> None:
        """Append `text` to the job's log. Locally it is appended to the file at once. On S3, where objects cannot
        be appended to, it goes to a local spool file holding the whole log (the object's earlier content first),
        and the whole spool is uploaded at most every LOG_FLUSH_S seconds, and by flush_logs()/close_log()."""
        if self._local:
            path = Path(self.log_uri(job_id))
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(text)
            return
        spool = self._spool(job_id)
        spool.append(text)
        if self._clock() - spool.flushed_at >= LOG_FLUSH_S:
            self._flush(job_id, spool)

    def flush_logs(self) -> None:
        """Upload every S3 log with text not yet uploaded (a no-op locally)."""
        for job_id, spool in list(self._spools.items()):
            self._flush(job_id, spool)

    def close_log(self, job_id: str) -> None:
        """Flush the job's log and drop its local spool (when the job ended)."""
        spool = self._spools.pop(job_id, None)
        if spool is not None:
            self._flush(job_id, spool)
            Path(spool.path).unlink(missing_ok=True)

    def close(self) -> None:
        """Flush every log and remove the spool folder."""
        for job_id in list(self._spools):
            self.close_log(job_id)
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
            self._spool_dir = None

    def read_log(self, job_id: str, offset: int = 0, max_bytes: int = READ_LOG_MAX_BYTES) -> tuple[str, int]:
        """Log text from byte `offset` (at most `max_bytes`) and the offset to read from next; ("", offset) when
        nothing new. Ends on a whole UTF-8 character, so a follower never splits one. On S3 the text is what has
        been uploaded (see append_log), or this process's own spool when it is the writer."""
        max_bytes = max(max_bytes, 4)  # room for a whole character, so a reader always moves on
        spool = self._spools.get(job_id)
        try:
            if self._local or spool is not None:
                with open(spool.path if spool else self.log_uri(job_id), "rb") as fh:
                    fh.seek(offset)
                    data = fh.read(max_bytes)
            else:
                data = self._storage.read_bytes(self.log_uri(job_id))[offset : offset + max_bytes]
        except (FileNotFoundError, ObjectMissing):
            if not self.exists(job_id):
                raise UnknownJob(job_id, self.uri) from None
            return "", offset
        data = _whole_utf8(data)
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def _spool(self, job_id: str) -> _Spool:
        spool = self._spools.get(job_id)
        if spool is None:
            if self._spool_dir is None:
                self._spool_dir = tempfile.mkdtemp(prefix="bulklabel-logs-")
            spool = _Spool(os.path.join(self._spool_dir, f"{_checked_id(job_id)}.log"), flushed_at=self._clock())
            try:  # a restarted service keeps appending to what the last one uploaded
                earlier = self._storage.read_bytes(self.log_uri(job_id))
            except ObjectMissing:
                earlier = b""
            Path(spool.path).write_bytes(earlier)
            self._spools[job_id] = spool
        return spool

    def _flush(self, job_id: str, spool: _Spool) -> None:
        if spool.dirty:
            self._storage.upload_file(spool.path, self.log_uri(job_id))
            spool.dirty = False
        spool.flushed_at = self._clock()


class _Spool:
    """The local copy of one S3 log, uploaded whole."""

    def __init__(self, path: str, flushed_at: float):
        self.path, self.flushed_at, self.dirty = path, flushed_at, False

    def append(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
        self.dirty = True


def _valid_id(job_id: str) -> bool:
    return isinstance(job_id, str) and _ID_RE.fullmatch(job_id) is not None


def _checked_id(job_id: str) -> str:
    """The id, refused unless it matches JOB_ID_PATTERN: it becomes a file name, so `../x` must never pass."""
    if not _valid_id(job_id):
        raise UnknownJob(job_id, "", why="(not a job id: letters, digits, '.', '_' and '-', at most 64)")
    return job_id


def _whole_utf8(data: bytes) -> bytes:
    """`data` without a UTF-8 character cut off at its end (a writer mid-append, or the max_bytes limit)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing is cut
            return data
        if byte >= 0xC0:  # a lead byte: whole if its sequence fits in what is left
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= length else data[:-back]
    return data
