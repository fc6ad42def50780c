"""The exactly-once promise, tried as a careless or hostile user would: what a re-run trusts is checked, two jobs
never share an output, other people's files are never touched, and a run that is mostly errors is not a success."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.label.plan import PlanError
from jobs.label.runner import JobFailed, run_label_job
from jobs.output.errors import OutputConflict
from schemas.layout import OWNER_NAME
from schemas.specs import LabelJobSpec
from tests.s3server import S3Server, WeedServer
from tests.scenarios.test_storage_outage import run_through_a_restart
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.io.storage import AccessDenied, join, open_storage

pytestmark = pytest.mark.usefixtures("ray_cluster")
MODEL = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}


def _photos(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for row in imagenet_labels()[start : start + count]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])
    return folder


def _spec(inp: str, out: str, **overrides) -> LabelJobSpec:
    fields = {"input": {"uri": inp, "files_per_shard": 2}, "output": out, "model": MODEL, "num_workers": 1,
              "batch_size": 4, "top_k": 3}  # fmt: skip
    return LabelJobSpec(**{**fields, **overrides})


def _keys(out: Path) -> list[str]:
    return sorted(ds.dataset(out, format="parquet").to_table(columns=["key"]).column("key").to_pylist())


@pytest.mark.fault(
    fault="a committed shard's Parquet file deleted (a lifecycle rule, an operator), then the job run again",
    injected="one part-*.parquet of a finished 4-shard job removed before the re-run",
    expected="the re-run notices the missing data, says so, labels that shard again; rows in = rows out",
)
def test_rerun_redoes_a_shard_whose_data_was_deleted(tmp_path, record_property):
    photos, out = _photos(tmp_path / "photos", 8), tmp_path / "out"
    spec = _spec(str(photos), str(out))
    assert run_label_job(spec, show_progress=False).status == "succeeded"
    victim = sorted(out.glob("data/part-*.parquet"))[1]
    victim.unlink()

    summary = run_label_job(spec, show_progress=False)

    shard = victim.name.removeprefix("part-").removesuffix(".parquet")
    assert summary.status == "succeeded" and summary.images == 8
    assert list(summary.shards_redone) == [shard] and "is gone" in summary.shards_redone[shard]
    assert any("redone" in line and shard in line for line in summary.lines())
    assert _keys(out) == sorted(p.name for p in photos.iterdir())
    record_property("measured", f"re-run redid 1 of 4 shards ({summary.shards_redone[shard]}); 8/8 rows, no dups")


@pytest.mark.fault(
    fault="input changed after the job finished: a tar rewritten with other photos under the same member names; "
    "a new tar added",
    injected="a finished 2-tar job; one tar rebuilt from other photos with the same names; separately a third tar",
    expected="the rewritten tar refuses the re-run before any work, naming it; the new tar alone is labelled",
)
def test_changed_input_is_refused_and_new_input_is_labelled(tmp_path, record_property):
    rows = imagenet_labels()
    names = [f"img{i}" for i in range(4)]
    tars, out = tmp_path / "tars", tmp_path / "out"
    write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows[:8]], tars, per_shard=4, keys=names * 2)
    spec = _spec(str(tars), str(out))
    assert run_label_job(spec, show_progress=False).images == 8

    # Grown input: a third tar appears; only it is labelled, and the summary says it is new.
    extra = write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows[8:12]], tmp_path / "extra", per_shard=4)
    shutil.copy(extra[0], tars / "00002.tar")
    grown = run_label_job(spec, show_progress=False)
    assert (grown.status, grown.images, grown.shards_new, grown.images_this_run) == ("succeeded", 12, 1, 4)
    assert len(_keys(out)) == 12

    # Changed input: 00000.tar rebuilt from other photos under the same member names.
    time.sleep(0.01)
    write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows[20:24]], tmp_path / "other", per_shard=4, keys=names)
    shutil.copy(tmp_path / "other" / "00000.tar", tars / "00000.tar")
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(PlanError, match=r"00000.tar.*different input") as refused:
        run_label_job(spec, show_progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing anything
    record_property("measured", f"new tar: 1 new shard, 4 rows this run, 12/12 rows; rewritten tar refused: "
                    f"{str(refused.value)[:90]}...")  # fmt: skip


def test_loose_files_added_after_the_job_are_labelled_alone_and_inside_a_shard_refused(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    files = [IMAGENET_SAMPLE / r["file"] for r in imagenet_labels()[:9]]
    for name, path in zip(["a1", "a2", "b1", "b2", "c1", "c2"], files, strict=False):
        shutil.copy(path, photos / f"{name}.jpg")
    spec = _spec(str(photos), str(out))
    assert run_label_job(spec, show_progress=False).shards == 3

    shutil.copy(files[6], photos / "d1.jpg")  # after every committed shard's key range
    shutil.copy(files[7], photos / "d2.jpg")
    grown = run_label_job(spec, show_progress=False)
    assert (grown.status, grown.images, grown.shards_new, grown.images_this_run) == ("succeeded", 8, 1, 2)

    shutil.copy(files[8], photos / "b15.jpg")  # inside the committed shard b1..b2
    with pytest.raises(PlanError, match=r"b1.jpg .. b2.jpg.*different input"):
        run_label_job(spec, show_progress=False)
    assert len(_keys(out)) == 8


@pytest.mark.fault(
    fault="stray and damaged files in the output's own folders: a `.DS_Store` in `_done/`, an empty done-marker "
    "(a disk that filled up mid-write)",
    injected="both files written into a finished job's `_done/` before its re-run",
    expected="the stray file is ignored, the empty marker's shard is labelled again, saying so; rows in = rows out",
)
def test_stray_and_empty_markers_are_ignored_or_redone(tmp_path, record_property):
    photos, out = _photos(tmp_path / "photos", 6), tmp_path / "out"
    spec = _spec(str(photos), str(out))
    run_label_job(spec, show_progress=False)
    (out / "_done" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    victim = sorted((out / "_done").glob("*.json"))[0]
    victim.write_bytes(b"")

    summary = run_label_job(spec, show_progress=False)

    assert summary.status == "succeeded" and summary.images == 6
    assert list(summary.shards_redone) == [victim.stem] and "unreadable" in summary.shards_redone[victim.stem]
    assert _keys(out) == sorted(p.name for p in photos.iterdir())
    record_property("measured", f".DS_Store ignored; empty marker → shard redone; {summary.images}/6 rows")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.fault(
    fault="the output's local disk fills up mid-job, then space is freed and the job run again",
    injected="output on a 512 KiB tmpfs, nearly filled by another file; the file removed before the re-run",
    expected="the full disk fails shards, not the output: no empty or partial file left; the re-run finishes, "
    "rows in = rows out",
)
def test_a_full_disk_fails_shards_and_the_rerun_finishes(tmp_path, record_property):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "512k"):
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk case is not exercised")
    try:
        photos, out = _photos(tmp_path / "photos", 8), disk / "out"
        filler = disk / "filler.bin"
        filler.write_bytes(b"\0" * (512 * 1024 - 40 * 1024))  # about one shard's Parquet file and marker free
        spec = _spec(str(photos), str(out), max_attempts=1, max_failed_shards=8)
        try:
            first = run_label_job(spec, show_progress=False)
            assert any("No space left" in error for error in first.failed_shards.values()), first
        except OSError as exc:  # the job manifest, written last, may not fit either
            assert exc.errno == 28, exc
        committed = len(list(out.glob("_done/*.json")))
        assert committed < 4
        damaged = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]
        assert damaged == [] and not list(out.rglob("*.tmp"))
        filler.unlink()

        summary = run_label_job(spec, show_progress=False)

        assert summary.status == "succeeded" and summary.images == 8
        assert _keys(out) == sorted(p.name for p in photos.iterdir())
        record_property("measured", f"first run: {4 - committed} of 4 shards failed with ENOSPC, no empty "
                        f"or temporary file left; re-run: succeeded, 8/8 rows")  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.fault(
    fault="other people's files in the output prefix: `_tmp/draft.docx`, `notes.txt`, another tool's "
    "`part-00000.parquet`",
    injected="the files placed under the output before the job; run with the default, then with foreign_files=keep",
    expected="default: refused before any work; keep: left byte-for-byte untouched; a foreign file under "
    "bulklabel's own names refused either way",
)
def test_foreign_files_in_the_output_are_refused_or_left_untouched(tmp_path, record_property):
    photos, out = _photos(tmp_path / "photos", 4), tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "draft.docx").write_bytes(b"someone's draft")
    (out / "notes.txt").write_bytes(b"notes")

    with pytest.raises(OutputConflict, match=r"2 file\(s\) bulklabel did not write.*foreign_files: keep"):
        run_label_job(_spec(str(photos), str(out)), show_progress=False)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["draft.docx", "notes.txt"]

    summary = run_label_job(_spec(str(photos), str(out), foreign_files="keep"), show_progress=False)
    assert summary.status == "succeeded" and summary.images == 4
    assert (out / "_tmp" / "draft.docx").read_bytes() == b"someone's draft"
    assert (out / "notes.txt").read_bytes() == b"notes"

    other = tmp_path / "other"
    other.mkdir()
    (other / "part-00000.parquet").write_bytes(b"another tool's table")
    with pytest.raises(OutputConflict, match=r"part-00000.parquet with no bulklabel owner"):
        run_label_job(_spec(str(photos), str(other), foreign_files="keep"), show_progress=False)
    assert (other / "part-00000.parquet").read_bytes() == b"another tool's table"
    record_property("measured", "default: refused naming 2 foreign files; keep: 4/4 rows, both files intact; "
                    "foreign part-00000.parquet: refused, intact")  # fmt: skip


@pytest.mark.fault(
    fault="a manifest whose keys do not exist (a wrong input), and a job whose rows are mostly errors",
    injected="a CSV manifest naming 6 keys of which none exist",
    expected="missing objects are rows saying so; the job fails (rows above max_error_fraction=0.5), naming the "
    "commonest error and an example",
)
def test_a_job_of_mostly_missing_images_fails_naming_the_error(tmp_path, record_property):
    photos = _photos(tmp_path / "photos", 1)
    manifest = photos / "manifest.csv"
    manifest.write_text("key\n" + "\n".join(f"nope-{i}.jpg" for i in range(6)) + "\n")
    spec = _spec(str(manifest), str(tmp_path / "out"))

    with pytest.raises(JobFailed) as failed:
        run_label_job(spec, show_progress=False)

    summary = failed.value.summary
    assert (summary.status, summary.images, summary.errors) == ("failed", 6, 6)
    assert "above max_error_fraction=0.5" in summary.failure_reason and "'read_failed'" in summary.failure_reason
    assert "nope-" in summary.failure_reason
    assert not (tmp_path / "out" / "_job.json").exists()  # no manifest: nothing reads it as a finished job
    record_property("measured", f"failed: {summary.failure_reason}")


def _rotate_secret(weed: WeedServer) -> S3Server:
    """A new secret for the server's one identity, as a key rotation would; the server must be restarted."""
    old = weed.server
    weed.server = S3Server(old.endpoint_url, old.access_key, secret_key=old.secret_key + "-rotated")
    identities = json.loads((weed.base / "identities.json").read_text())
    identities["identities"][0]["credentials"][0]["secretKey"] = weed.server.secret_key
    (weed.base / "identities.json").write_text(json.dumps(identities))
    return weed.server


