"""jobs.output.tables.delta: `format: delta` outputs, each shard's rows in the Delta table exactly once (application
transactions), read by DuckDB and Polars. A real job killed around its table commits: test_commit_faults.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pytest
from deltalake import DeltaTable

from jobs.output.compact import compact_output
from jobs.output.reader import open_output
from jobs.output.session import OutputSession
from jobs.output.tables.delta import app_id, delta_storage_options
from schemas.output import LABEL_SCHEMA_VERSION
from schemas.specs import LabelJobSpec
from tests.jobs.output.test_compact import DIM, JOB, ROWS, write_output

SHARDS = 12


def _table_keys(table: Path) -> list[str]:
    return sorted(DeltaTable(str(table)).to_pyarrow_table(columns=["key"])["key"].to_pylist())


def _folder_keys(output: Path) -> list[str]:
    return sorted(open_output(str(output)).to_table(columns=["key"])["key"].to_pylist())


def test_a_delta_output_holds_each_shard_once_with_its_properties(tmp_path):
    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=SHARDS, fmt="delta")
    table = DeltaTable(str(out / "table"))
    assert _table_keys(out / "table") == _folder_keys(out) and len(_folder_keys(out)) == SHARDS * ROWS
    config = table.metadata().configuration
    assert config["bulklabel.job_id"] == JOB and config["bulklabel.model"] == "m:x"
    version = str(LABEL_SCHEMA_VERSION)
    assert (config["bulklabel.schema_version"], config["bulklabel.embedding_dim"]) == (version, str(DIM))
    assert table.transaction_version(app_id(JOB, "files-000")) == 1
    assert table.transaction_version(app_id(JOB, "files-999")) is None

    # Readers: DuckDB over deltalake's dataset (DuckDB's delta extension cannot be installed offline), Polars.
    con = duckdb.connect()
    con.register("labels", table.to_pyarrow_dataset())
    count, keys, width = con.sql("SELECT count(*), count(DISTINCT key), max(len(embedding)) FROM labels").fetchall()[0]
    assert (count, keys, width) == (SHARDS * ROWS, SHARDS * ROWS, DIM)
    frame = pl.read_delta(str(out / "table"))
    assert frame.height == SHARDS * ROWS and frame["error"].null_count() == SHARDS * (ROWS - 1)
    assert Counter(pl.scan_delta(str(out / "table")).collect()["shard"].to_list()) == {
        f"files-{i:03d}": ROWS for i in range(SHARDS)
    }

    # The same job run again (start: every marker's shard is in the table already) adds nothing.
    version = table.version()
    spec = LabelJobSpec.model_validate({**json.loads((out / "_job.json").read_text())["spec"], "job_id": JOB})
    again = OutputSession(spec, JOB)
    again.check()
    again.start()
    again.close()
    assert DeltaTable(str(out / "table")).version() == version


def test_shards_committed_without_their_table_commit_are_appended_on_start_even_compacted(tmp_path):
    """The driver died after the markers and before the table commits (here: no table at all), and the folder was
    compacted since: the next start reads each shard's rows from the compacted file the manifest names."""
    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=SHARDS, fmt="parquet")
    compact_output(str(out), target_bytes=1 << 30)
    delta = spec.model_copy(update={"output_options": spec.output_options.model_copy(update={"format": "delta"})})
    session = OutputSession(delta, JOB)
    session.check()
    session.start()
    session.close()
    assert _table_keys(out / "table") == _folder_keys(out) and len(_folder_keys(out)) == SHARDS * ROWS
    writes = [c for c in DeltaTable(str(out / "table")).history() if c["operation"] == "WRITE"]
    assert len(writes) == SHARDS  # one atomic commit per shard


def test_a_delta_output_on_s3(s3_prefix, s3_server, tmp_path):
    options = s3_server.options()
    write_output(s3_prefix, tmp_path, shards=4, storage=options, fmt="delta")
    table = DeltaTable(f"{s3_prefix}/table", storage_options=delta_storage_options(s3_prefix, options))
    keys = sorted(table.to_pyarrow_table(columns=["key"])["key"].to_pylist())
    assert keys == sorted(open_output(s3_prefix, options).to_table(columns=["key"])["key"].to_pylist())
    assert len(keys) == 4 * ROWS and table.transaction_version(app_id(JOB, "files-003")) == 1


def _sinks_and_shards(tmp_path: Path, shards: int = 3):
    """Two drivers' sinks of one job's table (as two runs of the job had), and the job's committed shards."""
    from jobs.output.markers import read_committed
    from jobs.output.tables.delta import DeltaSink
    from workers.io.storage import LocalStorage

    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=shards, fmt="parquet")
    results = sorted(read_committed(LocalStorage(), str(out), JOB).done.values(), key=lambda r: r.shard_id)
    return out, DeltaSink(str(out), JOB), DeltaSink(str(out), JOB), results


def test_the_transaction_check_reads_the_table_s_latest_version_not_a_cached_snapshot(tmp_path):
    out, first, second, results = _sinks_and_shards(tmp_path)
    assert first.commit_shard(results[0])  # the first sink has loaded the table (its snapshot: shard 0)
    assert second.commit_shard(results[1])
    assert not first.commit_shard(results[1])  # the other sink's commit is seen: skipped, not appended again
    assert Counter(DeltaTable(str(out / "table")).to_pyarrow_table(columns=["shard"])["shard"].to_pylist()) == {
        results[0].shard_id: ROWS,
        results[1].shard_id: ROWS,
    }


def test_a_commit_that_loses_a_race_in_the_log_is_retried_then_named_exit_3(tmp_path, monkeypatch):
    import deltalake
    from deltalake.exceptions import CommitFailedError

    from jobs.errors import EXIT_INFRASTRUCTURE, exit_code_for
    from jobs.output.tables.sink import COMMIT_ATTEMPTS, TableCommitConflict

    out, sink, _, results = _sinks_and_shards(tmp_path, shards=2)
    real, calls = deltalake.write_deltalake, []

    def losing(*args, times: int, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise CommitFailedError("Transaction failed: version already exists")
        return real(*args, **kwargs)

    monkeypatch.setattr(deltalake, "write_deltalake", lambda *a, **k: losing(*a, times=1, **k))
    assert sink.commit_shard(results[0]) and len(calls) == 2  # lost once, retried on the latest version
    calls.clear()
    monkeypatch.setattr(deltalake, "write_deltalake", lambda *a, **k: losing(*a, times=COMMIT_ATTEMPTS, **k))
    with pytest.raises(TableCommitConflict) as conflict:
        sink.commit_shard(results[1])
    assert exit_code_for(conflict.value) == EXIT_INFRASTRUCTURE and len(calls) == COMMIT_ATTEMPTS
    assert DeltaTable(str(out / "table")).to_pyarrow_table(columns=["shard"]).num_rows == ROWS
