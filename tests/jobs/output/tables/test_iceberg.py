"""jobs.output.tables.iceberg: `format: iceberg` outputs, each shard's rows in the Iceberg table exactly once (the job
and shard ids in each snapshot's summary), read by DuckDB and Polars; the default SQLite catalog beside the output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pytest
from pydantic import ValidationError
from pyiceberg.catalog import load_catalog

from jobs.output.compact import compact_output
from jobs.output.reader import open_output
from jobs.output.session import OutputSession
from jobs.output.tables.iceberg import (
    CATALOG_NAME,
    SUMMARY_JOB,
    SUMMARY_SHARDS,
    IcebergSink,
    catalog_properties,
    shards_of,
)
from schemas.output import LABEL_SCHEMA_VERSION
from schemas.specs import LabelJobSpec, OutputOptions
from tests.jobs.output.test_compact import DIM, JOB, ROWS, write_output

SHARDS = 6
ICEBERG = OutputOptions(format="iceberg")


def _table(out: Path):
    return load_catalog(CATALOG_NAME, **catalog_properties(str(out), ICEBERG, None)).load_table(("bulklabel", "labels"))


def _folder_keys(output: Path) -> list[str]:
    return sorted(open_output(str(output)).to_table(columns=["key"])["key"].to_pylist())


def test_an_iceberg_output_holds_each_shard_once_with_its_properties_read_by_duckdb_and_polars(tmp_path):
    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=SHARDS, fmt="iceberg")
    table = _table(out)
    assert (out / "table" / "catalog.sqlite").is_file()  # the default catalog, beside the output
    props = table.properties
    assert props["bulklabel.job_id"] == JOB and props["bulklabel.model"] == "m:x"
    assert (props["bulklabel.schema_version"], props["bulklabel.embedding_dim"]) == (
        str(LABEL_SCHEMA_VERSION),
        str(DIM),
    )
    summaries = [s.summary.additional_properties for s in table.snapshots()]
    # the shards went in together (queued: table_commit_seconds), the snapshot naming the job and every shard
    assert len(summaries) == 1 and summaries[0][SUMMARY_JOB] == JOB
    assert shards_of(summaries[0]) == [f"files-{i:03d}" for i in range(SHARDS)]

    # Readers: DuckDB through pyiceberg's scan (its iceberg extension cannot be installed offline), Polars.
    con = table.scan().to_duckdb("labels")
    count, keys, width = con.sql("SELECT count(*), count(DISTINCT key), max(len(embedding)) FROM labels").fetchall()[0]
    assert (count, keys, width) == (SHARDS * ROWS, SHARDS * ROWS, DIM)
    frame = pl.scan_iceberg(table).collect()
    assert sorted(frame["key"].to_list()) == _folder_keys(out) and frame["error"].null_count() == SHARDS * (ROWS - 1)
    assert isinstance(con, duckdb.DuckDBPyConnection)

    # The same job run again (start: every marker's shard is in the table already) adds nothing.
    spec = LabelJobSpec.model_validate({**json.loads((out / "_job.json").read_text())["spec"], "job_id": JOB})
    again = OutputSession(spec, JOB)
    again.check()
    again.start()
    again.close()
    assert len(_table(out).snapshots()) == 1


def test_complete_compacts_the_table_in_one_commit_and_the_shards_stay_committed_once(tmp_path):
    """`compact: auto`: the job's end rewrites the per-shard data files as one (a delete and an append in one
    commit); the shards' snapshots stay in the history, so the job run again adds nothing; the rows are the same."""
    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=SHARDS, fmt="iceberg", compact="auto",
                        options={"table_commit_seconds": 0})  # a commit (and a data file) per shard  # fmt: skip
    table = _table(out)
    files = table.inspect.files(snapshot_id=table.current_snapshot().snapshot_id)
    assert len(files) == 1 and files["record_count"].to_pylist() == [SHARDS * ROWS]
    compaction = table.current_snapshot().summary.additional_properties
    assert compaction[SUMMARY_JOB] == JOB and SUMMARY_SHARDS not in compaction
    assert compaction["bulklabel.compacted_files"] == str(SHARDS)
    assert sorted(table.scan(selected_fields=("key",)).to_arrow()["key"].to_pylist()) == _folder_keys(out)
    snapshots = len(table.snapshots())

    again = OutputSession(spec, JOB)
    again.check()
    again.start()
    again.close()
    assert len(_table(out).snapshots()) == snapshots


