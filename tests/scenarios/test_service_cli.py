"""The job service end to end, through the CLI as a user drives it, on a real Ray cluster started with `ray start`
(tests/multinode/ray_nodes.py): a head with no CPUs and a 2-CPU worker node, so jobs compete for one node's CPUs.
What needs no real cluster (priorities, warm-pool sharing, refusals, ...) is tested on the core, test_core.py.

Every command is a separate `bulklabel` process with RAY_ADDRESS at that head and BULKLABEL_STATE at the test's job
store: the service outlives each of them, as it outlives a user's terminal.
"""

from __future__ import annotations

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

from tests.multinode.ray_nodes import MultiNodeCluster
from tests.support import IMAGENET_SAMPLE, PLANTS, assert_exactly_once, imagenet_labels
from workers.faults import ACK_ENV, ACK_VALUE, FAULTS_ENV

pytestmark = pytest.mark.multinode

CLI = str(Path(sys.executable).with_name("bulklabel"))
JOB_TIMEOUT_S = 300
MODEL = ["--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1"]


class Service:
    """A cluster, a job store, and the CLI pointed at both."""

    def __init__(self, cluster: MultiNodeCluster, state: Path):
        self.cluster, self.state = cluster, state

    def env(self) -> dict[str, str]:
        return {**self.cluster.node_env(), "RAY_ADDRESS": self.cluster.address, "BULKLABEL_STATE": str(self.state)}

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([CLI, *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"bulklabel {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
        return done

    def submit(self, *args: str) -> str:
        return self.cli("submit", *args).stdout.strip().splitlines()[-1]

    def status(self, job: str) -> dict:
        return json.loads(self.cli("status", job, "--json").stdout)

    def record(self, job: str) -> dict:
        """The job's record as the store holds it, which is what `status --json` prints (the service answers status
        from the store): waiting reads it here, so a poll is not a `bulklabel` process competing for the 2 CPUs."""
        path = self.state / "jobs" / f"{job}.json"
        for _ in range(50):  # written by rename: whole or absent (absent only before the submit returned)
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.1)
        raise AssertionError(f"no record of job {job} under {self.state}")

    def jobs(self) -> dict[str, dict]:
        return {r["job_id"]: r for r in json.loads(self.cli("list", "--json").stdout)}

    def wait_for(self, job: str, predicate, timeout: float = JOB_TIMEOUT_S, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.record(job)
            if predicate(record):
                return record
            time.sleep(0.5)
        raise AssertionError(
            f"job {job}: {what or 'condition'} not reached in {timeout:.0f}s; last: {record}\n" + self.diagnosis(job)
        )

    def diagnosis(self, job: str) -> str:
        """What a timed-out wait leaves to read: the job's log, every job's state, and Ray's own view of the cluster
        (resources in use, demands it cannot place), which is where a job waiting on an unplaceable actor shows."""
        log = self.cli("logs", job, check=False, timeout=60)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        ray_status = subprocess.run([ray_cli, "status", "--address", self.cluster.address], env=self.env(),
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
        states = {r["job_id"]: (r["state"], r["waiting_reason"]) for r in self.records()}
        stacks = _stacks_of(job, "EmbeddingActor")
        return (
            f"--- bulklabel logs {job}:\n{log.stdout[-4000:]}{log.stderr[-1000:]}\n--- jobs: {states}\n"
            f"--- ray status:\n{ray_status.stdout[-3000:]}{ray_status.stderr[-1000:]}\n--- stacks:\n{stacks[-8000:]}"
        )

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in (self.state / "jobs").glob("*.json")]

    def wait_ended(self, job: str) -> dict:
        return self.wait_for(job, lambda r: r["state"] in ("succeeded", "partial", "failed", "cancelled"),
                             what="an end")  # fmt: skip

    def stop(self) -> None:
        self.cli("service", "stop", check=False)

    def unfinished(self) -> list[str]:
        """Jobs in the store that have not ended (queued, running)."""
        return [r["job_id"] for r in self.records() if r["state"] in ("queued", "running")]


def _stacks_of(*names: str) -> str:
    """py-spy's dump of every process whose command line names one of `names` (a Ray task's or actor's process title
    holds its name): where a job that stopped moving is waiting."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    dumps = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if any(name in line for name in names) and proc.pid != os.getpid():
            done = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
            dumps.append(f"{line[:120]}\n{done.stdout}{done.stderr[-500:]}")
    return "\n".join(dumps) or f"no process named {names}"


# Every batch pauses a moment, so a job lasts long enough (about 1 s a shard) to be cancelled or killed mid-way.
SLOW = {FAULTS_ENV: json.dumps([{"action": "slow", "seconds": 0.5}]), ACK_ENV: ACK_VALUE}


@pytest.fixture(scope="module")
def cluster():
    nodes = MultiNodeCluster(env=SLOW, dashboard_on=False)
    try:
        yield nodes.start(worker_nodes=1, cpus_per_node=2)
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def module_service(cluster, tmp_path_factory):
    svc = Service(cluster, tmp_path_factory.mktemp("state"))
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def service(module_service):
    """The module cluster's service, one job store for its tests: the warm pool a test's job leaves serves the next
    test's job, as it serves a user's next one (a new service per test started two workers each time). A test that
    leaves a job unfinished stops the service, so the next one starts with the cluster's CPUs free."""
    yield module_service
    if module_service.unfinished():
        module_service.stop()


def _photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for row in imagenet_labels()[:count]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], folder / row["file"])
    return folder


