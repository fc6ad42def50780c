"""The corrections table of a review queue: every writer and reader of review decisions goes through here.

A decision is committed once, whole, as its own Parquet file `corrections/<decision id>.parquet` under the queue's
output (schemas.layout), created with the store's create-if-absent (S3 `If-None-Match: *`, a local `link()`):
- a request retried after a lost answer (the server killed after the write, a dropped connection) finds its file and
  records nothing twice; the same id with another decision is refused (a client bug, never silently dropped);
- several servers (reviewers on several machines) write without a lease: no two decisions share a file, and no
  file is ever rewritten, so there is nothing to coordinate;
- a server killed mid-write leaves at most a hidden temporary (LocalStorage) or no object (S3): the decision in
  flight is lost, its client was never told it was recorded, and retries it.

The queue must be a finished curation output of a table people review (`queue`, or `issues`): decisions about rows
of a run that has not finished would point at nothing.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from enum import Enum

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.output.errors import OutputError
from jobs.output.results import ResultOutput, open_result
from schemas.curation import ISSUES_TABLE, QUEUE_TABLE
from schemas.layout import CORRECTION_FILE, CORRECTIONS_DIR, correction_uri, join
from schemas.review import CORRECTIONS_SCHEMA, DecisionRecord
from schemas.specs import StorageOptions
from workers.io.storage import ObjectMissing, Storage, relative_key

log = logging.getLogger(__name__)

REVIEWED_TABLES = (QUEUE_TABLE, ISSUES_TABLE)
READ_THREADS = 16  # one small object per decision: reads overlap on S3


class Recorded(Enum):
    NEW = "new"  # this call committed it
    ALREADY = "already"  # an earlier request with the same id had: nothing was written


class DecisionConflict(OutputError):
    """A decision id already recorded with another decision: the client reused an id."""


def open_queue(uri: str, options: StorageOptions | None = None) -> ResultOutput:
    """The finished queue (or label-issues) output at `uri`, whose rows people review; OutputError naming what it is
    otherwise."""
    result = open_result(uri, options)
    if result is None:
        raise OutputError(f"{uri} is not a review queue: give the output of `bulklabel review-queue` or "
                          "`bulklabel label-issues`")  # fmt: skip
    if result.manifest.table not in REVIEWED_TABLES:
        raise OutputError(f"{uri} holds a {result.manifest.table!r} table, not one people review (a "
                          f"{' or '.join(map(repr, REVIEWED_TABLES))} table)")  # fmt: skip
    return result


def encode(decision: DecisionRecord) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([decision.row()], schema=CORRECTIONS_SCHEMA), sink)
    return sink.getvalue()


def record_decision(storage: Storage, queue: str, decision: DecisionRecord) -> Recorded:
    """Commit `decision` under `queue` once. Raises DecisionConflict when its id holds another decision."""
    uri = correction_uri(queue, decision.decision_id)
    if storage.create_exclusive(uri, encode(decision)):
        return Recorded.NEW
    earlier = _decode(storage.read_bytes(uri), uri)
    if earlier.model_dump(exclude={"decided_at"}) != decision.model_dump(exclude={"decided_at"}):
        raise DecisionConflict(f"decision {decision.decision_id} is recorded already, as another decision "
                               f"({earlier.decision.value} of {earlier.key!r} by {earlier.reviewer})")  # fmt: skip
    return Recorded.ALREADY


def read_decisions(storage: Storage, queue: str) -> list[DecisionRecord]:
    """Every decision committed under `queue`, in the order they were recorded (time, then id)."""
    prefix = join(queue, CORRECTIONS_DIR)
    uris = [obj.uri for obj in storage.list(prefix) if CORRECTION_FILE.fullmatch(relative_key(queue, obj.uri))]
    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(uris)))) as pool:
        decisions = list(pool.map(lambda uri: _read(storage, uri), uris))
    found = [d for d in decisions if d is not None]
    return sorted(found, key=lambda d: (d.decided_at, d.decision_id))


def corrections_table(decisions: list[DecisionRecord]) -> pa.Table:
    """The decisions as one Arrow table (`bulklabel query`'s view `corrections`)."""
    return pa.Table.from_pylist([d.row() for d in decisions], schema=CORRECTIONS_SCHEMA)


def _read(storage: Storage, uri: str) -> DecisionRecord | None:
    try:
        return _decode(storage.read_bytes(uri), uri)
    except ObjectMissing:  # listed, then gone: only a person deletes decisions
        log.warning("decision %s was listed but is gone", uri)
        return None


def _decode(data: bytes, uri: str) -> DecisionRecord:
    try:
        rows = pq.read_table(io.BytesIO(data), schema=CORRECTIONS_SCHEMA).to_pylist()
        if len(rows) != 1:
            raise ValueError(f"{len(rows)} rows, not 1")
        record = DecisionRecord.model_validate({k: v for k, v in rows[0].items() if v is not None})
    except Exception as exc:  # noqa: BLE001 - any damage is the same answer: name the file
        raise OutputError(f"decision file {uri} is damaged: {exc}") from exc
    if not uri.endswith(f"/{record.decision_id}.parquet"):
        raise OutputError(f"decision file {uri} is damaged: it holds decision {record.decision_id}")
    return record
