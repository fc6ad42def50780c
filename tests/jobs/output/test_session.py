"""jobs.output.session: the writer's phases (check, start, shard committed, complete, failed) on both backends,
and a real failed job leaving a record of why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.output.errors import OutputConflict
from jobs.output.failure import read_failure
from jobs.output.reader import open_output
from jobs.output.session import OutputSession
from schemas.layout import FAILED_NAME, LEASE_NAMES, MANIFEST_NAME, OWNER_NAME, temp_uri
from schemas.specs import LabelJobSpec
from workers.io.storage import join


def _spec(output: str, tmp_path: Path, **fields) -> LabelJobSpec:
    return LabelJobSpec(input={"uri": str(tmp_path / "in")}, output=output, model={"name": "mobilenet_v2"}, **fields)


def _names(root) -> set[str]:
    """What is under the output but the writer lease's generations (jobs.output.lease, tested there)."""
    names = {o.uri.removeprefix(root.uri + "/") for o in root.storage.list(root.uri)}
    return {n for n in names if not LEASE_NAMES.fullmatch(n)}


def test_phases_claim_record_a_failure_then_complete(storage_root, tmp_path):
    spec = _spec(storage_root.uri, tmp_path, **({"storage": storage_root.options} if storage_root.options else {}))
    session = OutputSession(spec, "job-a", storage_root.storage)
    leftover = temp_uri(storage_root.uri, "s1", 1, "0123abcd")
    storage_root.storage.write_bytes(leftover, b"half an upload")
    assert not session.check().done and _names(storage_root) == {leftover.removeprefix(storage_root.uri + "/")}
    assert session.start() is None
    assert _names(storage_root) == {OWNER_NAME}  # claimed; the partial of a dead attempt removed

    session.failed("ValueError: the store went away", {}, {"s1": "worker died 3 times"})
    failure = read_failure(storage_root.storage, storage_root.uri)
    assert (failure.job_id, failure.reason, failure.shards_committed) == ("job-a", "ValueError: the store went away", 0)
    assert [(f.shard, f.error) for f in failure.failed_shards] == [("s1", "worker died 3 times")]

    with pytest.raises(OutputConflict, match="belongs to job 'job-a'"):
        OutputSession(spec, "job-b", storage_root.storage).check()
    again = OutputSession(spec, "job-a", storage_root.storage)  # the re-run that completes
    again.check()
    again.start()
    again.complete({"model_id": "m"}, {}, {})
    assert _names(storage_root) == {OWNER_NAME, MANIFEST_NAME}  # the failure record is gone with the manifest
    manifest = json.loads(storage_root.storage.read_bytes(join(storage_root.uri, MANIFEST_NAME)))
    assert manifest["status"] == "succeeded"


def test_failed_never_masks_the_error_that_stopped_the_run(tmp_path):
    output = tmp_path / "out"
    session = OutputSession(_spec(str(output), tmp_path), "job-a")
    output.write_text("a file where the output folder should be")  # every write below it fails
    session.failed("the first error", {})  # logs, does not raise
    assert output.read_text() == "a file where the output folder should be"


def test_a_real_job_that_fails_leaves_a_record_saying_why(tmp_path, ray_cluster):
    from jobs.label.runner import JobFailed, run_label_job

    (tmp_path / "in").mkdir()
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text("key\n" + "\n".join(f"nope-{i}.jpg" for i in range(4)) + "\n")
    out = tmp_path / "out"
    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    spec = LabelJobSpec(input={"uri": str(manifest)}, output=str(out), model=model, num_workers=1)
    with pytest.raises(JobFailed):
        run_label_job(spec, show_progress=False)
    assert not (out / MANIFEST_NAME).exists()
    record = json.loads((out / FAILED_NAME).read_text())
    assert record["status"] == "failed" and record["job_id"] == spec.resolved_job_id()
    assert "above max_error_fraction" in record["reason"] and "'read_failed'" in record["reason"]
    assert record["shards_committed"] == 1
    unfinished = open_output(str(out))  # the reader says so too, beside the rows that were committed
    assert not unfinished.complete and unfinished.failure.reason == record["reason"]


