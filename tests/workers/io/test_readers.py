"""workers.io.readers: WebDataset tar shards and loose-file shards become ordered (key, source, bytes) records; one
bad member or object is an error record, a broken tar fails the whole shard (which is then retried)."""

from __future__ import annotations

import errno
import gzip
import io
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from schemas.shards import ShardTask
from schemas.specs import IMAGE_EXTENSIONS, InputSpec, StorageOptions
from workers.io.readers import (
    Record,
    ShardSource,
    StorageByScheme,
    bounded_map,
    class_folder,
    read_files,
    read_shard,
    read_tar,
    webdataset_key,
)
from workers.io.storage import AccessDenied, LocalStorage, S3Storage, StoreUnavailable, join, open_storage


def _source(storage, task: ShardTask, pool=None, **layout) -> ShardSource:
    """How a worker reads `task`: the default input spec for its base, with `layout`'s fields."""
    return ShardSource(storage, InputSpec(uri=task.base_uri, **layout), pool)


def tar_bytes(
    members: list[tuple[str, bytes | str | None]], compress: bool = False, fmt: int = tarfile.GNU_FORMAT
) -> bytes:
    """A tar of `members`: bytes → a regular file, None → a directory, "->target" → a symlink to target."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content.removeprefix("->")
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


def payload(name: str) -> bytes:
    """Distinct bytes per member, so a record carrying the wrong member's data shows."""
    return f"<bytes of {name}>".encode() * 7


def tar_task(base_uri: str, key: str = "shards/00000.tar") -> ShardTask:
    return ShardTask(shard_id="s-00000", kind="tar", base_uri=base_uri, keys=(key,))


def local_tar(tmp_path: Path, members: list, compress: bool = False) -> ShardTask:
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members, compress=compress))
    return tar_task(str(tmp_path))


def read_all_tar(task: ShardTask) -> list[Record]:
    return list(read_tar(LocalStorage(), task, IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------------------------- webdataset_key


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a/b/c.jpg", ("a/b/c", "jpg")),
        ("abc.jpg", ("abc", "jpg")),
        ("x.cls.jpg", ("x", "cls.jpg")),
        ("IMG_0001.JPG", ("IMG_0001", "jpg")),
        ("my photo's copy.jpeg", ("my photo's copy", "jpeg")),
        ("dir with space/it's here.png", ("dir with space/it's here", "png")),
        ("v1.2/img.webp", ("v1.2/img", "webp")),  # dots in folders are not extensions
        ("sample.seg.PNG", ("sample", "seg.png")),
        ("README", ("README", "")),
    ],
)
def test_webdataset_key(name, expected):
    assert webdataset_key(name) == expected


# ------------------------------------------------------------------------------------------------------ read_tar


def test_read_tar_yields_images_in_order_on_both_backends(storage_root):
    members = [
        ("000.jpg", payload("000.jpg")),
        ("000.json", b'{"caption": "not an image"}'),
        ("000.txt", b"a caption"),
        ("sub", None),
        ("sub/dir", None),
        ("sub/dir/img.jpg", payload("sub/dir/img.jpg")),
        ("001.PNG", payload("001.PNG")),
        ("001.cls", b"7"),
        ("002.webp", payload("002.webp")),
        ("003.txt", b"a sample without an image"),
        ("album.jpg", None),  # a directory with an image-like name is still only a directory
        ("album.jpg/inner.png", payload("album.jpg/inner.png")),
    ]
    storage_root.storage.write_bytes(join(storage_root.uri, "shards", "00000.tar"), tar_bytes(members))
    task = tar_task(storage_root.uri)

    records = list(read_shard(_source(storage_root.storage, task), task))

    source = join(storage_root.uri, "shards/00000.tar")
    assert records == [
        Record("000", source, payload("000.jpg"), sidecar='{"caption":"not an image"}'),
        Record("sub/dir/img", source, payload("sub/dir/img.jpg")),
        Record("001", source, payload("001.PNG"), given_label="7"),
        Record("002", source, payload("002.webp")),
        Record("album.jpg/inner", source, payload("album.jpg/inner.png")),
    ]


def test_read_tar_only_takes_the_configured_extensions(tmp_path):
    task = local_tar(tmp_path, [("a.jpg", b"a"), ("b.png", b"b"), ("c.jpeg", b"c"), ("d.x.jpg", b"d")])

    records = list(read_tar(LocalStorage(), task, ("jpg",)))

    assert [(r.key, r.data) for r in records] == [("a", b"a"), ("d", b"d")]