def _label_args(photos: Path, out: Path, *extra: str, per_shard: int = 2) -> list[str]:
    return ["label", *MODEL, "--input", str(photos), "--output", str(out), "--files-per-shard", str(per_shard),
            "--batch-size", "1", "--shared-storage", "--quiet", *extra]  # fmt: skip


@pytest.mark.fault(
    fault="a running job cancelled through the service, then resumed",
    injected="`bulklabel cancel` once 2 of 16 shards were committed, then `bulklabel resume`",
    expected="running shards finish, nothing new starts; resume labels exactly the rest: one row per image",
)
def test_cancel_then_resume_labels_exactly_the_rest(service, tmp_path, record_property):
    # 16 shards of about a second each: a loaded CI machine takes several seconds to run the `cancel` command.
    photos = _photos(tmp_path / "photos", 32)
    job = service.submit(*_label_args(photos, tmp_path / "out"))
    service.wait_for(job, lambda r: r["progress"]["shards_done"] >= 2, what="2 shards")
    service.cli("cancel", job)
    cancelled = service.wait_ended(job)
    assert cancelled["state"] == "cancelled" and cancelled["cancelled_by"] == "cancelled by `bulklabel cancel`"
    done_at_cancel = cancelled["progress"]["shards_done"]
    assert done_at_cancel < 16 and not (tmp_path / "out" / "_job.json").exists()
    # Case 15 of issue 21: the total stays the plan's 16 shards (it showed 7/7, as if the job were complete).
    assert cancelled["progress"]["shards_total"] == 16, cancelled["progress"]
    listed = next(line for line in service.cli("list").stdout.splitlines() if line.startswith(job))
    assert " cancelled " in listed and f" {done_at_cancel}/16 " in listed, listed
    service.cli("resume", job)
    assert service.wait_ended(job)["state"] == "succeeded"
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"cancelled with {done_at_cancel}/16 shards committed (status and list: "
                                f"{done_at_cancel}/16); resume did the rest; {rows}/32 rows, no duplicates, no stray "
                                "files")  # fmt: skip


@pytest.mark.fault(
    fault="`bulklabel service stop` mid-job, then any command",
    injected="`bulklabel service stop` once 2 of 16 shards were committed; `bulklabel list` (a new service) 3 s "
    "later; then `bulklabel resume`",
    expected="the record says cancelled by the stop (not running), stays so under the new service until `resume`, "
    "which labels exactly the rest",
)
def test_service_stop_mid_job_leaves_it_cancelled_until_resume(service, tmp_path, record_property):
    # Case 7 of issue 21: the record stayed `running`, the next command's new service queued the job again on its
    # own, and `bulklabel resume` was refused ("job ... is running").
    photos = _photos(tmp_path / "photos", 32)
    job = service.submit(*_label_args(photos, tmp_path / "out"))
    service.wait_for(job, lambda r: r["progress"]["shards_done"] >= 2, what="2 shards")
    said = service.cli("service", "stop").stdout
    stopped = service.status(job)  # starts a new service
    assert stopped["state"] == "cancelled", stopped
    assert stopped["cancelled_by"] == "the job service was stopped (`bulklabel service stop`)", stopped
    done, total = stopped["progress"]["shards_done"], stopped["progress"]["shards_total"]
    assert f"{job}: cancelled at {done}/{total} shards; `bulklabel resume {job}` continues it" in said, said
    time.sleep(3)  # the new service's loop has run several rounds: nothing re-queued it
    assert service.jobs()[job]["state"] == "cancelled"
    service.cli("resume", job)
    record = service.wait_ended(job)
    assert record["state"] == "succeeded", record
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"stopped at {done}/{total} shards: recorded cancelled by the stop, still "
                                f"cancelled 3 s into the next service; resume: succeeded, {rows}/32 rows, "
                                "no duplicates")  # fmt: skip