def test_output_as_a_string_or_a_mapping_and_the_json_schema_says_both():
    import jsonschema

    from jobs.kinds import job_spec_json_schema

    base = {"kind": "label", "input": {"uri": "/in"}, "model": {"name": "mobilenet_v2"}}
    plain = LabelJobSpec.model_validate({**base, "output": "/out"})
    table = LabelJobSpec.model_validate({**base, "output": {"uri": "/out", "format": "delta", "target_file_mb": 64}})
    assert plain.output == table.output == "/out" and plain.resolved_job_id() == table.resolved_job_id()
    assert (plain.output_options.format, table.output_options.format) == ("parquet", "delta")
    assert table.output_options.target_file_mb == 64 and table.output_options.compact == "auto"
    with pytest.raises(ValueError, match="a mapping needs uri"):
        LabelJobSpec.model_validate({**base, "output": {"format": "delta"}})
    with pytest.raises(ValueError, match="format"):
        LabelJobSpec.model_validate({**base, "output": {"uri": "/out", "format": "orc"}})
    schema = job_spec_json_schema()
    jsonschema.validate({**base, "output": "/out"}, schema)
    jsonschema.validate({**base, "output": {"uri": "/out", "format": "delta"}}, schema)
    jsonschema.validate({**base, "output": {"uri": "/out", "format": "iceberg", "catalog": {"type": "sql"}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**base, "output": {"uri": "/out", "format": "orc"}}, schema)


class _CountingStorage:
    """The output's storage, counting the listings of each prefix (one listing: one `list` call, however paged)."""

    def __init__(self, storage):
        self._storage = storage
        self.listed: list[str] = []

    def list(self, prefix: str):
        self.listed.append(prefix)
        return self._storage.list(prefix)

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


def test_each_phase_lists_the_output_once(tmp_path):
    """check() lists the output once for ownership and markers; start() once more, under the lease, for markers,
    partial uploads and superseded files; complete() only `_tmp/` (a run used to list the whole output 5 times)."""
    from tests.jobs.output.test_compact import write_output
    from workers.io.storage import LocalStorage

    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=3)  # an earlier run's output, resumed below
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "files-000.2.0123abcd.partial").write_bytes(b"a dead attempt's upload")
    storage = _CountingStorage(LocalStorage())
    session = OutputSession(spec, spec.job_id, storage)

    committed = session.check()
    assert [p for p in storage.listed if not p.startswith(join(spec.output, "_lease"))] == [spec.output]
    assert len(committed.done) == 3
    storage.listed.clear()
    session.start()  # no writer came between: check()'s listing serves, only the lease's folder is listed
    assert [p for p in storage.listed if not p.startswith(join(spec.output, "_lease"))] == []
    assert not (out / "_tmp" / "files-000.2.0123abcd.partial").exists()
    storage.listed.clear()
    session.complete({"model_id": "m:x"}, committed.done, {})
    assert spec.output not in storage.listed and join(spec.output, "_tmp") in storage.listed


def test_a_writer_between_check_and_start_makes_start_list_again(tmp_path):
    """Another writer took and released the lease after check(): what it did is read under this run's lease, so a
    shard it removed is planned again, not trusted from check()'s listing."""
    from jobs.output.lease import Writer, WriterKind, acquire
    from tests.jobs.output.test_compact import write_output
    from workers.io.storage import LocalStorage

    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=3)
    storage = _CountingStorage(LocalStorage())
    session = OutputSession(spec, spec.job_id, storage)
    assert len(session.check().done) == 3
    with acquire(storage, spec.output, Writer(WriterKind.COMPACTION, spec.job_id)):
        victim = sorted((out / "_done").glob("*.json"))[0]
        victim.unlink()  # as a writer may: its shard is no longer committed
    storage.listed.clear()
    session.start()
    assert spec.output in storage.listed
    assert len(session.committed.done) == 2


def test_a_run_whose_worker_died_removes_what_it_left_beside_markers_and_data(tmp_path):
    """Found by the chaos row: a worker SIGKILLed while writing a done-marker left `_done/.<marker>.<nonce>.tmp`
    (LocalStorage writes through a hidden file beside the target), and the run completed with it in the output."""
    from tests.jobs.output.test_compact import write_output

    out = tmp_path / "out"
    spec = write_output(str(out), tmp_path, shards=2)
    session = OutputSession(spec, spec.job_id)
    committed = session.check()
    session.start()
    marker = sorted((out / "_done").glob("*.json"))[0]
    litter = [marker.with_name(f".{marker.name}.0123abcd.tmp"), out / "data" / ".part-x.parquet.89abcdef.tmp"]
    for path in litter:
        path.write_bytes(b"half a write")
    session.complete({"model_id": "m:x"}, committed.done, {}, workers_died=True)
    assert not any(path.exists() for path in litter)