def test_read_tar_reads_gzipped_tars(tmp_path):
    task = local_tar(tmp_path, [("a.jpg", payload("a")), ("a.json", b"{}"), ("b.jpg", payload("b"))], compress=True)

    assert [(r.key, r.data) for r in read_all_tar(task)] == [("a", payload("a")), ("b", payload("b"))]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_read_tar_long_and_unicode_names(tmp_path, fmt):
    """Names over 100 bytes use extra headers (GNU longname, PAX records) that are read before the member."""
    long_key = "deep/" * 30 + "photo"
    names = [f"{long_key}.jpg", "фото ü 日本.jpg", "short.jpg"]
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    path.write_bytes(tar_bytes([(name, payload(name)) for name in names], fmt=fmt))

    records = read_all_tar(tar_task(str(tmp_path)))

    assert [(r.key, r.data) for r in records] == [
        (long_key, payload(names[0])),
        ("фото ü 日本", payload(names[1])),
        ("short", payload(names[2])),
    ]


def test_read_tar_of_an_empty_tar_yields_nothing(tmp_path):
    assert read_all_tar(local_tar(tmp_path, [])) == []


def test_read_tar_hostile_names_are_only_keys(tmp_path, monkeypatch):
    members = [
        ("../../etc/passwd.jpg", payload("passwd")),
        ("../escape.jpg", payload("escape")),
        ("/tmp/bulklabel-abs-evil.jpg", payload("abs")),
        ("ok.jpg", payload("ok")),
    ]
    # Two levels below the watched folder, so that `../../` from the shards' folder still lands inside it: watching
    # pytest's shared base folder instead saw the session's S3 server write its own files there.
    root = tmp_path / "a" / "b"
    task = local_tar(root, members)
    watched = tmp_path
    before = sorted(str(p) for p in watched.rglob("*"))
    monkeypatch.chdir(root / "shards")  # a relative extraction would land under `watched`

    records = read_all_tar(task)

    assert [(r.key, r.data, r.error) for r in records] == [
        ("../../etc/passwd", payload("passwd"), None),
        ("../escape", payload("escape"), None),
        ("/tmp/bulklabel-abs-evil", payload("abs"), None),
        ("ok", payload("ok"), None),
    ]
    assert sorted(str(p) for p in watched.rglob("*")) == before
    assert not Path("/tmp/bulklabel-abs-evil.jpg").exists()


def test_read_tar_links_are_error_records(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    members = [
        ("a.jpg", payload("a")),
        ("link.jpg", f"->{outside}"),
        ("rel.jpg", "->a.jpg"),
        ("b.jpg", payload("b")),
    ]
    records = read_all_tar(local_tar(tmp_path, members))

    assert [r.key for r in records] == ["a", "link", "rel", "b"]
    assert records[0] == Record("a", records[0].source, payload("a"))
    assert records[3] == Record("b", records[3].source, payload("b"))
    for record in records[1:3]:
        assert record.data is None
        assert "not a regular file" in record.error and f"{record.key}.jpg" in record.error


def test_read_tar_duplicate_key_is_an_error_record(tmp_path):
    members = [("a.jpg", payload("a1")), ("a.png", payload("a2")), ("b.jpg", payload("b")), ("a.jpg", payload("a3"))]

    records = read_all_tar(local_tar(tmp_path, members))

    assert [r.key for r in records] == ["a", "a", "b", "a"]
    assert records[0].data == payload("a1") and records[0].error is None
    assert records[2].data == payload("b") and records[2].error is None
    for record, member in ((records[1], "a.png"), (records[3], "a.jpg")):
        assert record.data is None
        assert "duplicate" in record.error and "'a'" in record.error and member in record.error


def _shard_for_truncation() -> tuple[bytes, dict[str, int]]:
    """A 4-sample shard (1536-byte images, 512-byte sidecars) and the offsets where its members start."""
    members = []
    for i in range(4):
        members += [(f"{i}.jpg", bytes([i]) * 1500), (f"{i}.json", b"{}")]
    data = tar_bytes(members)
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            offsets[member.name] = member.offset
    return data, offsets


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "where",
    ["inside image data", "inside sidecar data", "at a member boundary", "inside a header", "before the end blocks"],
)
def test_read_tar_truncated_shard_raises(tmp_path, where):
    """A cut-short tar must fail the shard (it is retried), never commit with its last rows silently missing."""
    data, offsets = _shard_for_truncation()
    cut = {
        "inside image data": offsets["2.jpg"] + 512 + 700,
        "inside sidecar data": offsets["2.json"] + 512 + 1,
        "at a member boundary": offsets["2.jpg"],
        "inside a header": offsets["2.jpg"] + 100,
        "before the end blocks": offsets["3.json"] + 1024,  # every member complete, no end-of-archive block
    }[where]
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    path.write_bytes(data[:cut])

    with pytest.raises(tarfile.ReadError):
        read_all_tar(tar_task(str(tmp_path)))


