"""Label jobs on a real multi-node Ray cluster on this machine: a head with no CPUs and three 1-CPU worker nodes,
each its own raylet (tests/multinode/ray_nodes.py). The jobs run as `bulklabel run spec.yaml` subprocesses with
RAY_ADDRESS at that head, as on a real cluster; S3 is the session's SeaweedFS. Credentials reach the workers the way
a fleet's do, from each node's own environment (here: set when the node started), never from the spec.

1-CPU nodes and 1-CPU workers: no two workers can share a node, so a 2-worker job is on 2 nodes by construction,
and the third node is the spare capacity a dead node's worker moves to. The node-kill test runs last: it leaves the
cluster one node short.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from jobs.output.lease import LeaseRecord
from schemas.layout import LEASE_FILE
from tests.multinode.ray_nodes import MultiNodeCluster
from tests.support import IMAGENET_SAMPLE, imagenet_labels

pytestmark = pytest.mark.multinode

WORKER_NODES = 3
JOB_TIMEOUT_S = 240
_COMMITTED_NAMES = ("_job.json", "_owner.json")


@pytest.fixture(scope="module")
def cluster(s3_server):
    nodes = MultiNodeCluster(env=_credentials(s3_server))
    try:
        yield nodes.start(worker_nodes=WORKER_NODES, cpus_per_node=1)
    finally:
        nodes.stop()


def _credentials(s3_server) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            "AWS_REGION": "us-east-1"}  # fmt: skip


def _upload_photos(s3_server, prefix: str, count: int) -> list[str]:
    """`count` real photos as loose files under the s3:// `prefix`; returns their names (the output's keys)."""
    bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
    client = s3_server.client()
    names = [row["file"] for row in imagenet_labels()[:count]]
    for name in names:
        client.put_object(Bucket=bucket, Key=f"{key_prefix}/{name}", Body=(IMAGENET_SAMPLE / name).read_bytes())
    return names