@pytest.mark.fault(
    fault="S3 credentials rotated mid-job",
    injected="SeaweedFS restarted with a new secret for the job's key after 2 of 6 loose-file shards committed",
    expected="the job stops naming the location (AccessDenied), no row says SignatureDoesNotMatch; a re-run with "
    "the new secret labels only the missing shards; rows in = rows out",
)
def test_rotated_credentials_stop_the_job_and_the_rerun_finishes(tmp_path, record_property):
    weed = WeedServer(tmp_path / "weed")
    server = weed.start()
    try:
        server.client().create_bucket(Bucket="rotate")
        storage = open_storage("s3://rotate", server.options())
        files = [IMAGENET_SAMPLE / r["file"] for r in imagenet_labels()[:12]]
        for path in files:
            storage.upload_file(str(path), join("s3://rotate/in", path.name))
        out = tmp_path / "out"
        spec = _spec("s3://rotate/in", str(out), storage=server.options(), batch_size=1)
        rotated: list[S3Server] = []
        outcome = run_through_a_restart(weed, spec, lambda: len(list(out.glob("_done/*.json"))), down_s=0,
                                        while_down=lambda: rotated.append(_rotate_secret(weed)))  # fmt: skip
        assert isinstance(outcome.get("error"), AccessDenied), outcome
        assert "s3://rotate/in" in str(outcome["error"])
        committed = len(list(out.glob("_done/*.json")))
        errors = ds.dataset(out, format="parquet").to_table(columns=["error"]).column("error").to_pylist()
        assert all(e is None for e in errors)

        summary = run_label_job(spec.model_copy(update={"storage": rotated[0].options()}), show_progress=False)
        assert (summary.status, summary.images, summary.errors) == ("succeeded", 12, 0)
        assert _keys(out) == sorted(p.name for p in files)
        record_property("measured", f"stopped: {str(outcome['error'])[:80]}; {committed}/6 shards committed, no "
                        f"error rows; re-run with the new secret: 12/12 rows")  # fmt: skip
    finally:
        weed.stop()


