"""The whole system held to its promise under stress, on a `ray start` cluster (tests/multinode/ray_nodes.py: a head
with no CPUs and a 2-CPU worker node): load (100 small jobs at once) and chaos (label workers killed every few
seconds and the service once, during a 200-shard job). Every row once and every record right at the end."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jobs.service.test_service_cli import JOB_TIMEOUT_S, Service, _label_args
from tests.jobs.test_faults import assert_exactly_once
from tests.multinode.ray_nodes import MultiNodeCluster
from tests.support import IMAGENET_SAMPLE, imagenet_labels

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

LOAD_JOBS = 100


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
    cluster = MultiNodeCluster().start(worker_nodes=1, cpus_per_node=2)
    svc = Service(cluster, tmp_path / "state")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "tests.jobs.service.stress_driver", str(tmp_path / "plan.json"),
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
    calls = {call: len(values) for call, values in result["latencies"].items()}
    record_property("measured", f"{LOAD_JOBS}/{LOAD_JOBS} succeeded, {rows}/{rows} rows once, in {seconds:.0f} s; "
                                f"p95 status {p95['status']:.2f} s ({calls['status']} calls), list "
                                f"{p95['list']:.2f} s ({calls['list']} calls)")  # fmt: skip


CHAOS_SHARDS = 200
KILL_EVERY_S = 4.0


@pytest.mark.fault(
    fault="chaos: label workers SIGKILLed every few seconds and the job service once, during a 200-shard job",
    injected="SIGKILL to a random live label worker every 4 s (pids from Ray's State API) until the job ends; "
    "SIGKILL to the service's process once 1/4 of the shards were committed",
    expected="the job succeeds: its record says succeeded with 200/200 shards; every image's row exactly once",
)
def test_chaos_workers_and_the_service_killed_during_a_job(tmp_path, record_property):
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in imagenet_labels()[:CHAOS_SHARDS]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    cluster = MultiNodeCluster().start(worker_nodes=1, cpus_per_node=2)
    svc = Service(cluster, tmp_path / "state")
    kills: list[int] = []
    try:
        job = svc.submit(*_label_args(photos, tmp_path / "out", per_shard=1))
        service_pid = json.loads(svc.cli("service", "status").stdout)["pid"]
        service_killed_at = None
        last_kill = time.monotonic()
        deadline = time.monotonic() + 3 * JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            record = svc.status(job)  # answers throughout, the service's restart included
            if record["state"] not in ("queued", "running"):
                break
            done = record["progress"]["shards_done"]
            if service_killed_at is None and done >= CHAOS_SHARDS // 4:
                os.kill(service_pid, signal.SIGKILL)
                service_killed_at = done
            if time.monotonic() - last_kill >= KILL_EVERY_S:
                alive = [actor.pid for actor in cluster.worker_actors("ALIVE") if actor.pid]
                if alive:
                    victim = random.choice(alive)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append(victim)
                    except ProcessLookupError:  # it died on its own between the listing and the kill
                        pass
                last_kill = time.monotonic()
            time.sleep(0.5)
        new_pid = json.loads(svc.cli("service", "status").stdout)["pid"]
        svc.stop()
    finally:
        cluster.stop()
    assert record["state"] == "succeeded", record
    progress = record["progress"]
    assert (progress["shards_total"], progress["shards_done"], progress["images"]) == (CHAOS_SHARDS,) * 3, progress
    assert service_killed_at is not None and new_pid != service_pid and record["attempts"] >= 2, record
    assert len(kills) >= 5, kills
    rows = assert_exactly_once(tmp_path / "out", photos)
    record_property("measured", f"{len(kills)} label workers killed, the service once at "
                                f"{service_killed_at}/{CHAOS_SHARDS} shards; succeeded, {progress['shards_done']}/"
                                f"{progress['shards_total']} shards in the record, {rows}/{CHAOS_SHARDS} rows "
                                f"once")  # fmt: skip
