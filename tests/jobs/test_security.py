"""Credentials stay secret, output stays under its prefix, bad requests are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.label.plan import PlanError
from jobs.label.runner import run_label_job
from jobs.output.errors import OutputConflict
from schemas.specs import LabelJobSpec, StorageOptions
from tests.support import IMAGENET_SAMPLE, imagenet_labels, write_tar_shards
from workers.io.storage import StorageError, join, open_storage

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _all_text_under(folder: Path) -> str:
    chunks = []
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            chunks.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(chunks)


@pytest.mark.fault(
    fault="credentials in logs, errors, manifests or outputs; writes outside the output prefix",
    injected="an S3 job with explicit keys; a second with a wrong secret; every log, output and object grepped",
    expected="the secret appears nowhere; the only new objects are under the output prefix",
)
def test_credentials_never_leak_and_writes_stay_under_output(
    s3_server, s3_prefix, ray_cluster, tmp_path, caplog, capfd, record_property
):
    storage = open_storage(s3_prefix, s3_server.options())
    rows = imagenet_labels()[:8]
    for shard in write_tar_shards([IMAGENET_SAMPLE / r["file"] for r in rows], tmp_path / "tars", per_shard=4):
        storage.upload_file(str(shard), join(s3_prefix, "in", shard.name))
    bucket = s3_prefix.removeprefix("s3://").split("/")[0]
    client = s3_server.client()
    before = {o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in
              p.get("Contents", [])}  # fmt: skip
    spec = LabelJobSpec(
        input={"uri": join(s3_prefix, "in")},
        output=join(s3_prefix, "out"),
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        storage=s3_server.options(),
        num_workers=1,
    )
    caplog.set_level("DEBUG")
    assert run_label_job(spec, show_progress=False).images == 8

    wrong = spec.model_copy(
        update={"storage": StorageOptions(**{**s3_server.options().model_dump(), "secret_access_key": "WRONG" * 8})}
    )
    with pytest.raises((StorageError, PlanError)) as refused:
        run_label_job(wrong.model_copy(update={"output": join(s3_prefix, "out2")}), show_progress=False)

    after = {o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in
             p.get("Contents", [])}  # fmt: skip
    out_key = join(s3_prefix, "out").removeprefix(f"s3://{bucket}/") + "/"
    assert after - before and all(key.startswith(out_key) for key in after - before)

    outputs = "".join(
        client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", errors="replace")
        for key in after - before
    )
    captured = capfd.readouterr()
    session_dir = Path(ray_cluster.address_info["session_dir"])
    haystack = "\n".join([outputs, caplog.text, captured.out, captured.err, str(refused.value),
                          repr(spec), spec.model_dump_json(), _all_text_under(session_dir / "logs")])  # fmt: skip
    for secret in (s3_server.secret_key, "WRONG" * 8):
        assert secret not in haystack
    assert "**********" in json.dumps(json.loads(client.get_object(Bucket=bucket, Key=out_key + "_job.json")["Body"]
                                                 .read())["spec"]["storage"])  # fmt: skip
    record_property("measured", f"secret absent from {len(haystack) // 1000} kB of logs, errors and outputs; "
                                f"{len(after - before)} new objects, all under the output prefix")  # fmt: skip


def test_top_k_above_the_number_of_classes_is_refused_before_work(tmp_path):
    (tmp_path / "in").mkdir()
    spec = LabelJobSpec(input={"uri": str(tmp_path / "in")}, output=str(tmp_path / "out"),
                        model={"name": "resnet18"}, top_k=1001)  # fmt: skip
    with pytest.raises(PlanError, match="top_k=1001 exceeds the 1000 classes"):
        run_label_job(spec, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_output_of_another_job_is_not_mixed_in(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((IMAGENET_SAMPLE / imagenet_labels()[0]["file"]).read_bytes())
    base = {"input": {"uri": str(folder)}, "output": str(tmp_path / "out"), "num_workers": 1,
            "model": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}}  # fmt: skip
    run_label_job(LabelJobSpec(**base), show_progress=False)
    with pytest.raises(OutputConflict, match="belongs to job"):
        run_label_job(LabelJobSpec(**{**base, "top_k": 3}), show_progress=False)
