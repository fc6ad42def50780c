"""`bulklabel dedupe`: exact and near-duplicate images across label outputs, and the leakage they cause.

Every committed row of each label output is one image. Images with the same bytes (`image_id`, sha256) are exact
duplicates; images whose stored embeddings reach the cosine threshold are near-duplicates, found through a faiss
index (workers.curate.neighbours, the same search and grouping the fine-tune's split uses), never all pairs. Groups
are the connected components of both. Each image's row names its group, the group's representative (its largest
image, ties to the first by source and key) and its cosine to it.

Leakage: with `split` (a fine-tune artifact's version folder), each image found in its split.csv gets its side, and a
group holding both train and validation images leaks (the validation score counted a copy of a training image);
without it, a group spanning several of the outputs given leaks (`dedupe train-out val-out`).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.curate.summary import CurationSummary, run_curation
from jobs.errors import BadInput
from jobs.output.reader import open_output
from jobs.output.results import ComputedResult
from schemas.curation import DUPLICATES_SCHEMA, DedupeJobSpec, ResultSource
from schemas.specs import StorageOptions
from workers.curate.neighbours import components, same_content_pairs, similar_pairs, unit_rows
from workers.finetune.artifacts import SPLIT_NAME
from workers.io.storage import ObjectMissing, join, normalise_uri, open_storage

log = logging.getLogger(__name__)

_COLUMNS = ["key", "source", "image_id", "label", "given_label", "embedding", "width", "height"]


@dataclass(frozen=True)
class Images:
    """Every image of the outputs, in order (source, key): where it is from and what is known of it."""

    source: list[str]
    key: list[str]
    image: list[str]
    image_id: list[str | None]
    label: list[str | None]
    given_label: list[str | None]
    pixels: np.ndarray  # width x height as decoded (0: not decoded)
    embeddings: np.ndarray  # (n, d) float32; all-zero rows for images without an embedding
    has_embedding: np.ndarray  # bool
    sources: tuple[ResultSource, ...]


def read_images(sources: tuple[str, ...], storage: StorageOptions | None) -> Images:
    """Every committed row of the label outputs `sources`, in (output, key) order, checked: complete, with
    embeddings of one width."""
    outputs, width = [], None
    for uri in sources:
        output = open_output(uri, storage)
        if not output.complete:
            raise BadInput(f"label output {uri} is not complete (its job is running or was interrupted): finish it "
                           "(`bulklabel resume` or run the job again) before dedupe reads it")  # fmt: skip
        if output.embedding_dim is None:
            raise BadInput(f"label output {uri} has no embeddings (labelled with `embeddings: false`): label it again "
                           "with embeddings to find near-duplicates")  # fmt: skip
        if width is not None and output.embedding_dim != width:
            raise BadInput(f"label output {uri} has embeddings of width {output.embedding_dim}, the others "
                           f"{width}: near-duplicates are compared within one model's embeddings")  # fmt: skip
        width = output.embedding_dim
        outputs.append((uri, output))
    cols: dict[str, list] = {name: [] for name in ("source", "key", "image", "image_id", "label", "given_label")}
    pixels, embeddings, has, sources = [], [], [], []
    for uri, output in outputs:
        table = output.to_table(columns=_COLUMNS)
        table = table.take(pc.sort_indices(table, [("key", "ascending")]))
        data = table.drop_columns(["embedding"]).to_pydict()
        cols["source"] += [uri] * table.num_rows
        cols["key"] += data["key"]
        cols["image"] += data["source"]
        for name in ("image_id", "label", "given_label"):
            cols[name] += data[name]
        pixels.append(np.asarray([(w or 0) * (h or 0) for w, h in zip(data["width"], data["height"], strict=True)],
                                 dtype=np.int64))  # fmt: skip
        vectors, valid = _matrix(table.column("embedding"), width)
        embeddings.append(vectors)
        has.append(valid)
        sources.append(ResultSource(uri=uri, job_id=output.job_id, generation=output.generation, rows=table.num_rows))
    return Images(**cols, pixels=np.concatenate(pixels), embeddings=np.concatenate(embeddings),
                   has_embedding=np.concatenate(has), sources=tuple(sources))  # fmt: skip


def _matrix(column: pa.ChunkedArray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A list column of embeddings as an (n, width) float32 matrix (zero rows where null) and the valid mask, read
    through Arrow's buffers (a million rows of 1280 floats as Python lists would take minutes and tens of GB)."""
    array = column.combine_chunks()
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros((len(array), width), dtype=np.float32)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    out[valid] = values.reshape(-1, width)
    return out, valid


def read_split(uri: str, options) -> dict[str, str]:
    """A fine-tune artifact's split.csv: image location → train | val. Missing or malformed: one line naming it."""
    location = join(normalise_uri(uri).rstrip("/"), SPLIT_NAME)
    try:
        text = open_storage(location, options).read_bytes(location).decode()
    except ObjectMissing:
        raise BadInput(f"{location} not found: --split takes a fine-tune artifact's version folder "
                       "(models/name/vN)") from None  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"key", "split"} <= set(rows[0]):
        raise BadInput(f"{location} is not a fine-tune split (columns key, label, split)")
    return {normalise_uri(r["key"]): r["split"] for r in rows}


