"""workers.io.storage: both backends must behave alike, so most tests run once per backend through `storage_root`."""

from __future__ import annotations

import io
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from schemas.specs import StorageOptions
from workers.io.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    check_writable,
    join,
    open_storage,
    relative_key,
    split_s3,
)


def test_write_then_read_roundtrip(storage_root):
    uri = join(storage_root.uri, "folder", "blob.bin")
    storage_root.storage.write_bytes(uri, b"\x00payload\xff")
    assert storage_root.storage.read_bytes(uri) == b"\x00payload\xff"

    storage_root.storage.write_bytes(uri, b"second")
    assert storage_root.storage.read_bytes(uri) == b"second"


def test_list_is_recursive_sorted_and_sized(storage_root):
    # Written out of order; in key order a folder's files and subfolders interleave ("a/b/c.txt" before "a/b0.txt").
    contents = {"c.txt": b"cc", "a/z.txt": b"z", "a/b0.txt": b"", "b/x.txt": b"xxxx", "a/b/c.txt": b"ccc", "a/a": b"a"}
    for key, data in contents.items():
        storage_root.storage.write_bytes(join(storage_root.uri, key), data)

    listed = list(storage_root.storage.list(storage_root.uri))

    expected = [(join(storage_root.uri, key), len(contents[key])) for key in sorted(contents)]
    assert [(o.uri, o.size) for o in listed] == expected
    assert all(o.etag for o in listed)  # S3 ETag or local mtime: what changes when an object is rewritten


def test_etag_changes_when_an_object_is_rewritten_at_the_same_size(storage_root):
    uri = join(storage_root.uri, "shard.tar")
    storage_root.storage.write_bytes(uri, b"first")
    before = next(iter(storage_root.storage.list(uri)))
    time.sleep(0.01)
    storage_root.storage.write_bytes(uri, b"other")
    after = next(iter(storage_root.storage.list(uri)))
    assert before.size == after.size and before.etag != after.etag


def test_create_exclusive_lets_exactly_one_of_many_racers_win(storage_root):
    uri = join(storage_root.uri, "claims", "_owner.json")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage_root.storage.create_exclusive(uri, b"%d" % i), range(8)))
    assert won.count(True) == 1
    assert storage_root.storage.read_bytes(uri) == b"%d" % won.index(True)
    assert storage_root.storage.create_exclusive(uri, b"again") is False


def test_local_list_is_in_key_order_like_aws_s3(tmp_path):
    """Key order puts "a-b/x" and "a.txt" before "a/..." ('-' and '.' sort before '/'). Only checked locally:
    SeaweedFS lists folder by folder ("a/..." before "a-b/x"), unlike AWS S3, so the s3 fixture cannot show it."""
    keys = ["a/z.txt", "a/b/c.txt", "a-b/x", "a.txt", "a0", "A"]
    for key in keys:
        LocalStorage().write_bytes(join(str(tmp_path), key), b"")

    listed = [relative_key(str(tmp_path), info.uri) for info in LocalStorage().list(str(tmp_path))]

    assert listed == sorted(keys) == ["A", "a-b/x", "a.txt", "a/b/c.txt", "a/z.txt", "a0"]


def test_local_list_leaves_out_a_file_removed_while_it_lists(tmp_path):
    """A record rewritten through its temp file (temp + rename) beside a listing: the temp file was in the folder
    when it was read and is gone at its stat. Found by the load row: `bulklabel list` failed with FileNotFoundError."""
    for name in ("a.json", "b.json", "c.json"):
        (tmp_path / name).write_text("{}")
    listing = LocalStorage().list(str(tmp_path))
    first = next(listing)  # the folder is read now; each entry is stat'ed as it is reached
    (tmp_path / "b.json").unlink()
    assert [first.uri, *(info.uri for info in listing)] == [str(tmp_path / "a.json"), str(tmp_path / "c.json")]


def test_list_of_missing_prefix_is_empty(storage_root):
    assert list(storage_root.storage.list(join(storage_root.uri, "nothing-here"))) == []


def test_list_does_not_include_sibling_prefixes(storage_root):
    storage = storage_root.storage
    storage.write_bytes(join(storage_root.uri, "run1", "a"), b"1")
    storage.write_bytes(join(storage_root.uri, "run10", "b"), b"10")
    storage.write_bytes(join(storage_root.uri, "run1.txt"), b"t")

    run1 = join(storage_root.uri, "run1")
    listed = [info.uri for info in storage.list(run1)]

    assert listed == [join(run1, "a")]
    assert [relative_key(run1, uri) for uri in listed] == ["a"]


