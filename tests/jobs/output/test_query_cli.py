"""`bulklabel query` and `bulklabel similar` on a real label job's output, local and on a real S3 server, checked
against pyarrow's (and numpy's) reading of the same committed files."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.output.query import NoEmbeddings, similar
from schemas.output import LABEL_SCHEMA_VERSION
from tests.jobs.output.test_reader import PHOTOS, label_photos
from workers.io.storage import join, open_storage


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_cluster) -> Path:
    return Path(label_photos(tmp_path_factory, str(tmp_path_factory.mktemp("labelled") / "out")))


@pytest.fixture(scope="module")
def reference(labelled):
    """The committed rows as pyarrow reads the part files that have done-markers."""
    parts = [labelled / "data" / f"part-{m.stem}.parquet" for m in sorted((labelled / "_done").glob("*.json"))]
    return pq.read_table(parts)


def _query(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["query", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json_rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_query_counts_and_label_histogram_match_pyarrow(labelled, reference, capsys):
    code, out, _ = _query(capsys, str(labelled), "SELECT count(*) AS n, count(DISTINCT key) AS keys FROM labels",
                          "--format", "json")  # fmt: skip
    assert code == 0 and _json_rows(out) == [{"n": PHOTOS, "keys": PHOTOS}]
    sql = "SELECT label, count(*) AS n FROM labels WHERE error IS NULL GROUP BY ALL ORDER BY n DESC, label"
    code, out, _ = _query(capsys, str(labelled), sql, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {r["label"]: int(r["n"]) for r in rows} == Counter(reference.column("label").to_pylist())
    code, out, _ = _query(capsys, str(labelled), sql)  # the default: DuckDB's table
    assert code == 0 and "label" in out and rows[0]["label"] in out


def test_embedding_is_a_fixed_array_and_cosine_equals_numpys(labelled, reference, capsys):
    code, out, _ = _query(capsys, str(labelled), "SELECT DISTINCT typeof(embedding) AS t FROM labels", "--format",
                          "json")  # fmt: skip
    assert code == 0 and _json_rows(out) == [{"t": "FLOAT[1280]"}]
    sql = ("SELECT a.key AS a, b.key AS b, array_cosine_similarity(a.embedding, b.embedding) AS cos "
           "FROM labels a, labels b WHERE a.key < b.key")  # fmt: skip
    code, out, _ = _query(capsys, str(labelled), sql, "--format", "json")
    pairs = _json_rows(out)
    assert code == 0 and len(pairs) == PHOTOS * (PHOTOS - 1) // 2
    columns = reference.column("key").to_pylist(), reference.column("embedding").to_pylist()
    vectors = {k: np.asarray(e, dtype=np.float64) for k, e in zip(*columns, strict=True)}
    for pair in pairs:
        a, b = vectors[pair["a"]], vectors[pair["b"]]
        assert pair["cos"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5, abs=1e-6)


def test_files_without_a_commit_are_not_in_the_view(labelled, tmp_path, capsys):
    out = Path(shutil.copytree(labelled, tmp_path / "copy"))
    parts = sorted(out.glob("data/part-*.parquet"))
    shutil.copy(parts[0], out / "data" / "part-stray-0123456789ab.parquet")  # data whose marker was never written
    (out / "exports").mkdir()
    shutil.copy(parts[1], out / "exports" / "other-tool.parquet")  # another tool's file under the output
    code, text, _ = _query(capsys, str(out), "SELECT count(*) AS n, count(DISTINCT shard) AS s FROM labels",
                           "--format", "json")  # fmt: skip
    assert code == 0 and _json_rows(text) == [{"n": PHOTOS, "s": 3}]


def test_parquet_and_csv_files_and_clear_errors(labelled, tmp_path, capsys):
    code, _, err = _query(capsys, str(labelled), "SELECT * FROM labels", "--format", "parquet")
    assert code == 2 and "--format parquet writes a file: give it with --out FILE" in err
    target = tmp_path / "low.parquet"
    code, _, _ = _query(capsys, str(labelled), "SELECT key, score, embedding FROM labels ORDER BY score LIMIT 5",
                        "--format", "parquet", "--out", str(target))  # fmt: skip
    written = pq.read_table(target)
    assert code == 0 and written.num_rows == 5 and written.column_names == ["key", "score", "embedding"]
    assert written.column("score").to_pylist() == sorted(written.column("score").to_pylist())
    assert pq.ParquetFile(target).metadata.row_group(0).column(0).compression == "ZSTD"
    code, _, _ = _query(capsys, str(labelled), "SELECT key FROM labels", "--format", "csv", "--out",
                        str(tmp_path / "keys.csv"))  # fmt: skip
    assert code == 0 and len((tmp_path / "keys.csv").read_text().splitlines()) == PHOTOS + 1

    code, _, err = _query(capsys, str(labelled), "SELECT no_such_column FROM labels")
    assert code == 2 and err.startswith("error: query failed:") and "no_such_column" in err
    code, _, err = _query(capsys, str(tmp_path / "nowhere"), "SELECT 1")
    assert code == 2 and "is not a bulklabel label output" in err


def test_newer_schema_version_is_refused_by_the_command(labelled, tmp_path, capsys):
    out = Path(shutil.copytree(labelled, tmp_path / "copy"))
    manifest = json.loads((out / "_job.json").read_text())
    (out / "_job.json").write_text(json.dumps(manifest | {"schema_version": LABEL_SCHEMA_VERSION + 1}))
    code, _, err = _query(capsys, str(out), "SELECT count(*) FROM labels")
    assert code == 2
    assert (
        f"label schema version {LABEL_SCHEMA_VERSION + 1}; this bulklabel reads version {LABEL_SCHEMA_VERSION}" in err
    )


def test_similar_puts_the_image_first_then_descending_as_numpy_ranks(labelled, reference, capsys):
    keys = reference.column("key").to_pylist()
    vectors = np.asarray(reference.column("embedding").to_pylist(), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = keys[3]
    expected = [keys[i] for i in np.argsort(-(vectors @ vectors[3]), kind="stable")[:5]]

    neighbours = similar(str(labelled), query, k=5)
    assert [n.key for n in neighbours] == expected and neighbours[0].key == query
    assert neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)
    sims = [n.similarity for n in neighbours]
    assert sims == sorted(sims, reverse=True) and sims[1] < 0.999
    labels = dict(zip(keys, reference.column("label").to_pylist(), strict=True))
    assert all(n.label == labels[n.key] for n in neighbours)

    assert main(["similar", str(labelled), query, "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "label", "score", "similarity"] and len(lines) == 4
    assert lines[1].startswith(query) and lines[1].split()[-1] == "1.0000"

    assert main(["similar", str(labelled), "no-such-photo.jpg"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-photo.jpg' is not a key (or image file, image id) of output" in err
    assert f"{PHOTOS} committed rows" in err


def test_similar_on_an_output_without_embeddings_says_so(labelled, tmp_path):
    out = Path(shutil.copytree(labelled, tmp_path / "copy"))
    manifest = json.loads((out / "_job.json").read_text())
    manifest["spec"]["embeddings"] = False
    (out / "_job.json").write_text(json.dumps(manifest))
    with pytest.raises(NoEmbeddings, match="has no embeddings: its job ran with embeddings: false"):
        similar(str(out), "anything.jpg")


def test_query_and_similar_on_s3(tmp_path_factory, ray_cluster, s3_server, s3_prefix, capsys, monkeypatch):
    from jobs.output.reader import open_output

    label_photos(tmp_path_factory, s3_prefix, storage=s3_server.options())
    storage = open_storage(s3_prefix, s3_server.options())
    # Another tool's file and a part without a marker, written after the job: neither is committed.
    storage.write_bytes(join(s3_prefix, "exports/x.parquet"), b"PAR1 not ours")
    first_part = next(o.uri for o in storage.list(s3_prefix) if "/part-" in o.uri)
    storage.write_bytes(join(s3_prefix, "part-stray-0123456789ab.parquet"), storage.read_bytes(first_part))

    output = open_output(s3_prefix, s3_server.options())
    assert output.complete and len(output.files) == 3 and output.to_table().num_rows == PHOTOS
    # The command: endpoint by flag, keys from the standard AWS environment variables.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    code, out, err = _query(capsys, s3_prefix, "SELECT count(*) AS n, count(DISTINCT key) AS k FROM labels",
                            "--format", "json", "--endpoint-url", s3_server.endpoint_url)  # fmt: skip
    assert code == 0, err
    assert _json_rows(out) == [{"n": PHOTOS, "k": PHOTOS}]
    key = output.to_table(columns=["key"]).column("key")[0].as_py()
    neighbours = similar(s3_prefix, key, k=PHOTOS, options=s3_server.options())
    assert neighbours[0].key == key and len(neighbours) == PHOTOS


def test_query_module_imports_no_torch_or_ray():
    script = "import sys, jobs.output.query; sys.exit('torch' in sys.modules or 'ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 0
