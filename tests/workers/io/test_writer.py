"""workers.io.writer: one shard's rows → one committed Parquet file (LABEL_SCHEMA) plus its done-marker."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.layout import data_uri, marker_uri
from schemas.output import LABEL_SCHEMA
from schemas.shards import ShardResult, ShardTask
from workers.io.storage import LocalStorage
from workers.io.writer import ShardWriter, node_id

CATEGORIES = [f"class_{i}" for i in range(10)]
K, D = 3, 6
SHARD = "shard-00007"


def _task(n: int) -> ShardTask:
    return ShardTask(shard_id=SHARD, kind="files", base_uri="/in", keys=tuple(f"img{i}.jpg" for i in range(n)))


def _batch(keys: list[str], errors: dict[str, str], rng: np.random.Generator, embeddings: bool = True):
    """(meta, indices, scores, embeddings) for one batch; arrays cover only the rows without error (None if none)."""
    meta = [(k, f"/in/{k}", 40 + i, 30 + i, None) if k not in errors else (k, f"/in/{k}", None, None, errors[k])
            for i, k in enumerate(keys)]  # fmt: skip
    n_ok = sum(1 for *_, e in meta if e is None)
    if n_ok == 0:
        return meta, None, None, None
    indices = np.stack([rng.permutation(len(CATEGORIES))[:K] for _ in range(n_ok)]).astype(np.int32)
    scores = np.sort(rng.random((n_ok, K)).astype(np.float32), axis=1)[:, ::-1].copy()
    embeds = rng.standard_normal((n_ok, D)).astype(np.float32) if embeddings else None
    return meta, indices, scores, embeds


def _fill(writer: ShardWriter, embeddings: bool = True) -> dict[str, tuple]:
    """Three batches: mixed, all-error, all-ok. Returns key → (top-k indices, top-k scores, embedding) for ok rows."""
    rng = np.random.default_rng(1)
    batches = [
        (["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"], {"img1.jpg": "corrupt JPEG", "img3.jpg": "not an image"}),
        (["img4.jpg", "img5.jpg"], {"img4.jpg": "truncated", "img5.jpg": "empty object (0 bytes)"}),
        (["img6.jpg", "img7.jpg", "img8.jpg"], {}),
    ]
    expected = {}
    for keys, errors in batches:
        meta, indices, scores, embeds = _batch(keys, errors, rng, embeddings)
        writer.add(meta, indices, scores, embeds)
        ok_keys = [m[0] for m in meta if m[4] is None]
        for j, key in enumerate(ok_keys):
            expected[key] = (indices[j], scores[j], None if embeds is None else embeds[j])
    return expected


@pytest.fixture
def writer() -> ShardWriter:
    return ShardWriter(_task(9), CATEGORIES, "resnet50:IMAGENET1K_V2", "job-1")


def test_table_matches_schema_and_rows(writer):
    expected = _fill(writer)
    assert writer.rows == 9
    table = writer.to_table()
    assert table.schema.equals(LABEL_SCHEMA, check_metadata=True)
    rows = {row["key"]: row for row in table.to_pylist()}
    assert list(rows) == [f"img{i}.jpg" for i in range(9)]  # input order kept across batches

    for key, row in rows.items():
        assert row["shard"] == SHARD and row["model"] == "resnet50:IMAGENET1K_V2" and row["job_id"] == "job-1"
        assert row["source"] == f"/in/{key}"
        if key in expected:
            idx, sc, emb = expected[key]
            assert row["error"] is None
            assert row["label_index"] == idx[0]
            assert row["label"] == CATEGORIES[idx[0]]
            assert row["score"] == pytest.approx(float(sc[0]))
            assert row["topk_indices"] == idx.tolist()
            assert row["topk_labels"] == [CATEGORIES[i] for i in idx]
            assert row["topk_scores"] == pytest.approx(sc.tolist())
            assert len(row["embedding"]) == D
            assert row["embedding"] == pytest.approx(emb.tolist())
            assert row["width"] is not None and row["height"] is not None
        else:
            assert row["error"]
            for column in ("label", "label_index", "score", "topk_labels", "topk_indices", "topk_scores", "embedding",
                           "width", "height"):  # fmt: skip
                assert row[column] is None, (key, column)
    assert sorted(k for k, r in rows.items() if r["error"] is None) == sorted(expected)


def test_embeddings_disabled_gives_null_not_empty_list():
    writer = ShardWriter(_task(9), CATEGORIES, "m:x", "job-1")
    expected = _fill(writer, embeddings=False)
    table = writer.to_table()
    assert table.schema.equals(LABEL_SCHEMA, check_metadata=True)
    assert table["embedding"].null_count == table.num_rows == 9
    assert table["label"].null_count == 9 - len(expected)  # the other columns are unaffected


def test_all_error_shard():
    writer = ShardWriter(_task(2), CATEGORIES, "m:x", "job-1")
    writer.add([("a", "/in/a", None, None, "corrupt"), ("b", "/in/b", None, None, "corrupt")], None, None, None)
    table = writer.to_table()
    assert table.schema.equals(LABEL_SCHEMA, check_metadata=True)
    assert table.num_rows == 2
    for column in ("label", "score", "topk_labels", "topk_indices", "topk_scores", "embedding"):
        assert table[column].null_count == 2


def _commit(writer: ShardWriter, out: Path, scratch: Path, attempt: int) -> ShardResult:
    return writer.commit(LocalStorage(), str(out), str(scratch), attempt, {"bytes_read": 1234, "seconds": 0.5})


def test_commit_local_writes_data_and_marker(writer, tmp_path):
    expected = _fill(writer)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    before = datetime.now(UTC)
    result = _commit(writer, out, scratch, attempt=1)
    assert before <= result.committed_at <= datetime.now(UTC)

    data = Path(data_uri(str(out), SHARD))
    assert data == out / "data" / f"part-{SHARD}.parquet" and data.is_file()
    marker = Path(marker_uri(str(out), SHARD))
    assert marker == out / "_done" / f"{SHARD}.json"
    on_disk = ShardResult.model_validate(json.loads(marker.read_text()))
    assert on_disk == result
    assert (result.rows, result.errors, result.attempt) == (9, 9 - len(expected), 1)
    assert result.fingerprint == writer.task.fingerprint() and result.data_in(str(out)) == str(data)
    assert (result.bytes_read, result.seconds) == (1234, 0.5)
    # Markers written before commit times were recorded still load (a job started by an older version resumes).
    old = json.loads(marker.read_text())
    del old["committed_at"]
    assert ShardResult.model_validate(old).committed_at is None

    assert not [p for p in (out / "_tmp").rglob("*") if p.is_file()]
    assert not list(scratch.iterdir())  # local staging file removed
    assert sorted(p.name for p in out.glob("data/*.parquet")) == [data.name]

    # Readable by pyarrow with the schema intact, and by DuckDB.
    read = pq.read_table(data)
    assert read.schema.equals(LABEL_SCHEMA)
    assert read.num_rows == 9
    count, with_error = duckdb.sql(f"select count(*), count(error) from read_parquet('{data}')").fetchall()[0]
    assert (count, with_error) == (9, result.errors)
    dims = duckdb.sql(f"select distinct len(embedding) from read_parquet('{data}') where error is null").fetchall()
    assert dims == [(D,)]

    # zstd everywhere; lists in the standard 3-level LIST layout.
    parquet = pq.ParquetFile(data)
    meta = parquet.metadata
    for rg in range(meta.num_row_groups):
        for col in range(meta.num_columns):
            assert meta.row_group(rg).column(col).compression == "ZSTD"
    layout = (
        r"optional group field_id=-1 embedding \(List\) \{\s*"
        r"repeated group field_id=-1 list \{\s*optional float field_id=-1 element;\s*\}\s*\}"
    )
    assert re.search(layout, str(parquet.schema)), str(parquet.schema)
    arrow_meta = parquet.schema_arrow
    assert "fixed_size_list" not in str(arrow_meta.field("embedding").type)


def test_marker_names_its_data_relative_to_the_output_its_node_and_the_rows_error_kinds(writer, tmp_path):
    """The marker survives a copy of the output (its data file's name is relative), says which machine wrote it, and
    counts errors by the same ErrorKind as the rows' `error_kind` column."""
    _fill(writer)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    result = _commit(writer, out, scratch, attempt=1)
    on_disk = json.loads((out / "_done" / f"{SHARD}.json").read_text())
    assert on_disk["data"] == f"data/part-{SHARD}.parquet" and "data_uri" not in on_disk
    # This process's Ray node when an earlier test of the session started Ray here, else none (outside Ray)
    assert (result.host, result.node_id) == (socket.gethostname(), node_id())
    rows = pq.read_table(out / "data" / f"part-{SHARD}.parquet").to_pylist()
    by_rows = Counter(row["error_kind"] for row in rows if row["error"] is not None)
    assert result.error_kinds == dict(by_rows) == {"corrupt": 2, "not_an_image": 2}
    moved = Path(shutil.copytree(out, tmp_path / "elsewhere"))
    assert ShardResult.model_validate_json((moved / "_done" / f"{SHARD}.json").read_text()).data_in(str(moved)) == str(
        moved / "data" / f"part-{SHARD}.parquet"
    )


def test_commit_twice_is_idempotent(writer, tmp_path):
    _fill(writer)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    first = _commit(writer, out, scratch, attempt=1)
    second = _commit(writer, out, scratch, attempt=2)
    assert sorted(p.name for p in out.glob("data/*.parquet")) == [f"part-{SHARD}.parquet"]
    assert first.rows == second.rows == 9 and second.attempt == 2
    assert pq.read_table(out / "data" / f"part-{SHARD}.parquet").num_rows == 9
    assert ShardResult.model_validate_json((out / "_done" / f"{SHARD}.json").read_text()) == second
    assert not [p for p in (out / "_tmp").rglob("*") if p.is_file()]
    glob = str(out / "data" / "**")  # the data folder as it is: nothing but Parquet in it
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0] == (9,)
