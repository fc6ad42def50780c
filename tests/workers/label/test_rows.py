"""The row columns the next jobs use: image_id, error_kind, given_label, sidecar, probabilities."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.output import LABEL_SCHEMA, ErrorKind, error_kind_of
from schemas.shards import ShardTask
from schemas.specs import IMAGE_EXTENSIONS, InputSpec, PreprocessSpec
from workers.io.readers import Record, ShardSource, read_shard
from workers.io.storage import LocalStorage
from workers.io.writer import RowMeta, ShardWriter
from workers.label.decode import decode
from workers.label.decoders import make_decoder
from workers.label.pipeline import decoded_batches


def jpeg(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


PRE = PreprocessSpec(resize_size=32, crop_size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"<html><body>404</body></html>", ErrorKind.NOT_AN_IMAGE),
        (b"", ErrorKind.NOT_AN_IMAGE),
        (b"\x00\x01\x02 random binary \xff\xfe" * 20, ErrorKind.NOT_AN_IMAGE),
        (jpeg(size=(200, 200))[:300], ErrorKind.CORRUPT),  # a JPEG cut short in its scan data
    ],
)
def test_decode_errors_map_to_their_kind(data, kind):
    decoded = decode(data, PRE)
    assert decoded.error is not None
    assert error_kind_of(decoded.error) == kind, decoded.error


def test_reader_errors_map_to_their_kind(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.jpg").write_bytes(jpeg(size=(300, 300)))
    task = ShardTask(shard_id="s", kind="files", base_uri=str(tmp_path / "in"), keys=("big.jpg", "gone.jpg"))
    with ThreadPoolExecutor(2) as pool:
        layout = InputSpec(uri=task.base_uri, extensions=IMAGE_EXTENSIONS, max_object_bytes=100)
        records = list(read_shard(ShardSource(LocalStorage(), layout, pool), task))
    assert [error_kind_of(r.error) for r in records] == [ErrorKind.TOO_LARGE, ErrorKind.READ_FAILED]
    assert error_kind_of(None) == ErrorKind.NONE == ""


def test_tar_samples_carry_their_cls_label_and_json_sidecar_after_the_image(tmp_path):
    members = [
        ("a.jpg", jpeg()),
        ("a.cls", b"tabby\n"),
        ("a.json", b'{"url": "https://example.com/a.jpg", "caption": "a cat", "width": 40}'),
        ("b.json", b'{"url": "https://example.com/b.jpg", "label": 281}'),  # sidecar before the image
        ("b.jpg", jpeg()),
        ("c.jpg", jpeg()),
        ("d.jpg", jpeg()),
        ("d.json", b"not json {"),
    ]
    (tmp_path / "00000.tar").write_bytes(tar_of(members))
    task = ShardTask(shard_id="00000", kind="tar", base_uri=str(tmp_path), keys=("00000.tar",))
    records = list(read_shard(ShardSource(LocalStorage(), InputSpec(uri=str(tmp_path))), task))
    assert [(r.key, r.given_label) for r in records] == [("a", "tabby"), ("b", "281"), ("c", None), ("d", None)]
    assert records[0].sidecar == '{"url":"https://example.com/a.jpg","caption":"a cat","width":40}'
    assert records[1].sidecar == '{"url":"https://example.com/b.jpg","label":281}'
    assert records[2].sidecar is None and records[3].sidecar is None  # unparseable JSON is not passed on

    picked = InputSpec(uri=str(tmp_path), image_field="png;jpg")
    records = list(read_shard(ShardSource(LocalStorage(), picked), task))
    assert [(r.key, r.given_label) for r in records] == [("a", "tabby"), ("b", "281"), ("c", None), ("d", None)]
    assert '"caption":"a cat"' in records[0].sidecar


def test_loose_files_under_class_folders_carry_the_folder_as_given_label(tmp_path):
    for key in ("cat/1.jpg", "dog/x/2.jpg", "top.jpg"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(jpeg())
    keys = ("cat/1.jpg", "dog/x/2.jpg", "top.jpg")
    task = ShardTask(shard_id="s", kind="files", base_uri=str(tmp_path), keys=keys)
    with ThreadPoolExecutor(2) as pool:
        records = list(read_shard(ShardSource(LocalStorage(), InputSpec(uri=str(tmp_path)), pool), task))
        assert [r.given_label for r in records] == ["cat", "dog", None]
        named = InputSpec(uri=str(tmp_path), row_key="name")  # img2dataset's files layout: folders are not classes
        records = list(read_shard(ShardSource(LocalStorage(), named, pool), task))
    assert [r.given_label for r in records] == [None, None, None]


def test_image_id_is_the_sha256_of_the_bytes_computed_in_the_decode_threads(monkeypatch):
    threads: list[str] = []
    real = hashlib.sha256

    def spying(data=b""):
        threads.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr("workers.label.pipeline.hashlib.sha256", spying)
    good, bad = jpeg(), b"<html>nope</html>"
    records = [Record("a", "src", good, given_label="cat", sidecar='{"url":"u"}'), Record("b", "src", bad),
               Record("c", "src", None, "missing: c")]  # fmt: skip
    with ThreadPoolExecutor(2, thread_name_prefix="decode") as pool:
        (batch,) = decoded_batches(iter(records), make_decoder("pillow", PRE, torch.device("cpu")), pool, batch_size=8)
    ids = [row.image_id for row in batch.meta]
    assert ids == [real(good).hexdigest(), real(bad).hexdigest(), None]  # a corrupt image still has a content id
    assert threads and all(name.startswith("decode") for name in threads)
    assert (batch.meta[0].given_label, batch.meta[0].sidecar) == ("cat", '{"url":"u"}')


def test_writer_stores_kinds_labels_and_probabilities_with_nulls_at_error_rows():
    task = ShardTask(shard_id="s", kind="files", base_uri="/in", keys=("a", "b", "c"))
    writer = ShardWriter(task, ["x", "y", "z"], "m", "job")
    meta = [
        RowMeta("a", "/in/a", 4, 4, None, "id-a", "x", '{"url":"u"}'),
        RowMeta("b", "/in/b", None, None, "not an image: content looks like HTML/text", "id-b"),
        RowMeta("c", "/in/c", 4, 4, None, "id-c"),
    ]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    indices = np.argsort(-probs, axis=1)[:, :2].astype(np.int32)
    writer.add(meta, indices, np.take_along_axis(probs, indices, 1), None, probs)
    table = writer.to_table()
    assert table.schema == LABEL_SCHEMA
    rows = table.to_pylist()
    assert [r["error_kind"] for r in rows] == ["", "not_an_image", ""]
    assert [r["image_id"] for r in rows] == ["id-a", "id-b", "id-c"]
    assert [r["given_label"] for r in rows] == ["x", None, None]
    assert rows[0]["sidecar"] == '{"url":"u"}' and rows[2]["sidecar"] is None
    assert rows[1]["probabilities"] is None
    assert np.allclose(rows[0]["probabilities"], probs[0]) and np.allclose(rows[2]["probabilities"], probs[1])
    assert str(table.schema.field("probabilities").type) == "list<item: float>"

    plain = ShardWriter(task, ["x", "y", "z"], "m", "job")
    plain.add([("a", "/in/a", 4, 4, None)], indices[:1], probs[:1, :2], None)  # the older 5-field rows still work
    assert plain.to_table().column("probabilities").null_count == 1
