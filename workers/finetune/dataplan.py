"""Labelled images for fine-tuning, planned on the driver: listing, a stratified seeded split that keeps
near-duplicate groups whole, and a fingerprint. No torch: the driver (and the job service) import this.

Every data error surfaces here, before a worker starts; the training workers then read their share of the plan
(workers.finetune.data).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from schemas.finetune import LABELS_FILE_SUFFIXES, CorrectionsApplied, FinetuneDataSpec
from schemas.review import Corrections
from schemas.specs import Spec
from workers.finetune.grouping import Groups
from workers.io.keys import KeyResolver
from workers.io.storage import Storage, StorageError, join, normalise_uri, relative_key

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
    unreadable: tuple[str, ...] = ()  # "<uri>: <reason>" of images left out before the split
    val_shortfall: int = 0  # validation images val_fraction asked for that whole groups could not provide
    unvalidated_classes: tuple[str, ...] = ()  # classes with no validation image: never scored
    corrections: CorrectionsApplied | None = None  # what review decisions changed (jobs.review), when applied

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
    labels: dict[str, str] = {}
    for key, label in rows:
        if not key or not label:
            raise FinetuneDataError(f"{uri}: a row has an empty {spec.key_column!r} or {spec.label_column!r}")
        if labels.setdefault(key, label) != label:
            raise FinetuneDataError(f"{uri}: {key!r} is labelled both {labels[key]!r} and {label!r}")
    # A labels file names its images as a label manifest does, under the same rule (workers.io.keys): its own folder
    # and the allowed roots, nothing else.
    resolver = KeyResolver(base, spec.allowed_roots)
    resolved = {key: resolver.resolve(key) for key in labels}
    outside = [key for key, where in resolved.items() if where is None]
    if outside:
        shown = ", ".join(repr(k if len(k) <= 200 else k[:200] + "…") for k in outside[:MAX_NAMED_PROBLEMS])
        raise FinetuneDataError(
            f"{uri}: {len(outside)} key(s) lie outside the labels file's folder {base} and the allowed roots: "
            f"{shown}; move those images under {base}, or name their location in data.allowed_roots"
        )
    listed = dict(_visible_keys(storage, base))
    missing = [k for k, where in resolved.items() if not _is_absolute(where) and where not in listed]
    missing += [k for k, where in resolved.items() if _is_absolute(where) and not storage.exists(where)]
    if missing:
        named = ", ".join(repr(k) for k in missing[:MAX_NAMED_PROBLEMS])
        raise FinetuneDataError(f"{uri} names {len(missing)} key(s) that do not exist under {base}: {named}")
    examples: dict[str, Example] = {}  # by location: one image named twice ('a/x.jpg', './a/x.jpg') is one example
    for key, label in labels.items():
        where = resolved[key]
        location = where if _is_absolute(where) else join(base, where)
        first = examples.setdefault(location, Example(key, location, label, listed.get(where)))
        if first.label != label:
            raise FinetuneDataError(f"{uri}: {first.key!r} and {key!r} name one image, labelled {first.label!r} and "
                                    f"{label!r}")  # fmt: skip
    return list(examples.values())


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
    corrections: CorrectionsApplied | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(sorted({e.label for e in self.examples}))

    def items(self) -> list[tuple[str, int]]:
        """(uri, class index) of `examples`, then of the validation set: the embedding pass's input, in order."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return [(e.uri, index[e.label]) for e in (*self.examples, *(self.validation or ()))]


def list_data(spec: FinetuneDataSpec, storage: Storage, val_storage: Storage | None = None,
              corrections: Corrections | None = None) -> Listing:  # fmt: skip
    """List the data, apply review `corrections` (relabels, bad images left out), and check every class is usable:
    two classes at least, each with a validation image to spare (or a given validation set whose classes all have
    training images)."""
    examples = tuple(list_examples(spec.uri, spec, storage))
    validation = None
    if spec.validation_uri:
        validation = tuple(list_examples(spec.validation_uri, spec, val_storage or storage))
    applied = None
    if corrections is not None:
        examples, validation, applied = apply_corrections(examples, validation, corrections)
    if spec.validation_uri:
        unknown = sorted({e.label for e in validation} - {e.label for e in examples})
        if unknown:
            raise FinetuneDataError(f"validation classes {unknown} have no training images in {spec.uri}")
    else:
        _check_counts(examples, minimum=2, what="stratified split")
    listing = Listing(examples, validation, applied)
    if len(listing.class_names) < 2:
        raise FinetuneDataError(f"found one class ({listing.class_names[0]!r}); a classifier needs at least two")
    return listing