def _spec_file(folder: Path, s3_server, **fields) -> Path:
    spec = {"kind": "label", "model": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, "top_k": 3,
            "num_workers": 2, "batch_size": 2, "storage": {"endpoint_url": s3_server.endpoint_url},
            **fields}  # fmt: skip
    path = folder / f"{fields.get('job_id', 'job')}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _start_job(cluster: MultiNodeCluster, spec: Path, s3_server, cwd: Path) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("bulklabel")
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TMPDIR": cluster.temp_dir, "RAY_AUTH_MODE": "disabled",
           **_credentials(s3_server)}  # fmt: skip
    return subprocess.Popen([str(cli), "run", str(spec), "--quiet"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _run_job(cluster: MultiNodeCluster, spec: Path, s3_server, cwd: Path) -> subprocess.CompletedProcess:
    proc = _start_job(cluster, spec, s3_server, cwd)
    return _wait_job(proc)


def _wait_job(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"the job ran past {JOB_TIMEOUT_S}s; its log ends:\n{stdout[-1500:]}\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _s3_objects(s3_server, prefix: str) -> list[str]:
    """Every key under `prefix`, relative to it."""
    bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key_prefix}/")
    return [item["Key"][len(key_prefix) + 1 :] for page in pages for item in page.get("Contents", [])]


def _assert_exactly_once_on_s3(s3_server, prefix: str, names: list[str]) -> int:
    """One row per input photo, none twice, read back with pyarrow from S3; nothing but committed files there."""
    objects = _s3_objects(s3_server, prefix)
    strays = [k for k in objects if not (k in _COMMITTED_NAMES
                                         or (k.startswith("data/part-") and k.endswith(".parquet"))
                                         or (k.startswith("_done/") and k.endswith(".json"))
                                         or LEASE_FILE.fullmatch(k))]  # fmt: skip
    assert strays == [], f"uncommitted or foreign objects under {prefix}: {strays}"
    # The writer lease (jobs.output.lease): at most one generation left, released by the run that finished.
    bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
    leases = [s3_server.client().get_object(Bucket=bucket, Key=f"{key_prefix}/{k}")["Body"].read()
              for k in objects if LEASE_FILE.fullmatch(k)]  # fmt: skip
    assert len(leases) <= 1 and all(LeaseRecord.model_validate_json(body).released for body in leases)
    parts = [f"{prefix.removeprefix('s3://')}/{k}" for k in objects if k.endswith(".parquet")]
    table = ds.dataset(parts, filesystem=s3_server.pyarrow_fs(), format="parquet").to_table(columns=["key", "error"])
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(names), "rows in != rows out (a row lost or duplicated)"
    assert table.column("error").null_count == len(keys), "every photo should have been labelled"
    return len(keys)


def _job_actors(cluster: MultiNodeCluster, job_id: str, state: str | None = None) -> list:
    return [a for a in cluster.worker_actors(state) if (a.name or "").startswith(f"bulklabel-{job_id}-")]


def _shards_by_node(cluster: MultiNodeCluster, job_id: str) -> dict[str, int]:
    """`label_shard` calls of this job's workers that started running, per Ray node id (State API task events).
    Any state, not only FINISHED: a worker killed at the job's end may not have flushed its last events."""
    from ray.util.state import list_tasks

    actors = {a.actor_id for a in _job_actors(cluster, job_id)}
    tasks = list_tasks(address=cluster.dashboard, detail=True, limit=10000)
    counts: dict[str, int] = {}
    for task in tasks:
        if task.actor_id in actors and task.name.endswith("label_shard") and task.node_id:
            counts[task.node_id] = counts.get(task.node_id, 0) + 1
    return counts


def test_label_job_spreads_over_the_nodes_and_uses_s3_only(cluster, s3_server, s3_prefix, tmp_path, record_property):
    names = _upload_photos(s3_server, f"{s3_prefix}/photos", 16)
    output, job_id = f"{s3_prefix}/labels", "mn-spread"
    spec = _spec_file(tmp_path, s3_server, job_id=job_id, input={"uri": f"{s3_prefix}/photos", "files_per_shard": 2},
                      output=output)  # fmt: skip
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    started = time.monotonic()
    done = _run_job(cluster, spec, s3_server, workdir)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"job {job_id}: succeeded" in done.stdout and "16 (0 with errors) in 8 shards" in done.stdout

    rows = _assert_exactly_once_on_s3(s3_server, output, names)
    assert list(workdir.iterdir()) == []  # nothing written where the driver ran: S3 only
    # The workers' nodes (GCS actor table, kept after they end): two, neither the head. Each was handed 2 shards
    # at once by the scheduler, and the task events show shards running on both.
    worker_nodes = {a.node_id for a in _job_actors(cluster, job_id)}
    head = next(n.node_id for n in cluster.nodes() if n.is_head_node)
    assert len(worker_nodes) == 2 and head not in worker_nodes, f"workers' nodes: {worker_nodes}"
    by_node = _shards_by_node(cluster, job_id)
    assert set(by_node) == worker_nodes, f"shards per node: {by_node}"
    record_property("measured", f"{rows}/16 rows from S3 to S3; shards per node {sorted(by_node.values())}; "
                                f"cluster start {cluster.describe()}; job {seconds:.0f}s")  # fmt: skip


@pytest.mark.fault(
    fault="a label job with a local output folder on a multi-node Ray cluster",
    injected="`bulklabel run` with output: /tmp/... (input on S3) against a head and three worker nodes; then the "
    "same spec with shared_storage: true",
    expected="refused with exit 2 before anything is written or any worker starts, naming the path, the node count "
    "and the fix; declared shared, the job runs",
)
def test_local_output_is_refused_on_a_multi_node_cluster_unless_declared_shared(
    cluster, s3_server, s3_prefix, tmp_path, record_property
):
    names = _upload_photos(s3_server, f"{s3_prefix}/photos", 4)
    out, job_id = tmp_path / "labels", "mn-local-output"
    fields = {"job_id": job_id, "input": {"uri": f"{s3_prefix}/photos", "files_per_shard": 2}, "output": str(out),
              "num_workers": 1}  # fmt: skip
    started = time.monotonic()
    refused = _run_job(cluster, _spec_file(tmp_path, s3_server, **fields), s3_server, tmp_path)
    refused_in = time.monotonic() - started
    assert refused.returncode == 2, refused.stderr[-3000:]  # bad input, found before any work
    message = refused.stderr.strip().splitlines()[-1]
    assert f"output {out} is a local path, but the Ray cluster has {WORKER_NODES + 1} nodes" in message
    assert "cannot see this machine's folders" in message and "shared_storage: true" in message
    assert not out.exists()  # refused before the output was claimed: nothing written
    assert _job_actors(cluster, job_id) == []  # and before any worker started

    # Declared shared (here it is: every node of this cluster is this machine), the same job runs.
    shared = _spec_file(tmp_path, s3_server, **fields, shared_storage=True)
    done = _run_job(cluster, shared, s3_server, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = ds.dataset(out, format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(names)
    record_property("measured", f"refused with exit 2 in {refused_in:.1f}s (process start included), nothing "
                                f"written; with shared_storage: true {len(keys)}/4 rows")  # fmt: skip


@pytest.mark.fault(
    fault="a worker node of a multi-node Ray cluster dies mid-job",
    injected="SIGKILL to one worker node's raylet and every process under it (its label worker, its agents) after "
    "2 of 16 shards were committed; input and output on S3",
    expected="the lost worker is replaced on another node and its shards retried; the job succeeds; every row "
    "exactly once",
)
def test_node_killed_mid_job_costs_retries_never_rows(cluster, s3_server, s3_prefix, tmp_path, record_property):
    names = _upload_photos(s3_server, f"{s3_prefix}/photos", 32)
    output, job_id = f"{s3_prefix}/labels", "mn-node-killed"
    spec = _spec_file(tmp_path, s3_server, job_id=job_id, input={"uri": f"{s3_prefix}/photos", "files_per_shard": 2},
                      output=output, batch_size=1)  # fmt: skip
    started = time.monotonic()
    proc = _start_job(cluster, spec, s3_server, tmp_path)
    committed_before = _wait_for_markers(s3_server, output, 2, proc)
    victim = _an_alive_worker(cluster, job_id)
    killed = cluster.kill_node(victim.node_id)
    killed_at = time.monotonic()
    done = _wait_job(proc)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"job {job_id}: succeeded" in done.stdout and "32 (0 with errors) in 16 shards" in done.stdout
    replaced = int(re.search(r"workers replaced after dying or hanging: (\d+)", done.stdout).group(1))
    assert replaced >= 1

    rows = _assert_exactly_once_on_s3(s3_server, output, names)
    attempts = [json.loads(s3_server.client().get_object(Bucket=s3_prefix.removeprefix("s3://").split("/")[0],
                                                         Key=key)["Body"].read())["attempt"]
                for key in _marker_keys(s3_server, output)]  # fmt: skip
    assert max(attempts) >= 2, "the killed worker's shard should have been retried"
    states = _node_states_once_dead(cluster, victim.node_id)
    assert list(states.values()).count("ALIVE") == WORKER_NODES  # the head and the two other workers
    by_node = _shards_by_node(cluster, job_id)
    record_property("measured", f"node killed ({len(killed)} processes) with {committed_before}/16 shards committed; "
                                f"{replaced} worker(s) replaced, {sum(a >= 2 for a in attempts)} shard(s) retried; "
                                f"{rows}/32 rows, no duplicates; shards per node {sorted(by_node.values())}; job "
                                f"{seconds:.0f}s, {time.monotonic() - killed_at:.0f}s after the kill")  # fmt: skip


def _node_states_once_dead(cluster: MultiNodeCluster, node_id: str, timeout: float = 60) -> dict[str, str]:
    """Node id → state, once `node_id` is DEAD: the GCS declares a node dead after missed health checks (about
    15 s here), which can be after a fast job already finished without it."""
    deadline = time.monotonic() + timeout
    while (states := {n.node_id: n.state for n in cluster.nodes()})[node_id] != "DEAD":
        assert time.monotonic() < deadline, f"node {node_id} killed but still {states[node_id]} after {timeout}s"
        time.sleep(0.5)
    return states


def _an_alive_worker(cluster: MultiNodeCluster, job_id: str, timeout: float = 20):
    """One of the job's live workers (the State API may lag behind the actors for a moment)."""
    deadline = time.monotonic() + timeout
    while not (alive := _job_actors(cluster, job_id, state="ALIVE")):
        assert time.monotonic() < deadline, f"no live worker of job {job_id} in the State API after {timeout}s"
        time.sleep(0.2)
    return alive[0]


def _marker_keys(s3_server, prefix: str) -> list[str]:
    key_prefix = prefix.removeprefix("s3://").partition("/")[2]
    return [f"{key_prefix}/{k}" for k in _s3_objects(s3_server, prefix) if k.startswith("_done/")]


def _wait_for_markers(s3_server, prefix: str, count: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(_marker_keys(s3_server, prefix))
        if done >= count:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {count} shards were committed: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"fewer than {count} shards committed in {timeout}s")