def test_list_of_a_single_object(storage_root):
    uri = join(storage_root.uri, "only.txt")
    storage_root.storage.write_bytes(uri, b"abc")
    assert [(o.uri, o.size) for o in storage_root.storage.list(uri)] == [(uri, 3)]


@pytest.mark.parametrize("key", ["with space/it's a cat.jpg", "O'Brien's  photos/ two  spaces .png", "café/ünï.webp"])
def test_awkward_keys_roundtrip_and_list(storage_root, key):
    uri = join(storage_root.uri, key)
    storage_root.storage.write_bytes(uri, b"img")

    assert storage_root.storage.exists(uri)
    assert storage_root.storage.read_bytes(uri) == b"img"
    assert [info.uri for info in storage_root.storage.list(storage_root.uri)] == [uri]
    assert relative_key(storage_root.uri, uri) == key


def test_exists_and_delete(storage_root):
    uri = join(storage_root.uri, "x", "y.txt")
    assert not storage_root.storage.exists(uri)

    storage_root.storage.write_bytes(uri, b"y")
    assert storage_root.storage.exists(uri)

    storage_root.storage.delete(uri)
    assert not storage_root.storage.exists(uri)
    storage_root.storage.delete(uri)  # deleting a missing object is not an error


def test_move_makes_dst_appear_and_src_disappear(storage_root):
    src = join(storage_root.uri, "staging", "part.tmp")
    dst = join(storage_root.uri, "final", "nested", "part.parquet")
    storage_root.storage.write_bytes(src, b"rows")

    storage_root.storage.move(src, dst)

    assert storage_root.storage.read_bytes(dst) == b"rows"
    assert not storage_root.storage.exists(src)
    assert [info.uri for info in storage_root.storage.list(storage_root.uri)] == [dst]


def test_upload_file(storage_root, tmp_path):
    # Over boto3's 8 MiB multipart threshold, so the S3 variant exercises a multipart upload.
    data = os.urandom(9 * 1024 * 1024)
    local = tmp_path / "upload.bin"
    local.write_bytes(data)
    uri = join(storage_root.uri, "uploads", "upload.bin")

    storage_root.storage.upload_file(str(local), uri)

    assert storage_root.storage.read_bytes(uri) == data
    assert [(o.uri, o.size) for o in storage_root.storage.list(join(storage_root.uri, "uploads"))] == [(uri, len(data))]


def test_open_read_streams_in_chunks(storage_root):
    data = os.urandom(1024 * 1024 + 7)
    uri = join(storage_root.uri, "stream.bin")
    storage_root.storage.write_bytes(uri, data)

    chunks = []
    with storage_root.storage.open_read(uri) as stream:
        while chunk := stream.read(64 * 1024):
            chunks.append(chunk)

    assert len(chunks) > 1
    assert b"".join(chunks) == data


def test_check_writable_passes_and_leaves_nothing(storage_root):
    check_writable(storage_root.storage, storage_root.uri)
    assert list(storage_root.storage.list(storage_root.uri)) == []


def test_check_writable_under_a_file_names_the_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    prefix = str(blocker / "out")

    with pytest.raises(StorageError, match=f"output {prefix} is not writable"):
        check_writable(LocalStorage(), prefix)


def test_check_writable_under_proc_names_the_location():
    with pytest.raises(StorageError, match="output /proc/bulklabel-out is not writable"):
        check_writable(LocalStorage(), "/proc/bulklabel-out")


def test_check_writable_with_a_wrong_secret_names_the_location(s3_server, s3_prefix):
    options = StorageOptions(
        endpoint_url=s3_server.endpoint_url,
        region="us-east-1",
        access_key_id=s3_server.access_key,
        secret_access_key="not-the-secret",
    )
    with pytest.raises(StorageError, match=f"output {s3_prefix} is not writable"):
        check_writable(open_storage(s3_prefix, options), s3_prefix)


def test_listing_a_missing_bucket_raises(s3_server):
    storage = open_storage("s3://no-such-bucket-bulklabel/x", s3_server.options())
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-bulklabel' does not exist"):
        list(storage.list("s3://no-such-bucket-bulklabel/x"))


def test_open_storage_picks_the_backend(tmp_path):
    assert isinstance(open_storage("s3://bucket/prefix"), S3Storage)
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage("relative/folder"), LocalStorage)


