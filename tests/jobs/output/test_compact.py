"""jobs.output.compact: small per-shard files merged into target-size files through one manifest switch; resume,
readers and exactly-once unchanged; a compaction SIGKILLed at each step loses and duplicates nothing.

Outputs here are written by the real writer (workers/io/writer.ShardWriter) and the real session phases, without Ray or
a model, so 100 shards take about a second; tests/jobs/output/test_compact_job.py compacts a real label job's output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from jobs.output.compact import compact_output, small_files
from jobs.output.markers import read_committed
from jobs.output.reader import OutputError, open_output
from jobs.output.session import OutputSession
from schemas.layout import PART_FILE
from schemas.output import LABEL_SCHEMA_VERSION
from schemas.shards import ShardTask
from schemas.specs import LabelJobSpec
from tests.conftest import PROJECT_ROOT
from workers.io.storage import open_storage
from workers.io.writer import ShardWriter

SHARDS = 100
ROWS = 6
DIM = 1280  # MobileNetV2's width: rows of a realistic size, so file sizes are about the rows, not the footers
CATEGORIES = ["cat", "dog", "owl"]
JOB = "job-compact"


def write_output(
    output: str,
    tmp: Path,
    shards: int = SHARDS,
    storage=None,
    compact: str = "never",
    fmt: str = "parquet",
    catalog: dict | None = None,
    options: dict | None = None,
) -> LabelJobSpec:
    """A finished output of `shards` shards of ROWS rows (one error row each), as a label job leaves it."""
    extra = {"storage": storage} if storage else {}
    options = {"uri": output, "compact": compact, "format": fmt, **({"catalog": catalog} if catalog else {}),
               **(options or {})}  # fmt: skip
    spec = LabelJobSpec(input={"uri": str(tmp / "in")}, output=options, model={"name": "mobilenet_v2"}, job_id=JOB,
                        **extra)  # fmt: skip
    session = OutputSession(spec, JOB)
    session.check()
    session.start()
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    results = {}
    for i in range(shards):
        keys = tuple(f"img-{i:03d}-{j}.jpg" for j in range(ROWS))
        task = ShardTask(shard_id=f"files-{i:03d}", kind="files", base_uri=str(tmp / "in"), keys=keys)
        writer = ShardWriter(task, CATEGORIES, "m:x", JOB)
        meta = [(k, f"{tmp}/in/{k}", 32, 32, None) for k in keys[:-1]] + [(keys[-1], "x", None, None, "missing: x")]
        ok = ROWS - 1
        writer.add(
            meta,
            rng.integers(0, 3, (ok, 2)),
            rng.random((ok, 2), np.float32),
            rng.random((ok, DIM), np.float32),
        )
        result = writer.commit(
            session.storage,
            spec.output,
            str(scratch),
            1,
            {"bytes_read": 1, "seconds": 0.1},
        )
        session.shard_committed(result)
        results[result.shard_id] = result
    session.complete({"model_id": "m:x", "embedding_dim": DIM, "num_classes": 3}, results, {})
    return spec


def _folder_counts(output: Path) -> tuple[int, int]:
    """Rows and distinct keys as DuckDB reads the data folder itself (no manifest: what other engines see)."""
    return duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{output}/data/**')").fetchall()[0]


def _rows(output: str, storage=None) -> list[tuple]:
    table = open_output(output, storage).to_table(columns=["key", "shard", "embedding"])
    columns = [table[name].to_pylist() for name in ("key", "shard", "embedding")]
    return sorted(zip(*columns, strict=True))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("compact")
    write_output(str(tmp / "out"), tmp)
    return tmp / "out"


@pytest.fixture
def output(finished, tmp_path) -> Path:
    """A copy of the 100-shard output to compact (the manifest and markers name the original: resume reads both)."""
    return Path(shutil.copytree(finished, tmp_path / "out"))


def test_small_files_are_merged_and_large_ones_left_alone():
    files = [("a", 40), ("b", 40), ("big", 90), ("c", 30)]
    assert small_files(files, 100) == ["a", "b", "c"]
    assert small_files([("a", 10), ("big", 60)], 100) == []  # one small file: nothing to merge it with


def test_rows_are_written_in_groups_of_the_group_size_however_many_tables_come(finished, tmp_path):
    """The rolling file writes a row group each time the tables waiting reach the group size, counting from zero again
    after each: 3,000 one-row tables (an output of one-image shards) give 30 groups of 100 rows, every row once. (It
    kept a running count: summing the waiting tables on every append made compaction O(n^2) in the shards, 36 of the
    driver's 40 CPU seconds in a job of 1,000 one-image shards.)"""
    from jobs.output.compact import _RollingFile

    row = pq.read_table(next((finished / "data").glob("*.parquet"))).take([0])
    rolling = _RollingFile(str(tmp_path), target_bytes=1 << 40, group_bytes=row.nbytes * 100)
    assert not any(rolling.append(row) for _ in range(3000))
    path = rolling.path
    assert rolling.close()
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 3000 and meta.num_row_groups == 30
    assert {meta.row_group(i).num_rows for i in range(30)} == {100}


def test_compaction_keeps_every_row_in_files_of_the_target_size(output):
    before = _rows(str(output))
    target = 512 << 10  # the 600 rows take about 3 MB: about six files

    result = compact_output(str(output), target_bytes=target)

    assert (result.generation, result.files_before, result.files_merged) == (
        1,
        SHARDS,
        SHARDS,
    )
    assert _rows(str(output)) == before
    files = sorted((output / "data").glob("*.parquet"))
    assert [p.name for p in files] == [f"compact-1-{i:05d}.parquet" for i in range(len(files))]
    assert 4 <= len(files) <= 8 and result.files_after == len(files)
    sizes = [p.stat().st_size for p in files]
    assert all(target <= size <= target * 1.3 for size in sizes[:-1]) and sizes[-1] <= target * 1.3, sizes
    assert not [p for p in (output / "_tmp").rglob("*") if p.is_file()]
    meta = pq.ParquetFile(files[0]).metadata
    assert 1 <= meta.num_row_groups <= 5 and meta.row_group(0).num_rows > ROWS  # shards together in row groups
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(files[0]).metadata[b"bulklabel.schema_version"] == str(LABEL_SCHEMA_VERSION).encode()
    manifest = json.loads((output / "_job.json").read_text())
    assert manifest["generation"] == 1 and {Path(s["data"]).name for s in manifest["shards"]} == {p.name for p in files}
    # The folder as it is, for engines that read it without bulklabel:
    assert _folder_counts(output) == (SHARDS * ROWS,) * 2
    assert pl.read_parquet(f"{output}/data/").height == SHARDS * ROWS
    # What a resume trusts: every shard committed, in the file the manifest names.
    committed = read_committed(open_storage(str(output)), str(output), JOB)
    assert len(committed.done) == SHARDS and not committed.redo
    assert set(committed.locations.values()) == {str(p) for p in files}
    assert compact_output(str(output), target_bytes=target).files_merged == 0  # nothing small left


def test_an_output_of_the_previous_schema_version_compacts_with_the_new_columns_null(output):
    """An output labelled before schema version 2 (no error_kind, image_id, given_label, sidecar, probabilities)
    compacts into files of this version's schema, every row kept, the columns it never had null."""
    new_columns = ["error_kind", "image_id", "given_label", "sidecar", "probabilities"]
    for data in (output / "data").glob("*.parquet"):  # as version 1 wrote them
        table = pq.read_table(data).drop_columns(new_columns)
        pq.write_table(table.replace_schema_metadata({"bulklabel.schema_version": "1"}), data)
    manifest = json.loads((output / "_job.json").read_text())
    (output / "_job.json").write_text(json.dumps(manifest | {"schema_version": 1}))
    before = _rows(str(output))

    result = compact_output(str(output), target_bytes=512 << 10)

    assert result.files_merged == SHARDS and _rows(str(output)) == before
    table = open_output(str(output)).to_table()
    assert all(table[name].null_count == SHARDS * ROWS for name in new_columns if name != "error_kind")
    # error_kind is never null: derived from the error text, as the writer derives it ('missing: x' → read_failed)
    kinds = dict(zip(table["error"].to_pylist(), table["error_kind"].to_pylist(), strict=True))
    assert kinds == {None: "", "missing: x": "read_failed"}
    assert pq.read_schema(next((output / "data").glob("compact-1-*.parquet"))).names == table.schema.names


def test_compaction_at_the_end_of_a_job_of_many_small_files(tmp_path):
    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=70, compact="auto")
    files = list((out / "data").glob("*.parquet"))
    assert [p.name for p in files] == ["compact-1-00000.parquet"]
    assert open_output(str(out)).to_table().num_rows == 70 * ROWS
    few = tmp_path / "few"
    write_output(str(few), tmp_path, shards=3, compact="auto")  # a few files: read as fast as they are
    assert len(list((few / "data").glob("part-*.parquet"))) == 3


