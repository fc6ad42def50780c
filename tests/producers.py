"""Inputs as real producers write them: the `webdataset` library's own TarWriter, and img2dataset's three output
layouts (webdataset, files, parquet).

img2dataset itself cannot be installed here (it pins webdataset<0.3 and needs wandb, albumentations and OpenCV), so
its layouts are reproduced from its writer module (img2dataset 1.47.0, `img2dataset/writer.py`, read from the
PyPI wheel): shard names `{shard_id:05d}`, sample keys `{shard_id:05d}{index:04d}`, an image member or file named
`<key>.jpg` with `<key>.txt` (caption) and `<key>.json` (metadata, `json.dumps(meta, indent=4)`), a `<shard>.parquet`
of the metadata beside each shard and `<shard>_stats.json` last; in the parquet layout the image bytes are the `jpg`
column of `<shard>.parquet` itself, beside `key`, `txt` and the metadata columns.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

OOM_SHARD_COUNT = 5
OOM_SAMPLE_PER_SHARD = 4


def img2dataset_key(shard_id: int, index: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}{index:0{OOM_SAMPLE_PER_SHARD}d}"


def _meta(key: str, data: bytes, index: int) -> dict:
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return {
        "url": f"https://example.com/photos/{index}.jpg",
        "caption": f"photo number {index}",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
    }


_META_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
     ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
     ("original_width", pa.int64()), ("original_height", pa.int64())]
)  # fmt: skip


def write_img2dataset(folder: Path, photos: list[bytes], layout: str, per_shard: int) -> list[str]:
    """img2dataset's output for `photos` in `layout` (webdataset, files or parquet); returns the sample keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard_id, start in enumerate(range(0, len(photos), per_shard)):
        shard = f"{shard_id:0{OOM_SHARD_COUNT}d}"
        metas, images = [], []
        for index, data in enumerate(photos[start : start + per_shard]):
            key = img2dataset_key(shard_id, index)
            keys.append(key)
            metas.append(_meta(key, data, start + index))
            images.append(data)
        _write_shard(folder, shard, layout, metas, images)
        (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(metas), "successes": len(metas)}))
    return keys


def _write_shard(folder: Path, shard: str, layout: str, metas: list[dict], images: list[bytes]) -> None:
    table = pa.Table.from_pylist(metas, _META_SCHEMA)
    if layout == "parquet":
        table = table.append_column("jpg", pa.array(images, pa.binary())).append_column(
            "txt", pa.array([m["caption"] for m in metas])
        )
        pq.write_table(table, folder / f"{shard}.parquet")
        return
    pq.write_table(table, folder / f"{shard}.parquet")
    if layout == "webdataset":
        with wds.TarWriter(str(folder / f"{shard}.tar")) as sink:
            for meta, data in zip(metas, images, strict=True):
                sink.write({"__key__": meta["key"], "jpg": data, "txt": meta["caption"],
                            "json": json.dumps(meta, indent=4)})  # fmt: skip
        return
    sub = folder / shard
    sub.mkdir()
    for meta, data in zip(metas, images, strict=True):
        (sub / f"{meta['key']}.jpg").write_bytes(data)
        (sub / f"{meta['key']}.txt").write_text(meta["caption"])
        (sub / f"{meta['key']}.json").write_text(json.dumps(meta, indent=4))


def write_webdataset_shards(pattern: str, samples: list[dict], per_shard: int) -> list[Path]:
    """Shards written by webdataset's own ShardWriter (`pattern` like 'dir/shard-%06d.tar' or '.tar.gz')."""
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    folder = Path(pattern).parent
    return sorted(p for p in folder.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()
