"""The whole system held to its promise under stress, on a `ray start` cluster (tests/multinode/ray_nodes.py: a head
with no CPUs and a 2-CPU worker node): load (100 small jobs at once) and chaos (label workers killed all through
a 200-shard job, and the service once). Every row once and every record right at the end."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest

from jobs.output.lease import LeaseRecord
from jobs.service.store import JobStore
from schemas.layout import DATA_FILE, DONE_DIR, LEASE_FILE, MANIFEST_NAME, OWNER_NAME
from tests.multinode.ray_nodes import MultiNodeCluster
from tests.scenarios.test_service_cli import JOB_TIMEOUT_S, Service, _label_args
from tests.support import IMAGENET_SAMPLE, assert_exactly_once, imagenet_labels
from workers.faults import ACK_ENV, ACK_VALUE, FAULTS_ENV

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

LOAD_JOBS = 100
# A call to a busy service still answers within this (the load row's own bound; measured p95s are far below it on
# a loaded 2-core machine): a service whose loop holds its lock through a whole job's bookkeeping would not.
LATENCY_P95_BOUND_S = 10.0


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


@pytest.mark.fault(
    fault="load: 100 small label jobs submitted to the job service at once",
    injected="100 jobs of 1-2 photos each (distinct outputs) through `jobs.submit` from 16 threads; `status` and "
    "`list` polled until all end",
    expected="every job succeeded with exactly one row per image; status and list answer throughout (p95 measured)",
)
def test_load_a_hundred_jobs_at_once(tmp_path, record_property):
    photos = [IMAGENET_SAMPLE / row["file"] for row in imagenet_labels()]
    specs, inputs = [], {}
    for index in range(LOAD_JOBS):
        folder = tmp_path / "in" / f"{index:03d}"
        folder.mkdir(parents=True)
        for photo in photos[index * 2 : index * 2 + 1 + index % 2]:  # 1 or 2 photos, none shared between jobs
            shutil.copy(photo, folder / photo.name)
        out = tmp_path / "out" / f"{index:03d}"
        inputs[str(out)] = folder
        specs.append({"kind": "label", "input": {"uri": str(folder), "files_per_shard": 1}, "output": str(out),
                      "model": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, "batch_size": 1,
                      "shared_storage": True})  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps({"specs": specs}))
    cluster = MultiNodeCluster(dashboard_on=False).start(worker_nodes=1, cpus_per_node=2)
    svc = Service(cluster, tmp_path / "state")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "tests.scenarios.stress_driver", str(tmp_path / "plan.json"),
                               str(tmp_path / "result.json")], env=svc.env(), capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        seconds = time.monotonic() - started
        svc.stop()
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    records = result["records"]
    assert len(set(result["jobs"])) == LOAD_JOBS and set(records) == set(result["jobs"])
    states = {job: r["state"] for job, r in records.items()}
    assert set(states.values()) == {"succeeded"}, {j: (s, records[j]["last_error"]) for j, s in states.items()
                                                   if s != "succeeded"}  # fmt: skip
    rows = 0
    for record in records.values():
        rows += assert_exactly_once(Path(record["output"]), inputs[record["output"]])
        assert record["progress"]["images"] == len(list(inputs[record["output"]].iterdir())), record
    p95 = {call: _p95(values) for call, values in result["latencies"].items()}
    print(f"load: {LOAD_JOBS} jobs, {rows} rows in {seconds:.0f} s; p95 latency: status {p95['status']:.2f} s, "
          f"list {p95['list']:.2f} s")  # fmt: skip
    assert max(p95.values()) < LATENCY_P95_BOUND_S, p95
    calls = {call: len(values) for call, values in result["latencies"].items()}
    record_property("measured", f"{LOAD_JOBS}/{LOAD_JOBS} succeeded, {rows}/{rows} rows once, in {seconds:.0f} s; "
                                f"p95 status {p95['status']:.2f} s ({calls['status']} calls), list "
                                f"{p95['list']:.2f} s ({calls['list']} calls)")  # fmt: skip


CHAOS_SHARDS = 200
CHAOS_WORKERS = 3  # a kill takes one worker of three: the job moves on the others while Ray starts a new one
KILL_EVERY_SHARDS = 4  # a kill each time this many more shards were committed: paced by the job, not the clock
# Every batch pauses a moment (200 shards of 1 photo on 3 workers: at least 7 s of labelling). Without it a quiet
# machine labelled the 200 photos in about 20 s and the killer, looking every half second, got only 3 kills in.
CHAOS_SLOW = {FAULTS_ENV: json.dumps([{"action": "slow", "seconds": 0.1}]), ACK_ENV: ACK_VALUE}
# Kills stop after this many: each costs a worker's start (seconds of CPU on 2 cores), and a longer job on a loaded
# machine got 13 in, which tests nothing the first 8 did not.
MAX_KILLS = 8


class WorkerKiller(threading.Thread):
    """SIGKILLs a random live label worker of the cluster each time the job has committed `every_shards` more
    shards (`progress()`, read every half second), MAX_KILLS times at most. Paced by the job's progress, not by the
    clock: on a loaded 2-core machine a worker takes tens of seconds to start, so kills every few seconds could
    outpace every start (testing only that a job with no workers waits), and on a quick one the job could end after
    a few kills."""

    def __init__(self, cluster: MultiNodeCluster, every_shards: int, progress):
        super().__init__(daemon=True)
        self.cluster, self.every_shards, self.progress = cluster, every_shards, progress
        self.killed: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        next_kill_at = self.every_shards
        while len(self.killed) < MAX_KILLS and not self.halt.wait(0.5):
            try:
                done = self.progress()
            except (OSError, ValueError):  # the store answers on the next try
                continue
            if done < next_kill_at:
                continue
            victim = self._victim()
            if victim is None:  # none alive now (the service restarting its pool): the next look tries again
                continue
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:  # it ended on its own between the listing and the kill
                continue
            self.killed.append(victim)
            next_kill_at = done + self.every_shards

    def _victim(self) -> int | None:
        """A live label worker's pid, checked against the process's title (Ray names it `ray::LabelWorkerActor`):
        the State API's pid of an actor can lag the process it names, and no other process may be hit."""
        pids = [a.pid for a in self.cluster.worker_actors("ALIVE") if a.pid and a.pid not in self.killed]
        random.shuffle(pids)
        for pid in pids:
            try:
                if "LabelWorkerActor" in " ".join(psutil.Process(pid).cmdline()):
                    return pid
            except psutil.Error:
                continue
        return None