@pytest.mark.parametrize("uri", ["gs://bucket/images", "https://example.com/x.jpg"])
def test_open_storage_rejects_other_schemes(uri):
    with pytest.raises(StorageError, match=r"unsupported URI scheme .*use a local path or s3://bucket/prefix"):
        open_storage(uri)


def test_split_s3():
    assert split_s3("s3://bucket/a/b.jpg") == ("bucket", "a/b.jpg")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="no bucket"):
        split_s3("s3:///key")


def test_join():
    assert join("s3://b/prefix/", "/a/", "b.jpg") == "s3://b/prefix/a/b.jpg"
    assert join("/data/root", "x") == "/data/root/x"
    assert join("s3://b/p") == "s3://b/p"


def test_relative_key():
    assert relative_key("s3://b/prefix", "s3://b/prefix/a/b.jpg") == "a/b.jpg"
    assert relative_key("/data/root/", "/data/root/x.png") == "x.png"
    with pytest.raises(ValueError, match="is not under"):
        relative_key("s3://b/run1", "s3://b/run10/a.jpg")


def test_s3_storage_pickles_without_its_client(s3_server, s3_prefix):
    storage = open_storage(s3_prefix, s3_server.options())
    uri = join(s3_prefix, "pickled.txt")
    storage.write_bytes(uri, b"p")  # builds the client
    assert storage._client is not None

    copy = pickle.loads(pickle.dumps(storage))

    assert copy._client is None
    assert copy.read_bytes(uri) == b"p"  # the copy builds its own client
    assert storage._client is not None  # pickling did not drop the original's client


def test_local_list_follows_file_links_not_folder_links(tmp_path: Path):
    """A symlink to a file is listed like a file; a symlinked folder is not followed (as os.walk did)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f.txt").write_bytes(b"f")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link.txt").symlink_to(tmp_path / "real" / "f.txt")
    (tmp_path / "root" / "linked-folder").symlink_to(tmp_path / "real", target_is_directory=True)

    listed = list(LocalStorage().list(str(tmp_path / "root")))

    assert [(o.uri, o.size) for o in listed] == [(str(tmp_path / "root" / "link.txt"), 1)]


class _OutageClock:
    """An injected clock for S3Storage's retries: its `sleep` advances the clock instead of waiting, and it stands
    in for the boto3 client, refusing connections until the clock passes the outage's end, so outages of many
    seconds are tested in milliseconds."""

    def __init__(self, outage_s: float):
        self.now, self.outage_s, self.calls = 0.0, outage_s, 0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 - boto3's parameter names
        from botocore.exceptions import EndpointConnectionError

        self.calls += 1
        if self.now < self.outage_s:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return {"Body": io.BytesIO(f"{Bucket}/{Key}".encode())}


def _storage_on(clock: _OutageClock, jitter: float, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """An S3Storage whose retries sleep on `clock` and whose jitter factor is always `jitter` (0.5 to 1)."""
    import workers.io.storage as storage_module

    monkeypatch.setattr(storage_module, "time", SimpleNamespace(sleep=clock.sleep))
    monkeypatch.setattr(storage_module, "random", SimpleNamespace(uniform=lambda low, high: jitter))
    storage = S3Storage(StorageOptions())
    storage._client = clock
    return storage


@pytest.mark.parametrize(("jitter", "outage_s"), [(0.5, 0.1), (0.5, 15.0), (1.0, 30.0)])
def test_s3_retries_ride_out_an_outage(jitter, outage_s, monkeypatch):
    """tests/scenarios/test_storage_outage.py stops SeaweedFS for a few seconds for real; how long an outage one call
    outlasts (about 15 s at the shortest jittered backoff, 30 s at the longest) is checked here on a clock."""
    clock = _OutageClock(outage_s)
    storage = _storage_on(clock, jitter, monkeypatch)
    assert storage.read_bytes("s3://bucket/key") == b"bucket/key"
    assert clock.now >= outage_s and 1 < clock.calls <= S3Storage.RETRY_ATTEMPTS


def test_s3_retries_are_bounded_and_end_in_store_unavailable(monkeypatch):
    from workers.io.storage import StoreUnavailable

    clock = _OutageClock(outage_s=3600)
    storage = _storage_on(clock, 1.0, monkeypatch)
    with pytest.raises(StoreUnavailable, match="s3://bucket/key"):
        storage.read_bytes("s3://bucket/key")
    assert clock.calls == S3Storage.RETRY_ATTEMPTS
    assert 25 < clock.now < 60  # backoff grows, then is capped: a dead store is given up on in under a minute
