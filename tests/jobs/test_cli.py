"""The `bulklabel` command line, run as users run it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import ray.exceptions
from pydantic import ValidationError

from jobs import cli
from jobs.cli import main
from jobs.errors import BadInput, InfrastructureError, WorkersLost, exit_code_for
from jobs.label.placement import PlacementError
from schemas.outcome import Outcome
from schemas.spec_files import SpecError
from schemas.specs import LabelJobSpec
from tests.schemas.test_specs import ALIAS_BOMB
from tests.support import IMAGENET_SAMPLE, imagenet_labels
from workers.io.storage import AccessDenied, ObjectMissing, StorageError, StoreUnavailable


def test_bad_spec_file_exits_2_naming_the_field(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("kind: label\ninput: {uri: ./in}\noutput: ./out\nmodel: {name: resnet50}\nbatch_size: -4\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "-4" in err


def test_unknown_model_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code = main(["label", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "resnet5O"])
    assert code == 2
    assert "unknown model 'resnet5O'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_input_fails_fast_with_its_name(tmp_path, capsys):
    code = main(["label", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--model", "resnet18"])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_unwritable_output_fails_fast(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(IMAGENET_SAMPLE / imagenet_labels()[0]["file"], tmp_path / "in")  # an input that plans
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["label", "--input", str(tmp_path / "in"), "--output", str(blocker / "out"), "--model", "resnet18"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(blocker / "out") in err and err.count("\n") == 1


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    assert "files_per_shard" in json.loads(capsys.readouterr().out)["$defs"]["InputSpec"]["properties"]


@pytest.mark.slow
def test_label_command_resolves_real_weights_offline(tmp_path, ray_cluster_env):
    """The README's promise: after set-up, this command works with no network. It joins the session's cluster (a
    private one costs seconds here); the command on its own local Ray is tested in tests/jobs/test_cluster.py
    (the stale address file) and tests/scenarios/test_interruptions.py (the cluster stopped)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in imagenet_labels()[:6]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos)
    cli = Path(sys.executable).with_name("bulklabel")
    args = [str(cli), "label", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--quiet",
            "--input", str(photos), "--output", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(args, env=ray_cluster_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "succeeded" in done.stdout
    table = ds.dataset(tmp_path / "out", format="parquet").to_table()
    assert table.num_rows == 6
    assert set(table.column("model").to_pylist()) == {"mobilenet_v2:IMAGENET1K_V1"}
    truth = {r["file"]: r["name"].replace("_", " ") for r in imagenet_labels()[:6]}
    hits = sum(truth[k].lower() in [t.lower() for t in top] for k, top in
               zip(table.column("key").to_pylist(), table.column("topk_labels").to_pylist(), strict=True))  # fmt: skip
    assert hits >= 4


def _validation_error() -> ValidationError:
    try:
        LabelJobSpec(input={"uri": "s3://a/b"}, output="s3://c/d", model={"name": "x"}, batch_size=-1)
    except ValidationError as exc:
        return exc
    raise AssertionError("the spec validated")


def _ray_task_error(cause: BaseException) -> BaseException:
    return ray.exceptions.RayTaskError("label_shard", "traceback", cause).as_instanceof_cause()


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: SpecError("job.yaml: aliases"), 2),
        (_validation_error, 2),
        (lambda: PlacementError("num_workers=64"), 2),
        (lambda: BadInput("bad"), 2),
        (lambda: StorageError("no bucket in s3://"), 2),
        (lambda: ObjectMissing("s3://b/x does not exist"), 2),
        (lambda: FileNotFoundError(errno.ENOENT, "No such file", "job.yaml"), 2),
        (lambda: StoreUnavailable("cannot list s3://b/x: store unreachable"), 3),
        (lambda: AccessDenied("access to s3://b/x denied"), 3),
        (lambda: InfrastructureError("cluster gone"), 3),
        (lambda: WorkersLost("workers died 5 times"), 3),
        (lambda: ray.exceptions.RaySystemError("raylet died"), 3),
        (lambda: ray.exceptions.GetTimeoutError("get timed out"), 3),
        (lambda: ConnectionError("could not connect to the GCS at 10.0.0.1:6379"), 3),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), 3),
        (lambda: _ray_task_error(StoreUnavailable("down")), 3),
        (lambda: _ray_task_error(KeyError("bug")), 4),
        (lambda: KeyError("bug"), 4),
        (lambda: ValueError("a bug's ValueError, not a user's"), 4),
        (lambda: TypeError("bug"), 4),
    ],
)
def test_exit_code_for_each_kind_of_error(make, code):
    assert exit_code_for(make()) == code


def test_failed_jobs_exit_1_classified_without_importing_their_modules():
    from jobs.finetune import FinetuneFailed
    from jobs.label.runner import JobFailed

    assert exit_code_for(FinetuneFailed("training failed")) == 1
    assert exit_code_for(JobFailed.__new__(JobFailed)) == 1
    script = "import sys, jobs.errors, jobs.cli; sys.exit('torch' in sys.modules or 'ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 0


