"""One output, several writers or a reader at once (issue 21, cases 1-3): every writer goes through the output's lease
(jobs.output.lease), readers are pinned to one manifest generation (jobs.output.reader.read_pinned).

Real processes through the CLI: a writer caught mid-write is frozen with SIGSTOP at a named point
(jobs/output/faultpoints.py, `"action": "hang"`), the other writer or reader runs, then the first is let go."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from deltalake import DeltaTable

import jobs.output.query as query_module
import jobs.output.reader as reader_module
from jobs.cli import main
from jobs.label.runner import run_label_job
from jobs.output.compact import compact_output
from jobs.output.query import run_query
from jobs.output.reader import open_output
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec
from tests.conftest import PROJECT_ROOT
from tests.jobs.output.test_compact import ROWS, write_output
from tests.support import IMAGENET_SAMPLE, imagenet_labels

MODEL = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}


def _faults(point: str, attempt: int = 1) -> dict[str, str]:
    return {"BULKLABEL_FAULTS": json.dumps([{"shard": point, "attempt": attempt, "action": "hang"}]),
            "BULKLABEL_FAULTS_ACKNOWLEDGE": "I-AM-TESTING"}  # fmt: skip


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=PROJECT_ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _wait_stopped(proc: subprocess.Popen, timeout: float = 240) -> bool:
    """True once `proc` froze itself at its fault point; False if it ended first (no such point: today's code)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED:
            return True
        time.sleep(0.1)
    raise AssertionError(f"{proc.args} neither stopped nor ended in {timeout} s")


def _resume(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def _photos(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    for row in rows:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])


def _count(out: Path) -> tuple[int, int]:
    stream = io.StringIO()
    run_query(str(out), "SELECT count(*) AS n, count(DISTINCT key) AS k FROM labels", "json", stream=stream)
    row = json.loads(stream.getvalue())
    return row["n"], row["k"]


@pytest.mark.fault(
    fault="two `bulklabel compact` of one output at once",
    injected="the first compaction frozen (SIGSTOP) after uploading its new files, before its switch; the second "
    "started then, and a query run meanwhile; then the first let go",
    expected="the second is refused in one line naming the first (compaction, job, host, pid, since), exit 3; the "
    "query answers from the generation in place; the first completes; every row once",
)
def test_two_compactions_at_once_the_second_refused_naming_the_first(tmp_path, capfd, record_property):
    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=20)
    first = _cli(["compact", str(out), "--target-mb", "1"], _faults("compact:uploaded"))
    try:
        stopped = _wait_stopped(first, timeout=120)
        capfd.readouterr()
        code = main(["compact", str(out), "--target-mb", "1"])
        refusal = capfd.readouterr().err.strip()
        during = _count(out)
    finally:
        first_code, _, first_err = _resume(first)
    assert stopped, "the first compaction never reached its stop point"
    assert code == 3, refusal
    assert len(refusal.splitlines()) == 1 and "is being written by compaction of job 'job-compact'" in refusal
    assert f"pid {first.pid}" in refusal and "since" in refusal
    assert during == (20 * ROWS, 20 * ROWS)
    assert first_code == 0, first_err[-2000:]
    assert open_output(str(out)).generation == 1 and _count(out) == (20 * ROWS, 20 * ROWS)
    record_property("measured", f"second compaction: exit {code}, '{refusal[:150]}...'; query meanwhile "
                    f"{during[0]} rows; first compaction exit {first_code}, generation 1, {20 * ROWS} rows "
                    "once")  # fmt: skip


@pytest.mark.fault(
    fault="a query that read the manifest just before a compaction's switch, and its files after the merged ones "
    "were deleted",
    injected="a whole `compact_output` run between the query's manifest read and its first file read (the reader's "
    "open_output wrapped to compact right after it returns, once)",
    expected="the query reads once more, on the new generation, and answers every row once; never 'Failed to open "
    "local file' blamed on the SQL",
)
def test_a_query_pinned_across_a_compaction_switch_answers_right(tmp_path, monkeypatch, record_property):
    out = tmp_path / "out"
    write_output(str(out), tmp_path, shards=20)
    real, calls = reader_module.open_output, []

    def then_compacted(uri, options=None):
        found = real(uri, options)
        calls.append(found.manifest.generation)
        if len(calls) == 1:
            compact_output(uri, target_bytes=1 << 20)  # switches the manifest, deletes the files `found` lists
        return found

    monkeypatch.setattr(reader_module, "open_output", then_compacted)
    monkeypatch.setattr(query_module, "open_output", then_compacted, raising=False)  # where older code looked
    stream = io.StringIO()
    run_query(str(out), "SELECT count(*) AS n, count(DISTINCT key) AS k FROM labels", "json", stream=stream)
    answer = json.loads(stream.getvalue())
    assert (answer["n"], answer["k"]) == (20 * ROWS, 20 * ROWS) and stream.getvalue().count("\n") == 1
    assert calls == [0, 1]  # pinned to generation 0, then read once more on generation 1
    record_property("measured", f"read generations {calls}; answer {answer['n']} rows, {answer['k']} keys")