def test_shards_committed_without_their_table_commit_are_appended_on_start_even_compacted(tmp_path):
    """The driver died after the markers and before the table commits (here: no table at all), and the folder was
    compacted since: the next start reads each shard's rows from the compacted file the manifest names."""
    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=SHARDS, fmt="parquet")
    compact_output(str(out), target_bytes=1 << 30)
    iceberg = spec.model_copy(update={"output_options": ICEBERG})
    session = OutputSession(iceberg, JOB)
    session.check()
    session.start()
    session.close()
    rows = _table(out).scan().to_arrow()
    assert sorted(rows["key"].to_pylist()) == _folder_keys(out) and rows.num_rows == SHARDS * ROWS
    assert Counter(rows["shard"].to_pylist()) == {f"files-{i:03d}": ROWS for i in range(SHARDS)}


def _sinks_and_shards(tmp_path: Path):
    """Two drivers' sinks of one job's table (as two runs of the job had), and the job's committed shards."""
    from jobs.output.markers import read_committed
    from workers.io.storage import LocalStorage

    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=3, fmt="parquet")
    results = sorted(read_committed(LocalStorage(), str(out), JOB).done.values(), key=lambda r: r.shard_id)
    at_once = OutputOptions(format="iceberg", table_commit_seconds=0)  # a commit per shard, as it comes
    return out, IcebergSink(str(out), JOB, at_once), IcebergSink(str(out), JOB, at_once), results


def test_the_summary_check_reads_the_table_s_latest_state_not_a_cached_one(tmp_path):
    out, first, second, results = _sinks_and_shards(tmp_path)
    assert first.commit_shard(results[0])
    assert second.commit_shard(results[1])
    assert not first.commit_shard(results[1])  # the other sink's commit is seen: skipped, not appended again
    assert first.commit_shard(results[2]) and not second.commit_shard(results[2])
    assert Counter(_table(out).scan().to_arrow()["shard"].to_pylist()) == {r.shard_id: ROWS for r in results}


def test_shards_are_queued_and_committed_together_and_a_run_that_ends_early_commits_its_queue(tmp_path, monkeypatch):
    """One commit for many shards (each commit rewrites the table's metadata): queued until table_commit_seconds
    pass or MAX_BATCH_SHARDS wait; what is queued when a run ends before `complete` goes in on close."""
    from jobs.output.tables import iceberg

    out, _, _, results = _sinks_and_shards(tmp_path)
    sink = IcebergSink(str(out), JOB, OutputOptions(format="iceberg", table_commit_seconds=3600))
    assert not sink.commit_shard(results[0]) and not (out / "table" / "catalog.sqlite").exists()
    monkeypatch.setattr(iceberg, "MAX_BATCH_SHARDS", 2)
    assert sink.commit_shard(results[1])  # two waiting: committed together
    assert [shards_of(s.summary.additional_properties) for s in _table(out).snapshots()] == [
        [results[0].shard_id, results[1].shard_id]
    ]
    assert not sink.commit_shard(results[2]) and sink.flush() == 1 and sink.flush() == 0
    assert Counter(_table(out).scan().to_arrow()["shard"].to_pylist()) == {r.shard_id: ROWS for r in results}

    # A session whose run ends without `complete` (cancelled, failed): close() commits its queue.
    other = tmp_path / "other"
    spec = write_output(str(other), tmp_path, shards=2, fmt="parquet")
    session = OutputSession(spec.model_copy(update={"output_options": OutputOptions(format="iceberg")}), JOB)
    session.check()
    session.start()  # the 2 committed shards queued for the table, appended on start
    assert Counter(_table(other).scan().to_arrow()["shard"].to_pylist()) == {"files-000": ROWS, "files-001": ROWS}
    session.table.commit_shard(session.committed.done["files-000"])  # queued again: already in the table
    session.close()
    assert len(_table(other).snapshots()) == 1


