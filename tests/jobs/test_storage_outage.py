"""The S3 server goes away for ~20 s in the middle of a job and comes back."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.runner import run_label_job
from schemas.specs import LabelJobSpec
from tests.s3server import WeedServer
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.storage import join, open_storage

pytestmark = pytest.mark.usefixtures("ray_cluster")
OUTAGE_S = 20


@pytest.mark.fault(
    fault="the S3 server stopped for ~20 s mid-job, then restarted",
    injected="SIGTERM to SeaweedFS after 2 of 8 shards were committed; started again 20 s later on the same data",
    expected="botocore's bounded retries with backoff ride it out (shards retried if not); rows in = rows out",
)
def test_job_survives_a_20s_storage_outage(tmp_path, record_property):
    weed = WeedServer(tmp_path / "weed")
    server = weed.start()
    try:
        server.client().create_bucket(Bucket="outage")
        rows = imagenet_labels()[:64]
        storage = open_storage("s3://outage", server.options())
        for shard in write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows], tmp_path / "tars", per_shard=8):
            storage.upload_file(str(shard), join("s3://outage/in", shard.name))
        spec = LabelJobSpec(
            input={"uri": "s3://outage/in"},
            output="s3://outage/out",
            model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
            storage=server.options(),
            num_workers=1,
            batch_size=2,
        )
        outcome: dict = {}
        job = threading.Thread(target=lambda: outcome.update(summary=run_label_job(spec, show_progress=False)))
        job.start()
        client = server.client()
        deadline = time.monotonic() + 120
        while client.list_objects_v2(Bucket="outage", Prefix="out/_done/").get("KeyCount", 0) < 2:
            assert time.monotonic() < deadline and job.is_alive()
            time.sleep(0.1)
        weed.stop()
        time.sleep(OUTAGE_S)
        weed.start()
        job.join(timeout=600)
        summary = outcome["summary"]
        assert (summary.status, summary.images, summary.shards) == ("succeeded", 64, 8)
        listed = client.list_objects_v2(Bucket="outage", Prefix="out/")["Contents"]
        data = sorted(o["Key"] for o in listed if o["Key"].endswith(".parquet"))
        assert data == [f"out/part-{i:05d}.parquet" for i in range(8)]
        assert not [o for o in listed if "/_tmp/" in o["Key"]]
        record_property("measured", f"succeeded, 64/64 rows in 8/8 shards, {summary.seconds:.0f}s with a "
                                    f"{OUTAGE_S}s outage")  # fmt: skip
    finally:
        weed.stop()