def test_compaction_on_s3(s3_prefix, s3_server, tmp_path):
    options = s3_server.options()
    write_output(s3_prefix, tmp_path, shards=12, storage=options)
    before = _rows(s3_prefix, options)
    result = compact_output(s3_prefix, target_bytes=1 << 30, storage_options=options)
    assert (result.files_before, result.files_after) == (12, 1)
    assert _rows(s3_prefix, options) == before
    names = [o.uri.rsplit("/", 1)[1] for o in open_storage(s3_prefix, options).list(s3_prefix + "/data")]
    assert names == ["compact-1-00000.parquet"]


def test_an_unfinished_output_is_not_compacted(output):
    (output / "_job.json").unlink()
    with pytest.raises(OutputError, match="has no manifest: only a finished job's output is compacted"):
        compact_output(str(output))


def _compact_in_a_process(output: Path, target: int, point: str | None) -> int:
    script = textwrap.dedent(f"""
        from jobs.output.compact import compact_output
        compact_output({str(output)!r}, target_bytes={target})
    """)
    env = {**os.environ}
    if point:
        env |= {"BULKLABEL_FAULTS": json.dumps([{"shard": point, "action": "exit"}]),
                "BULKLABEL_FAULTS_ACKNOWLEDGE": "I-AM-TESTING"}  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, timeout=120).returncode


