"""workers.finetune.data: listing (class folders, labels files) on both backends, the split, decoding, datasets."""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from schemas.finetune import FinetuneDataSpec
from schemas.specs import PreprocessSpec
from tests.support import PLANTS
from workers.finetune.data import (
    AugmentedImages,
    Example,
    FinetuneDataError,
    dataset_fingerprint,
    epoch_order,
    list_examples,
    load_images,
    plan_data,
    scaled_preprocess,
    shard_of,
    stratified_split,
    train_cache_preprocess,
)
from workers.finetune.dataplan import Listing, split_data
from workers.finetune.grouping import Groups
from workers.io.storage import join

PREPROCESS = PreprocessSpec(resize_size=40, crop_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG")
    return out.getvalue()


def write_classes(root, counts: dict[str, int]) -> None:
    """`counts[name]` small JPEGs in a folder per class on the root's backend."""
    for index, (name, count) in enumerate(counts.items()):
        for i in range(count):
            root.storage.write_bytes(join(root.uri, name, f"img{i:02d}.jpg"), jpeg((40 * index, 200 - i, 90)))


def examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{c}/{i}.jpg", f"/d/{c}/{i}.jpg", c, 100 + i) for c, n in counts.items() for i in range(n)]


# ------------------------------------------------------------------------------------------------- listing


def test_class_folders_list_every_image_with_its_folder_as_label(storage_root):
    write_classes(storage_root, {"healthy": 3, "blight": 2})
    storage_root.storage.write_bytes(join(storage_root.uri, "healthy", "notes.txt"), b"not an image")
    storage_root.storage.write_bytes(join(storage_root.uri, "blight", "deeper", "x.png"), jpeg((1, 2, 3)))
    storage_root.storage.write_bytes(join(storage_root.uri, "_checkpoints", "c", "a.jpg"), jpeg((1, 2, 3)))
    storage_root.storage.write_bytes(join(storage_root.uri, "loose.jpg"), jpeg((1, 2, 3)))

    found = list_examples(storage_root.uri, FinetuneDataSpec(uri=storage_root.uri), storage_root.storage)

    assert Counter(e.label for e in found) == {"healthy": 3, "blight": 3}
    assert {e.key for e in found if e.label == "blight"} >= {"blight/deeper/x.png", "blight/img00.jpg"}
    assert all(e.uri == join(storage_root.uri, e.key) and e.size > 0 for e in found)


def test_a_class_folder_without_images_is_named(storage_root):
    write_classes(storage_root, {"healthy": 3})
    storage_root.storage.write_bytes(join(storage_root.uri, "rust", "README.txt"), b"to do")

    with pytest.raises(FinetuneDataError, match=r"no images .*\['rust'\]"):
        list_examples(storage_root.uri, FinetuneDataSpec(uri=storage_root.uri), storage_root.storage)


def test_an_empty_local_class_folder_is_named(tmp_path):
    (tmp_path / "healthy").mkdir()
    (tmp_path / "healthy" / "a.jpg").write_bytes(jpeg((0, 0, 0)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneDataError, match=r"\['empty'\]"):
        list_examples(str(tmp_path), FinetuneDataSpec(uri=str(tmp_path)), _local())


def test_nothing_to_train_on_is_an_error(storage_root):
    storage_root.storage.write_bytes(join(storage_root.uri, "readme.txt"), b"")
    with pytest.raises(FinetuneDataError, match="no labelled images"):
        list_examples(storage_root.uri, FinetuneDataSpec(uri=storage_root.uri), storage_root.storage)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_labels_file_keys_are_relative_to_its_folder(storage_root, fmt):
    write_classes(storage_root, {"a": 2, "b": 2})
    rows = {"key": ["a/img00.jpg", "a/img01.jpg", "b/img00.jpg", "b/img01.jpg"], "label": ["x", "y", "x", "y"]}
    uri = join(storage_root.uri, f"labels.{fmt}")
    storage_root.storage.write_bytes(uri, _table_bytes(rows, fmt))

    found = list_examples(uri, FinetuneDataSpec(uri=uri), storage_root.storage)

    assert {(e.key, e.label) for e in found} == set(zip(rows["key"], rows["label"], strict=True))
    assert {e.uri for e in found} == {join(storage_root.uri, k) for k in rows["key"]}


def test_labels_file_naming_missing_keys_names_them(storage_root):
    write_classes(storage_root, {"a": 1})
    uri = join(storage_root.uri, "labels.csv")
    storage_root.storage.write_bytes(uri, b"key,label\na/img00.jpg,x\na/gone.jpg,y\nb/also-gone.jpg,y\n")

    with pytest.raises(FinetuneDataError, match=r"2 key\(s\) that do not exist .*'a/gone.jpg', 'b/also-gone.jpg'"):
        list_examples(uri, FinetuneDataSpec(uri=uri), storage_root.storage)


def test_labels_file_problems_are_explained(tmp_path):
    write_classes_local = {"a/img00.jpg": jpeg((0, 0, 0))}
    for key, data in write_classes_local.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)
    cases = {
        "file,class\na/img00.jpg,x\n": r"needs columns \['key', 'label'\]",
        "key,label\na/img00.jpg,x\na/img00.jpg,y\n": "labelled both 'x' and 'y'",
        "key,label\na/img00.jpg,\n": "empty 'key' or 'label'",
    }
    for text, message in cases.items():
        (tmp_path / "labels.csv").write_text(text)
        with pytest.raises(FinetuneDataError, match=message):
            list_examples(str(tmp_path / "labels.csv"), FinetuneDataSpec(uri=str(tmp_path / "labels.csv")), _local())
    spec = FinetuneDataSpec(uri=str(tmp_path / "labels.csv"), key_column="file", label_column="class")
    (tmp_path / "labels.csv").write_text("file,class\na/img00.jpg,x\n")
    assert [(e.key, e.label) for e in list_examples(spec.uri, spec, _local())] == [("a/img00.jpg", "x")]


def test_labels_file_keys_are_confined_like_manifest_keys(tmp_path):
    """A labels file may name its own folder's images and the allowed roots', nothing else: the same rule
    (workers.io.keys) as a label manifest's keys."""
    data, other = tmp_path / "data", tmp_path / "other"
    for folder in (data / "a", data / "b", other):
        folder.mkdir(parents=True)
    for i in range(2):
        (data / "a" / f"{i}.jpg").write_bytes(jpeg((i, 0, 0)))
        (data / "b" / f"{i}.jpg").write_bytes(jpeg((0, i, 0)))
    (other / "x.jpg").write_bytes(jpeg((9, 9, 9)))
    labels = data / "labels.csv"
    inside = "a/0.jpg,a\na/1.jpg,a\nb/0.jpg,b\nb/1.jpg,b\n"
    hostile = {"/etc/hostname": "b", str(other / "x.jpg"): "a", "../other/x.jpg": "a", f"{data}/../other/x.jpg": "b"}
    for key, label in hostile.items():
        labels.write_text(f"key,label\n{inside}{key},{label}\n")
        with pytest.raises(FinetuneDataError, match=r"1 key\(s\) lie outside the labels file's folder .*allowed_roots"):
            list_examples(str(labels), FinetuneDataSpec(uri=str(labels)), _local())

    labels.write_text(f"key,label\n{inside}{other / 'x.jpg'},a\n{data / 'b' / '1.jpg'},b\n./a/../a/0.jpg,a\n")
    found = list_examples(str(labels), FinetuneDataSpec(uri=str(labels), allowed_roots=(str(other),)), _local())
    assert sorted(e.uri for e in found) == sorted(str(p) for p in (other / "x.jpg", *data.glob("*/*.jpg")))
    labels.write_text(f"key,label\n{inside}/etc/hostname,b\n")
    with pytest.raises(FinetuneDataError, match="'/etc/hostname'"):
        list_examples(str(labels), FinetuneDataSpec(uri=str(labels), allowed_roots=(str(other),)), _local())


def test_the_plants_labels_file_and_folders_agree():
    by_folder = list_examples(str(PLANTS), FinetuneDataSpec(uri=str(PLANTS)), _local())
    labels = str(PLANTS / "labels.csv")
    by_file = list_examples(labels, FinetuneDataSpec(uri=labels, key_column="file"), _local())
    assert len(by_folder) == len(by_file) == 600
    assert {(e.uri, e.label) for e in by_folder} == {(e.uri, e.label) for e in by_file}
    assert dataset_fingerprint(by_folder) == dataset_fingerprint(by_file)


def _table_bytes(rows: dict, fmt: str) -> bytes:
    if fmt == "csv":
        lines = ["key,label"] + [f"{k},{v}" for k, v in zip(rows["key"], rows["label"], strict=True)]
        return ("\n".join(lines) + "\n").encode()
    out = io.BytesIO()
    pq.write_table(pa.table(rows), out)
    return out.getvalue()


def _local():
    from workers.io.storage import LocalStorage

    return LocalStorage()


# --------------------------------------------------------------------------------------------- split, plan


def test_stratified_split_holds_out_the_fraction_of_every_class_reproducibly():
    data = examples({"a": 50, "b": 10, "c": 2})
    train, val = stratified_split(data, 0.2, seed=7)

    assert Counter(e.label for e in val) == {"a": 10, "b": 2, "c": 1}  # at least one, never all
    assert Counter(e.label for e in train) == {"a": 40, "b": 8, "c": 1}
    assert stratified_split(list(reversed(data)), 0.2, seed=7) == (train, val)  # input order does not matter
    assert stratified_split(data, 0.2, seed=8)[1] != val


def test_adding_a_class_does_not_move_another_classs_images():
    _, before = stratified_split(examples({"a": 30, "b": 30}), 0.2, seed=0)
    _, after = stratified_split(examples({"a": 30, "b": 30, "new": 9}), 0.2, seed=0)
    assert [e for e in after if e.label != "new"] == before


def test_a_class_with_one_image_cannot_be_split(storage_root):
    write_classes(storage_root, {"many": 4, "single": 1})
    with pytest.raises(FinetuneDataError, match=r"at least 2 image\(s\) per class; too few in: 'single' \(1\)"):
        plan_data(FinetuneDataSpec(uri=storage_root.uri), storage_root.storage, seed=0)


def test_plan_indexes_sorted_class_names_and_keeps_the_split(tmp_path):
    root = tmp_path / "data"
    for name, count in {"zeta": 5, "alpha": 5}.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(jpeg((i, i, i)))

    plan = plan_data(FinetuneDataSpec(uri=str(root), val_fraction=0.4), _local(), seed=3)

    assert plan.class_names == ("alpha", "zeta")
    assert plan.counts("train") == {"alpha": 3, "zeta": 3} and plan.counts("val") == {"alpha": 2, "zeta": 2}
    assert all((uri.split("/")[-2] == "zeta") == (label == 1) for uri, label in plan.train + plan.val)
    assert Counter(split for *_, split in plan.split_rows) == {"train": 6, "val": 4}
    assert plan == plan_data(FinetuneDataSpec(uri=str(root), val_fraction=0.4), _local(), seed=3)


def test_a_given_validation_set_is_used_as_it_is(tmp_path):
    for part, counts in {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 2}}.items():
        for name, count in counts.items():
            (tmp_path / part / name).mkdir(parents=True)
            for i in range(count):
                (tmp_path / part / name / f"{i}.jpg").write_bytes(jpeg((i, 0, 0)))
    spec = FinetuneDataSpec(uri=str(tmp_path / "train"), validation_uri=str(tmp_path / "val"))

    plan = plan_data(spec, _local(), seed=0)
    assert plan.counts("train") == {"a": 3, "b": 3} and plan.counts("val") == {"a": 1, "b": 2}

    (tmp_path / "val" / "c").mkdir()
    (tmp_path / "val" / "c" / "0.jpg").write_bytes(jpeg((0, 0, 0)))
    with pytest.raises(FinetuneDataError, match=r"validation classes \['c'\] have no training images"):
        plan_data(spec, _local(), seed=0)


