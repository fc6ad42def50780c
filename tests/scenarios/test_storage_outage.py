"""The S3 server goes away for a few seconds in the middle of a job and comes back: one real outage per input kind
(tar shards, loose files). How long an outage one store call outlasts is tested on an injected clock in
tests/workers/io/test_storage.py, so these need not wait out 20 s each."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pyarrow.dataset as ds
import pytest

from jobs.label.plan import shard_id_for
from jobs.label.runner import run_label_job
from schemas.specs import LabelJobSpec
from tests.s3server import WeedServer
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.io.storage import join, open_storage

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
OUTAGE_S = 5  # longer than the first few backoffs (0.25-0.5, 0.5-1, 1-2, 2-4 s): calls fail and are retried


def run_through_a_restart(
    weed: WeedServer,
    spec: LabelJobSpec,
    committed: Callable[[], int],
    down_s: float = OUTAGE_S,
    while_down: Callable[[], None] = lambda: None,
) -> dict:
    """Run the job on a thread; once `committed()` counts 2 shards, stop SeaweedFS for `down_s` (calling
    `while_down`, e.g. to rotate its credentials), start it again and wait for the job. Returns {"summary": ...}
    or {"error": the exception the job raised}."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_label_job(spec, show_progress=False)
        except Exception as exc:  # noqa: BLE001 - the caller looks at what the job raised
            outcome["error"] = exc

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + 120
    while committed() < 2:
        assert time.monotonic() < deadline and job.is_alive(), outcome
        time.sleep(0.05)
    weed.stop()
    while_down()
    time.sleep(down_s)
    weed.start()
    job.join(timeout=600)
    return outcome


@pytest.mark.fault(
    fault="the S3 server stopped for 5 s mid-job, then restarted (tar shards)",
    injected="SIGTERM to SeaweedFS after 2 of 8 shards were committed; started again 5 s later on the same data",
    expected="the store's bounded retries with backoff ride it out (shards retried if not); rows in = rows out",
)
def test_job_survives_a_storage_outage(tmp_path, record_property):
    weed = WeedServer(tmp_path / "weed")
    server = weed.start()
    try:
        server.client().create_bucket(Bucket="outage")
        rows = imagenet_labels()[:32]
        storage = open_storage("s3://outage", server.options())
        shards = write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows], tmp_path / "tars", per_shard=4)
        for shard in shards:
            storage.upload_file(str(shard), join("s3://outage/in", shard.name))
        spec = LabelJobSpec(
            input={"uri": "s3://outage/in"},
            output="s3://outage/out",
            model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
            storage=server.options(),
            num_workers=1,
            batch_size=2,
        )
        client = server.client()
        outcome = run_through_a_restart(
            weed, spec, lambda: client.list_objects_v2(Bucket="outage", Prefix="out/_done/").get("KeyCount", 0)
        )
        summary = outcome["summary"]
        assert (summary.status, summary.images, summary.shards) == ("succeeded", 32, 8)
        listed = client.list_objects_v2(Bucket="outage", Prefix="out/")["Contents"]
        data = sorted(o["Key"] for o in listed if o["Key"].endswith(".parquet"))
        assert data == sorted(f"out/data/part-{shard_id_for(shard.name)}.parquet" for shard in shards)
        assert not [o for o in listed if "/_tmp/" in o["Key"]]
        record_property("measured", f"succeeded, 32/32 rows in 8/8 shards, {summary.seconds:.0f}s with a "
                                    f"{OUTAGE_S}s outage")  # fmt: skip
    finally:
        weed.stop()


@pytest.mark.fault(
    fault="the S3 server stopped for 5 s mid-job while loose files were being read (local output)",
    injected="SIGTERM to SeaweedFS after 2 of 8 loose-file shards were committed; started again 5 s later",
    expected="an unreachable store fails the shard (retried), never becomes rows: every image labelled, no errors",
)
def test_loose_files_survive_a_storage_outage_without_error_rows(tmp_path, record_property):
    weed = WeedServer(tmp_path / "weed")
    server = weed.start()
    try:
        server.client().create_bucket(Bucket="outage")
        rows = imagenet_labels()[:24]
        storage = open_storage("s3://outage", server.options())
        for row in rows:
            storage.upload_file(str(IMAGENET_SAMPLE / row["file"]), join("s3://outage/in", row["file"]))
        out = tmp_path / "out"
        spec = LabelJobSpec(
            input={"uri": "s3://outage/in", "files_per_shard": 3},
            output=str(out),
            model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
            storage=server.options(),
            num_workers=1,
            batch_size=3,
        )
        summary = run_through_a_restart(weed, spec, lambda: len(list((out / "_done").glob("*.json"))))["summary"]
        table = ds.dataset(out, format="parquet").to_table(columns=["key", "label", "error"]).to_pylist()
        assert (summary.status, summary.images, summary.errors, summary.shards) == ("succeeded", 24, 0, 8)
        assert sorted(r["key"] for r in table) == sorted(r["file"] for r in rows)
        assert [r for r in table if r["error"] is not None or r["label"] is None] == []
        record_property("measured", f"succeeded, 24/24 rows labelled, 0 error rows, {summary.seconds:.0f}s with a "
                                    f"{OUTAGE_S}s outage")  # fmt: skip
    finally:
        weed.stop()
