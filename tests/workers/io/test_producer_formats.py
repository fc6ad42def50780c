"""Planning and reading inputs as real producers write them: shards from the `webdataset` library (plain, gzip,
samples with several images), brace patterns and single shard files, img2dataset's three layouts and Hugging Face
style Parquet (the image as a {bytes, path} struct). No Ray here: plan → read_shard, as the worker runs them."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.label.plan import PlanError, expand_braces, plan_shards
from schemas.specs import InputSpec
from tests.producers import img2dataset_key, png_bytes, write_img2dataset, write_webdataset_shards
from tests.support import IMAGENET_SAMPLE
from workers.io.readers import ParquetLayoutError, Record, ShardSource, read_shard
from workers.io.storage import open_storage

PHOTOS = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:5]


def _records(spec: InputSpec, tmp_path: Path) -> list[Record]:
    """Every record of every planned shard."""
    storage = open_storage(spec.uri)
    with ThreadPoolExecutor(2) as pool:
        return [
            record
            for task in plan_shards(spec, storage)
            for record in read_shard(ShardSource(storage, spec, pool, scratch=str(tmp_path)), task)
        ]


def _read(spec: InputSpec, tmp_path: Path) -> dict[str, tuple[bytes | None, str | None]]:
    """key → (bytes, error), keys unique."""
    records = _records(spec, tmp_path)
    out = {record.key: (record.data, record.error) for record in records}
    assert len(out) == len(records), [record.key for record in records]
    return out


def _samples(count: int) -> list[dict]:
    return [{"__key__": f"sample{i:04d}", "jpg": PHOTOS[i % len(PHOTOS)].read_bytes(), "cls": i} for i in range(count)]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_webdataset_library_shards_plain_and_gzip(tmp_path, suffix):
    shards = write_webdataset_shards(str(tmp_path / "in" / f"shard-%06d{suffix}"), _samples(7), per_shard=3)
    assert [p.name for p in shards] == [f"shard-{i:06d}{suffix}" for i in range(3)]

    rows = _read(InputSpec(uri=str(tmp_path / "in")), tmp_path)

    assert sorted(rows) == [f"sample{i:04d}" for i in range(7)]
    assert rows["sample0005"] == (PHOTOS[0].read_bytes(), None)


def test_a_tgz_shard_is_a_tar_shard(tmp_path):
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "part.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        data = png_bytes((1, 2, 3))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    assert _read(InputSpec(uri=str(tmp_path / "in")), tmp_path) == {"a": (data, None)}


def test_one_shard_file_as_the_input(tmp_path):
    shards = write_webdataset_shards(str(tmp_path / "in" / "shard-%06d.tar.gz"), _samples(4), per_shard=2)

    rows = _read(InputSpec(uri=str(shards[1])), tmp_path)

    assert sorted(rows) == ["sample0002", "sample0003"]


def test_one_file_that_is_no_shard_refuses_the_plan_at_once(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a shard")
    with pytest.raises(PlanError, match="one file but not a tar shard"):
        list(plan_shards(InputSpec(uri=str(notes), format="tar"), open_storage(str(notes))))


def test_brace_pattern_names_the_shards_and_a_missing_one_refuses_the_plan(tmp_path):
    write_webdataset_shards(str(tmp_path / "in" / "shard-%06d.tar"), _samples(8), per_shard=2)  # shards 0-3

    rows = _read(InputSpec(uri=str(tmp_path / "in" / "shard-{000001..000002}.tar")), tmp_path)
    assert sorted(rows) == [f"sample{i:04d}" for i in range(2, 6)]

    missing = InputSpec(uri=str(tmp_path / "in" / "shard-{000002..000005}.tar"))
    with pytest.raises(PlanError, match=r"2 of its 4 shards do not exist \(first: .*shard-000004.tar\)"):
        list(plan_shards(missing, open_storage(missing.uri)))


def test_brace_expansion_like_webdataset():
    import braceexpand  # webdataset's own expander

    for pattern in ["s3://b/x-{000..011}.tar", "a/{train,val}-{0..2}.tar.gz", "plain.tar", "x-{9..10}.tar"]:
        assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern)), pattern


def test_samples_with_several_images_pick_the_image_field(tmp_path):
    photo, seg = PHOTOS[0].read_bytes(), png_bytes((9, 9, 9))
    samples = [
        {"__key__": "both", "jpg": photo, "seg.png": seg},
        {"__key__": "png-only", "png": seg},
        {"__key__": "stereo", "left.jpg": photo, "right.jpg": photo},
    ]
    write_webdataset_shards(str(tmp_path / "in" / "s-%03d.tar"), samples, per_shard=10)

    unset = [r for r in _records(InputSpec(uri=str(tmp_path / "in")), tmp_path) if r.key == "both"]
    assert unset[0].data == photo and "image_field" in unset[1].error  # the old behaviour, explained

    rows = _read(InputSpec(uri=str(tmp_path / "in"), image_field="jpg;png"), tmp_path)
    assert rows["both"] == (photo, None) and rows["png-only"] == (seg, None)
    assert rows["stereo"][0] is None and "left.jpg, right.jpg" in rows["stereo"][1]
    stereo = _read(InputSpec(uri=str(tmp_path / "in"), image_field="left.jpg"), tmp_path)
    assert stereo["stereo"] == (photo, None) and stereo["both"][0] is None


@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_img2dataset_tar_and_files_layouts(tmp_path, layout):
    photos = [p.read_bytes() for p in PHOTOS]
    keys = write_img2dataset(tmp_path / "in", photos, layout, per_shard=3)
    assert keys[:4] == ["000000000", "000000001", "000000002", "000010000"]

    spec = InputSpec(uri=str(tmp_path / "in"), row_key="name" if layout == "files" else "path")
    rows = _read(spec, tmp_path)

    assert sorted(rows) == keys  # img2dataset's keys, not 00000/000000000.jpg
    assert rows[img2dataset_key(1, 1)] == (photos[4], None)


def test_img2dataset_parquet_layout(tmp_path):
    photos = [p.read_bytes() for p in PHOTOS]
    keys = write_img2dataset(tmp_path / "in", photos, "parquet", per_shard=3)

    rows = _read(InputSpec(uri=str(tmp_path / "in"), format="parquet", key_column="key"), tmp_path)

    assert sorted(rows) == keys and rows["000010001"] == (photos[4], None)
    # Without key_column, its own `key` column is not trusted to be unique: rows are keyed by file and row.
    by_path = _read(InputSpec(uri=str(tmp_path / "in"), format="parquet"), tmp_path)
    assert by_path["00001.parquet#1"] == (photos[4], None) and len(by_path) == len(keys)


def test_hugging_face_image_structs_and_empty_cells(tmp_path):
    (tmp_path / "in").mkdir()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": png_bytes((1, 1, 1)), "path": "a.png"}, None, {"bytes": None, "path": "gone.png"}]
    table = pa.table({"image": pa.array(cells, image), "label": [0, 1, 2]})
    pq.write_table(table, tmp_path / "in" / "train-00000-of-00001.parquet", row_group_size=2)

    rows = _read(InputSpec(uri=str(tmp_path / "in"), format="parquet"), tmp_path)

    stem = "train-00000-of-00001.parquet"
    assert rows[f"{stem}#0"] == (cells[0]["bytes"], None)
    assert rows[f"{stem}#1"][0] is None and "empty" in rows[f"{stem}#1"][1]
    assert rows[f"{stem}#2"][0] is None


def test_hugging_face_class_labels_become_given_labels(tmp_path):
    """A Hugging Face image-classification split: `label` is a ClassLabel index whose names the file's
    `huggingface` schema metadata lists (as `datasets` writes it); the rows keep the class name."""
    (tmp_path / "in").mkdir()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": png_bytes((i, i, i)), "path": f"{i}.png"} for i in range(3)]
    features = {"image": {"_type": "Image"}, "label": {"names": ["healthy", "early_blight"], "_type": "ClassLabel"}}
    table = pa.table({"image": pa.array(cells, image), "label": pa.array([1, 0, None], pa.int64())})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "in" / "train-00000-of-00001.parquet")

    records = _records(InputSpec(uri=str(tmp_path / "in"), format="parquet"), tmp_path)
    assert [r.given_label for r in records] == ["early_blight", "healthy", None]

    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"image": pa.array(cells, image), "species": ["a", "b", "c"]}), plain / "x.parquet")
    assert [r.given_label for r in _records(InputSpec(uri=str(plain), format="parquet"), tmp_path)] == [None] * 3
    spec = InputSpec(uri=str(plain), format="parquet", label_column="species")
    assert [r.given_label for r in _records(spec, tmp_path)] == ["a", "b", "c"]
    with pytest.raises(ParquetLayoutError, match="no label column 'kind'"):
        _records(InputSpec(uri=str(plain), format="parquet", label_column="kind"), tmp_path)


def test_a_manifests_labels_are_the_rows_given_labels(tmp_path):
    """A manifest naming images by path with a label column: each row keeps its own label (not its folder's)."""
    (tmp_path / "photos" / "batch1").mkdir(parents=True)
    for i, photo in enumerate(PHOTOS[:3]):
        (tmp_path / "photos" / "batch1" / f"{i}.jpg").write_bytes(photo.read_bytes())
    lines = ["key,label", "batch1/0.jpg,tench", "batch1/1.jpg,", "batch1/2.jpg,goldfish", "batch1/gone.jpg,shark"]
    (tmp_path / "photos" / "labels.csv").write_text("\n".join(lines) + "\n")

    records = _records(InputSpec(uri=str(tmp_path / "photos" / "labels.csv"), files_per_shard=2), tmp_path)

    expected = [("batch1/0.jpg", "tench"), ("batch1/1.jpg", None), ("batch1/2.jpg", "goldfish"),
                ("batch1/gone.jpg", "shark")]  # fmt: skip
    assert [(r.key, r.given_label) for r in records] == expected
    assert records[3].error and "missing" in records[3].error  # an error row keeps its given label too


def test_parquet_without_an_image_column_names_the_columns(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "in" / "meta.parquet")
    with pytest.raises(ParquetLayoutError, match=r"no image column.*\['url'\]"):
        _read(InputSpec(uri=str(tmp_path / "in"), format="parquet"), tmp_path)
    with pytest.raises(ParquetLayoutError, match="no image column pixels"):
        _read(InputSpec(uri=str(tmp_path / "in"), format="parquet", image_column="pixels"), tmp_path)


def test_sidecar_json_is_what_img2dataset_writes(tmp_path):
    """The layout reproduction keeps img2dataset's sidecar as it writes it (indent=4 JSON with url and caption)."""
    write_img2dataset(tmp_path / "in", [PHOTOS[0].read_bytes()], "files", per_shard=3)
    meta = json.loads((tmp_path / "in" / "00000" / "000000000.json").read_text())
    assert meta["url"].startswith("https://") and meta["key"] == "000000000" and meta["status"] == "success"
    assert (tmp_path / "in" / "00000_stats.json").is_file() and (tmp_path / "in" / "00000.parquet").is_file()


def test_patterns_single_gzip_shards_and_parquet_on_both_backends(storage_root, tmp_path):
    """The same plans and reads from S3 (SeaweedFS) as from a folder: a brace pattern, one .tar.gz shard as the
    input, a parquet shard (copied to scratch before reading)."""
    local = write_webdataset_shards(str(tmp_path / "made" / "shard-%04d.tar.gz"), _samples(6), per_shard=2)
    write_img2dataset(tmp_path / "made-pq", [PHOTOS[0].read_bytes()], "parquet", per_shard=3)
    root, storage = storage_root.uri, storage_root.storage
    for path in local:
        storage.write_bytes(f"{root}/in/{path.name}", path.read_bytes())
    storage.write_bytes(f"{root}/pq/00000.parquet", (tmp_path / "made-pq" / "00000.parquet").read_bytes())

    def read(**fields) -> list[str]:
        spec = InputSpec(**fields)
        keys = []
        with ThreadPoolExecutor(2) as pool:
            for task in plan_shards(spec, storage):
                records = read_shard(ShardSource(storage, spec, pool, scratch=str(tmp_path)), task)
                keys += [record.key for record in records]
        return keys

    assert read(uri=f"{root}/in/shard-{{0001..0002}}.tar.gz") == [f"sample{i:04d}" for i in range(2, 6)]
    assert read(uri=f"{root}/in/shard-0002.tar.gz") == ["sample0004", "sample0005"]
    assert read(uri=f"{root}/pq", format="parquet") == ["00000.parquet#0"]
    assert read(uri=f"{root}/pq", format="parquet", key_column="key") == ["000000000"]  # planning read it too
    with pytest.raises(PlanError, match="do not exist"):
        read(uri=f"{root}/in/shard-{{0002..0003}}.tar.gz")
