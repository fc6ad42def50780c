"""Inputs as real producers write them: the `webdataset` library's own TarWriter, and img2dataset's three output
layouts (webdataset, files, parquet) written by img2dataset's own sample writers.

img2dataset 1.47.0 is installed without its dependencies (deploy/setup.sh): its downloader needs wandb,
albumentations and OpenCV, and it pins webdataset<0.3. Its `writer` module needs none of them (fsspec, pyarrow,
webdataset's TarWriter), so it is loaded from the installed package's file, without the package's `__init__` (which
imports the downloader), and fed the samples its downloader would give it: a key `{shard_id:05d}{index:04d}`, the
image bytes, the caption, and the metadata row of the schema the downloader builds (the input's url and caption,
then key, status, error_message, sizes and the sha256). The shard's `_stats.json` is the downloader's own file,
written here with the counts it records.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from functools import cache
from pathlib import Path

import pyarrow as pa
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
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# The metadata schema img2dataset's downloader builds for url + caption input with its default compute_hash.
_META_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
     ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
     ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string())]
)  # fmt: skip
_WRITERS = {"webdataset": "WebDatasetSampleWriter", "files": "FilesSampleWriter", "parquet": "ParquetSampleWriter"}


@cache
def img2dataset_writer_module():
    """img2dataset's `writer` module, loaded from the installed package without running the package's __init__."""
    package = importlib.util.find_spec("img2dataset")
    if package is None or not package.submodule_search_locations:
        raise ImportError("img2dataset is not installed: run deploy/setup.sh")
    path = Path(package.submodule_search_locations[0], "writer.py")
    spec = importlib.util.spec_from_file_location("img2dataset_writer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_img2dataset(folder: Path, photos: list[bytes], layout: str, per_shard: int) -> list[str]:
    """img2dataset's output for `photos` in `layout` (webdataset, files or parquet); returns the sample keys."""
    folder.mkdir(parents=True, exist_ok=True)
    writer_class = getattr(img2dataset_writer_module(), _WRITERS[layout])
    keys = []
    for shard_id, start in enumerate(range(0, len(photos), per_shard)):
        writer = writer_class(shard_id, str(folder), True, OOM_SHARD_COUNT, _META_SCHEMA, "jpg")
        for index, data in enumerate(photos[start : start + per_shard]):
            key = img2dataset_key(shard_id, index)
            keys.append(key)
            meta = _meta(key, data, start + index)
            writer.write(data, key, meta["caption"], meta)
        writer.close()
        count = len(photos[start : start + per_shard])
        shard = f"{shard_id:0{OOM_SHARD_COUNT}d}"
        (folder / f"{shard}_stats.json").write_text(json.dumps({"count": count, "successes": count}, indent=4))
    return keys


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


def write_hugging_face_parquet(
    folder: Path, splits: dict[str, list[tuple[bytes, int]]], classes: list[str]
) -> list[Path]:
    """A Hugging Face image-classification dataset as the Hub's Parquet conversion lays it out:
    `default/<split>/0000.parquet`, an `image` column of {bytes, path} structs (the `datasets` Image feature), a
    `label` ClassLabel index, and the `huggingface` schema metadata naming the features (as `datasets` writes it).
    Every split's file has the same name, and no column is a key."""
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
    written = []
    for split, rows in splits.items():
        cells = [{"bytes": data, "path": f"{split}-{i}.jpg"} for i, (data, _) in enumerate(rows)]
        table = pa.table({"image": pa.array(cells, image), "label": pa.array([c for _, c in rows], pa.int64())})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        path = folder / "default" / split / "0000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        written.append(path)
    return written
