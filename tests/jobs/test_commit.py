"""jobs.output.ownership, markers, partials: the ownership claim, which files count as ours, and what a re-run
trusts of the done-markers.

Pure storage logic, on both backends (a local folder and SeaweedFS), without Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from jobs.output.errors import OutputConflict
from jobs.output.markers import error_summary, read_committed
from jobs.output.ownership import check_output, claim_output
from jobs.output.partials import remove_partials
from schemas.layout import OWNER_NAME, data_name, data_uri
from schemas.shards import MARKER_FORMAT, ShardResult
from tests.conftest import PROJECT_ROOT
from workers.io.storage import join

RACERS = 6


def _marker(output: str, shard: str, job: str = "job-a", **fields) -> ShardResult:
    values = {"shard_id": shard, "job_id": job, "fingerprint": "f", "data": data_name(shard),
              "rows": 2, "errors": 0, "bytes_read": 1, "seconds": 0.1, "attempt": 1, "marker_format": MARKER_FORMAT,
              "data_bytes": 4}  # fmt: skip
    return ShardResult(**{**values, **fields})


def _commit(root, shard: str, job: str = "job-a", data: bytes = b"PAR1") -> ShardResult:
    marker = _marker(root.uri, shard, job, data_bytes=len(data))
    root.storage.write_bytes(data_uri(root.uri, shard), data)
    root.storage.write_bytes(join(root.uri, "_done", f"{shard}.json"), marker.model_dump_json().encode())
    return marker


def test_a_fresh_output_is_claimed_and_then_only_by_its_job(storage_root):
    check_output(storage_root.storage, storage_root.uri, "job-a", "refuse")
    claim_output(storage_root.storage, storage_root.uri, "job-a")
    claim_output(storage_root.storage, storage_root.uri, "job-a")  # the same job again: a resume
    check_output(storage_root.storage, storage_root.uri, "job-a", "refuse")
    with pytest.raises(OutputConflict, match="belongs to job 'job-a', not 'job-b'"):
        check_output(storage_root.storage, storage_root.uri, "job-b", "refuse")
    with pytest.raises(OutputConflict, match="belongs to job 'job-a', not 'job-b'"):
        claim_output(storage_root.storage, storage_root.uri, "job-b")


def _racer_script(uri: str, options_json: str, start_at: float) -> str:
    return textwrap.dedent(f"""
        import json, os, sys, time
        from jobs.output.errors import OutputConflict
        from jobs.output.ownership import check_output, claim_output
        from schemas.specs import StorageOptions
        from workers.io.storage import open_storage
        options = StorageOptions.model_validate_json({options_json!r}) if {options_json!r} else None
        storage = open_storage({uri!r}, options)
        job = "job-" + sys.argv[1]
        while time.time() < {start_at!r}:
            time.sleep(0.001)
        try:
            check_output(storage, {uri!r}, job, "refuse")
            claim_output(storage, {uri!r}, job)
            print("won", job)
        except OutputConflict as exc:
            print("lost", exc)
    """)


def test_jobs_racing_from_several_processes_one_wins(storage_root):
    """Real processes, released at the same instant: exactly one claims the output, the others name it."""
    options = "" if storage_root.options is None else _unmasked_json(storage_root.options)
    script = _racer_script(storage_root.uri, options, time.time() + 4.0)  # time enough for every import
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True, env=env)
             for i in range(RACERS)]  # fmt: skip
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    winners = [line.split()[1] for line in outputs if line.startswith("won")]
    assert len(winners) == 1, outputs
    owner = json.loads(storage_root.storage.read_bytes(join(storage_root.uri, OWNER_NAME)))["job_id"]
    assert winners == [owner]
    assert all(f"'{owner}'" in line for line in outputs if line.startswith("lost")), outputs


def _unmasked_json(options) -> str:
    data = options.model_dump(mode="json")
    for key in ("access_key_id", "secret_access_key"):
        if getattr(options, key) is not None:
            data[key] = getattr(options, key).get_secret_value()
    return json.dumps(data)


def test_foreign_files_are_refused_unless_kept(storage_root):
    storage_root.storage.write_bytes(join(storage_root.uri, "_tmp", "draft.docx"), b"x")
    with pytest.raises(OutputConflict, match=r"1 file\(s\) bulklabel did not write \(e.g. _tmp/draft.docx\)"):
        check_output(storage_root.storage, storage_root.uri, "job-a", "refuse")
    check_output(storage_root.storage, storage_root.uri, "job-a", "keep")


def test_our_names_without_an_owner_are_refused_even_when_keeping_foreign_files(storage_root):
    storage_root.storage.write_bytes(join(storage_root.uri, "part-00000.parquet"), b"another tool's")
    with pytest.raises(OutputConflict, match="part-00000.parquet with no bulklabel owner"):
        check_output(storage_root.storage, storage_root.uri, "job-a", "keep")


def test_an_output_of_an_older_bulklabel_belongs_to_its_job(storage_root):
    manifest = {"job_id": "job-old", "status": "succeeded"}
    storage_root.storage.write_bytes(join(storage_root.uri, "_job.json"), json.dumps(manifest).encode())
    with pytest.raises(OutputConflict, match="holds rows of job 'job-old'"):
        check_output(storage_root.storage, storage_root.uri, "job-a", "refuse")


def test_remove_partials_deletes_only_our_temporary_names(storage_root):
    ours = join(storage_root.uri, "_tmp", "shard-1.2.0123abcd.partial")
    theirs = join(storage_root.uri, "_tmp", "draft.docx")
    for uri in (ours, theirs):
        storage_root.storage.write_bytes(uri, b"x")
    remove_partials(storage_root.storage, storage_root.uri)
    assert not storage_root.storage.exists(ours)
    assert storage_root.storage.read_bytes(theirs) == b"x"


def test_read_committed_trusts_only_markers_whose_data_is_there(storage_root):
    root = storage_root
    good = _commit(root, "a-1")
    _commit(root, "b-2")
    root.storage.delete(data_uri(root.uri, "b-2"))  # deleted by a lifecycle rule
    _commit(root, "c-3")
    root.storage.write_bytes(data_uri(root.uri, "c-3"), b"PAR1 rewritten, longer")
    root.storage.write_bytes(join(root.uri, "_done", "d-4.json"), b"")  # a disk that filled up mid-write
    root.storage.write_bytes(join(root.uri, "_done", ".DS_Store"), b"\0Bud1")  # never parsed
    _commit(root, "e-5", job="job-other")

    committed = read_committed(root.storage, root.uri, "job-a")

    assert committed.done == {"a-1": good}
    assert set(committed.redo) == {"b-2", "c-3", "d-4", "e-5"}
    assert "is gone" in committed.redo["b-2"]
    assert "the marker recorded 4" in committed.redo["c-3"]
    assert "unreadable" in committed.redo["d-4"]
    assert "job-other" in committed.redo["e-5"]


def test_markers_of_an_older_format_refuse_the_resume(storage_root):
    _commit(storage_root, "old")
    marker = _marker(storage_root.uri, "old", marker_format=1)
    storage_root.storage.write_bytes(join(storage_root.uri, "_done", "old.json"), marker.model_dump_json().encode())
    with pytest.raises(OutputConflict, match="older bulklabel"):
        read_committed(storage_root.storage, storage_root.uri, "job-a")


def test_error_summary_names_the_commonest_kind_and_an_example():
    shards = [
        _marker(
            "/o",
            "a",
            errors=3,
            error_kinds={"missing": 2, "refused": 1},
            error_examples={"missing": "x.jpg", "refused": "big.png"},
        ),  # fmt: skip
        _marker("/o", "b", errors=2, error_kinds={"missing": 2}, error_examples={"missing": "y.jpg"}),
    ]
    assert error_summary(shards) == ("missing", 4, "x.jpg")
    assert error_summary([_marker("/o", "c")]) is None