@pytest.mark.fault(
    fault="chaos: label workers SIGKILLed all through a 200-shard job, and the job service once",
    injected="SIGKILL to a random live label worker (of 3, each batch paused 0.1 s) each time 4 more shards were "
    "committed (pids from Ray's State API), 8 times at most; SIGKILL to the service's process once 1/4 of the "
    "shards were committed",
    expected="the job succeeds: its record says succeeded with 200/200 shards; every image's row exactly once",
)
def test_chaos_workers_and_the_service_killed_during_a_job(tmp_path, record_property):
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in imagenet_labels()[:CHAOS_SHARDS]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    cluster = MultiNodeCluster(env=CHAOS_SLOW).start(worker_nodes=1, cpus_per_node=CHAOS_WORKERS)
    svc = Service(cluster, tmp_path / "state")
    store = JobStore(str(svc.state))
    killer = WorkerKiller(cluster, KILL_EVERY_SHARDS, lambda: store.get(job).progress.shards_done)
    started = time.monotonic()
    try:
        job = svc.submit(*_label_args(photos, tmp_path / "out", "--workers", str(CHAOS_WORKERS), per_shard=1))
        service_pid = json.loads(svc.cli("service", "status").stdout)["pid"]
        service_killed_at = None
        killer.start()
        deadline = time.monotonic() + 3 * JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            # The store, read directly: a `status` command a second would take a core of this 2-core machine.
            record = store.get(job)
            if not record.state.is_active():
                break
            if service_killed_at is None and record.progress.shards_done >= CHAOS_SHARDS // 4:
                os.kill(service_pid, signal.SIGKILL)
                service_killed_at = record.progress.shards_done
            time.sleep(1.0)
        killer.halt.set()
        killer.join()
        seconds = time.monotonic() - started
        final = svc.status(job)  # the record as the user sees it, after the service's restart
        new_pid = json.loads(svc.cli("service", "status").stdout)["pid"]
        svc.stop()
    finally:
        killer.halt.set()
        cluster.stop()
    assert final["state"] == "succeeded", final
    progress = final["progress"]
    assert (progress["shards_total"], progress["shards_done"], progress["images"]) == (CHAOS_SHARDS,) * 3, progress
    assert service_killed_at is not None and new_pid != service_pid and final["attempts"] >= 2, final
    assert len(killer.killed) >= 5, killer.killed
    rows = _rows_once_compacted(tmp_path / "out", photos)
    record_property("measured", f"{len(killer.killed)} label workers killed, the service once at "
                                f"{service_killed_at}/{CHAOS_SHARDS} shards; succeeded in {seconds:.0f} s, "
                                f"{progress['shards_done']}/{progress['shards_total']} shards in the record, "
                                f"{rows}/{CHAOS_SHARDS} rows once (compacted at the end)")  # fmt: skip


def _rows_once_compacted(out: Path, photos: Path) -> int:
    """assert_exactly_once for an output the job compacted as it ended (`compact: auto`, the default, merges a
    200-shard job's part files into `data/compact-<gen>-<n>.parquet`): one row per image, nothing but committed
    names under the prefix."""
    keys = ds.dataset(out / "data", format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(p.name for p in photos.iterdir())
    committed = re.compile(
        rf"{OWNER_NAME}|{MANIFEST_NAME}|{DONE_DIR}/.+\.json|{DATA_FILE.pattern}|{LEASE_FILE.pattern}"
    )
    leftovers = [p for p in out.rglob("*") if p.is_file() and not committed.fullmatch(p.relative_to(out).as_posix())]
    assert leftovers == []
    # The writer lease (jobs.output.lease): at most one generation left, released by the run that finished.
    leases = [p for p in out.rglob("*") if p.is_file() and LEASE_FILE.fullmatch(p.relative_to(out).as_posix())]
    assert len(leases) <= 1 and all(LeaseRecord.model_validate_json(p.read_text()).released for p in leases)
    return len(keys)
