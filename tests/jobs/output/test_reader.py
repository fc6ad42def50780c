"""jobs.output.reader on a real label job's output: committed files only, typed manifest, schema version checked;
and what other readers (DuckDB, Polars, pyarrow/pandas) make of the same committed files."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray

from jobs.errors import exit_code_for
from jobs.output.reader import OutputError, UnsupportedSchemaVersion, open_output
from schemas.output import LABEL_SCHEMA_VERSION
from tests.support import IMAGENET_SAMPLE, imagenet_labels

PHOTOS = 12
FILES_PER_SHARD = 4


def label_photos(tmp_path_factory: pytest.TempPathFactory, output: str, storage=None) -> str:
    """Label 12 real ImageNet photos with MobileNetV2 (3 shards of 4) into `output`; returns the output."""
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    photos = tmp_path_factory.mktemp("photos")
    for row in imagenet_labels()[:PHOTOS]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    spec = LabelJobSpec(
        input={"uri": str(photos), "files_per_shard": FILES_PER_SHARD},
        output=output,
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        num_workers=1,
        batch_size=8,
        **({"storage": storage} if storage else {}),
    )
    summary = run_label_job(spec, show_progress=False)
    assert (summary.status, summary.images, summary.errors) == ("succeeded", PHOTOS, 0)
    return output


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_cluster) -> Path:
    return Path(label_photos(tmp_path_factory, str(tmp_path_factory.mktemp("labelled") / "out")))


@pytest.fixture
def copied(labelled, tmp_path) -> Path:
    """A copy of the output elsewhere (its manifest names the original folder), free to damage."""
    return Path(shutil.copytree(labelled, tmp_path / "copy"))


def _parts(output: Path) -> list[str]:
    return sorted(str(p) for p in output.glob("data/part-*.parquet"))


def test_open_output_gives_the_manifest_and_committed_files(labelled):
    output = open_output(str(labelled))
    assert output.complete and output.manifest is not None
    assert output.job_id == output.manifest.job_id == json.loads((labelled / "_owner.json").read_text())["job_id"]
    assert output.manifest.status == "succeeded" and output.manifest.schema_version == LABEL_SCHEMA_VERSION
    assert output.manifest.model.model_id.startswith("mobilenet_v2") and output.embedding_dim == 1280
    assert (output.manifest.totals.rows, output.manifest.totals.shards) == (PHOTOS, PHOTOS // FILES_PER_SHARD)
    assert list(output.files) == _parts(labelled)
    table = output.to_table()
    assert table.num_rows == PHOTOS
    assert sorted(table.column("key").to_pylist()) == sorted(r["file"] for r in imagenet_labels()[:PHOTOS])
    assert table.equals(pq.read_table(_parts(labelled)).select(table.column_names))
    # Each done-marker says which machine and Ray node wrote it, and names its file relative to the output.
    markers = [json.loads(m.read_text()) for m in sorted((labelled / "_done").glob("*.json"))]
    assert all(m["host"] and m["node_id"] and m["data"].startswith("data/part-") for m in markers), markers
    assert {m["node_id"] for m in markers} <= {n["NodeID"] for n in ray.nodes()}


def test_stray_part_and_foreign_parquet_are_not_read(copied):
    # A part file whose done-marker was never written (a worker died between the two) and another tool's file.
    shutil.copy(_parts(copied)[0], copied / "data" / "part-stray-0123456789ab.parquet")
    (copied / "other").mkdir()
    shutil.copy(_parts(copied)[1], copied / "other" / "foreign.parquet")
    output = open_output(str(copied))
    assert len(output.files) == 3 and all(Path(f).parent == copied / "data" for f in output.files)
    assert "part-stray-0123456789ab.parquet" not in {Path(f).name for f in output.files}
    assert output.to_table().num_rows == PHOTOS  # the copy reads the same: files are found relative to the output


def test_without_a_manifest_only_shards_with_valid_markers_are_read(labelled, tmp_path):
    """A job still running (or interrupted): no `_job.json`; a part without its marker is not committed."""
    manifest, aside = labelled / "_job.json", tmp_path / "_job.json"
    markers = sorted((labelled / "_done").glob("*.json"))
    marker_aside = tmp_path / markers[-1].name
    shutil.move(manifest, aside)
    shutil.move(markers[-1], marker_aside)
    try:
        output = open_output(str(labelled))
        assert not output.complete and output.manifest is None and output.embedding_dim is None
        assert len(output.files) == 2
        assert str(labelled / "data" / f"part-{markers[-1].stem}.parquet") not in output.files
        assert output.to_table().num_rows == 2 * FILES_PER_SHARD
    finally:
        shutil.move(marker_aside, markers[-1])
        shutil.move(aside, manifest)
    assert open_output(str(labelled)).complete


@pytest.mark.parametrize("version", [LABEL_SCHEMA_VERSION + 1, "one", None])
def test_newer_or_unknown_schema_version_is_refused_naming_both(copied, version):
    manifest = json.loads((copied / "_job.json").read_text())
    manifest["schema_version"] = version
    (copied / "_job.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedSchemaVersion) as info:
        open_output(str(copied))
    message = str(info.value)
    assert f"version {version!r}" in message and f"reads version {LABEL_SCHEMA_VERSION}" in message
    assert ("upgrade bulklabel" in message) == isinstance(version, int)
    assert exit_code_for(info.value) == 2


def test_damaged_or_missing_outputs_are_clear_errors(copied, tmp_path):
    Path(_parts(copied)[1]).unlink()
    with pytest.raises(OutputError, match=r"is damaged: its manifest lists data/part-.*\.parquet .*which is not there"):
        open_output(str(copied))
    with pytest.raises(OutputError, match="not a bulklabel label output: it is empty or missing"):
        open_output(str(tmp_path / "nothing-here"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(OutputError, match="has no _owner.json or _job.json"):
        open_output(str(tmp_path / "foreign"))


# ----------------------------------------------------------------------------------------------- compatibility


def test_duckdb_polars_pandas_read_the_committed_rows_alike(labelled):
    files = list(open_output(str(labelled)).files)
    reference = pq.read_table(files)
    labels = Counter(reference.column("label").to_pylist())

    con = duckdb.connect()
    listed = ", ".join(f"'{f}'" for f in files)
    assert con.sql(f"SELECT count(*) FROM read_parquet([{listed}])").fetchall() == [(PHOTOS,)]
    histogram = con.sql(f"SELECT label, count(*) FROM read_parquet([{listed}]) GROUP BY label").fetchall()
    assert dict(histogram) == labels
    emb = reference.column("embedding").to_pylist()
    cosine = con.execute(
        f"SELECT array_cosine_similarity(a.embedding::FLOAT[1280], b.embedding::FLOAT[1280]) FROM "
        f"read_parquet([{listed}]) a, read_parquet([{listed}]) b WHERE a.key = ? AND b.key = ?",
        [reference.column("key")[0].as_py(), reference.column("key")[1].as_py()],
    ).fetchone()[0]
    a, b = np.asarray(emb[0]), np.asarray(emb[1])
    assert cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)

    frame = pl.read_parquet(files)
    assert frame.height == PHOTOS and frame.schema["embedding"] == pl.List(pl.Float32)
    assert dict(frame.group_by("label").len().iter_rows()) == labels
    assert frame["embedding"].list.len().unique().to_list() == [1280]

    pandas = reference.to_pandas()
    assert len(pandas) == PHOTOS and Counter(pandas["label"]) == labels
    assert len(pandas["topk_labels"].iloc[0]) == 5


def test_parquet_files_use_3_level_lists_plain_top1_scalars_and_zstd(labelled):
    for path in open_output(str(labelled)).files:
        parquet = pq.ParquetFile(path)
        columns = {parquet.schema.column(i).path: parquet.schema.column(i) for i in range(len(parquet.schema))}
        for name in ("topk_labels", "topk_indices", "topk_scores", "embedding"):
            # The standard LIST layout: <name> (LIST) / repeated group list / element.
            assert f"{name}.list.element" in columns, sorted(columns)
            assert columns[f"{name}.list.element"].max_repetition_level == 1
        for name in ("key", "label", "label_index", "score", "width", "height", "error"):
            assert columns[name].max_repetition_level == 0
        assert columns["label_index"].physical_type == "INT32" and columns["score"].physical_type == "FLOAT"
        metadata = parquet.metadata
        codecs = {metadata.row_group(g).column(c).compression for g in range(metadata.num_row_groups)
                  for c in range(metadata.num_columns)}  # fmt: skip
        assert codecs == {"ZSTD"}


def test_every_reader_pointed_at_the_folder_itself_reads_it_as_it_is(labelled):
    """No file list, no glob of ours: `OUT/data/` holds Parquet and nothing else (markers, manifest, claim and
    temporaries are beside it), and pyarrow and pandas given the output's own folder skip the `_` names."""
    reference = open_output(str(labelled)).to_table()
    labels = Counter(reference.column("label").to_pylist())
    data = labelled / "data"
    con = duckdb.connect()
    for source in (f"{data}/**", f"{data}/*.parquet", str(data)):
        rows = con.sql(f"SELECT label, count(*) FROM read_parquet('{source}') GROUP BY label").fetchall()
        assert dict(rows) == labels, source
    for source in (f"{data}/", str(data)):
        assert dict(pl.read_parquet(source).group_by("label").len().iter_rows()) == labels, source
        assert pl.scan_parquet(source).select(pl.len()).collect().item() == PHOTOS
    for folder in (labelled, data):
        assert ds.dataset(str(folder), format="parquet").count_rows() == PHOTOS
        assert Counter(pd.read_parquet(folder)["label"]) == labels


