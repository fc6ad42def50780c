"""Planning turns any input layout into stable, uniquely named shard tasks, streamed; it skips only what the spec
excludes (and counts it), fingerprints what it lists, keeps committed loose-files shards on re-runs, confines
manifest keys to allowed locations, and fails fast on empty input."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jobs.errors import BadInput
from jobs.label import plan
from jobs.label.plan import KeyResolver, PlanError, PlanStats, files_shard_id, is_excluded, plan_shards, shard_id_for
from schemas.shards import ShardResult, ShardTask
from schemas.specs import InputSpec, StorageOptions
from workers.io.storage import AccessDenied, ObjectInfo, StoreUnavailable, join, open_storage

ID_PATTERN = r"^[A-Za-z0-9._=-]+$"


def _tar_bytes(payload: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _put_tar(storage, uri: str, payload: bytes = b"") -> None:
    storage.write_bytes(uri, _tar_bytes(payload))


def _h(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _marker(task) -> ShardResult:
    """The done-marker a worker writes for `task` (the fields planning reads: id, fingerprint, key range)."""
    return ShardResult(
        shard_id=task.shard_id, job_id="j", fingerprint=task.fingerprint(), data_uri="x", rows=len(task.keys),
        errors=0, bytes_read=0, seconds=0, attempt=1, marker_format=2, first_key=task.keys[0], last_key=task.keys[-1],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ loose files


def test_loose_files_are_grouped_in_key_order(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    for name in ["b/2.JPG", "a 1.jpg", "c.png", "notes.txt"]:
        storage.write_bytes(join(root, name), b"x")
    stats = PlanStats()
    tasks = list(plan_shards(InputSpec(uri=root, files_per_shard=2), storage, stats))
    assert [t.keys for t in tasks] == [("a 1.jpg", "b/2.JPG"), ("c.png",)]
    assert [t.shard_id for t in tasks] == [f"files-a_1.jpg-{_h('a 1.jpg')}", f"files-c.png-{_h('c.png')}"]
    assert all(t.kind == "files" and t.base_uri == root for t in tasks)
    assert (stats.not_images, stats.excluded, stats.examples) == (1, 0, ["notes.txt"])
    # Same input, same plan: this is what lets a re-run skip committed shards.
    again = list(plan_shards(InputSpec(uri=root, files_per_shard=2), storage))
    assert [(t.shard_id, t.fingerprint()) for t in tasks] == [(t.shard_id, t.fingerprint()) for t in again]


def test_camera_and_hidden_names_are_planned(storage_root):
    """Issue 9 case 3: names starting with '_' or '.' (Sony/Nikon `_DSC0001.JPG`, `_archive/`, `.thumbs/`) were
    dropped without a word; nothing but the spec's exclusions is skipped now."""
    root, storage = storage_root.uri, storage_root.storage
    names = ["_DSC0001.JPG", "_archive/x.jpg", ".thumbs/y.jpg", ".hidden.png", "plain.jpg"]
    for name in names:
        storage.write_bytes(join(root, name), b"x")
    stats = PlanStats()
    tasks = list(plan_shards(InputSpec(uri=root, files_per_shard=100), storage, stats))
    assert sorted(k for t in tasks for k in t.keys) == sorted(names)
    assert stats.skipped == 0
    assert all(not t.shard_id.startswith((".", "_")) for t in tasks)  # ids never look like hidden or own files