def test_read_tar_of_a_complete_shard_reads_every_sample(tmp_path):
    data, _ = _shard_for_truncation()
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    path.write_bytes(data)

    assert [(r.key, r.data) for r in read_all_tar(tar_task(str(tmp_path)))] == [
        (str(i), bytes([i]) * 1500) for i in range(4)
    ]


@pytest.mark.timeout(30)
def test_read_tar_of_a_non_tar_object_raises(tmp_path):
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg, not a tar" * 100)

    with pytest.raises(tarfile.ReadError):
        read_all_tar(tar_task(str(tmp_path)))


def test_read_tar_of_a_missing_object_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_all_tar(tar_task(str(tmp_path), "shards/missing.tar"))


# ---------------------------------------------------------------------------------------------------- read_files


def test_read_files_in_task_key_order_on_both_backends(storage_root):
    keys = ("b/2.jpg", "a/1.jpg", "c d's 3.jpg", "z.png", "0.jpg")
    base = join(storage_root.uri, "images")
    for key in keys:
        storage_root.storage.write_bytes(join(base, key), payload(key))
    task = ShardTask(shard_id="s-1", kind="files", base_uri=base, keys=keys)

    with ThreadPoolExecutor(4) as pool:
        records = list(read_shard(_source(storage_root.storage, task, pool), task))

    assert records == [Record(key, join(base, key), payload(key), given_label=class_folder(key)) for key in keys]


def test_read_files_missing_object_is_an_error_record_on_both_backends(storage_root):
    base = join(storage_root.uri, "images")
    for key in ("a.jpg", "c.jpg"):
        storage_root.storage.write_bytes(join(base, key), payload(key))
    task = ShardTask(shard_id="s-1", kind="files", base_uri=base, keys=("a.jpg", "gone.jpg", "c.jpg"))

    with ThreadPoolExecutor(2) as pool:
        records = list(read_files(storage_root.storage, task, pool))

    assert [r.key for r in records] == ["a.jpg", "gone.jpg", "c.jpg"]
    assert records[0] == Record("a.jpg", join(base, "a.jpg"), payload("a.jpg"))
    assert records[2] == Record("c.jpg", join(base, "c.jpg"), payload("c.jpg"))
    missing = records[1]
    assert missing.data is None and missing.source == join(base, "gone.jpg")
    assert missing.error == f"missing: {join(base, 'gone.jpg')} does not exist"


def test_read_files_absolute_keys_are_used_as_given_on_both_backends(storage_root):
    elsewhere = join(storage_root.uri, "elsewhere", "x.jpg")
    storage_root.storage.write_bytes(elsewhere, payload("x"))
    base = join(storage_root.uri, "base")
    storage_root.storage.write_bytes(join(base, "y.jpg"), payload("y"))
    assert elsewhere.startswith(("/", "s3://"))
    task = ShardTask(shard_id="s-1", kind="files", base_uri=base, keys=(elsewhere, "y.jpg"))

    with ThreadPoolExecutor(2) as pool:
        records = list(read_files(storage_root.storage, task, pool))

    assert records == [Record(elsewhere, elsewhere, payload("x")), Record("y.jpg", join(base, "y.jpg"), payload("y"))]


def test_read_files_unreadable_local_object_is_an_error_record(tmp_path):
    (tmp_path / "a_folder.jpg").mkdir()  # IsADirectoryError, an OSError
    task = ShardTask(shard_id="s-1", kind="files", base_uri=str(tmp_path), keys=("a_folder.jpg",))

    with ThreadPoolExecutor(1) as pool:
        [record] = list(read_files(LocalStorage(), task, pool))

    assert record.data is None and "IsADirectoryError" in record.error


def test_read_files_unreadable_local_file_is_an_error_record(tmp_path):
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"x")
    locked.chmod(0)
    (tmp_path / "ok.jpg").write_bytes(b"ok")
    task = ShardTask(shard_id="s-1", kind="files", base_uri=str(tmp_path), keys=("locked.jpg", "ok.jpg"))

    class RootProofStorage(LocalStorage):
        """As root, mode 0 does not stop a read: raise what open() raises for everyone else."""

        def open_read(self, uri: str):
            if uri == str(locked) and os.access(locked, os.R_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), uri)
            return super().open_read(uri)

    with ThreadPoolExecutor(2) as pool:
        records = list(read_files(RootProofStorage(), task, pool))

    assert records[0].data is None and "PermissionError" in records[0].error
    assert records[1] == Record("ok.jpg", str(tmp_path / "ok.jpg"), b"ok")