def test_fingerprint_changes_with_any_image_label_or_size():
    data = examples({"a": 3, "b": 3})
    base = dataset_fingerprint(data)
    assert dataset_fingerprint(reversed(data)) == base
    assert dataset_fingerprint(data[1:]) != base
    assert dataset_fingerprint([Example(data[0].key, data[0].uri, "b", data[0].size), *data[1:]]) != base
    assert dataset_fingerprint([Example(data[0].key, data[0].uri, "a", 1), *data[1:]]) != base


def _twice_stored(photos: int) -> tuple[list[Example], list[int]]:
    """Class a: `photos` photos each stored twice (`x.JPG`, `x (1).JPG`, byte-identical: one group); class b: ten
    distinct photos. Returns the examples and their group ids."""
    items, ids = [], []
    for i in range(photos):
        for name in (f"x{i}.JPG", f"x{i} (1).JPG"):
            items.append(Example(f"a/{name}", f"/d/a/{name}", "a", 100 + i))
            ids.append(i)
    for i in range(10):
        items.append(Example(f"b/{i}.JPG", f"/d/b/{i}.JPG", "b", 200 + i))
        ids.append(photos + i)
    return items, ids


def test_a_grouped_split_never_validates_a_copy_of_a_training_image():
    """Copies are one group; a group larger than its class's share stays in training whole, so that class gets no
    validation image (named, with the shortfall) rather than one whose twin is in training."""
    items, ids = _twice_stored(photos=3)  # class a: 6 images, a share of round(1.2) = 1, every group of 2
    spec = FinetuneDataSpec(uri="/d")

    plan = split_data(Listing(tuple(items), None), spec, seed=0, groups=Groups(tuple(ids)))

    group_of = {e.uri: g for e, g in zip(items, ids, strict=True)}
    assert not {group_of[uri] for uri, _ in plan.val} & {group_of[uri] for uri, _ in plan.train}
    assert plan.counts("val") == {"a": 0, "b": 2} and plan.counts("train") == {"a": 6, "b": 8}
    assert plan.unvalidated_classes == ("a",) and plan.val_shortfall == 1

    items, ids = _twice_stored(photos=10)  # a share of 4: two whole groups fit
    plan = split_data(Listing(tuple(items), None), spec, seed=0, groups=Groups(tuple(ids)))
    assert plan.counts("val") == {"a": 4, "b": 2} and (plan.unvalidated_classes, plan.val_shortfall) == ((), 0)

    copies_only = [e for e in _twice_stored(photos=3)[0] if e.label == "a"]
    twins = copies_only + [Example(f"c/{e.key[2:]}", f"/d/c/{e.key[2:]}", "c", e.size) for e in copies_only]
    with pytest.raises(FinetuneDataError, match="no validation image could be held out: every near-duplicate group"):
        split_data(Listing(tuple(twins), None), spec, seed=0, groups=Groups(tuple(i // 2 for i in range(12))))


def test_unreadable_images_are_left_out_before_the_split():
    """An unreadable image never takes a validation place: with it left out first, its class is validated on a
    readable image; a class left with one readable image is named as not validated; one with none is refused."""
    items = examples({"a": 10, "b": 4})
    spec = FinetuneDataSpec(uri="/d")
    picked = next(uri for uri, label in split_data(Listing(tuple(items), None), spec, seed=0).val if label == 1)
    unreadable = {picked: f"{picked}: cannot identify image file"}  # b's one validation image, as planned before

    plan = split_data(Listing(tuple(items), None), spec, seed=0, unreadable=unreadable)

    assert picked not in {uri for uri, _ in plan.train + plan.val} and plan.unreadable == (unreadable[picked],)
    assert plan.counts("val") == {"a": 2, "b": 1} and plan.counts("train") == {"a": 8, "b": 2}
    assert plan.unvalidated_classes == ()

    b = [e.uri for e in items if e.label == "b"]
    two_bad = {uri: f"{uri}: truncated" for uri in b[:3]}
    plan = split_data(Listing(tuple(items), None), spec, seed=0, unreadable=two_bad)
    assert plan.counts("val")["b"] == 0 and plan.counts("train")["b"] == 1 and plan.unvalidated_classes == ("b",)
    with pytest.raises(FinetuneDataError, match=r"class\(es\) \['b'\] have no readable image \(e.g. /d/b/0.jpg: trunc"):
        split_data(Listing(tuple(items), None), spec, seed=0, unreadable={uri: f"{uri}: truncated" for uri in b})


# ---------------------------------------------------------------------------------------------- decoding


def test_unreadable_images_are_skipped_and_counted(storage_root):
    write_classes(storage_root, {"a": 2})
    bad = join(storage_root.uri, "a", "bad.jpg")
    storage_root.storage.write_bytes(bad, b"<html>not found</html>")
    items = [(join(storage_root.uri, "a", "img00.jpg"), 0), (bad, 0), (join(storage_root.uri, "a", "gone.jpg"), 0),
             (join(storage_root.uri, "a", "img01.jpg"), 1)]  # fmt: skip

    images = load_images(items, storage_root.storage, PREPROCESS, threads=4)

    assert len(images) == 2 and images.labels == [0, 1]
    assert images.pixels[0].shape == (3, 32, 32) and images.pixels[0].dtype == torch.uint8
    assert len(images.skipped) == 2
    assert images.skipped[0].startswith(f"{bad}: ") and "HTML" in images.skipped[0]
    assert "cannot read" in images.skipped[1]


def test_training_crops_are_random_but_seeded(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg((10, 200, 30), size=(90, 60)))
    scaled = scaled_preprocess(PREPROCESS, crop_size=24)
    assert (scaled.resize_size, scaled.crop_size, scaled.mean) == (30, 24, PREPROCESS.mean)  # 24 x 40/32
    cache = train_cache_preprocess(scaled)
    assert (cache.resize_size, cache.crop_size) == (30, 30)
    images = load_images([(str(tmp_path / "a.jpg"), 0)], _local(), cache, threads=1)
    dataset = AugmentedImages(images, crop_size=24, min_scale=0.3)

    torch.manual_seed(5)
    first = [dataset[0][0] for _ in range(4)]
    torch.manual_seed(5)
    again = [dataset[0][0] for _ in range(4)]

    assert all(x.shape == (3, 24, 24) and x.dtype == torch.uint8 for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_epoch_order_gives_every_rank_the_same_length():
    generator = torch.Generator().manual_seed(0)
    shards = [shard_of(list(range(11)), rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    orders = [epoch_order(len(s), 4, generator) for s in shards]
    assert [len(o) for o in orders] == [4, 4, 4]
    assert sorted(orders[2][:3]) == [0, 1, 2]  # a full pass first, then wrapped
    assert sorted(epoch_order(5, 5, generator)) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------- review corrections


def test_corrections_relabel_and_drop_by_location_or_queue_key_and_count_the_rest(tmp_path):
    from schemas.review import Corrections
    from workers.finetune.dataplan import list_data

    root = type("Root", (), {"uri": str(tmp_path / "d"), "options": None, "storage": _local()})
    write_classes(root, {"cat": 4, "dog": 4})
    at = join(root.uri, "cat", "img00.jpg")
    corrections = Corrections(
        queues=("/q",), decisions=6,
        labels={at: "dog", join(root.uri, "dog", "img01.jpg"): "dog", "/elsewhere/x.jpg": "cat",
                "/label-output/key-of-it": "dog"},
        bad={join(root.uri, "dog", "img02.jpg"): "blurred"},
        keys={"cat/img03.jpg": "/label-output/key-of-it"},  # a queue that named it by another location, same key
        reviewers={at: "ana", join(root.uri, "dog", "img01.jpg"): "ana", "/elsewhere/x.jpg": "bo",
                   "/label-output/key-of-it": "bo", join(root.uri, "dog", "img02.jpg"): "bo"},
    )  # fmt: skip
    listing = list_data(FinetuneDataSpec(uri=root.uri), root.storage, corrections=corrections)
    labels = {e.key: e.label for e in listing.examples}
    assert labels == {"cat/img00.jpg": "dog", "cat/img01.jpg": "cat", "cat/img02.jpg": "cat", "cat/img03.jpg": "dog",
                      "dog/img00.jpg": "dog", "dog/img01.jpg": "dog", "dog/img03.jpg": "dog"}  # fmt: skip
    applied = listing.corrections
    assert (applied.relabelled, applied.dropped, applied.confirmed, applied.not_in_data) == (2, 1, 1, 1)
    assert applied.per_reviewer == {"ana": 2, "bo": 2} and applied.images_decided == 5
    plan = split_data(listing, FinetuneDataSpec(uri=root.uri, val_fraction=0.25), seed=0)
    assert plan.corrections == applied and plan.class_names == ("cat", "dog")