def _as_layout_1(output: Path, written_at: Path) -> None:
    """Rewrite a finished output the way bulklabel before `data/` laid it out (data files at the top, markers and
    manifest naming absolute URIs), as if it had been written where it is now (its markers name the copy)."""
    for part in sorted((output / "data").glob("*.parquet")):
        part.rename(output / part.name)
    (output / "data").rmdir()
    for marker in (output / "_done").glob("*.json"):
        data = json.loads(marker.read_text())
        data["data_uri"] = f"{output}/{data.pop('data').removeprefix('data/')}"
        data["marker_format"] = 2
        del data["host"], data["node_id"]
        marker.write_text(json.dumps(data))
    manifest = json.loads((output / "_job.json").read_text())
    manifest.pop("layout_version"), manifest.pop("generation")
    for entry in manifest["shards"]:
        entry["data"] = f"{written_at}/{entry['data'].removeprefix('data/')}"
    (output / "_job.json").write_text(json.dumps(manifest))
    owner = json.loads((output / "_owner.json").read_text())
    owner.pop("layout_version")
    (output / "_owner.json").write_text(json.dumps(owner))


def test_a_layout_1_output_still_reads_but_a_run_into_it_is_refused_naming_the_versions(labelled, copied):
    from jobs.output.errors import OutputConflict
    from jobs.output.markers import read_committed
    from jobs.output.ownership import check_output
    from workers.io.storage import open_storage

    _as_layout_1(copied, labelled)
    output = open_output(str(copied))
    assert output.manifest.layout_version == 1 and all(Path(f).parent == copied for f in output.files)
    assert output.to_table().num_rows == PHOTOS
    (copied / "_job.json").unlink()  # and unfinished: read through its markers
    assert open_output(str(copied)).to_table().num_rows == PHOTOS
    storage = open_storage(str(copied))
    with pytest.raises(OutputConflict, match=r"output layout version 1 .*writes layout version 3 .*new output prefix"):
        check_output(storage, str(copied), output.job_id, "refuse")
    assert len(read_committed(storage, str(copied), output.job_id).done) == PHOTOS // FILES_PER_SHARD