def test_the_label_commands_modules_import_no_pandas():
    """pyarrow.dataset imports pandas (a third of a second of CPU): the modules a `bulklabel label` loads before it
    connects import it only where a dataset is scanned, so every command starts that much sooner."""
    modules = "jobs.cli, jobs.label.runner, jobs.output.reader, jobs.output.results, jobs.service.client"
    loaded = "sorted(m for m in ('pandas', 'pyarrow.dataset', 'torch') if m in sys.modules)"
    script = f"import sys, {modules}; sys.exit({loaded} or None)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_internal_error_is_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys, caplog):
    def broken(args):
        raise KeyError("shard-7")

    monkeypatch.setattr(cli, "_cmd_schema", broken)  # a bug, injected where `schema` would run
    assert main(["schema"]) == 4
    err = capsys.readouterr().err
    assert err == "internal error: KeyError: 'shard-7' (run with -v for the traceback)\n"
    with caplog.at_level("DEBUG", logger="bulklabel"):
        assert main(["-v", "schema"]) == 4
    # The traceback as text, through the credential masking (schemas.masking) like every other error path.
    assert any("Traceback" in r.getMessage() and "KeyError: 'shard-7'" in r.getMessage() for r in caplog.records)


def test_validation_errors_are_bounded_and_mask_secrets(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    fields = "".join(f"extra_{i}: {'x' * 20_000}\n" for i in range(30))
    spec.write_text(
        "kind: label\ninput: {uri: s3://a/b}\noutput: s3://c/d\nmodel: {name: resnet50}\n"
        "storage: {secret_access_key: hunter2hunter2}\n" + fields
    )
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"invalid job spec {spec}: 31 problems\n")
    assert "... and 11 more" in err and "hunter2hunter2" not in err
    assert len(err) < 20 * 400 and max(len(line) for line in err.splitlines()) < 400


@pytest.mark.fault(
    fault="hostile spec files: an alias bomb, a python tag, an oversized excerpt",
    injected="a 605-byte YAML of nested aliases (387 million values), !!python/object/apply, 30 bad 20 kB fields",
    expected="each refused before any work, exit 2, one bounded error, no traceback; in milliseconds and kilobytes",
)
def test_hostile_spec_files_are_refused_quickly_in_one_bounded_error(tmp_path, capsys, record_property):
    cases = {
        "alias bomb": ALIAS_BOMB,
        "python tag": "kind: !!python/object/apply:os.system ['touch pwned']\n",
        "oversized excerpt": "kind: label\nbatch_size: " + "x" * 500_000 + "\n",
    }
    measured = []
    for name, text in cases.items():
        spec = tmp_path / f"{name.replace(' ', '-')}.yaml"
        spec.write_text(text)
        tracemalloc.start()
        started = time.perf_counter()
        code = main(["run", str(spec)])
        elapsed, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and str(spec) in err, (name, err[:500])
        assert elapsed < 1 and peak < 16 << 20 and len(err) < 2000, (name, elapsed, peak, len(err))
        measured.append(f"{name}: exit {code} in {elapsed * 1000:.0f} ms, {peak / 2**20:.1f} MB, {len(err)} chars")
    assert not (tmp_path / "pwned").exists()
    record_property("measured", "; ".join(measured))


