"""jobs.output.tables.lance: `format: lance` outputs, each shard's rows in the Lance dataset exactly once (the job
and shard ids as transaction properties), the embedding a fixed-size float32 vector, read by DuckDB and Polars."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import lance
import polars as pl
import pyarrow as pa

from jobs.output.compact import compact_output
from jobs.output.reader import open_output
from jobs.output.session import OutputSession
from jobs.output.tables.lance import TX_JOB, TX_SHARD, LanceSink
from schemas.output import LABEL_SCHEMA_VERSION
from schemas.specs import LabelJobSpec, OutputOptions
from tests.jobs.output.test_compact import DIM, JOB, ROWS, write_output

SHARDS = 6


def _folder_keys(output: Path) -> list[str]:
    return sorted(open_output(str(output)).to_table(columns=["key"])["key"].to_pylist())


def test_a_lance_output_holds_each_shard_once_as_vectors_read_by_duckdb_and_polars(tmp_path):
    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=SHARDS, fmt="lance")
    dataset = lance.dataset(str(out / "table"))
    assert dataset.schema.field("embedding").type == pa.list_(pa.float32(), DIM)  # a vector column
    meta = {k.decode(): v.decode() for k, v in dataset.schema.metadata.items()}
    assert meta["bulklabel.job_id"] == JOB and meta["bulklabel.model"] == "m:x"
    assert meta["bulklabel.schema_version"] == str(LABEL_SCHEMA_VERSION) and meta["bulklabel.embedding_dim"] == str(DIM)
    shards = [dataset.read_transaction(v).transaction_properties for v in range(1, dataset.latest_version + 1)]
    assert sorted(p[TX_SHARD] for p in shards) == [f"files-{i:03d}" for i in range(SHARDS)]
    assert {p[TX_JOB] for p in shards} == {JOB}

    # Readers: DuckDB over Lance's Arrow dataset (no extension needed), Polars through its pyarrow-dataset scan.
    labels = dataset.to_table()  # noqa: F841 - DuckDB's replacement scan finds it by name
    count, keys, width = duckdb.sql("SELECT count(*), count(DISTINCT key), max(len(embedding)) FROM labels").fetchall()[
        0
    ]
    assert (count, keys, width) == (SHARDS * ROWS, SHARDS * ROWS, DIM)
    frame = pl.scan_pyarrow_dataset(dataset).collect()
    assert sorted(frame["key"].to_list()) == _folder_keys(out) and frame["error"].null_count() == SHARDS * (ROWS - 1)

    # The same job run again (start: every marker's shard is in the dataset already) adds nothing.
    version = dataset.latest_version
    spec = LabelJobSpec.model_validate({**json.loads((out / "_job.json").read_text())["spec"], "job_id": JOB})
    again = OutputSession(spec, JOB)
    again.check()
    again.start()
    again.close()
    assert lance.dataset(str(out / "table")).latest_version == version


def test_shards_committed_without_their_commit_are_appended_on_start_even_compacted(tmp_path):
    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=SHARDS, fmt="parquet")
    compact_output(str(out), target_bytes=1 << 30)
    session = OutputSession(spec.model_copy(update={"output_options": OutputOptions(format="lance")}), JOB)
    session.check()
    session.start()
    session.close()
    rows = lance.dataset(str(out / "table")).to_table(columns=["key", "shard"])
    assert sorted(rows["key"].to_pylist()) == _folder_keys(out)
    assert Counter(rows["shard"].to_pylist()) == {f"files-{i:03d}": ROWS for i in range(SHARDS)}


def test_the_transaction_check_reads_the_dataset_s_latest_version(tmp_path):
    from jobs.output.markers import read_committed
    from workers.io.storage import LocalStorage

    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=3, fmt="parquet")
    results = sorted(read_committed(LocalStorage(), str(out), JOB).done.values(), key=lambda r: r.shard_id)
    first, second = LanceSink(str(out), JOB), LanceSink(str(out), JOB)
    assert first.commit_shard(results[0]) and second.commit_shard(results[1])
    assert not first.commit_shard(results[1]) and first.commit_shard(results[2]) and not second.commit_shard(results[2])
    rows = lance.dataset(str(out / "table")).to_table(columns=["shard"])
    assert Counter(rows["shard"].to_pylist()) == {r.shard_id: ROWS for r in results}


def test_a_lance_output_on_s3(s3_prefix, s3_server, tmp_path):
    from jobs.output.tables.sink import object_store_options

    options = s3_server.options()
    write_output(s3_prefix, tmp_path, shards=3, storage=options, fmt="lance")
    dataset = lance.dataset(f"{s3_prefix}/table", storage_options=object_store_options(s3_prefix, options))
    keys = sorted(dataset.to_table(columns=["key"])["key"].to_pylist())
    assert keys == sorted(open_output(s3_prefix, options).to_table(columns=["key"])["key"].to_pylist())
    assert len(keys) == 3 * ROWS and dataset.schema.field("embedding").type == pa.list_(pa.float32(), DIM)


def test_a_lance_output_through_seaweedfs_s_namespace_server_exactly_once(tmp_path):
    """`output.namespace`: the dataset created and found through a Lance namespace server (SeaweedFS's REST one, a
    LANCE table bucket; a server of its own: it lets unsigned requests in), its rows each once, read back by
    DuckDB and Polars; the same job run again adds nothing."""
    from tests.s3server import VECTOR_BUCKET, WeedServer

    weed = WeedServer(tmp_path / "weed", lance_namespace=True)
    server = weed.start()
    try:
        namespace = {"uri": server.lance_url, "table_id": [VECTOR_BUCKET, "runs", "labels"]}
        out = tmp_path / "out"
        spec = write_output(str(out), tmp_path, shards=3, storage=server.options(), fmt="lance",
                            options={"namespace": namespace})  # fmt: skip
        assert not (out / "table").exists()  # the namespace's, not beside the output
        sink = OutputSession(spec, JOB).table
        dataset = sink._latest()
        assert dataset.uri == f"s3://{VECTOR_BUCKET}/runs/labels"
        assert sorted(dataset.to_table(columns=["key"])["key"].to_pylist()) == _folder_keys(out)
        labels = dataset.to_table()  # noqa: F841 - DuckDB's replacement scan finds it by name
        assert duckdb.sql("SELECT count(DISTINCT key) FROM labels").fetchall() == [(3 * ROWS,)]
        assert pl.scan_pyarrow_dataset(dataset).collect().height == 3 * ROWS
        version = dataset.latest_version

        again = OutputSession(spec, JOB)
        again.check()
        again.start()
        again.close()
        assert again.table._latest().latest_version == version
    finally:
        weed.stop()


def test_a_namespace_is_for_lance_outputs_only():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="output namespace is for format lance, not delta"):
        OutputOptions(format="delta", namespace={"uri": "http://127.0.0.1:9101"})
    assert OutputOptions(format="lance", namespace={"uri": "http://x"}).namespace.table_id == ("bulklabel", "labels")
