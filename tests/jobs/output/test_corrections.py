"""jobs/output/corrections.py: review decisions committed once each under a finished queue, on both backends."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.output.corrections import (
    DecisionConflict,
    Recorded,
    open_queue,
    read_decisions,
    record_decision,
)
from jobs.output.errors import OutputError
from jobs.output.query import run_query
from jobs.output.results import ComputedResult, commit_result
from schemas.curation import DUPLICATES_SCHEMA, DedupeJobSpec
from schemas.layout import correction_uri
from schemas.review import DecisionRecord
from tests.jobs.output.test_results import JOB, _queue, _spec

NOW = datetime(2026, 12, 7, 15, 0, tzinfo=UTC)


def _finished_queue(root, rows: int = 5):
    commit_result(root.uri, root.options, JOB, "review-queue", _spec(root),
                  lambda: ComputedResult(table=_queue(rows)))  # fmt: skip
    return open_queue(root.uri, root.options)


def _decision(n: int, decision: str = "label", label: str | None = "dog", **fields) -> DecisionRecord:
    return DecisionRecord(decision_id=f"d{n:07d}", key=f"k{n % 5}.jpg", image=f"/in/k{n % 5}.jpg", reviewer="ana",
                          decision=decision, label=label, previous_label="cat", decided_at=NOW, **fields)  # fmt: skip


def test_a_decision_is_committed_once_and_a_retry_records_nothing(storage_root):
    queue = _finished_queue(storage_root)
    first = _decision(1)
    assert record_decision(queue.storage, queue.uri, first) is Recorded.NEW
    retried = first.model_copy(update={"decided_at": datetime(2026, 12, 7, 15, 0, 9, tzinfo=UTC)})  # its answer lost
    assert record_decision(queue.storage, queue.uri, retried) is Recorded.ALREADY
    with pytest.raises(DecisionConflict, match="d0000001 is recorded already, as another decision"):
        record_decision(queue.storage, queue.uri, _decision(1, label="fox"))
    assert read_decisions(queue.storage, queue.uri) == [first]


def test_reviewers_writing_at_once_lose_and_duplicate_nothing_and_query_reads_them(storage_root):
    queue = _finished_queue(storage_root)
    decisions = [_decision(n, "bad" if n % 7 == 0 else "label", None if n % 7 == 0 else "dog") for n in range(60)]

    def post(part: list[DecisionRecord]) -> None:
        for decision in part + part[:3]:  # each reviewer's client retries its first three
            record_decision(queue.storage, queue.uri, decision)

    threads = [threading.Thread(target=post, args=(decisions[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = read_decisions(queue.storage, queue.uri)
    assert sorted(d.decision_id for d in read) == sorted(d.decision_id for d in decisions)
    out = io.StringIO()
    run_query(storage_root.uri, "SELECT decision, count(*) AS n FROM corrections GROUP BY ALL ORDER BY 1", "json",
              None, storage_root.options, out)  # fmt: skip
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [{"decision": "bad", "n": 9},
                                                                           {"decision": "label", "n": 51}]  # fmt: skip


def test_a_damaged_decision_file_is_named(tmp_path):
    class Root:
        uri, options = str(tmp_path / "queue"), None

    queue = _finished_queue(Root)
    (tmp_path / "queue" / "corrections").mkdir()
    pq.write_table(pa.table({"x": [1]}), correction_uri(queue.uri, "d0000009"))
    with pytest.raises(OutputError, match=r"decision file .*d0000009\.parquet is damaged"):
        read_decisions(queue.storage, queue.uri)


def test_only_a_finished_queue_or_issues_output_takes_decisions(tmp_path):
    with pytest.raises(OutputError, match="is not a review queue"):
        open_queue(str(tmp_path / "nothing"))
    out = tmp_path / "dupes"
    commit_result(str(out), None, "dedupe-0123456789ab", "dedupe", DedupeJobSpec(sources=["/in/a"], output=str(out)),
                  lambda: ComputedResult(table=DUPLICATES_SCHEMA.empty_table()))  # fmt: skip
    with pytest.raises(OutputError, match="holds a 'duplicates' table, not one people review"):
        open_queue(str(out))


def test_review_status_says_reviewed_and_left_by_decision_and_reviewer(tmp_path, capsys):
    from jobs.cli import main

    class Root:
        uri, options = str(tmp_path / "queue"), None

    queue = _finished_queue(Root, rows=5)
    for decision in [_decision(1), _decision(2, "bad", None), _decision(3, "skip", None),
                     _decision(4, label="cat").model_copy(update={"reviewer": "bo"})]:  # fmt: skip
        record_decision(queue.storage, queue.uri, decision)
    assert main(["review", "status", queue.uri]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "3 of 5 image(s) reviewed, 2 left (4 decision(s) recorded, 1 image(s) skipped and still open)",
        "  bad: 1", "  label changed: 1", "  label kept: 1", "  reviewer ana: 2", "  reviewer bo: 1"]  # fmt: skip