@pytest.mark.fault(
    fault="a compaction killed midway: after writing its new files, after moving them into data/, after the "
    "manifest switch (before deleting the merged files)",
    injected="`compact_output` in a real process SIGKILLed at that step (jobs/output/faultpoints.py)",
    expected="the manifest names the old files or the new ones, never both or neither: every row once; resume "
    "trusts every shard; compacting again finishes and cleans up, the folder then holds each row once",
)
@pytest.mark.parametrize("point", ["compact:uploaded", "compact:moved", "compact:switched"])
def test_a_compaction_killed_midway_loses_and_duplicates_nothing(output, point, record_property):
    before = _rows(str(output))
    target = 512 << 10

    assert _compact_in_a_process(output, target, point) == -9  # SIGKILL

    after_crash = _rows(str(output))
    assert after_crash == before  # through the manifest: one generation, every row once
    committed = read_committed(open_storage(str(output)), str(output), JOB)
    assert len(committed.done) == SHARDS and not committed.redo
    generation = json.loads((output / "_job.json").read_text()).get("generation", 0)
    on_disk = len(list((output / "data").glob("*.parquet")))

    assert _compact_in_a_process(output, target, None) == 0
    assert _rows(str(output)) == before
    files = list((output / "data").glob("*.parquet"))
    assert all(not PART_FILE.fullmatch(f"data/{p.name}") for p in files)
    assert _folder_counts(output) == (SHARDS * ROWS,) * 2
    assert not [p for p in (output / "_tmp").rglob("*") if p.is_file()]
    record_property("measured", f"killed at {point}: manifest generation {generation}, {on_disk} data files on "
                    f"disk, {len(after_crash)}/{SHARDS * ROWS} rows read once; re-run: {len(files)} files, rows "
                    "equal")  # fmt: skip