def test_a_commit_that_loses_a_race_is_checked_again_then_named_exit_3(tmp_path, monkeypatch):
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.table import Table

    from jobs.errors import exit_code_for
    from jobs.output.tables.sink import COMMIT_ATTEMPTS, TableCommitConflict

    out, sink, other, results = _sinks_and_shards(tmp_path)
    real_append, calls = Table.append, []

    def racing(table, rows, snapshot_properties):
        calls.extend(shards_of(snapshot_properties))
        if len(calls) == 1:  # the other driver commits this very shard first, then ours loses the race
            other.commit_shard(results[0])
            raise CommitFailedException("the table moved")
        return real_append(table, rows, snapshot_properties=snapshot_properties)

    monkeypatch.setattr(Table, "append", racing)
    assert not sink.commit_shard(results[0])  # checked again after the lost race: the other's commit has it
    assert calls == [results[0].shard_id] * 2  # ours (lost), the other's (made); ours was not tried again
    assert Counter(_table(out).scan().to_arrow()["shard"].to_pylist()) == {results[0].shard_id: ROWS}

    monkeypatch.setattr(Table, "append", lambda *a, **k: (_ for _ in ()).throw(CommitFailedException("moved")))
    with pytest.raises(TableCommitConflict, match=f"lost {COMMIT_ATTEMPTS} races") as caught:
        sink.commit_shard(results[1])
    assert exit_code_for(caught.value) == 3


def test_iceberg_outputs_name_what_is_missing_in_one_line():
    base = {"input": {"uri": "/data/in"}, "model": {"name": "mobilenet_v2"}}
    with pytest.raises(ValidationError, match="format iceberg on object storage needs output.catalog"):
        LabelJobSpec.model_validate({**base, "output": {"uri": "s3://b/out", "format": "iceberg"}})
    with pytest.raises(ValidationError, match="output catalog is for format iceberg, not delta"):
        LabelJobSpec.model_validate({**base, "output": {"uri": "/out", "format": "delta", "catalog": {"uri": "x"}}})
    rest = LabelJobSpec.model_validate({**base, "output": {"uri": "s3://b/out", "format": "iceberg",
                                                           "catalog": {"uri": "http://127.0.0.1:8181"}}})  # fmt: skip
    props = catalog_properties(rest.output, rest.output_options, None)
    assert (props["type"], props["uri"]) == ("rest", "http://127.0.0.1:8181")


def test_an_s3_output_commits_through_a_rest_catalog_exactly_once(s3_server, s3_prefix, tmp_path):
    """SeaweedFS's Iceberg REST catalog (SigV4 with the job's keys; the session's S3 server): the folder on S3, the
    table in the catalog's warehouse, each shard once; read back by Polars and DuckDB; a re-run adds nothing."""
    import uuid

    from tests.s3server import TABLE_BUCKET

    namespace = f"t{uuid.uuid4().hex[:8]}"  # tests keep apart by namespace, as by prefix
    catalog = {"type": "rest", "uri": s3_server.iceberg_url, "warehouse": TABLE_BUCKET, "sigv4": True,
               "namespace": namespace}  # fmt: skip
    spec = write_output(s3_prefix, tmp_path, shards=3, storage=s3_server.options(), fmt="iceberg", catalog=catalog,
                        compact="auto", options={"table_commit_seconds": 0})  # fmt: skip
    props = catalog_properties(spec.output, spec.output_options, spec.storage)
    table = load_catalog(CATALOG_NAME, **props).load_table((namespace, "labels"))
    assert table.location().startswith(f"s3://{TABLE_BUCKET}/")
    summaries = [s.summary.additional_properties for s in table.snapshots()]
    assert sorted(shard for s in summaries for shard in shards_of(s)) == [f"files-{i:03d}" for i in range(3)]
    # compacted at the job's end through the REST catalog: one commit, one data file
    assert len(table.inspect.files(snapshot_id=table.current_snapshot().snapshot_id)) == 1
    s3 = {"aws_endpoint_url": s3_server.endpoint_url, "aws_access_key_id": s3_server.access_key,
          "aws_secret_access_key": s3_server.secret_key, "aws_region": "us-east-1",
          "aws_allow_http": "true"}  # fmt: skip
    keys = sorted(pl.scan_iceberg(table, storage_options=s3).collect()["key"].to_list())
    assert keys == sorted(open_output(s3_prefix, s3_server.options()).to_table(columns=["key"])["key"].to_pylist())
    assert table.scan().to_duckdb("labels").sql("SELECT count(DISTINCT key) FROM labels").fetchall() == [(3 * ROWS,)]

    again = OutputSession(spec, JOB)
    again.check()
    again.start()
    again.close()
    assert len(load_catalog(CATALOG_NAME, **props).load_table((namespace, "labels")).snapshots()) == len(summaries)
    assert s3_server.secret_key not in json.dumps(spec.output_options.model_dump(mode="json"))