@pytest.mark.fault(
    fault="two clusters sharing one job store (the default ~/.bulklabel/state), a command against the second "
    "while the first runs a job",
    injected="`bulklabel list` against a second `ray start` cluster (its own new service) once 2 of 32 shards "
    "were committed on the first",
    expected="the second service leaves the first cluster's live job alone: it stays running, succeeds, and "
    "`bulklabel wait` through either cluster exits 0 with exact counts",
)
def test_a_second_cluster_on_the_same_store_leaves_a_live_clusters_job_alone(service, tmp_path, record_property):
    # Case 6 of issue 21: the second cluster's service marked the live job `interrupted: its cluster went away`; the
    # first finished it, but the record stayed interrupted for ever and `wait` exited 1.
    # One worker, 32 shards of about a second: the job still runs when the second cluster's service has started.
    photos = _photos(tmp_path / "photos", 64)
    second = MultiNodeCluster(dashboard_on=False).start(worker_nodes=0)
    try:
        job = service.submit(*_label_args(photos, tmp_path / "out"), "--max-workers", "1")
        service.wait_for(job, lambda r: r["progress"]["shards_done"] >= 2, what="2 shards")
        other = Service(second, service.state)
        seen = other.jobs()[job]  # starts the second cluster's service, which looks at the store's jobs
        waited = other.cli("wait", job, "--quiet", check=False, timeout=JOB_TIMEOUT_S)
        other.stop()
    finally:
        second.stop()
    first_port = service.cluster.address.rsplit(":", 1)[1]
    assert seen["state"] == "running" and seen["cluster"].split("/")[0].endswith(f":{first_port}"), seen
    assert waited.returncode == 0, waited.stdout + waited.stderr
    record = service.status(job)
    assert record["state"] == "succeeded" and record["last_error"] is None, record
    assert service.cli("wait", job, "--quiet").returncode == 0
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"seen by the second cluster's service as {seen['state']} at "
                                f"{seen['progress']['shards_done']} shards of 32; `wait` through it exited 0; job "
                                f"{record['state']}; {rows}/64 rows, no duplicates")  # fmt: skip


@pytest.mark.fault(
    fault="the job service's process SIGKILLed mid-job",
    injected="SIGKILL to the service actor's process after 2 of 16 shards were committed",
    expected="Ray restarts the service, which continues the job; status answers throughout; exact counts",
)
def test_service_killed_mid_job_continues_it(service, tmp_path, record_property):
    # The pid is read before the job starts and the kill follows the status call that sees 2 shards: a `service
    # status` command between them took long enough on a loaded CI machine for the job to end first.
    photos = _photos(tmp_path / "photos", 32)
    job = service.submit(*_label_args(photos, tmp_path / "out"))
    pid = json.loads(service.cli("service", "status").stdout)["pid"]
    at_kill = service.wait_for(job, lambda r: r["progress"]["shards_done"] >= 2, what="2 shards")
    os.kill(pid, signal.SIGKILL)
    assert at_kill["state"] == "running" and at_kill["progress"]["shards_done"] < 16, at_kill
    states = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        record = service.status(job)  # each call must answer, during the restart too
        states.append(record["state"])
        if record["state"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    assert states[-1] == "succeeded" and set(states) <= {"queued", "running", "succeeded"}, states
    new_pid = json.loads(service.cli("service", "status").stdout)["pid"]
    assert new_pid != pid and not psutil.pid_exists(pid)
    assert record["attempts"] >= 2 and record["progress"]["images"] == 32
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"service pid {pid} killed at {at_kill['progress']['shards_done']}/16 shards; "
                                f"restarted as {new_pid}; job succeeded after {record['attempts']} attempts; "
                                f"{rows}/32 rows, no duplicates")  # fmt: skip