def _cli_in_subprocess(args: list[str], attempts: int) -> tuple[subprocess.CompletedProcess, float]:
    """The command in its own process, as a user runs it, with S3 retries cut to `attempts` (the failure itself is
    real: nothing listens at the endpoint)."""
    script = (f"import sys; from workers.io.storage import S3Storage; S3Storage.RETRY_ATTEMPTS = {attempts}; "
              "from jobs.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - started


@pytest.mark.fault(
    fault="user-caused failures: unreachable endpoint, bad spec, missing spec file, too many workers",
    injected="--endpoint-url http://127.0.0.1:1 (nothing listening), batch_size: -4, a missing job.yaml, "
    "--workers 64 on a 2-CPU Ray",
    expected="one line on stderr naming the problem, no traceback; exit 3 for the store, 2 for the rest",
)
def test_user_caused_failures_end_in_one_line_and_their_exit_code(tmp_path, capsys, ray_cluster, record_property):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGENET_SAMPLE / imagenet_labels()[0]["file"], photos)
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("kind: label\ninput: {uri: s3://in/x}\noutput: s3://out/x\nmodel: {name: resnet50}\n"
                        "batch_size: -4\n")  # fmt: skip
    label = ["label", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--quiet"]
    measured = []

    done, elapsed = _cli_in_subprocess(
        [*label, "--input", "s3://b/x", "--output", str(tmp_path / "o1"), "--endpoint-url", "http://127.0.0.1:1"], 2
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("error: ") and "127.0.0.1:1" in last and "s3://b/x" in last, last
    measured.append(f"unreachable endpoint: exit 3 in {elapsed:.1f} s (2 tries, process start included)")

    cases = {
        "bad spec": (["run", str(bad_spec)], 2, "batch_size"),
        "missing spec file": (["run", str(tmp_path / "nope.yaml")], 2, "nope.yaml"),
        "64 workers": ([*label, "--input", str(photos), "--output", str(tmp_path / "o2"), "--workers", "64"], 2,
                       "num_workers=64 needs at least 32 CPUs at 0.5 CPU each; the cluster has 2"),
    }  # fmt: skip
    for name, (argv, code, named) in cases.items():
        started = time.perf_counter()
        assert main(argv) == code, name
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        measured.append(f"{name}: exit {code} in {time.perf_counter() - started:.1f} s")
    record_property("measured", "; ".join(measured) + "; each one line on stderr")


KEY_ID, SECRET = "AKIAEXAMPLEKEYID0001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET0001"


@pytest.mark.fault(
    fault="a spec whose storage is a YAML list by mistake (`- access_key_id: ...`), for `run` and `submit`",
    injected="spec files with `storage:` as a one-item list holding both keys: of kind label, of kind finetune, "
    "and without kind (the error then echoes the whole spec); each run with -v (the traceback logged too)",
    expected="exit 2, one line naming `storage`, neither key anywhere on stderr or in the debug log (masked as ***)",
)
def test_a_storage_list_by_mistake_never_echoes_the_secret(tmp_path, capsys, caplog, record_property):
    storage = f"storage:\n  - access_key_id: {KEY_ID}\n    secret_access_key: {SECRET}\n    region: eu-west-1\n"
    specs = {
        "label": "kind: label\ninput: {uri: ./in}\noutput: ./out\nmodel: {name: resnet50}\n",
        "finetune": "kind: finetune\ndata: {uri: ./in}\nbase: {name: resnet50}\noutput: ./out\n",
        "no kind": "input: {uri: ./in}\noutput: ./out\nmodel: {name: resnet50}\n",
    }
    measured = []
    caplog.set_level("DEBUG")
    for name, text in specs.items():
        spec = tmp_path / f"{name.replace(' ', '-')}.yaml"
        spec.write_text(text + storage)
        for command in ("run", "submit"):
            assert main(["-v", command, str(spec)]) == 2, (name, command)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "storage" in err and "***" in err, (name, command, err)
            assert KEY_ID not in err and SECRET not in err, (name, command, err)
        measured.append(f"{name}: exit 2 for run and submit, {len(err)} chars, keys shown as ***")
    assert "the command failed" in caplog.text and KEY_ID not in caplog.text and SECRET not in caplog.text
    record_property("measured", "; ".join(measured) + "; neither key in the -v traceback either")


class _Summary:
    """A finished run's summary as the CLI reads it: its outcome and its lines."""

    def __init__(self, status):
        self.status = status

    def lines(self) -> list[str]:
        return [f"job x: {self.status}"]


_EXITS = {"succeeded": 0, "partial": 0, "already_complete": 0, "failed": 1, "cancelled": 130}


@pytest.mark.parametrize("outcome", list(Outcome), ids=str)
def test_a_job_exits_by_its_outcome_through_the_table(tmp_path, monkeypatch, outcome):
    import jobs.label.runner

    spec = tmp_path / "job.yaml"
    spec.write_text(f"kind: label\ninput: {{uri: {tmp_path / 'in'}}}\noutput: {tmp_path / 'out'}\nmodel: {{name: x}}\n")
    monkeypatch.setattr(jobs.label.runner, "run_label_job", lambda spec, show_progress: _Summary(outcome))
    assert set(cli.EXIT_BY_OUTCOME) == set(Outcome)  # every outcome has its code: no default is needed
    assert main(["run", str(spec), "--quiet"]) == _EXITS[outcome.value]


def test_an_outcome_without_an_exit_code_is_an_internal_error_never_a_success(tmp_path, monkeypatch, capsys):
    import jobs.label.runner

    spec = tmp_path / "job.yaml"
    spec.write_text(f"kind: label\ninput: {{uri: {tmp_path / 'in'}}}\noutput: {tmp_path / 'out'}\nmodel: {{name: x}}\n")
    monkeypatch.setattr(jobs.label.runner, "run_label_job", lambda spec, show_progress: _Summary(Outcome.SUCCEEDED))
    monkeypatch.delitem(cli.EXIT_BY_OUTCOME, Outcome.SUCCEEDED)  # a new outcome nobody mapped
    assert main(["run", str(spec), "--quiet"]) == 4
    assert "internal error: UnmappedOutcome: no exit code for the job outcome" in capsys.readouterr().err


def test_in_process_commands_start_without_the_job_kinds_and_the_service():
    """`bulklabel predict` must answer in under 3 s with torch's 2 s of imports: its parser loads none of the job
    kinds, the service's commands or their specs (half a second), and its path loads no faiss."""
    code = ("import sys; from jobs.cli import main; main(['models', 'mobilenet_v2', '--json']); "
            "print(sorted(m for m in ('jobs.kinds', 'jobs.service.commands', 'faiss', 'ray') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stderr[-2000:]
