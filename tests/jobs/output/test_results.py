"""jobs/output/results.py: a curation job's table committed once through the output protocol, on both backends."""

from __future__ import annotations

import io
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.output.errors import OutputConflict, OutputError
from jobs.output.ownership import claim_output
from jobs.output.query import run_query
from jobs.output.results import ComputedResult, commit_result, open_result
from schemas.curation import QUEUE_SCHEMA, ResultSource, ReviewQueueJobSpec
from schemas.layout import data_name, join

JOB = "review-queue-0123456789ab"


def _queue(n: int) -> pa.Table:
    return pa.table({"rank": list(range(1, n + 1)), "key": [f"k{i}.jpg" for i in range(n)],
                     "image": [f"/in/k{i}.jpg" for i in range(n)], "label": ["cat"] * n, "score": [0.5] * n,
                     "topk_labels": [["cat", "dog"]] * n, "topk_scores": [[0.5, 0.4]] * n, "given_label": [None] * n,
                     "uncertainty": [0.9] * n, "strategy": ["margin"] * n, "measured_on": ["topk"] * n},
                    schema=QUEUE_SCHEMA)  # fmt: skip


def _spec(root) -> ReviewQueueJobSpec:
    return ReviewQueueJobSpec(source="/in/labels", output=root.uri)


def _never():
    raise AssertionError("computed although the output was refused or complete")


def test_a_result_commits_once_and_reads_back_in_duckdb_and_polars(storage_root):
    computed = ComputedResult(table=_queue(3), sources=(ResultSource(uri="/in/labels", job_id="label-x", rows=9),),
                              figures={"queued": 3}, sheet=b"<html></html>")  # fmt: skip
    manifest, wrote = commit_result(storage_root.uri, storage_root.options, JOB, "review-queue", _spec(storage_root),
                                    lambda: computed)  # fmt: skip
    assert wrote and manifest.table == "queue" and manifest.rows == 3 and manifest.sheet == "sheet.html"
    again, wrote_again = commit_result(storage_root.uri, storage_root.options, JOB, "review-queue",
                                       _spec(storage_root), _never)  # fmt: skip
    assert not wrote_again and again == manifest
    result = open_result(storage_root.uri, storage_root.options)
    assert result is not None and result.to_table().equals(computed.table)
    out = io.StringIO()
    assert run_query(storage_root.uri, "SELECT key FROM queue ORDER BY rank", "json", options=storage_root.options,
                     stream=out) == 3  # fmt: skip
    assert [json.loads(line)["key"] for line in out.getvalue().splitlines()] == ["k0.jpg", "k1.jpg", "k2.jpg"]
    if storage_root.options is None:  # Polars straight off the data folder, as users point it
        assert pl.read_parquet(f"{storage_root.uri}/data/").height == 3
    names = {
        o.uri.rsplit(storage_root.uri.rstrip("/") + "/", 1)[1] for o in storage_root.storage.list(storage_root.uri)
    }
    assert {"_owner.json", "_job.json", "sheet.html", data_name("queue")} <= names
    assert not any(n.startswith("_tmp/") for n in names)


def test_another_jobs_output_and_foreign_files_are_refused_before_any_work(storage_root):
    commit_result(storage_root.uri, storage_root.options, JOB, "review-queue", _spec(storage_root),
                  lambda: ComputedResult(table=_queue(1)))  # fmt: skip
    with pytest.raises(OutputConflict, match="belongs to job"):
        commit_result(storage_root.uri, storage_root.options, "review-queue-other", "review-queue",
                      _spec(storage_root), _never)  # fmt: skip
    foreign = join(storage_root.uri.rstrip("/") + "-foreign", "notes.txt")
    storage_root.storage.write_bytes(foreign, b"mine")
    with pytest.raises(OutputConflict, match="did not write"):
        commit_result(foreign.rsplit("/", 1)[0], storage_root.options, JOB, "review-queue", _spec(storage_root),
                      _never)  # fmt: skip


def test_a_run_killed_before_its_manifest_shows_no_rows_and_its_rerun_commits_them_once(storage_root):
    # What a run SIGKILLed between its data file and its manifest leaves (the real kill: tests/jobs/curate).
    claim_output(storage_root.storage, storage_root.uri, JOB)
    storage_root.storage.write_bytes(join(storage_root.uri, data_name("queue")), _parquet(_queue(5)))
    with pytest.raises(OutputError, match="has not finished"):
        open_result(storage_root.uri, storage_root.options)
    commit_result(storage_root.uri, storage_root.options, JOB, "review-queue", _spec(storage_root),
                  lambda: ComputedResult(table=_queue(2)))  # fmt: skip
    assert open_result(storage_root.uri, storage_root.options).to_table().num_rows == 2


def test_a_label_output_is_no_result_and_a_damaged_manifest_is_named(tmp_path):
    label = tmp_path / "labels"
    label.mkdir()
    (label / "_job.json").write_text(json.dumps({"job_id": "label-1", "kind": "label"}))
    assert open_result(str(label)) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "_job.json").write_text(json.dumps({"job_id": "q", "kind": "review-queue", "schema_version": 1,
                                               "table": "queue"}))  # fmt: skip
    with pytest.raises(OutputError, match="is damaged"):
        open_result(str(bad))
    (bad / "_job.json").write_text(json.dumps({"job_id": "q", "kind": "review-queue", "schema_version": 99}))
    with pytest.raises(OutputError, match="result schema version 99"):
        open_result(str(bad))


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