@pytest.mark.timeout(60)
def test_read_files_unreachable_store_raises_instead_of_error_records(monkeypatch):
    """An outage is not a fact about the images: it fails the shard (retried by the driver), never becomes rows."""
    monkeypatch.setattr(S3Storage, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(S3Storage, "RETRY_BASE_S", 0.01)
    storage = S3Storage(StorageOptions(endpoint_url="http://127.0.0.1:9", access_key_id="k", secret_access_key="s"))
    task = ShardTask(shard_id="s-1", kind="files", base_uri="s3://bucket/images", keys=("a.jpg", "b.jpg"))

    with ThreadPoolExecutor(2) as pool, pytest.raises(StoreUnavailable, match="unreachable"):
        list(read_files(storage, task, pool))


def test_read_files_with_a_wrong_secret_raises_access_denied(s3_server, s3_prefix):
    """Rotated credentials fail the job naming the location; before, every image became a SignatureDoesNotMatch row."""
    good = open_storage(s3_prefix, s3_server.options())
    good.write_bytes(join(s3_prefix, "a.jpg"), payload("a"))
    right = s3_server.options()
    options = StorageOptions(endpoint_url=right.endpoint_url, access_key_id=right.access_key_id,
                             secret_access_key="rotated-" + "0" * 24)  # fmt: skip
    task = ShardTask(shard_id="s-1", kind="files", base_uri=s3_prefix, keys=("a.jpg",))

    with ThreadPoolExecutor(2) as pool, pytest.raises(AccessDenied, match="a.jpg"):
        list(read_files(S3Storage(options), task, pool))


def test_read_files_reads_each_key_through_the_storage_of_its_own_scheme(s3_server, s3_prefix, tmp_path):
    """A local path in an S3 manifest and an s3:// key in a local one are read from where they point."""
    s3 = open_storage(s3_prefix, s3_server.options())
    s3.write_bytes(join(s3_prefix, "remote.jpg"), payload("remote"))
    local = tmp_path / "local.jpg"
    local.write_bytes(payload("local"))
    stores = StorageByScheme(s3_server.options())
    keys = (str(local), join(s3_prefix, "remote.jpg"))

    for base in (s3_prefix, str(tmp_path / "manifest-folder")):
        task = ShardTask(shard_id="s-1", kind="files", base_uri=base, keys=keys)
        with ThreadPoolExecutor(2) as pool:
            records = list(read_files(stores(base), task, pool, stores=stores))
        assert records == [Record(keys[0], keys[0], payload("local")), Record(keys[1], keys[1], payload("remote"))]


@pytest.mark.parametrize(
    "bad_key, error",
    [
        ("s3:///no-bucket.jpg", "no bucket"),
        ("s3://", "no bucket"),
        ("http://example.com/x.jpg", "unsupported URI scheme"),
        ("nul\0byte.jpg", "malformed key"),
        ("a.jpg/inside-a-file.jpg", "NotADirectoryError"),
        ("x" * 300 + ".jpg", "OSError"),
        ("sub", "IsADirectoryError"),
    ],
)
def test_read_files_one_bad_key_is_a_row_and_the_others_are_read(tmp_path, bad_key, error):
    """One malformed or unreadable key in a manifest never costs its shard's other images."""
    (tmp_path / "a.jpg").write_bytes(payload("a"))
    (tmp_path / "b.jpg").write_bytes(payload("b"))
    (tmp_path / "sub").mkdir()
    task = ShardTask(shard_id="s-1", kind="files", base_uri=str(tmp_path), keys=("a.jpg", bad_key, "b.jpg"))

    with ThreadPoolExecutor(3) as pool:
        records = list(read_files(LocalStorage(), task, pool))

    assert [r.key for r in records] == ["a.jpg", bad_key, "b.jpg"]
    assert records[0].data == payload("a") and records[2].data == payload("b")
    assert records[1].data is None and records[1].error.startswith("cannot read ") and error in records[1].error


def test_read_files_objects_above_the_cap_are_refused_without_being_read(storage_root):
    base = join(storage_root.uri, "images")
    sizes = {"small.jpg": 100, "exact.jpg": 1000, "big.jpg": 1001, "listed-big.jpg": 10}
    for key, size in sizes.items():
        storage_root.storage.write_bytes(join(base, key), b"x" * size)
    keys = tuple(sizes)
    unlisted = ShardTask(shard_id="s-1", kind="files", base_uri=base, keys=keys)  # a manifest: sizes unknown
    # A listing says how large each object is: one listed above the cap is refused before any GET.
    listed = unlisted.model_copy(update={"sizes": (100, 1000, 1001, 5000), "etags": ("",) * 4})

    with ThreadPoolExecutor(2) as pool:
        by_stream = list(read_files(storage_root.storage, unlisted, pool, max_bytes=1000))
        by_listing = list(read_files(storage_root.storage, listed, pool, max_bytes=1000))

    assert [r.data for r in by_stream] == [b"x" * 100, b"x" * 1000, None, b"x" * 10]
    assert by_stream[2].error == (
        f"refused: {join(base, 'big.jpg')} is more than 1000 bytes, above max_object_bytes=1000"
    )
    assert [r.data for r in by_listing] == [b"x" * 100, b"x" * 1000, None, None]
    assert by_listing[3].error == (
        f"refused: {join(base, 'listed-big.jpg')} is 5000 bytes, above max_object_bytes=1000"
    )


def test_read_tar_members_above_the_cap_are_error_records_and_not_read(tmp_path):
    members = [("a.jpg", b"a" * 512), ("huge.jpg", b"h" * 5000), ("b.jpg", b"b" * 1024)]
    task = local_tar(tmp_path, members)

    records = list(read_shard(_source(LocalStorage(), task, max_object_bytes=1024), task))

    assert [(r.key, r.data) for r in records] == [("a", b"a" * 512), ("huge", None), ("b", b"b" * 1024)]
    assert records[1].error == "refused: member 'huge.jpg' is 5000 bytes, above max_object_bytes=1024"


# --------------------------------------------------------------------------------------------------- bounded_map


@pytest.mark.timeout(30)
@pytest.mark.parametrize("window", [1, 3, 8])
def test_bounded_map_keeps_order_and_bounds_calls_in_flight(window):
    lock = threading.Lock()
    started = consumed = running = max_running = 0
    max_ahead = 0
    # The first `window` calls wait for each other: the map must really run `window` at once (or this times out).
    barrier = threading.Barrier(window, timeout=10)

    def fn(item: int) -> int:
        nonlocal started, running, max_running, max_ahead
        with lock:
            started += 1
            running += 1
            max_running = max(max_running, running)
            max_ahead = max(max_ahead, started - consumed)
        if item < window:
            barrier.wait()
        time.sleep(0.002 * ((item * 7) % 5))  # finish out of order
        with lock:
            running -= 1
        return item * 10

    results = []
    with ThreadPoolExecutor(max_workers=window + 8) as pool:
        for result in bounded_map(pool, fn, range(60), window=window):
            with lock:
                consumed += 1
            results.append(result)

    assert results == [i * 10 for i in range(60)]
    assert max_running <= window
    assert max_ahead <= window  # started but not yet handed to the consumer
    assert started == 60


def test_bounded_map_is_lazy_when_the_consumer_stops_early():
    submitted = []

    def fn(item: int) -> int:
        submitted.append(item)
        return item

    with ThreadPoolExecutor(8) as pool:
        iterator = bounded_map(pool, fn, range(1000), window=4)
        assert [next(iterator) for _ in range(3)] == [0, 1, 2]
        iterator.close()

    assert len(submitted) <= 3 + 4


def test_bounded_map_propagates_exceptions_in_order():
    def fn(item: int) -> int:
        if item == 2:
            raise ValueError("bad item 2")
        return item

    with ThreadPoolExecutor(4) as pool:
        iterator = bounded_map(pool, fn, range(5), window=3)
        assert next(iterator) == 0 and next(iterator) == 1
        with pytest.raises(ValueError, match="bad item 2"):
            next(iterator)


def test_read_shard_files_uses_the_pool(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"a")
    task = ShardTask(shard_id="s", kind="files", base_uri=str(tmp_path), keys=("a.jpg",))
    names = []

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            names.append(args[0])
            return super().submit(fn, *args, **kwargs)

    with RecordingPool(1) as pool:
        assert list(read_shard(_source(LocalStorage(), task, pool), task)) == [
            Record("a.jpg", os.path.join(str(tmp_path), "a.jpg"), b"a")
        ]
    assert names == ["a.jpg"]