def _spec_file(tmp_path: Path, photos: Path, out: Path, fmt: str = "parquet") -> Path:
    spec = {"kind": "label", "input": {"uri": str(photos), "files_per_shard": 1}, "job_id": "same-job",
            "output": {"uri": str(out), "format": fmt, "compact": "never"}, "model": MODEL, "num_workers": 1,
            "batch_size": 1}  # fmt: skip
    path = tmp_path / f"spec-{fmt}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.fault(
    fault="`bulklabel compact` while an incremental re-run of the job writes the output",
    injected="6 photos labelled, 4 added; the re-run's driver frozen (SIGSTOP) after its first new shard commits; "
    "`bulklabel compact` run then; the driver let go",
    expected="the compaction is refused in one line naming the label job (exit 3), nothing deleted; the job ends "
    "succeeded and the output is whole and queryable: every image once",
)
def test_a_compaction_while_a_job_writes_is_refused_naming_the_job(tmp_path, ray_cluster, capfd, record_property):
    photos, out = tmp_path / "photos", tmp_path / "out"
    rows = imagenet_labels()
    _photos(photos, rows[:6])
    spec = _spec_file(tmp_path, photos, out)
    first = run_label_job(LabelJobSpec.model_validate(json.loads(spec.read_text())), show_progress=False)
    assert first.status == "succeeded" and first.images == 6
    _photos(photos, rows[6:10])
    env = {"RAY_ADDRESS": ray_cluster.address_info["address"], **_faults("session:shard_committed")}
    rerun = _cli(["run", str(spec), "--quiet"], env)
    try:
        stopped = _wait_stopped(rerun)
        capfd.readouterr()
        code = main(["compact", str(out), "--target-mb", "1"])
        refusal = capfd.readouterr().err.strip()
    finally:
        rerun_code, stdout, stderr = _resume(rerun)
    assert stopped, f"the re-run never reached its stop point: exit {rerun_code}, {stderr[-3000:]}"
    assert code == 3 and len(refusal.splitlines()) == 1, refusal
    assert "is being written by label job 'same-job'" in refusal and f"pid {rerun.pid}" in refusal
    assert rerun_code == 0 and "same-job: succeeded" in stdout, stderr[-2000:]
    done = open_output(str(out))
    assert done.complete and done.manifest.totals.rows == 10 and _count(out) == (10, 10)
    record_property("measured", f"compaction during the re-run: exit {code}, '{refusal[:140]}...'; re-run exit "
                    f"{rerun_code}; output: {_count(out)[1]}/10 keys, each once, queryable")  # fmt: skip


@pytest.mark.fault(
    fault="the same label job started twice at once into one Delta table output",
    injected="two `bulklabel run` of one spec (12 photos, 12 shards, format: delta) started together on one cluster",
    expected="one writes, the other waits on the output's lease and is then refused naming the first (exit 3) or "
    "finds the job done; never exit 4; the table holds each image once, one commit per shard",
)
def test_the_same_job_twice_at_once_into_a_delta_output(tmp_path, ray_cluster, record_property):
    photos, out = tmp_path / "photos", tmp_path / "out"
    _photos(photos, imagenet_labels()[:12])
    spec = _spec_file(tmp_path, photos, out, fmt="delta")
    env = {"RAY_ADDRESS": ray_cluster.address_info["address"]}
    runs = [_cli(["run", str(spec), "--quiet"], env) for _ in range(2)]
    ended = [run.communicate(timeout=420) + (run.returncode,) for run in runs]
    codes = sorted(code for _, _, code in ended)
    assert codes in ([0, 0], [0, 3]), [err[-1500:] for _, err, _ in ended]
    for _, err, code in ended:
        if code == 3:
            line = err.strip().splitlines()[-1]
            assert "is being written by label job 'same-job'" in line and "pid" in line, err[-1500:]
    # Never both writing: a run that labelled shards says "succeeded" with fewer than 12 done before it; the other
    # was refused, or found every shard done (it waited for the lease until the first had finished).
    wrote = [out_ for out_, _, code in ended if code == 0 and "same-job: succeeded" in out_
             and "12 already done before this run" not in out_]  # fmt: skip
    assert len(wrote) == 1, [out_[-800:] for out_, _, _ in ended]
    if codes == [0, 3]:  # the refused run, run again: everything is done
        again = run_label_job(LabelJobSpec.model_validate(json.loads(spec.read_text())), show_progress=False)
        assert again.status == Outcome.ALREADY_COMPLETE
    table = DeltaTable(str(out / "table"))
    keys = table.to_pyarrow_table(columns=["key"])["key"].to_pylist()
    writes = [c for c in table.history() if c["operation"] == "WRITE"]
    assert sorted(keys) == sorted(r["file"] for r in imagenet_labels()[:12]) and len(writes) == 12
    assert _count(out) == (12, 12)
    record_property("measured", f"exit codes {codes}, {len(wrote)} run wrote; table: {len(keys)} rows for 12 keys, "
                    f"{len(writes)} append commits; folder: {_count(out)[0]} rows")  # fmt: skip