def test_excluded_keys_are_skipped_and_counted(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    for name in ["a.jpg", ".thumbs/t.jpg", "sub/.thumbs/u.jpg", "raw/r.jpg", "sub/raw/kept.jpg", "x.part.jpg", "n.txt"]:
        storage.write_bytes(join(root, name), b"x")
    stats = PlanStats()
    spec = InputSpec(uri=root, exclude=(".thumbs", "raw/", "*.part.jpg"))
    keys = [k for t in plan_shards(spec, storage, stats) for k in t.keys]
    assert keys == ["a.jpg", "sub/raw/kept.jpg"]
    assert (stats.excluded, stats.not_images) == (4, 1)
    assert set(stats.examples) == {".thumbs/t.jpg", "sub/.thumbs/u.jpg", "raw/r.jpg", "x.part.jpg", "n.txt"}


@pytest.mark.parametrize(
    ("key", "pattern", "excluded"),
    [
        (".thumbs/y.jpg", ".thumbs", True),  # a folder name, anywhere
        ("a/b/.thumbs/y.jpg", ".thumbs", True),
        ("a/.DS_Store", ".DS_Store", True),  # a file name, anywhere
        ("x.tmp", "*.tmp", True),
        ("a/b/x.tmp", "*.tmp", True),  # `*` crosses `/` against the whole key
        ("raw/x/y.jpg", "raw/**", True),
        ("raw/y.jpg", "raw/", True),  # a trailing `/`: that folder at that place of the key
        ("a/raw/y.jpg", "raw/", False),
        ("_DSC0001.JPG", "*.jpg", False),  # case-sensitive, as keys are
        ("thumbs/y.jpg", ".thumbs", False),
    ],
)
def test_exclude_pattern_matching(key, pattern, excluded):
    assert is_excluded(key, (pattern,)) is excluded


def test_many_skipped_objects_keep_a_few_examples():
    stats = PlanStats()
    for i in range(100):
        stats.skip(f"k{i}", excluded=i % 2 == 0)
    assert (stats.excluded, stats.not_images, stats.skipped) == (50, 50, 100)
    assert stats.examples == [f"k{i}" for i in range(PlanStats.MAX_EXAMPLES)]


def test_empty_or_missing_input_fails_before_any_shard(storage_root):
    with pytest.raises(PlanError, match="holds no images"):
        next(plan_shards(InputSpec(uri=join(storage_root.uri, "nothing-here")), storage_root.storage))


def test_an_input_of_only_excluded_files_says_what_was_skipped(storage_root):
    storage_root.storage.write_bytes(join(storage_root.uri, "raw/a.jpg"), b"x")
    with pytest.raises(PlanError, match=r"holds no images.*1 excluded by `exclude`.*raw/a.jpg"):
        next(plan_shards(InputSpec(uri=storage_root.uri, exclude=("raw",)), storage_root.storage))


def test_loose_file_fingerprints_cover_sizes_and_etags(storage_root):
    """Issue 9 case 7: a file rewritten under the same name (same size even) changes its shard's fingerprint."""
    root, storage = storage_root.uri, storage_root.storage
    storage.write_bytes(join(root, "a.jpg"), b"one")
    storage.write_bytes(join(root, "b.jpg"), b"two")
    before = next(plan_shards(InputSpec(uri=root), storage))
    assert before.sizes == (3, 3) and all(before.etags)
    storage.write_bytes(join(root, "b.jpg"), b"TWO")
    if not root.startswith("s3://"):  # a coarse file-system clock must not hide the rewrite from this test
        os.utime(join(root, "b.jpg"), ns=(1, 1))
    after = next(plan_shards(InputSpec(uri=root), storage))
    assert (after.shard_id, after.keys) == (before.shard_id, before.keys)
    assert after.fingerprint() != before.fingerprint()


# ------------------------------------------------------------------------------------------------ incremental


def _write_names(storage, root: str, names) -> None:
    for name in names:
        storage.write_bytes(join(root, name), b"x")


def test_new_files_form_new_shards_and_committed_shards_keep_theirs(storage_root):
    """Issue 9 case 7: files added after a job finished used to shift every later shard (chunks in listing order);
    now keys inside a committed shard's key range form that shard again, and the rest form new shards."""
    root, storage = storage_root.uri, storage_root.storage
    _write_names(storage, root, [f"{i:02d}.jpg" for i in range(10)])
    spec = InputSpec(uri=root, files_per_shard=4)
    first = list(plan_shards(spec, storage))
    assert [t.keys[0] for t in first] == ["00.jpg", "04.jpg", "08.jpg"]
    markers = [_marker(t) for t in first]

    _write_names(storage, root, ["-early.jpg", "05b.jpg", "10.jpg", "11.jpg", "12.jpg"])
    again = {t.shard_id: t for t in plan_shards(spec, storage, committed=markers)}
    assert set(again) == {m.shard_id for m in markers} | {files_shard_id("-early.jpg"), files_shard_id("10.jpg")}
    assert again[files_shard_id("-early.jpg")].keys == ("-early.jpg",)  # cut where the first committed range begins
    assert again[files_shard_id("10.jpg")].keys == ("10.jpg", "11.jpg", "12.jpg")
    unchanged = {m.shard_id: m.fingerprint for m in markers if again[m.shard_id].fingerprint() == m.fingerprint}
    assert set(unchanged) == {first[0].shard_id, first[2].shard_id}
    assert again[first[1].shard_id].keys == ("04.jpg", "05.jpg", "05b.jpg", "06.jpg", "07.jpg")  # changed: refused


def test_an_interrupted_run_resumes_with_the_same_shards(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    _write_names(storage, root, [f"{i:02d}.jpg" for i in range(14)])
    spec = InputSpec(uri=root, files_per_shard=4)
    first = list(plan_shards(spec, storage))
    resumed = list(plan_shards(spec, storage, committed=[_marker(first[0]), _marker(first[2])]))
    assert [(t.shard_id, t.fingerprint()) for t in resumed] == [(t.shard_id, t.fingerprint()) for t in first]


def test_a_committed_shard_whose_files_are_all_gone_is_not_planned(storage_root):
    """The runner notices the committed shard missing from the plan and refuses (input removed)."""
    root, storage = storage_root.uri, storage_root.storage
    _write_names(storage, root, ["a.jpg", "b.jpg", "c.jpg"])
    first = list(plan_shards(InputSpec(uri=root, files_per_shard=1), storage))
    storage.delete(join(root, "b.jpg"))
    again = list(plan_shards(InputSpec(uri=root, files_per_shard=1), storage, committed=map(_marker, first)))
    assert [t.shard_id for t in again] == [first[0].shard_id, first[2].shard_id]


def test_overlapping_committed_ranges_are_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    spec = InputSpec(uri=str(tmp_path))
    task = next(plan_shards(spec, open_storage(str(tmp_path))))
    one = _marker(task).model_copy(update={"shard_id": "files-one", "first_key": "a", "last_key": "m"})
    two = _marker(task).model_copy(update={"shard_id": "files-two", "first_key": "k", "last_key": "z"})
    with pytest.raises(PlanError, match="files-one and files-two claim overlapping key ranges"):
        list(plan_shards(spec, open_storage(str(tmp_path)), committed=[one, two]))


# ------------------------------------------------------------------------------------------------ tar shards


def test_tar_prefix_gives_one_shard_per_tar(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    for name in ["00000.tar", "sub/00001.tar"]:
        _put_tar(storage, join(root, name))
    storage.write_bytes(join(root, "stats.json"), b"{}")
    stats = PlanStats()
    tasks = list(plan_shards(InputSpec(uri=root), storage, stats))
    expected = [(f"00000-{_h('00000.tar')}", ("00000.tar",)), (f"sub__00001-{_h('sub/00001.tar')}", ("sub/00001.tar",))]
    assert sorted((t.shard_id, t.keys) for t in tasks) == expected
    assert {t.kind for t in tasks} == {"tar"}
    assert all(t.sizes == (len(_tar_bytes()),) and len(t.etags) == 1 and t.etags[0] for t in tasks)
    assert (stats.not_images, stats.examples) == (1, ["stats.json"])


def test_tar_names_that_sanitise_alike_get_distinct_ids(storage_root):
    """Issue 9 case 2: '中国.tar' and '日本.tar' both became '_', 'a b.tar' and 'a_b.tar' both 'a_b': half lost."""
    root, storage = storage_root.uri, storage_root.storage
    names = ["中国.tar", "日本.tar", "a b.tar", "a_b.tar"]
    for name in names:
        _put_tar(storage, join(root, name))
    tasks = list(plan_shards(InputSpec(uri=root), storage))
    assert sorted(t.keys[0] for t in tasks) == sorted(names)
    ids = [t.shard_id for t in tasks]
    assert len(set(ids)) == 4
    assert all(re.match(ID_PATTERN, i) for i in ids)
    assert {i.rsplit("-", 1)[0] for i in ids} == {"shard", "a_b"}  # the readable part; the hash keeps them apart


def test_a_rewritten_tar_changes_its_fingerprint(storage_root):
    """Issue 9 case 7: a tar rewritten with other photos under the same member names was 'already complete'."""
    root, storage = storage_root.uri, storage_root.storage
    _put_tar(storage, join(root, "00000.tar"), b"photo one")
    before = next(plan_shards(InputSpec(uri=root), storage))
    _put_tar(storage, join(root, "00000.tar"), b"photo two")  # same member name, same size
    if not root.startswith("s3://"):
        os.utime(join(root, "00000.tar"), ns=(1, 1))
    after = next(plan_shards(InputSpec(uri=root), storage))
    assert (after.shard_id, after.keys, after.sizes) == (before.shard_id, before.keys, before.sizes)
    assert after.fingerprint() != before.fingerprint()


def test_a_single_tar_file_as_input(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    _put_tar(storage, join(root, "only.tar"))
    (task,) = plan_shards(InputSpec(uri=join(root, "only.tar")), storage)
    assert (task.base_uri, task.keys) == (root, ("only.tar",))


def test_shard_ids_are_readable_safe_and_carry_a_hash_of_the_full_key():
    assert shard_id_for("2024/cam 1/shard-0001.tar") == f"2024__cam_1__shard-0001-{_h('2024/cam 1/shard-0001.tar')}"
    long_a, long_b = "x" * 300 + "a.tar", "x" * 300 + "b.tar"
    assert shard_id_for(long_a) != shard_id_for(long_b)
    for key in [long_a, "中国.tar", "../..//.tar", "_DSC.tar", ".hidden.tar"]:
        assert re.match(ID_PATTERN, shard_id_for(key)) and len(shard_id_for(key)) <= 120
        assert re.match(ID_PATTERN, files_shard_id(key)) and len(files_shard_id(key)) <= 120
        assert not shard_id_for(key).startswith((".", "_"))


def test_a_repeated_shard_id_refuses_the_plan(tmp_path, monkeypatch):
    """Uniqueness is by construction; should ids ever repeat (injected here), planning refuses rather than merging."""
    for name in ["a.tar", "b.tar"]:
        (tmp_path / name).write_bytes(_tar_bytes())
    monkeypatch.setattr(plan, "shard_id_for", lambda key: "same")
    with pytest.raises(PlanError, match=r"share the id same: 'a.tar' and 'b.tar'"):
        list(plan_shards(InputSpec(uri=str(tmp_path)), open_storage(str(tmp_path))))


# ------------------------------------------------------------------------------------------------ row keys


def test_a_key_repeated_in_a_manifest_refuses_the_plan_naming_both_lines(tmp_path):
    """`./b.jpg` is `b.jpg` once collapsed: the same image twice, in shards 1 and 2 (2 keys a shard)."""
    (tmp_path / "m.csv").write_text("key\na.jpg\nc.jpg\n./b.jpg\nd.jpg\nb.jpg\n")
    spec = InputSpec(uri=str(tmp_path / "m.csv"), files_per_shard=2)
    with pytest.raises(PlanError, match=r"line 4 and line 6 name the same row key 'b.jpg'"):
        next(plan_shards(spec, open_storage(str(tmp_path))))


def test_loose_files_keyed_by_name_refuse_two_files_of_one_name(tmp_path):
    for name in ["00000/000000001.jpg", "00000/000000002.jpg", "00001/000000001.jpg"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    spec = InputSpec(uri=str(tmp_path), row_key="name", files_per_shard=1)
    first, second = tmp_path / "00000/000000001.jpg", tmp_path / "00001/000000001.jpg"
    with pytest.raises(PlanError, match=f"share the key '000000001' .*: {first} and {second}; .*row_key: path"):
        next(plan_shards(spec, open_storage(str(tmp_path))))
    assert len(list(plan_shards(spec.model_copy(update={"row_key": "path"}), open_storage(str(tmp_path))))) == 3


def test_parquet_key_column_repeated_across_files_refuses_the_plan(storage_root):
    """Hugging Face splits whose `id` column restarts at 0 in each split: the ids repeat across the two files; read
    from the key column alone, on both backends (S3: by range)."""
    root, storage = storage_root.uri, storage_root.storage
    for split, ids in [("train", ["0", "1"]), ("test", ["0", "5"])]:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": ids, "image": [b"x", b"y"]}), buffer)
        storage.write_bytes(join(root, "default", split, "0000.parquet"), buffer.getvalue())
    spec = InputSpec(uri=root, format="parquet", key_column="id")
    train, test = join(root, "default/train/0000.parquet"), join(root, "default/test/0000.parquet")
    with pytest.raises(PlanError, match=f"share the key '0' .*: {re.escape(test)}#0 and {re.escape(train)}#0"):
        next(plan_shards(spec, storage))
    # Unset, keys are the files' paths and row numbers: unique by construction, nothing read to plan.
    assert [t.keys for t in plan_shards(InputSpec(uri=root, format="parquet"), storage)] == [
        ("default/test/0000.parquet",),
        ("default/train/0000.parquet",),
    ]
    with pytest.raises(PlanError, match="no key column 'uid'"):
        next(plan_shards(InputSpec(uri=root, format="parquet", key_column="uid"), storage))


def test_find_repeated_key_survives_digest_collisions(monkeypatch):
    from jobs.label import keys

    monkeypatch.setattr(keys, "_digest", lambda key: 7)  # every key collides: only equal keys are a repeat
    rows = [("a", "1"), ("b", "2"), ("c", "3")]
    assert keys.find_repeated_key(lambda: iter(rows)) is None
    assert keys.find_repeated_key(lambda: iter([*rows, ("b", "4")])) == keys.RepeatedKey("b", "2", "4")


# ------------------------------------------------------------------------------------------------ manifests


def _write_manifest(storage, uri: str, keys: list[str]) -> None:
    if uri.endswith(".csv"):
        storage.write_bytes(uri, ("key,label\n" + "".join(f"{k},x\n" for k in keys)).encode())
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"key": keys}), buffer)
        storage.write_bytes(uri, buffer.getvalue())


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_manifest_keys_become_shards(storage_root, suffix):
    root, storage = storage_root.uri, storage_root.storage
    keys = [f"img/{i:03d}.jpg" for i in range(5)]
    _write_manifest(storage, join(root, f"manifest.{suffix}"), keys)
    tasks = list(plan_shards(InputSpec(uri=join(root, f"manifest.{suffix}"), files_per_shard=2), storage))
    assert [t.keys for t in tasks] == [tuple(keys[0:2]), tuple(keys[2:4]), tuple(keys[4:])]
    assert [t.shard_id for t in tasks] == ["manifest-000000", "manifest-000001", "manifest-000002"]
    assert tasks[0].base_uri == root
    assert all(t.sizes == () and t.etags == () for t in tasks)  # not listed: manifest shards fingerprint keys only


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_manifests_label_column_travels_with_its_keys(tmp_path, suffix):
    keys, labels = ["a.jpg", "b.jpg", "c.jpg"], ["cat", None, "007"]
    table = pa.table({"key": keys, "label": labels, "tag": ["x", "y", "z"]})
    uri = str(tmp_path / f"m.{suffix}")
    pacsv.write_csv(table, uri) if suffix == "csv" else pq.write_table(table, uri)
    storage = open_storage(str(tmp_path))

    first, second = plan_shards(InputSpec(uri=uri, files_per_shard=2), storage)
    assert first.labels == ("cat", "") and second.labels == ("007",)  # text, as given; '' where a row has none
    (tagged,) = plan_shards(InputSpec(uri=uri, label_column="tag", files_per_shard=3), storage)
    assert tagged.labels == ("x", "y", "z") and tagged.fingerprint() != first.fingerprint()
    (unlabelled,) = plan_shards(InputSpec(uri=uri, label_column=None, files_per_shard=3), storage)
    assert unlabelled.labels == ()
    with pytest.raises(PlanError, match="no column 'species'"):
        list(plan_shards(InputSpec(uri=uri, label_column="species"), storage))


def test_a_manifest_without_a_label_column_plans_as_before(tmp_path):
    (tmp_path / "m.csv").write_text("key\na.jpg\n")
    (task,) = plan_shards(InputSpec(uri=str(tmp_path / "m.csv")), open_storage(str(tmp_path)))
    assert task.labels == () and task == ShardTask(shard_id=task.shard_id, kind="files", base_uri=str(tmp_path),
                                                   keys=("a.jpg",))  # fmt: skip


def test_manifest_keys_that_look_like_numbers_stay_text(tmp_path):
    (tmp_path / "m.csv").write_text("key\n0001\n0002\n")
    (task,) = plan_shards(InputSpec(uri=str(tmp_path / "m.csv")), open_storage(str(tmp_path)))
    assert task.keys == ("0001", "0002")


def test_manifest_without_the_key_column_is_named(storage_root):
    uri = join(storage_root.uri, "m.csv")
    storage_root.storage.write_bytes(uri, b"path\nx.jpg\n")
    with pytest.raises(PlanError, match="no column 'key'"):
        list(plan_shards(InputSpec(uri=uri), storage_root.storage))


def test_a_missing_or_unreadable_manifest_is_named(storage_root):
    with pytest.raises(PlanError, match="manifest .*m.csv does not exist"):
        next(plan_shards(InputSpec(uri=join(storage_root.uri, "m.csv")), storage_root.storage))
    storage_root.storage.write_bytes(join(storage_root.uri, "m.parquet"), b"not parquet at all")
    with pytest.raises(PlanError, match="m.parquet cannot be read"):
        next(plan_shards(InputSpec(uri=join(storage_root.uri, "m.parquet")), storage_root.storage))


def _outside_keys(root: str) -> list[str]:
    """Keys a manifest under `<root>/in/` must not name unless allowed_roots lists `<root>/elsewhere`."""
    local = "/etc/passwd" if root.startswith("s3://") else join(root, "in/../../etc/passwd")
    return [
        "/etc/passwd",
        local,
        "../elsewhere/x.jpg",
        join(root, "in/../elsewhere/y.jpg"),
        "s3://another-bucket/k.jpg",
    ]


def test_manifest_keys_outside_its_folder_are_refused_before_any_shard(storage_root):
    """Issue 9 cases 8 and 15: a manifest could name /etc/passwd, any photo on the workers' disks or another bucket,
    and a local path in an S3 manifest failed its whole shard; now the whole manifest is checked before planning."""
    root, storage = storage_root.uri, storage_root.storage
    inside = ["a.jpg", "sub/../b.jpg", join(root, "in/c.jpg")]
    uri = join(root, "in/m.csv")
    _write_manifest(storage, uri, inside + _outside_keys(root))
    with pytest.raises(PlanError, match=r"5 key\(s\) lie outside .*first: line 5: '/etc/passwd'.*allowed_roots"):
        next(plan_shards(InputSpec(uri=uri, files_per_shard=1), storage))  # the first shard is all inside


def test_allowed_roots_let_a_manifest_name_other_locations(storage_root):
    root, storage = storage_root.uri, storage_root.storage
    uri = join(root, "in/m.csv")
    _write_manifest(storage, uri, ["a.jpg", "sub/../b.jpg", join(root, "in/c.jpg"), "../elsewhere/x.jpg",
                                   join(root, "in/../elsewhere/y.jpg")])  # fmt: skip
    spec = InputSpec(uri=uri, allowed_roots=(join(root, "elsewhere") + "/",))
    (task,) = plan_shards(spec, storage)
    assert task.base_uri == join(root, "in")
    assert task.keys == ("a.jpg", "b.jpg", join(root, "in/c.jpg"), join(root, "elsewhere/x.jpg"),
                         join(root, "elsewhere/y.jpg"))  # fmt: skip
    _write_manifest(storage, uri, ["a.jpg", *_outside_keys(root)])
    with pytest.raises(PlanError, match=r"3 key\(s\) lie outside"):  # /etc/passwd (two spellings), another bucket
        next(plan_shards(spec, storage))


@pytest.mark.parametrize(
    ("base", "key", "resolved"),
    [
        ("/data/in", "x.jpg", "x.jpg"),
        ("/data/in", "a/./b/../x.jpg", "a/x.jpg"),
        ("/data/in", "/data/in/x.jpg", "/data/in/x.jpg"),
        ("/data/in", "/data/in/../../etc/passwd", None),
        ("/data/in", "../in-other/x.jpg", None),  # a sibling whose name starts like the folder is outside
        ("/data/in", "/data/inside/x.jpg", None),
        ("/data/in", "../../x.jpg", None),
        ("/data/in", "http://host/x.jpg", None),
        ("/data/in", "s3://b/in/x.jpg", None),
        ("s3://b/in", "x.jpg", "x.jpg"),
        ("s3://b/in", "a//x.jpg", "a//x.jpg"),  # S3 keys are literal: empty parts are kept
        ("s3://b/in", "s3://b/in/./x.jpg", "s3://b/in/x.jpg"),
        ("s3://b/in", "s3://b/in/../secret", None),
        ("s3://b/in", "../../../x.jpg", None),  # above the bucket
        ("s3://b/in", "/etc/passwd", None),
        ("s3://b", "s3://b/any/x.jpg", "s3://b/any/x.jpg"),  # a manifest at the bucket's root
    ],
)
def test_key_resolution(base, key, resolved):
    assert KeyResolver(base, ()).resolve(key) == resolved


def test_allowed_roots_as_written_and_through_symbolic_links(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    resolver = KeyResolver(str(tmp_path / "in"), [str(tmp_path / "link"), "s3://other/pre/"])
    assert resolver.resolve(str(tmp_path / "link/x.jpg")) == str(tmp_path / "link/x.jpg")
    assert resolver.resolve(str(real / "x.jpg")) == str(real / "x.jpg")
    assert resolver.resolve("s3://other/pre/x.jpg") == "s3://other/pre/x.jpg"
    assert resolver.resolve("s3://other/prefix/x.jpg") is None


# ------------------------------------------------------------------------------------------------ errors


def test_plan_errors_are_bad_input():
    assert issubclass(PlanError, BadInput)


def test_a_missing_bucket_is_a_plan_error(s3_server):
    uri = "s3://no-such-bucket-bulklabel/prefix"
    with pytest.raises(PlanError, match="no-such-bucket-bulklabel"):
        next(plan_shards(InputSpec(uri=uri), open_storage(uri, s3_server.options())))


def test_denied_access_is_not_a_plan_error(s3_server, s3_prefix):
    """Wrong credentials are an infrastructure error (exit 3), not bad input (exit 2)."""
    wrong = StorageOptions(**{**s3_server.options().model_dump(), "secret_access_key": "WRONG" * 8})
    with pytest.raises(AccessDenied):
        next(plan_shards(InputSpec(uri=s3_prefix), open_storage(s3_prefix, wrong)))


@pytest.mark.parametrize("fmt", ["auto", "files", "tar"])
def test_an_unreachable_store_is_not_a_plan_error(fmt):
    class Unreachable:  # the one failure injected: the store is down after the backend's own retries
        def list(self, prefix):
            raise StoreUnavailable(f"cannot list {prefix}: store unreachable")
            yield

    with pytest.raises(StoreUnavailable):
        next(plan_shards(InputSpec(uri="s3://b/p", format=fmt), Unreachable()))


def test_planning_streams_without_listing_everything_first(tmp_path):
    class CountingStorage:
        listed = 0

        def list(self, prefix):
            for i in range(1_000_000):
                CountingStorage.listed += 1
                yield ObjectInfo(f"{prefix}/{i:07d}.jpg", 1, "e")

    tasks = plan_shards(InputSpec(uri=str(tmp_path), format="files", files_per_shard=100), CountingStorage())
    first = next(tasks)
    assert len(first.keys) == 100
    assert CountingStorage.listed < 1000


def test_a_million_key_manifest_is_checked_quickly(tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w") as fh:
        fh.write("key\n")
        fh.writelines(f"img/{i:07d}.jpg\n" for i in range(1_000_000))
        fh.write("/etc/passwd\n")
    with pytest.raises(PlanError, match=r"1 key\(s\) lie outside .*line 1000002"):
        next(plan_shards(InputSpec(uri=str(manifest)), open_storage(str(manifest))))