def split_data(listing: Listing, spec: FinetuneDataSpec, seed: int, groups: Groups | None = None,
               unreadable: Mapping[str, str] | None = None) -> DataPlan:  # fmt: skip
    """The plan: the given validation set, or a stratified seeded split of the examples that keeps each group of
    `groups` (indexed like `listing.examples`) on one side. Images in `unreadable` (uri → why, found by the
    embedding pass) are left out first, so none takes a place in validation that a readable image would have had.

    A class that ends up with no validation image (its only ones unreadable, or every near-duplicate group of it
    larger than its share) is named in a warning and in the plan; a split where no class has one is refused."""
    bad = unreadable or {}
    kept = [i for i, e in enumerate(listing.examples) if e.uri not in bad]
    examples = [listing.examples[i] for i in kept]
    given = None if listing.validation is None else [e for e in listing.validation if e.uri not in bad]
    _check_readable(listing, examples, bad)
    shortfall = 0
    if given is not None:
        train, val = examples, given
    elif groups is not None:
        content = [groups.content_ids[i] for i in kept] if groups.content_ids else None
        train, val = grouped_split(examples, [groups.ids[i] for i in kept], spec.val_fraction, seed, content)
        asked = Counter(e.label for e in examples)
        shortfall = sum(val_quota(n, spec.val_fraction) for n in asked.values()) - len(val)
    else:
        train, val = stratified_split(examples, spec.val_fraction, seed)
    unvalidated = tuple(sorted(set(listing.class_names) - {e.label for e in val}))
    _check_validated(listing, unvalidated, shortfall, bad)
    if unvalidated:
        log.warning(
            "class(es) without a validation image, not validated (no recall measured; the macro averages leave them "
            "out): %s%s", list(unvalidated),
            f"; whole near-duplicate groups left validation {shortfall} image(s) short" if shortfall else "",
        )  # fmt: skip
    index = {name: i for i, name in enumerate(listing.class_names)}
    grouped = groups is not None and given is None
    return DataPlan(
        class_names=listing.class_names,
        train=tuple((e.uri, index[e.label]) for e in train),
        val=tuple((e.uri, index[e.label]) for e in val),
        fingerprint=dataset_fingerprint(train + val),
        split_rows=tuple((e.uri, e.label, "train") for e in train) + tuple((e.uri, e.label, "val") for e in val),
        groups=groups.count if grouped else None,
        duplicate_groups=groups.duplicate_groups if grouped else 0,
        grouped_images=groups.grouped_images if grouped else 0,
        unreadable=tuple(bad[uri] for uri in sorted(bad)),
        val_shortfall=shortfall,
        unvalidated_classes=unvalidated,
        corrections=listing.corrections,
    )


def apply_corrections(examples: Sequence[Example], validation: Sequence[Example] | None, corrections: Corrections
                      ) -> tuple[tuple[Example, ...], tuple[Example, ...] | None, CorrectionsApplied]:  # fmt: skip
    """The examples (and validation set) with the decided labels, images decided bad left out. An image is matched
    by its location, else by its key as the queue named it; decisions about images not in the data are counted."""
    matched: set[str] = set()
    counts: Counter[str] = Counter()
    reviewers: Counter[str] = Counter()

    def corrected(e: Example) -> Example | None:
        image = e.uri if e.uri in corrections.reviewers else corrections.keys.get(e.key)
        if image is None or image not in corrections.reviewers:
            return e
        matched.add(image)
        reviewers[corrections.reviewers[image]] += 1
        if image in corrections.bad:
            counts["dropped"] += 1
            return None
        label = corrections.labels[image]
        counts["relabelled" if label != e.label else "confirmed"] += 1
        return Example(e.key, e.uri, label, e.size) if label != e.label else e

    kept = tuple(c for c in map(corrected, examples) if c is not None)
    kept_val = None if validation is None else tuple(c for c in map(corrected, validation) if c is not None)
    applied = CorrectionsApplied(
        queues=corrections.queues, decisions=corrections.decisions, images_decided=len(corrections.reviewers),
        relabelled=counts["relabelled"], dropped=counts["dropped"], confirmed=counts["confirmed"],
        not_in_data=len(corrections.reviewers) - len(matched), per_reviewer=dict(reviewers),
    )  # fmt: skip
    log.info("review corrections from %s: %d relabelled, %d left out as bad, %d kept; %d decided image(s) not in the "
             "data", ", ".join(corrections.queues), applied.relabelled, applied.dropped, applied.confirmed,
             applied.not_in_data)  # fmt: skip
    return kept, kept_val, applied


def _check_readable(listing: Listing, readable: Sequence[Example], unreadable: Mapping[str, str]) -> None:
    """Every class needs a readable training image: one whose images are all unreadable cannot be learnt."""
    empty = sorted(set(listing.class_names) - {e.label for e in readable})
    if empty:
        first = next(unreadable[e.uri] for e in listing.examples if e.label == empty[0])
        raise FinetuneDataError(f"class(es) {empty} have no readable image (e.g. {first}); fix or remove them")