def _label_process(photos: Path, out: Path, top_k: int, env: dict[str, str]) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("bulklabel")
    command = [str(cli), "label", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--quiet", "--input",
               str(photos), "--output", str(out), "--files-per-shard", "2", "--top-k", str(top_k)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.fault(
    fault="two different label jobs started at the same moment into one output prefix",
    injected="two `bulklabel label` processes (top-k 3 and top-k 5: two job ids) launched together",
    expected="exactly one claims the output and succeeds; the other exits 2 naming the owner; the output holds "
    "only the winner's rows",
)
def test_two_jobs_started_together_one_wins_the_output(tmp_path, ray_cluster_env, record_property):
    """Both drivers join the session's cluster, as two users' commands on one cluster would."""
    photos, out = _photos(tmp_path / "photos", 4), tmp_path / "out"
    procs = [_label_process(photos, out, k, ray_cluster_env) for k in (3, 5)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    loser = next(err for code, _, err in results if code == 2)
    assert "belongs to job" in loser or "holds rows of job" in loser
    # One line, no traceback; the driver's own log records (`... INFO jobs.cluster: starting Ray`) aside.
    said = [line for line in loser.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO ", line)]
    assert len(said) == 1 and said[0].startswith("error: "), loser
    owner = json.loads((out / OWNER_NAME).read_text())["job_id"]
    table = ds.dataset(out, format="parquet").to_table(columns=["key", "job_id"])
    assert set(table.column("job_id").to_pylist()) == {owner} and table.num_rows == 4
    record_property("measured", f"exit codes {codes}; loser: {said[0][:100]}; 4/4 rows, all of the winner")
