"""An output copied or moved elsewhere (another folder, another S3 prefix) reads whole: markers and manifest name
their files relative to the output (layout 3). Outputs written before (layout 2: absolute names under the output the
job wrote to) still read and resume, where they were written and once moved. Without Ray: the outputs are written
by jobs.output.session and workers.io.writer as a job writes them (tests.jobs.output.test_compact.write_output)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.output.compact import compact_output
from jobs.output.reader import open_output
from jobs.output.session import OutputSession
from schemas.layout import MANIFEST_NAME
from tests.jobs.output.test_compact import JOB, ROWS, write_output
from workers.io.storage import join, relative_key

SHARDS = 3
COUNT_SQL = "SELECT count(*) AS n, count(DISTINCT key) AS keys FROM labels"


def _copy(storage, source: str, target: str) -> int:
    """Every object under `source` written under `target` (what `aws s3 sync` or `cp -r` does); returns how many."""
    copied = 0
    for obj in storage.list(source):
        storage.write_bytes(join(target, relative_key(source, obj.uri)), storage.read_bytes(obj.uri))
        copied += 1
    return copied


def _remove(storage, prefix: str) -> None:
    for obj in list(storage.list(prefix)):
        storage.delete(obj.uri)


def _query_count(capsys, request, root, output: str) -> dict:
    """`bulklabel query OUTPUT "SELECT count(*) ..."` as a user runs it (on S3: endpoint by flag, keys by env)."""
    args = ["query", output, COUNT_SQL, "--format", "json"]
    if root.options is not None:
        server = request.getfixturevalue("s3_server")
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        args += ["--endpoint-url", server.endpoint_url]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.splitlines()[0])


def test_a_copied_output_answers_query_with_every_row_finished_or_not(storage_root, tmp_path, capsys, request):
    """Copied to another folder or S3 prefix and the original deleted (a move): `bulklabel query` on the copy
    answers every row, through its manifest and, with the manifest removed (an unfinished job), through its
    done-markers."""
    root = storage_root
    original, moved = join(root.uri, "original"), join(root.uri, "moved")
    write_output(original, tmp_path, shards=SHARDS, storage=root.options)
    assert _copy(root.storage, original, moved) > 2 * SHARDS
    _remove(root.storage, original)  # nothing may be read from where the job wrote it

    assert _query_count(capsys, request, root, moved) == {"n": SHARDS * ROWS, "keys": SHARDS * ROWS}
    root.storage.delete(join(moved, MANIFEST_NAME))
    unfinished = open_output(moved, root.options)
    assert not unfinished.complete and len(unfinished.files) == SHARDS
    assert _query_count(capsys, request, root, moved) == {"n": SHARDS * ROWS, "keys": SHARDS * ROWS}


def _as_layout_2(output: Path) -> None:
    """Rewrite a finished local output as bulklabel wrote it in layout 2, where it is: done-markers of format 2 with
    the data file's absolute URI (`data_uri`), no node; a manifest of layout version 2 naming absolute URIs."""
    for marker in (output / "_done").glob("*.json"):
        data = json.loads(marker.read_text())
        data["data_uri"] = f"{output}/{data.pop('data')}"
        data["marker_format"] = 2
        del data["host"], data["node_id"]
        marker.write_text(json.dumps(data))
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    manifest["layout_version"] = 2
    for entry in manifest["shards"]:
        entry["data"] = f"{output}/{entry['data']}"
    (output / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_an_output_of_layout_2_reads_and_resumes_where_written_and_once_moved(tmp_path, capsys):
    """Absolute names (layout 2) read where the job wrote them and, once the folder is moved, under its new place;
    a run of the job there finds every shard done, and its manifest names the files relative (layout 3)."""
    written = tmp_path / "written"
    spec = write_output(str(written), tmp_path, shards=SHARDS)
    _as_layout_2(written)
    assert json.loads(next((written / "_done").glob("*.json")).read_text())["data_uri"].startswith(str(written))
    assert open_output(str(written)).to_table().num_rows == SHARDS * ROWS

    moved = Path(shutil.move(written, tmp_path / "moved"))
    assert main(["query", str(moved), COUNT_SQL, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"n": SHARDS * ROWS, "keys": SHARDS * ROWS}
    # A compaction of a copy derives its manifest from the layout 2 one: merged files, relative names, nothing lost.
    copy = Path(shutil.copytree(moved, tmp_path / "copy"))
    assert compact_output(str(copy), 1 << 20).generation == 1
    compacted, before = (json.loads((folder / MANIFEST_NAME).read_text()) for folder in (copy, moved))
    assert compacted["layout_version"] == 3 and {e["data"] for e in compacted["shards"]} == {
        "data/compact-1-00000.parquet"
    }
    assert (compacted["started_at"], compacted["model"]) == (before["started_at"], before["model"])
    assert open_output(str(copy)).to_table().num_rows == SHARDS * ROWS
    (moved / MANIFEST_NAME).rename(tmp_path / "layout-2-manifest.json")  # unfinished: read through its markers
    assert open_output(str(moved)).to_table().num_rows == SHARDS * ROWS

    session = OutputSession(spec.model_copy(update={"output": str(moved)}), JOB)
    committed = session.check()
    assert (len(committed.done), committed.redo) == (SHARDS, {})
    session.start()
    manifest = session.complete({"model_id": "m:x"}, committed.done, {})
    assert manifest.layout_version == 3 and all(not e.data.startswith("/") for e in manifest.shards)
    assert open_output(str(moved)).to_table().num_rows == SHARDS * ROWS


@pytest.mark.parametrize("entry", ["/elsewhere/data/part-x.parquet", "../outside/part-x.parquet"])
def test_a_manifest_naming_a_file_outside_the_output_is_damaged(tmp_path, entry):
    from jobs.output.errors import OutputError

    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=1)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["shards"][0]["data"] = entry
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match="is damaged"):
        open_output(str(out))
