"""jobs.service.runs: a label job's compile decision at submit, and the pool key it leads to (no Ray started)."""

from __future__ import annotations

import pytest

from jobs import kinds
from jobs.cluster import ClusterResources
from jobs.label.compile_policy import explicit
from jobs.service.runs import label_compile, label_worker_spec
from schemas.specs import LabelJobSpec

TWO_CPUS = ClusterResources(cpus=2, gpus=0)
pytestmark = pytest.mark.usefixtures("cpu_compile_pays")


def _spec(tmp_path, compile) -> LabelJobSpec:
    return LabelJobSpec(input={"uri": str(tmp_path / "photos"), "format": "files"}, output=str(tmp_path / "labels"),
                        model={"name": "resnet50", "compile": compile})  # fmt: skip


def test_a_small_job_goes_to_the_eager_pool_unless_a_compiled_one_is_warm(tmp_path):
    (tmp_path / "photos").mkdir()
    for index in range(40):
        (tmp_path / "photos" / f"{index}.jpg").write_bytes(b"x")
    spec = _spec(tmp_path, "auto")
    decision = label_compile(spec, TWO_CPUS, None, warm_pools=set())
    assert not decision.compile and "job too small: 40 images on 1 CPU worker" in decision.reason
    eager_key = kinds.LABEL.pool_key(spec, decision)
    assert eager_key == label_worker_spec(_spec(tmp_path, False), None).pool_key()  # the same pool as compile: false
    compiled_key = label_worker_spec(_spec(tmp_path, True), None).pool_key()
    joined = label_compile(spec, TWO_CPUS, None, warm_pools={compiled_key})
    assert joined.compile and kinds.LABEL.pool_key(spec, joined) == compiled_key


def test_input_that_cannot_be_counted_leaves_the_job_eager_for_its_own_checks_to_report(tmp_path):
    decision = label_compile(_spec(tmp_path, "auto"), TWO_CPUS, None, warm_pools=set())  # no photos folder
    assert not decision.compile and decision.reason.startswith("input not counted (")
    assert label_compile(_spec(tmp_path, True), TWO_CPUS, None, warm_pools=set()) == explicit(True)


def test_a_label_jobs_output_proves_a_finished_run_only_with_its_own_manifest_written_since_it_started(tmp_path):
    import json
    from datetime import UTC, datetime, timedelta

    from jobs.service.records import JobState, advance, new_record
    from jobs.service.runs import label_finished
    from schemas.layout import MANIFEST_NAME
    from schemas.output import LABEL_SCHEMA_VERSION

    started = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)
    spec = _spec(tmp_path, False)
    record = new_record("label-x", "label", spec, output=spec.output, seq=0, now=started)
    record = advance(record, JobState.RUNNING, started)
    assert not label_finished(record, None)  # no output at all

    def manifest(job_id: str, status: str, finished: datetime) -> None:
        out = tmp_path / "labels"
        out.mkdir(exist_ok=True)
        (out / MANIFEST_NAME).write_text(json.dumps({
            "job_id": job_id, "kind": "label", "status": status, "spec": {"output": str(out)},
            "model": {"model_id": "mobilenet_v2"}, "schema_version": LABEL_SCHEMA_VERSION, "layout_version": 2,
            "started_at": started.isoformat(), "finished_at": finished.isoformat(),
            "totals": {"shards": 0, "rows": 0, "errors": 0, "failed_shards": 0}, "shards": [],
        }))  # fmt: skip

    manifest("label-x", "succeeded", started + timedelta(minutes=5))
    assert label_finished(record, None)
    manifest("label-x", "succeeded", started - timedelta(minutes=5))  # an earlier run's
    assert not label_finished(record, None)
    manifest("label-x", "partial", started + timedelta(minutes=5))
    assert not label_finished(record, None)
    manifest("label-other", "succeeded", started + timedelta(minutes=5))
    assert not label_finished(record, None)
    assert not kinds.FINETUNE.finished(record, None)


def test_a_cancelled_label_jobs_total_is_its_plans_shard_count_not_what_was_dispatched():
    # Case 15 of issue 21: a 16-shard job cancelled part-way showed 7/7. The plan is streamed to the workers, so its
    # count is known only at its end: the runner counts the rest of it on cancel.
    from types import SimpleNamespace

    from jobs.label.runner import _count_the_rest, _not_yet_done
    from jobs.progress import Progress
    from jobs.service.runs import LabelProgress

    listener = LabelProgress()
    progress = Progress(enabled=False, listener=listener)
    pending = _not_yet_done(iter([SimpleNamespace(shard_id=f"s{i}") for i in range(16)]), {}, {}, progress)
    dispatched = [next(pending) for _ in range(7)]
    assert len(dispatched) == 7 and listener.snapshot().shards_total is None  # not known yet: not 7
    _count_the_rest(pending)
    assert listener.snapshot().shards_total == 16
