"""A real label job's rows, read back the way the next jobs read them: content ids, error kinds, given labels,
img2dataset sidecars through DuckDB, full softmax vectors; and an output of the previous schema version."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import _parser, spec_of
from jobs.label.runner import run_label_job
from jobs.output.reader import open_output
from schemas.output import LABEL_SCHEMA
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels

pytestmark = pytest.mark.usefixtures("ray_cluster")

PHOTOS = 4
NEW_COLUMNS = ("error_kind", "image_id", "given_label", "sidecar", "probabilities")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """One img2dataset-style tar shard (jpg, json with url and caption, cls) plus an HTML page saved as .jpg,
    labelled with `probabilities: true`."""
    root = tmp_path_factory.mktemp("rows")
    rows = imagenet_labels()[:PHOTOS]
    photos = {f"{i:09d}": (IMAGENET_SAMPLE / r["file"]).read_bytes() for i, r in enumerate(rows)}
    (root / "in").mkdir()
    with tarfile.open(root / "in" / "00000.tar", "w") as tar:
        for i, (key, data) in enumerate(photos.items()):
            _add(tar, f"{key}.jpg", data)
            _add(tar, f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg", "caption": f"photo {i}",
                                                 "status": "success"}).encode())  # fmt: skip
            _add(tar, f"{key}.cls", rows[i]["class_index"].encode())
        _add(tar, "broken.jpg", b"<html><body>404 not found</body></html>")
    spec = LabelJobSpec(input={"uri": str(root / "in")}, output=str(root / "out"), top_k=3, probabilities=True,
                        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, num_workers=1)  # fmt: skip
    summary = run_label_job(spec, show_progress=False)
    assert (summary.status, summary.images, summary.errors) == ("succeeded", PHOTOS + 1, 1)
    return root / "out", photos, rows


def test_rows_carry_content_ids_kinds_given_labels_and_probabilities(labelled):
    out, photos, rows = labelled
    table = open_output(str(out)).to_table()
    assert table.schema.names == LABEL_SCHEMA.names
    by_key = {r["key"]: r for r in table.to_pylist()}
    for i, (key, data) in enumerate(photos.items()):
        row = by_key[key]
        assert row["image_id"] == hashlib.sha256(data).hexdigest()
        assert (row["error_kind"], row["given_label"]) == ("", rows[i]["class_index"])
        probs = np.asarray(row["probabilities"], np.float32)
        assert probs.shape == (1000,) and abs(float(probs.sum()) - 1) < 1e-3
        assert int(probs.argmax()) == row["label_index"] and abs(float(probs.max()) - row["score"]) < 1e-6
    broken = by_key["broken"]
    assert (broken["error_kind"], broken["probabilities"], broken["given_label"]) == ("not_an_image", None, None)
    assert broken["image_id"] == hashlib.sha256(b"<html><body>404 not found</body></html>").hexdigest()


def test_duckdb_reads_the_sidecar_as_json(labelled):
    out, photos, _ = labelled
    got = duckdb.sql(
        f"SELECT key, sidecar->>'url', sidecar->>'caption', len(probabilities) FROM read_parquet('{out}/data/**') "
        "WHERE sidecar IS NOT NULL ORDER BY key"
    ).fetchall()
    assert got == [(k, f"https://example.com/{k}.jpg", f"photo {i}", 1000) for i, k in enumerate(photos)]


def test_an_output_of_the_previous_schema_version_still_reads_with_the_new_columns_null(labelled, tmp_path):
    out, photos, _ = labelled
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for data in (old / "data").glob("*.parquet"):  # as version 1 wrote them: without the new columns
        table = pq.read_table(data)
        table = table.drop_columns(list(NEW_COLUMNS)).replace_schema_metadata({"bulklabel.schema_version": "1"})
        pq.write_table(table, data)
    manifest = json.loads((old / "_job.json").read_text())
    (old / "_job.json").write_text(json.dumps(manifest | {"schema_version": 1}))
    table = open_output(str(old)).to_table()
    assert table.num_rows == PHOTOS + 1 and set(table.column("key").to_pylist()) >= set(photos)
    assert all(table.column(name).null_count == table.num_rows for name in NEW_COLUMNS)


def test_cli_probabilities_flag_reaches_the_spec():
    args = ["label", "--input", "/in", "--output", "/out", "--model", "mobilenet_v2"]
    assert spec_of(_parser().parse_args(args)).probabilities is False
    assert spec_of(_parser().parse_args([*args, "--probabilities"])).probabilities is True
