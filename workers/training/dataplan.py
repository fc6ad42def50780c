"""Labelled images for fine-tuning, planned on the driver: listing, a stratified seeded split that keeps
near-duplicate groups whole, and a fingerprint. No torch: the driver (and the job service) import this.

Every data error surfaces here, before a worker starts; the training workers then read their share of the plan
(workers.training.data).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from schemas.finetune import LABELS_FILE_SUFFIXES, FinetuneDataSpec
from schemas.specs import Spec
from workers.storage import Storage, StorageError, join, normalise_uri, relative_key
from workers.training.grouping import Groups

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
    groups: int | None = None  # near-duplicate groups the split kept whole; None: not grouped
    duplicate_groups: int = 0  # groups of two or more images
    grouped_images: int = 0  # images in those

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


@dataclass(frozen=True)
class Listing:
    """The labelled images found, before any split: `examples` (split by the plan) and a given validation set."""

    examples: tuple[Example, ...]
    validation: tuple[Example, ...] | None

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(sorted({e.label for e in self.examples}))

    def items(self) -> list[tuple[str, int]]:
        """(uri, class index) of `examples`, then of the validation set: the embedding pass's input, in order."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return [(e.uri, index[e.label]) for e in (*self.examples, *(self.validation or ()))]


def list_data(spec: FinetuneDataSpec, storage: Storage, val_storage: Storage | None = None) -> Listing:
    """List the data and check every class is usable: two classes at least, each with a validation image to spare
    (or a given validation set whose classes all have training images)."""
    examples = tuple(list_examples(spec.uri, spec, storage))
    validation = None
    if spec.validation_uri:
        validation = tuple(list_examples(spec.validation_uri, spec, val_storage or storage))
        unknown = sorted({e.label for e in validation} - {e.label for e in examples})
        if unknown:
            raise FinetuneDataError(f"validation classes {unknown} have no training images in {spec.uri}")
    else:
        _check_counts(examples, minimum=2, what="stratified split")
    listing = Listing(examples, validation)
    if len(listing.class_names) < 2:
        raise FinetuneDataError(f"found one class ({listing.class_names[0]!r}); a classifier needs at least two")
    return listing


def split_data(listing: Listing, spec: FinetuneDataSpec, seed: int, groups: Groups | None = None) -> DataPlan:
    """The plan: the given validation set, or a stratified seeded split of the examples that keeps each group of
    `groups` (indexed like `listing.examples`) on one side."""
    if listing.validation is not None:
        train, val = list(listing.examples), list(listing.validation)
    elif groups is not None:
        train, val = grouped_split(listing.examples, groups.ids, spec.val_fraction, seed)
    else:
        train, val = stratified_split(listing.examples, spec.val_fraction, seed)
    index = {name: i for i, name in enumerate(listing.class_names)}
    missing_val = sorted(set(listing.class_names) - {e.label for e in val})
    if missing_val:
        log.warning("classes without validation images (their recall is not measured): %s", missing_val)
    grouped = groups is not None and listing.validation is None
    return DataPlan(
        class_names=listing.class_names,
        train=tuple((e.uri, index[e.label]) for e in train),
        val=tuple((e.uri, index[e.label]) for e in val),
        fingerprint=dataset_fingerprint(train + val),
        split_rows=tuple((e.uri, e.label, "train") for e in train) + tuple((e.uri, e.label, "val") for e in val),
        groups=groups.count if grouped else None,
        duplicate_groups=groups.duplicate_groups if grouped else 0,
        grouped_images=groups.grouped_images if grouped else 0,
    )


def plan_data(spec: FinetuneDataSpec, storage: Storage, seed: int, val_storage: Storage | None = None,
              groups: Groups | None = None) -> DataPlan:  # fmt: skip
    """List the data, check every class is usable, and split it (stratified, seeded; groups kept whole) unless a
    validation set is given."""
    return split_data(list_data(spec, storage, val_storage), spec, seed, groups)


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


def grouped_split(examples: Sequence[Example], group_ids: Sequence[int], val_fraction: float, seed: int
                  ) -> tuple[list, list]:  # fmt: skip
    """`stratified_split` over whole groups: each class's groups (a group belongs to the class of its first image
    by key) are shuffled by the class's own seeded generator and go to validation while they fit in the class's
    quota of round(n x val_fraction) images; a group larger than what is left of the quota goes to training. With
    every image its own group this is exactly `stratified_split`."""
    members: dict[int, list[Example]] = {}
    for example, group in sorted(zip(examples, group_ids, strict=True), key=lambda pair: pair[0].key):
        members.setdefault(group, []).append(example)
    by_class: dict[str, list[int]] = {}
    for group, items in members.items():  # in order of each group's first key
        by_class.setdefault(items[0].label, []).append(group)
    images = Counter(e.label for e in examples)
    train, val = [], []
    for name in sorted(by_class):
        order = by_class[name]
        random.Random(f"{seed}:{name}").shuffle(order)
        quota = min(max(1, round(images[name] * val_fraction)), images[name] - 1)
        taken, chosen = 0, []
        for group in order:
            fits = taken + len(members[group]) <= quota
            (chosen if fits else train).extend(members[group])
            taken += len(members[group]) if fits else 0
        if not chosen:
            # Every group of the class is larger than its quota: most likely the embeddings cannot tell its images
            # apart (random or unsuited weights) rather than that it is one subject; validating it ungrouped beats
            # not validating it at all.
            log.warning("class %r: no near-duplicate group fits its %d validation image(s); split ungrouped", name,
                        quota)  # fmt: skip
            images_of = [e for g in order for e in members[g]]
            moved = set(images_of)
            train = [e for e in train if e not in moved]
            chosen, rest = stratified_split(images_of, val_fraction, seed)[::-1]
            train += rest
        val += chosen
    return train, val


def dataset_fingerprint(examples: Iterable[Example]) -> str:
    """sha256 over every (key, class, size): changes when an image is added, removed, relabelled or rewritten."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda e: (e.key, e.label)):
        digest.update(f"{example.key}\0{example.label}\0{example.size}\n".encode())
    return digest.hexdigest()