def group_images(images: Images, threshold: float, method: str) -> tuple[np.ndarray, int]:
    """Each image's group (numbered by first image) and how many near-duplicate pairs the search found."""
    members = np.flatnonzero(images.has_embedding)
    pairs = similar_pairs(unit_rows(images.embeddings[members]), threshold, method)
    groups = components(len(images.key), same_content_pairs(images.image_id),
                        (members[pairs.left], members[pairs.right]))  # fmt: skip
    return groups, len(pairs)


def prepare(spec: DedupeJobSpec):
    """Read and check the outputs and the split; the grouping is what is left to compute."""
    images = read_images(spec.sources, spec.storage)
    split = read_split(spec.split, spec.storage) if spec.split else None
    return lambda: compute(spec, images, split)


def compute(spec: DedupeJobSpec, images: Images, split: dict[str, str] | None) -> ComputedResult:
    groups, pairs = group_images(images, spec.threshold, spec.index)
    n = len(groups)
    sizes = np.bincount(groups, minlength=int(groups.max()) + 1 if n else 0)
    rep = _representatives(groups, images.pixels)
    unit = unit_rows(images.embeddings)
    cosine = np.clip(np.einsum("ij,ij->i", unit, unit[rep]), -1.0, 1.0) if n else np.zeros(0, np.float32)
    sides = [split.get(normalise_uri(image)) if split is not None else None for image in images.image]
    leaks = _leaking_groups(groups, images.source, sides, split is not None)
    table = pa.table({
        "source": images.source, "key": images.key, "image": images.image, "image_id": images.image_id,
        "label": images.label, "given_label": images.given_label, "group": groups.astype(np.int64),
        "group_size": sizes[groups].astype(np.int32) if n else np.zeros(0, np.int32),
        "representative": np.arange(n) == rep,
        "representative_source": [images.source[r] for r in rep], "representative_key": [images.key[r] for r in rep],
        "cosine": pa.array([float(c) if images.has_embedding[i] and images.has_embedding[rep[i]] else None
                            for i, c in enumerate(cosine)], pa.float32()),
        "exact": [images.image_id[i] is not None and images.image_id[i] == images.image_id[r]
                  for i, r in enumerate(rep)],
        "split": sides, "leaks": [bool(leaks[g]) for g in groups],
    }, schema=DUPLICATES_SCHEMA)  # fmt: skip
    table = table.take(np.lexsort((np.arange(n), groups)))  # by group, then (source, key)
    duplicate = sizes > 1
    exact_groups = len({d for d in images.image_id if d is not None and images.image_id.count(d) > 1})
    figures = {
        "images": n, "groups": int(len(sizes)), "duplicate_groups": int(duplicate.sum()),
        "images_in_duplicate_groups": int(sizes[duplicate].sum()), "exact_duplicate_groups": exact_groups,
        "near_duplicate_pairs": pairs, "threshold": spec.threshold, "leak_basis": _leak_basis(spec),
        "leaking_groups": int(leaks.sum()),
        "leaked_val_images": sum(1 for i, s in enumerate(sides) if s == "val" and leaks[groups[i]]),
        "unsplit_images": sum(1 for s in sides if s is None) if split is not None else None,
    }  # fmt: skip
    log.info("dedupe: %d images, %d groups of 2 or more, %d leaking", n, figures["duplicate_groups"],
             figures["leaking_groups"])  # fmt: skip
    return ComputedResult(table=table, sources=images.sources, figures=figures)


def _representatives(groups: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Each image's group representative: the group's largest image (a copy is rarely larger than its original:
    resized, cropped or thumbnailed), ties to the first by (source, key)."""
    best: dict[int, int] = {}
    for i, group in enumerate(groups.tolist()):
        held = best.get(group)
        if held is None or pixels[i] > pixels[held]:
            best[group] = i
    return np.array([best[g] for g in groups.tolist()], dtype=np.int64)


def _leak_basis(spec: DedupeJobSpec) -> str:
    return "split" if spec.split else "sources" if len(spec.sources) > 1 else "none"


def _leaking_groups(groups: np.ndarray, sources: list[str], sides: list[str | None], by_split: bool) -> np.ndarray:
    count = int(groups.max()) + 1 if len(groups) else 0
    seen: list[set] = [set() for _ in range(count)]
    for i, group in enumerate(groups):
        mark = sides[i] if by_split else sources[i]
        if mark is not None:
            seen[group].add(mark)
    if by_split:
        return np.array([{"train", "val"} <= marks for marks in seen], dtype=bool)
    return np.array([len(marks) > 1 for marks in seen], dtype=bool)


def describe(figures: dict) -> list[str]:
    lines = [f"groups:   {figures['duplicate_groups']} of 2 or more images ({figures['images_in_duplicate_groups']} "
             f"of {figures['images']} images; {figures['exact_duplicate_groups']} with identical bytes), cosine >= "
             f"{figures['threshold']}"]  # fmt: skip
    basis = figures.get("leak_basis")
    if basis == "split":
        lines.append(f"leakage:  {figures['leaking_groups']} group(s) span train and validation "
                     f"({figures['leaked_val_images']} validation image(s) have a copy in training)")  # fmt: skip
    elif basis == "sources":
        lines.append(f"leakage:  {figures['leaking_groups']} group(s) span more than one output")
    return lines


def run_dedupe_job(spec: DedupeJobSpec, show_progress: bool = True) -> CurationSummary:
    return run_curation(spec, lambda: prepare(spec), describe)