def _check_validated(listing: Listing, unvalidated: Sequence[str], shortfall: int, unreadable: Mapping[str, str]
                     ) -> None:  # fmt: skip
    if len(unvalidated) < len(listing.class_names):
        return
    if listing.validation is not None:
        why = f"every image of the validation set is unreadable ({len(unreadable)} unreadable)"
    elif shortfall:
        why = (
            "every near-duplicate group (copies of one image, or photos of one subject) is larger than its "
            "class's share of validation, and a group is never split between training and validation"
        )
    else:
        why = "no class has a readable image to spare"
    raise FinetuneDataError(
        f"no validation image could be held out: {why}; add images, raise val_fraction, or give a validation set "
        "(validation_uri)"
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


def val_quota(images: int, val_fraction: float) -> int:
    """Validation images a class of `images` gets: round(n x val_fraction), at least 1, at most n - 1."""
    return min(max(1, round(images * val_fraction)), images - 1)


def stratified_split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `val_quota` images of each class for validation.

    Each class is shuffled by its own seeded generator, so adding a class does not move another class's images.
    """
    by_class: dict[str, list[Example]] = {}
    for example in sorted(examples, key=lambda e: e.key):
        by_class.setdefault(example.label, []).append(example)
    train, val = [], []
    for name in sorted(by_class):
        items = by_class[name]
        random.Random(f"{seed}:{name}").shuffle(items)
        n_val = val_quota(len(items), val_fraction)
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def grouped_split(examples: Sequence[Example], group_ids: Sequence[int], val_fraction: float, seed: int,
                  content_ids: Sequence[int] | None = None) -> tuple[list, list]:  # fmt: skip
    """`stratified_split` over whole groups: each class's groups (a group belongs to the class of its first image
    by key) are shuffled by the class's own seeded generator and go to validation while they fit in the class's
    `val_quota`; a group larger than what is left of the quota goes to training. With every image its own group
    this is exactly `stratified_split`.

    A group is never split. Where no group of a class fits (every one larger than its quota) and `content_ids`
    (groups of byte-identical images alone) are given, the class is split by those instead: embeddings that join
    a whole class most likely cannot tell its images apart (random or unsuited weights), and identical bytes are
    still never on both sides. Where no content group fits either, the class gets no validation image rather than
    one whose copy is in training (scoring a copy measures memory, not the model)."""
    members = _members(examples, group_ids)
    by_class: dict[str, list[int]] = {}
    for group, items in members.items():  # in order of each group's first key
        by_class.setdefault(items[0].label, []).append(group)
    images = Counter(e.label for e in examples)
    content = _members(examples, content_ids) if content_ids is not None else {}
    content_of = {e.uri: c for e, c in zip(examples, content_ids or (), strict=False)}
    train, val = [], []
    for name in sorted(by_class):
        quota = val_quota(images[name], val_fraction)
        groups = [members[g] for g in by_class[name]]
        chosen, rest = _fill(groups, quota, f"{seed}:{name}")
        if not chosen and content:
            mine = {e.uri for g in groups for e in g}
            # Content groups wholly of this class's images (one shared with another class stays in training).
            ids = sorted({content_of[uri] for uri in mine}, key=lambda c: content[c][0].key)
            eligible = [content[c] for c in ids if all(e.uri in mine for e in content[c])]
            chosen, rest = _fill(eligible, quota, f"{seed}:{name}")
            rest += [e for c in ids if not all(e.uri in mine for e in content[c]) for e in content[c] if e.uri in mine]
            if chosen:
                log.warning("class %r: its near-duplicate groups are all larger than its %d validation image(s) (the "
                            "embeddings cannot tell its images apart?): split keeping identical files together only",
                            name, quota)  # fmt: skip
        val += chosen
        train += rest
    return train, val


def _members(examples: Sequence[Example], group_ids: Sequence[int]) -> dict[int, list[Example]]:
    """Each group's images in key order, groups in order of their first key."""
    members: dict[int, list[Example]] = {}
    for example, group in sorted(zip(examples, group_ids, strict=True), key=lambda pair: pair[0].key):
        members.setdefault(group, []).append(example)
    return members


def _fill(groups: list[list[Example]], quota: int, seed: str) -> tuple[list[Example], list[Example]]:
    """(validation, training): `groups` shuffled by `seed`, each to validation while it fits in `quota`."""
    order = list(groups)
    random.Random(seed).shuffle(order)
    chosen, rest, taken = [], [], 0
    for group in order:
        fits = taken + len(group) <= quota
        (chosen if fits else rest).extend(group)
        taken += len(group) if fits else 0
    return chosen, rest


def dataset_fingerprint(examples: Iterable[Example]) -> str:
    """sha256 over every (key, class, size): changes when an image is added, removed, relabelled or rewritten."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda e: (e.key, e.label)):
        digest.update(f"{example.key}\0{example.label}\0{example.size}\n".encode())
    return digest.hexdigest()
