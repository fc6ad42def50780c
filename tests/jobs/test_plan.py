"""Planning turns any input layout into stable shard tasks, streamed, and fails fast on empty input."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.plan import PlanError, plan_shards, shard_id_for
from schemas.specs import InputSpec
from workers.storage import join


def _put_tar(storage, uri: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.jpg")
        tar.addfile(info, io.BytesIO(b""))
    storage.write_bytes(uri, buffer.getvalue())


def test_loose_files_are_grouped_in_listing_order(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    for name in ["b/2.JPG", "a 1.jpg", "c.png", "notes.txt", "_tmp/x.jpg", ".hidden.jpg"]:
        storage.write_bytes(join(root, name), b"x")
    tasks = list(plan_shards(InputSpec(uri=root, files_per_shard=2), storage))
    assert [t.shard_id for t in tasks] == ["files-000000", "files-000001"]
    assert sorted(k for t in tasks for k in t.keys) == ["a 1.jpg", "b/2.JPG", "c.png"]
    assert all(t.kind == "files" and t.base_uri == root for t in tasks)
    # Same input, same plan: this is what lets a re-run skip committed shards.
    again = list(plan_shards(InputSpec(uri=root, files_per_shard=2), storage))
    assert [t.fingerprint() for t in tasks] == [t.fingerprint() for t in again]


def test_tar_prefix_gives_one_shard_per_tar(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    for name in ["00000.tar", "sub/00001.tar"]:
        _put_tar(storage, join(root, name))
    storage.write_bytes(join(root, "stats.json"), b"{}")
    tasks = list(plan_shards(InputSpec(uri=root), storage))
    expected = [("00000", ("00000.tar",)), ("sub__00001", ("sub/00001.tar",))]
    assert sorted((t.shard_id, t.keys) for t in tasks) == expected
    assert {t.kind for t in tasks} == {"tar"}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_manifest_keys_become_shards(storage_root, suffix):
    root, storage = storage_root.uri, storage_root.storage
    keys = [f"img/{i:03d}.jpg" for i in range(5)]
    buffer = io.BytesIO()
    if suffix == "csv":
        buffer.write(("key,label\n" + "".join(f"{k},x\n" for k in keys)).encode())
    else:
        pq.write_table(pa.table({"key": keys}), buffer)
    storage.write_bytes(join(root, f"manifest.{suffix}"), buffer.getvalue())
    tasks = list(plan_shards(InputSpec(uri=join(root, f"manifest.{suffix}"), files_per_shard=2), storage))
    assert [t.keys for t in tasks] == [tuple(keys[0:2]), tuple(keys[2:4]), tuple(keys[4:])]
    assert tasks[0].base_uri == root


def test_manifest_without_the_key_column_is_named(storage_root):
    uri = join(storage_root.uri, "m.csv")
    storage_root.storage.write_bytes(uri, b"path\nx.jpg\n")
    with pytest.raises(PlanError, match="no column 'key'"):
        list(plan_shards(InputSpec(uri=uri), storage_root.storage))


def test_empty_or_missing_input_fails_before_any_shard(storage_root):
    with pytest.raises(PlanError, match="holds no images"):
        next(plan_shards(InputSpec(uri=join(storage_root.uri, "nothing-here")), storage_root.storage))


def test_shard_ids_are_file_name_safe():
    assert shard_id_for("2024/cam 1/shard-0001.tar") == "2024__cam_1__shard-0001"


def test_planning_streams_without_listing_everything_first(tmp_path):
    class CountingStorage:
        listed = 0

        def list(self, prefix):
            from workers.storage import ObjectInfo

            for i in range(1_000_000):
                CountingStorage.listed += 1
                yield ObjectInfo(f"{prefix}/{i:07d}.jpg", 1)

    tasks = plan_shards(InputSpec(uri=str(tmp_path), format="files", files_per_shard=100), CountingStorage())
    first = next(tasks)
    assert len(first.keys) == 100
    assert CountingStorage.listed < 1000
