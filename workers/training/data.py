"""Labelled images for fine-tuning: listing, a stratified seeded split, a fingerprint, and in-memory datasets.

The driver lists and splits (cheap, and every data error surfaces before a worker starts); each training worker
then reads and decodes its share of the images once, keeps them in memory as uint8 tensors, and draws augmented
crops from them every epoch. Fine-tune sets are small (hundreds to thousands of images: ~200 KB each at 256 px),
so decoding once instead of every epoch takes the JPEG decoder off the training loop's critical path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from botocore.exceptions import BotoCoreError, ClientError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from schemas.finetune import LABELS_FILE_SUFFIXES, FinetuneDataSpec
from schemas.specs import PreprocessSpec, Spec
from workers.decode import decode
from workers.storage import Storage, StorageError, join, normalise_uri, relative_key

log = logging.getLogger(__name__)

# Errors that make one image unreadable (gone, no permission) rather than the store unreachable.
_OBJECT_ERRORS = (OSError, ClientError, BotoCoreError)
MAX_NAMED_PROBLEMS = 10  # keys named in an error message; the rest are counted


class FinetuneDataError(ValueError):
    """The labelled data cannot be used as it is: the message says what to fix."""


@dataclass(frozen=True)
class Example:
    """One labelled image: `key` relative to the data root (or absolute), `uri` where to read it."""

    key: str
    uri: str
    label: str
    size: int | None  # bytes, from the listing; part of the fingerprint


class DataPlan(Spec):
    """What every training worker gets: class names and (uri, class index) pairs of each split."""

    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    fingerprint: str
    split_rows: tuple[tuple[str, str, str], ...]  # (image location, class, "train" | "val"): the artifact's split.csv

    def counts(self, split: str) -> dict[str, int]:
        """Images per class name in `split` ('train' or 'val')."""
        counted = Counter(label for _, label in (self.train if split == "train" else self.val))
        return {name: counted.get(i, 0) for i, name in enumerate(self.class_names)}


# ---------------------------------------------------------------------------------------------- listing


def list_examples(uri: str, spec: FinetuneDataSpec, storage: Storage) -> list[Example]:
    """The labelled images at `uri`: a labels file (CSV/Parquet) or a folder with one sub-folder per class."""
    uri = normalise_uri(uri)
    try:
        if uri.lower().endswith(LABELS_FILE_SUFFIXES):
            examples = _from_labels_file(uri, spec, storage)
        else:
            examples = _from_class_folders(uri, spec, storage)
    except (FileNotFoundError, StorageError) as exc:
        raise FinetuneDataError(f"cannot list {uri}: {exc}") from exc
    if not examples:
        raise FinetuneDataError(
            f"no labelled images at {uri}: expected one sub-folder per class holding images "
            f"({', '.join(spec.extensions)}), or a CSV/Parquet labels file"
        )
    return examples


def _visible_keys(storage: Storage, uri: str) -> Iterable[tuple[str, int]]:
    """(key relative to `uri`, size), skipping hidden and underscore paths (editor files, our own outputs)."""
    for obj in storage.list(uri):
        key = relative_key(uri, obj.uri)
        if not any(part.startswith((".", "_")) for part in key.split("/") if part):
            yield key, obj.size


def _is_image(key: str, extensions: tuple[str, ...]) -> bool:
    return "." in key.rsplit("/", 1)[-1] and key.rsplit(".", 1)[-1].lower() in extensions


def _from_class_folders(uri: str, spec: FinetuneDataSpec, storage: Storage) -> list[Example]:
    examples, folders, outside = [], set(), 0
    for key, size in _visible_keys(storage, uri):
        parts = key.split("/")
        if len(parts) < 2:
            outside += _is_image(key, spec.extensions)
            continue
        folders.add(parts[0])  # a folder holding only non-images (or an S3 "folder/" marker) is an empty class
        if _is_image(key, spec.extensions):
            examples.append(Example(key, join(uri, key), parts[0], size))
    if not uri.startswith("s3://") and Path(uri).is_dir():
        # Local listings skip empty folders; an empty class folder is still a mistake worth naming.
        folders |= {p.name for p in Path(uri).iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    if outside:
        log.warning("%d image(s) directly in %s are outside any class folder and were ignored", outside, uri)
    empty = sorted(folders - {e.label for e in examples})
    if empty:
        raise FinetuneDataError(f"class folder(s) with no images ({', '.join(spec.extensions)}) in {uri}: {empty}")
    return examples


def _from_labels_file(uri: str, spec: FinetuneDataSpec, storage: Storage) -> list[Example]:
    rows = _read_labels_table(uri, spec, storage)
    base = uri.rsplit("/", 1)[0]
    listed = dict(_visible_keys(storage, base))
    labels: dict[str, str] = {}
    for key, label in rows:
        if not key or not label:
            raise FinetuneDataError(f"{uri}: a row has an empty {spec.key_column!r} or {spec.label_column!r}")
        if labels.setdefault(key, label) != label:
            raise FinetuneDataError(f"{uri}: {key!r} is labelled both {labels[key]!r} and {label!r}")
    missing = [k for k in labels if not _is_absolute(k) and k not in listed]
    missing += [k for k in labels if _is_absolute(k) and not storage.exists(k)]
    if missing:
        named = ", ".join(repr(k) for k in missing[:MAX_NAMED_PROBLEMS])
        raise FinetuneDataError(f"{uri} names {len(missing)} key(s) that do not exist under {base}: {named}")
    return [
        Example(key, key if _is_absolute(key) else join(base, key), label, listed.get(key))
        for key, label in labels.items()
    ]


def _is_absolute(key: str) -> bool:
    return key.startswith(("s3://", "/"))


def _read_labels_table(uri: str, spec: FinetuneDataSpec, storage: Storage) -> list[tuple[str, str]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        raise FinetuneDataError(f"labels file {uri} does not exist")
    data = io.BytesIO(storage.read_bytes(uri))
    table = pq.read_table(data) if uri.lower().endswith(".parquet") else pacsv.read_csv(data)
    wanted = [spec.key_column, spec.label_column]
    if not set(wanted) <= set(table.column_names):
        raise FinetuneDataError(f"labels file {uri} needs columns {wanted}; it has {table.column_names}")
    keys, labels = (table.column(c).cast("string").to_pylist() for c in wanted)
    return [(str(k or "").strip(), str(v or "").strip()) for k, v in zip(keys, labels, strict=True)]


# ------------------------------------------------------------------------------------------------ plan


def plan_data(spec: FinetuneDataSpec, storage: Storage, seed: int, val_storage: Storage | None = None) -> DataPlan:
    """List the data, check every class is usable, and split it (stratified, seeded) unless a validation set is
    given."""
    examples = list_examples(spec.uri, spec, storage)
    if spec.validation_uri:
        train = examples
        val = list_examples(spec.validation_uri, spec, val_storage or storage)
        unknown = sorted({e.label for e in val} - {e.label for e in train})
        if unknown:
            raise FinetuneDataError(f"validation classes {unknown} have no training images in {spec.uri}")
    else:
        _check_counts(examples, minimum=2, what="stratified split")
        train, val = stratified_split(examples, spec.val_fraction, seed)
    class_names = tuple(sorted({e.label for e in train}))
    index = {name: i for i, name in enumerate(class_names)}
    if len(class_names) < 2:
        raise FinetuneDataError(f"found one class ({class_names[0]!r}); a classifier needs at least two")
    missing_val = sorted(set(class_names) - {e.label for e in val})
    if missing_val:
        log.warning("classes without validation images (their recall is not measured): %s", missing_val)
    return DataPlan(
        class_names=class_names,
        train=tuple((e.uri, index[e.label]) for e in train),
        val=tuple((e.uri, index[e.label]) for e in val),
        fingerprint=dataset_fingerprint(train + val),
        split_rows=tuple((e.uri, e.label, "train") for e in train) + tuple((e.uri, e.label, "val") for e in val),
    )


def _check_counts(examples: Sequence[Example], minimum: int, what: str) -> None:
    counts = Counter(e.label for e in examples)
    few = sorted(name for name, n in counts.items() if n < minimum)
    if few:
        detail = ", ".join(f"{name!r} ({counts[name]})" for name in few[:MAX_NAMED_PROBLEMS])
        raise FinetuneDataError(
            f"a {what} needs at least {minimum} image(s) per class; too few in: {detail}. "
            "Add images, remove the class, or give a separate validation set"
        )


def stratified_split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(n x val_fraction) images of each class (at least 1, at most n - 1) for validation.

    Each class is shuffled by its own seeded generator, so adding a class does not move another class's images.
    """
    by_class: dict[str, list[Example]] = {}
    for example in sorted(examples, key=lambda e: e.key):
        by_class.setdefault(example.label, []).append(example)
    train, val = [], []
    for name in sorted(by_class):
        items = by_class[name]
        random.Random(f"{seed}:{name}").shuffle(items)
        n_val = min(max(1, round(len(items) * val_fraction)), len(items) - 1)
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def dataset_fingerprint(examples: Iterable[Example]) -> str:
    """sha256 over every (key, class, size): changes when an image is added, removed, relabelled or rewritten."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda e: (e.key, e.label)):
        digest.update(f"{example.key}\0{example.label}\0{example.size}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- decoded images


@dataclass
class DecodedImages:
    """Images decoded once: `pixels[i]` is a uint8 CHW tensor of class `labels[i]`; unreadable ones are skipped."""

    pixels: list[torch.Tensor]
    labels: list[int]
    skipped: list[str]  # "<uri>: <reason>"

    def __len__(self) -> int:
        return len(self.pixels)


def load_images(
    items: Sequence[tuple[str, int]], storage: Storage, preprocess: PreprocessSpec, threads: int
) -> DecodedImages:
    """Read and decode `items` ((uri, class) pairs) with the label path's decoder: EXIF rotation, RGB, resize of
    the shorter side, centre crop. Pillow releases the GIL while decoding, so threads overlap reads and decodes."""

    def load(item: tuple[str, int]) -> tuple[torch.Tensor | None, int, str | None]:
        uri, label = item
        try:
            data = storage.read_bytes(uri)
        except _OBJECT_ERRORS as exc:
            return None, label, f"{uri}: cannot read: {type(exc).__name__}: {exc}"
        decoded = decode(data, preprocess)
        if decoded.pixels is None:
            return None, label, f"{uri}: {decoded.error}"
        # HWC → CHW (what torchvision transforms expect) as one copy, which also makes decode's read-only array
        # writable.
        return torch.from_numpy(np.ascontiguousarray(decoded.pixels.transpose(2, 0, 1))), label, None

    out = DecodedImages([], [], [])
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="finetune-decode") as pool:
        for pixels, label, error in pool.map(load, items):
            if error is not None:
                out.skipped.append(error)
            else:
                out.pixels.append(pixels)
                out.labels.append(label)
    for problem in out.skipped[:MAX_NAMED_PROBLEMS]:
        log.warning("skipped unreadable image %s", problem)
    return out


def scaled_preprocess(preset: PreprocessSpec, crop_size: int) -> PreprocessSpec:
    """The preset's evaluation preprocessing at another crop size, keeping its resize/crop ratio (224 from 256
    becomes 160 from 183). A model trained on smaller crops is evaluated, and later labels, at that scale: with
    MobileNetV2 on the plants set, training at 160 and evaluating at 224 gave 0.82 validation accuracy where
    224/224 gave 0.96, since batch-norm statistics and object sizes learnt at one scale do not carry to another."""
    resize = max(crop_size, round(crop_size * preset.resize_size / preset.crop_size))
    return preset.model_copy(update={"resize_size": resize, "crop_size": crop_size})


def train_cache_preprocess(eval_preprocess: PreprocessSpec) -> PreprocessSpec:
    """How training images are cached: the square the evaluation crop is cut from (256 for a 224 crop), from which
    random crops are drawn, as torchvision's recipes do."""
    side = eval_preprocess.resize_size
    return eval_preprocess.model_copy(update={"resize_size": side, "crop_size": side})


class AugmentedImages(Dataset):
    """Training view: a random resized crop and a horizontal flip of each cached image, uint8 CHW.

    Randomness comes from torch's global generator, which the training loop seeds per epoch and rank, so a
    resumed run draws the same crops as an uninterrupted one.
    """

    def __init__(self, images: DecodedImages, crop_size: int, min_scale: float):
        self.images = images
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.pixels[index]), self.images.labels[index]


class EvalImages(Dataset):
    """Validation view: the cached eval crops as they are (the label path's preprocessing, no augmentation)."""

    def __init__(self, images: DecodedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images.pixels[index], self.images.labels[index]


def epoch_order(local_count: int, length: int, generator: torch.Generator) -> list[int]:
    """A shuffled order of this rank's `local_count` images, wrapped or cut to `length`.

    DDP needs the same number of steps on every rank, so each rank's order has the longest shard's length.
    """
    if local_count == 0:
        return []
    order: list[int] = []
    while len(order) < length:
        order += torch.randperm(local_count, generator=generator).tolist()
    return order[:length]


def shard_of(items: Sequence, rank: int, world_size: int) -> list:
    """Rank `rank`'s share of `items`: every world_size-th item, so shards differ in size by at most one."""
    return list(items[rank::world_size])