@pytest.mark.fault(
    fault="the whole Ray cluster stopped mid-job, a new one started with the same job store",
    injected="every process of the cluster killed after 2 of 16 shards (one worker); a new head and worker node "
    "started",
    expected="`list` on the new cluster shows the job interrupted, naming the old cluster; `resume` finishes it with "
    "exact counts",
)
def test_cluster_lost_mid_job_is_interrupted_then_resumed(tmp_path, record_property):
    # One worker, 16 shards of about a second: the cluster is gone well before the job could finish (a job that
    # did finish first is recorded as the success its manifest proves, not as interrupted).
    photos, state = _photos(tmp_path / "photos", 32), tmp_path / "state"
    old = MultiNodeCluster(env=SLOW, dashboard_on=False).start(worker_nodes=1, cpus_per_node=2)
    try:
        svc = Service(old, state)
        job = svc.submit(*_label_args(photos, tmp_path / "out"), "--max-workers", "1")
        svc.wait_for(job, lambda r: r["progress"]["shards_done"] >= 2, what="2 shards")
    finally:
        old.stop()
    assert not (tmp_path / "out" / "_job.json").exists(), "the job finished before its cluster was stopped"
    new = MultiNodeCluster(dashboard_on=False).start(worker_nodes=1, cpus_per_node=2)
    try:
        svc = Service(new, state)
        listed = svc.jobs()[job]
        assert listed["state"] == "interrupted", listed
        assert listed["last_error"].startswith("interrupted: its cluster ") and "went away" in listed["last_error"]
        svc.cli("resume", job)
        record = svc.wait_ended(job)
        svc.stop()
    finally:
        new.stop()
    assert record["state"] == "succeeded"
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"listed on the new cluster as {listed['last_error']!r}; resumed to {rows}/32 rows, "
                                "no duplicates")  # fmt: skip


@pytest.mark.fault(
    fault="a job submitted to a cluster with no CPUs (head started with --num-cpus 0, no worker node)",
    injected="`bulklabel submit --workers 2` to the bare head; a 2-CPU node started (`ray start --address`) 5 s later",
    expected="the job waits as queued with its reason (not an error); the new node picks it up, its pool grows to 2 "
    "workers there, and it finishes",
)
def test_a_job_waits_for_a_node_then_runs_on_it(tmp_path, record_property):
    photos = _photos(tmp_path / "photos", 12)
    cluster = MultiNodeCluster(env=SLOW, dashboard_on=False)
    try:
        cluster.start(worker_nodes=0)
        svc = Service(cluster, tmp_path / "state")
        job = svc.submit(*_label_args(photos, tmp_path / "out", "--workers", "2"))
        waiting = svc.wait_for(job, lambda r: r["waiting_reason"], timeout=60, what="a waiting reason")
        assert waiting["state"] == "queued" and "node" in waiting["waiting_reason"], waiting
        time.sleep(5)
        assert svc.status(job)["state"] == "queued"
        cluster.add_worker_node("late", cpus=2)
        record = svc.wait_ended(job)
        pools = json.loads(svc.cli("service", "status").stdout)["pools"]
        svc.stop()
    finally:
        cluster.stop()
    assert record["state"] == "succeeded", record
    labelled = [worker["shards_labelled"] for worker in pools[0]["worker_details"]]
    assert len(labelled) == 2 and min(labelled) >= 1 and sum(labelled) == 6, pools
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"queued: {waiting['waiting_reason']!r}; ran once the node joined, on 2 workers "
                                f"(shards {labelled}); {rows}/12 rows")  # fmt: skip


def _small_plants(folder: Path, per_class: int = 4) -> Path:
    for name in ("Potato___Early_blight", "Potato___healthy"):
        (folder / name).mkdir(parents=True)
        for photo in sorted((PLANTS / name).iterdir())[:per_class]:
            shutil.copy(photo, folder / name / photo.name)
    return folder


def test_token_auth_cluster_metrics_and_no_credentials_in_records(tmp_path):
    """On a cluster with Ray token authentication: the CLI with the token works, without it is refused; the
    service's metrics reach the nodes' Prometheus endpoints; job records, logs and status hold no credentials.
    A fine-tune runs there too, as the service runs one (a Ray task of the service), to its published version."""
    token, secret = "bl-test-" + os.urandom(16).hex(), "SECRET-" + os.urandom(8).hex()
    cluster = MultiNodeCluster(env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        cluster.start(worker_nodes=1, cpus_per_node=2)
        svc = Service(cluster, tmp_path / "state")
        photos = _photos(tmp_path / "photos", 4)
        spec = tmp_path / "job.yaml"
        spec.write_text(json.dumps({"kind": "label", "input": {"uri": str(photos)}, "output": str(tmp_path / "out"),
                                    "model": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
                                    "shared_storage": True, "storage": {"access_key_id": "AKIA" + secret[:8],
                                                                        "secret_access_key": secret}}))  # fmt: skip
        job = svc.submit("file", str(spec))
        tune = svc.submit("finetune", "--data", str(_small_plants(tmp_path / "plants")), "--base", "mobilenet_v2",
                          "--weights", "IMAGENET1K_V1", "--output", str(tmp_path / "model"), "--method",
                          "linear-probe", "--image-size", "64", "--quiet")  # fmt: skip
        record, tuned = svc.wait_ended(job), svc.wait_ended(tune)
        without = {k: v for k, v in svc.env().items() if k != "RAY_AUTH_TOKEN"}
        refused = subprocess.run([CLI, "list"], env=without, capture_output=True, text=True, timeout=120)
        texts = [svc.cli("status", job, "--json").stdout, svc.cli("logs", job).stdout, svc.cli("logs", tune).stdout,
                 *(p.read_text() for p in (tmp_path / "state").rglob("*") if p.is_file())]  # fmt: skip
        metrics = _scrape(cluster, "bulklabel_images_labelled")
        svc.stop()
    finally:
        cluster.stop()
    assert record["state"] == "succeeded", record
    assert tuned["state"] == "succeeded" and (tmp_path / "model" / "v1").is_dir(), tuned
    assert refused.returncode != 0
    assert not any(secret in text or token in text for text in texts)
    assert any(f'job="{job}"' in line and line.rstrip().endswith(" 4.0") for line in metrics), metrics


def _scrape(cluster: MultiNodeCluster, name: str, timeout: float = 60) -> list[str]:
    """The lines of metric `name` from every node's Prometheus endpoint (Ray exports every few seconds)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for port in cluster.metrics_ports.values():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    text = response.read().decode()
                lines += [ln for ln in text.splitlines() if name in ln and not ln.startswith("#")]
            except OSError:
                continue
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(2)


def test_curation_jobs_submitted_before_their_input_fail_in_one_line_then_resume(service, tmp_path):
    """Each curation kind through `bulklabel submit` and `resume`: queued before what it reads exists (a label
    output, a labelled set), it fails naming it; once that exists, `resume` runs it to its committed table."""
    labels, plants, pool = tmp_path / "labels", tmp_path / "plants", tmp_path / "pool"
    jobs = {
        "dedupe": service.submit("dedupe", str(labels), "--out", str(tmp_path / "dupes")),
        "review-queue": service.submit("review-queue", str(labels), "--out", str(tmp_path / "queue"), "-n", "4"),
        "label-issues": service.submit("label-issues", "--data", str(plants), "--base", "mobilenet_v2", "--weights",
                                       "IMAGENET1K_V1", "--out", str(tmp_path / "issues"), "--no-sheet"),
        "self-train": service.submit("self-train", "--data", str(plants), "--pool", str(pool), "--base",
                                     "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--output", str(tmp_path / "models"),
                                     "--method", "linear-probe", "--target-precision", "0.5", "--min-support", "1",
                                     "--shared-storage"),
    }  # fmt: skip
    for kind, job in jobs.items():
        record = service.wait_ended(job)
        assert record["state"] == "failed" and record["kind"] == kind, record
        assert str(plants if kind in ("label-issues", "self-train") else labels) in record["last_error"], record
        assert "\n" not in record["last_error"]
    label = service.submit(*_label_args(_photos(tmp_path / "photos", 6), labels, per_shard=3))
    _small_plants(plants)
    pool.mkdir()
    for name in ("Potato___Early_blight", "Potato___healthy"):  # three more of each class, unlabelled
        for photo in sorted((PLANTS / name).iterdir())[4:7]:
            shutil.copy(photo, pool / photo.name)
    assert service.wait_ended(label)["state"] == "succeeded"
    for job in jobs.values():
        service.cli("resume", job)
    ended = {kind: service.wait_ended(job) for kind, job in jobs.items()}
    assert {r["state"] for r in ended.values()} == {"succeeded"}, ended
    assert all(r["attempts"] == 2 for r in ended.values())
    counted = service.cli("query", str(tmp_path / "dupes"), "SELECT count(*) AS n, count(DISTINCT key) AS k FROM "
                          "duplicates", "--format", "json").stdout  # fmt: skip
    assert json.loads(counted) == {"n": 6, "k": 6}
    ranked = service.cli("query", str(tmp_path / "queue"), "SELECT rank FROM queue ORDER BY rank", "--format", "json")
    assert [json.loads(line)["rank"] for line in ranked.stdout.splitlines()] == [1, 2, 3, 4]
    scored = service.cli("query", str(tmp_path / "issues"), "SELECT count(*) AS n FROM issues WHERE self_confidence "
                         "IS NOT NULL", "--format", "json").stdout  # fmt: skip
    assert json.loads(scored) == {"n": 8}
    assert "table:    duplicates, 6 rows" in service.cli("logs", jobs["dedupe"]).stdout
    card = json.loads((tmp_path / "models" / "v2" / "model_card.json").read_text())
    assert card["self_training"]["started_from"] == "models:v1" and card["self_training"]["pool_images"] == 6
