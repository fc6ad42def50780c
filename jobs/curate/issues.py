"""`bulklabel label-issues`: which labels of a labelled set are likely wrong.

The labelled set is listed as a fine-tune lists it (class folders or a labels file: workers/finetune/dataplan.py;
every image is scored, so no class needs images to spare for a split),
and read and embedded once by the fine-tune's embedding pass (a Ray actor holding the frozen base model,
workers/finetune/embed.py), which then fits a linear probe per fold on the other folds' embeddings: every image
gets class probabilities from a probe that never saw it. Confident learning (cleanlab, workers/curate/confident.py)
flags the labels those probabilities contradict beyond each class's estimated noise, ranked by self-confidence.
Unreadable images are rows with their error, never flagged. Output: one row per image and a sheet of the flagged.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from jobs.cluster import ensure_ray
from jobs.curate.sheet import SheetItem, contact_sheet
from jobs.curate.summary import CurationSummary, run_curation
from jobs.errors import BadInput
from jobs.finetune import embedding_pass, unreadable_images
from jobs.label.warm import release_kept
from jobs.output.report import MAX_THUMB_SOURCE_BYTES, Thumbnail, made_from_sources
from jobs.output.results import ComputedResult
from schemas.catalog import check_model
from schemas.curation import ISSUES_SCHEMA, LabelIssuesJobSpec, ResultSource
from workers.curate.confident import PROBE_L2_GRID, label_issues, stratified_folds
from workers.finetune.dataplan import Listing, list_examples
from workers.io.storage import open_storage

log = logging.getLogger(__name__)

SHEET_MAX = 500  # flagged images on the sheet (the table holds them all)


def prepare(spec: LabelIssuesJobSpec):
    """Check the model and list the data (one class, an empty folder: one line, before anything is written)."""
    check_model(spec.base)
    examples = tuple(list_examples(spec.data.uri, spec.data, open_storage(spec.data.uri, spec.storage)))
    listing = Listing(examples, None)
    if len(listing.class_names) < 2:
        found = f"one class ({listing.class_names[0]!r})" if listing.class_names else "no labelled image"
        raise BadInput(f"found {found} in {spec.data.uri}: label-issues compares classes, it needs two at least")
    return lambda: compute(spec, listing)


def compute(spec: LabelIssuesJobSpec, listing: Listing) -> ComputedResult:
    tune = spec.finetune_spec()
    cluster = ensure_ray()
    release_kept("released for label-issues")  # this process's idle label workers would hold the actor's CPUs
    items = listing.items()
    labels = np.array([label for _, label in items], dtype=np.int64)
    folds = stratified_folds(labels, spec.folds, spec.seed)
    classes = listing.class_names
    with embedding_pass(tune, cluster) as embedder:
        embedded = embedder("embed", items, True)
        l2s = (spec.probe_l2,) if spec.probe_l2 else PROBE_L2_GRID
        probabilities, l2 = embedder("out_of_sample", folds, len(classes), l2s)
    unreadable = unreadable_images(listing, embedded)
    readable = np.array([digest is not None for digest in embedded.sha256s])
    if len(np.unique(labels[readable])) < 2:
        raise BadInput(f"fewer than two classes of {spec.data.uri} have a readable image")
    found = label_issues(labels[readable], probabilities[readable])
    flagged, rank, confidence = (np.zeros(len(items), bool), np.zeros(len(items), np.int64),
                                 np.full(len(items), np.nan))  # fmt: skip
    flagged[readable], rank[readable], confidence[readable] = found.flagged, found.rank, found.self_confidence
    suggested = probabilities.argmax(axis=1)
    examples = listing.examples
    table = pa.table({
        "key": [e.key for e in examples], "image": [e.uri for e in examples],
        "given_label": [e.label for e in examples],
        "suggested_label": [classes[s] if ok else None for s, ok in zip(suggested, readable, strict=True)],
        "self_confidence": pa.array([float(c) if ok else None for c, ok in zip(confidence, readable, strict=True)],
                                    pa.float32()),
        "suggested_score": pa.array([float(probabilities[i, s]) if readable[i] else None
                                     for i, s in enumerate(suggested)], pa.float32()),
        "flagged": flagged, "rank": pa.array([int(r) if r else None for r in rank], pa.int32()),
        "error": [unreadable.get(e.uri) for e in examples],
    }, schema=ISSUES_SCHEMA)  # fmt: skip
    order = np.lexsort((np.arange(len(items)), np.where(flagged, rank, len(items) + 1)))
    table = table.take(order)  # the flagged first, likeliest wrong first; the rest in listing order
    figures = {"images": len(items), "unreadable": int((~readable).sum()), "classes": len(classes),
               "flagged": int(flagged.sum()), "folds": spec.folds, "probe_l2": l2,
               "out_of_sample_accuracy": round(float((suggested[readable] == labels[readable]).mean()), 4),
               "flagged_per_class": {c: int(flagged[labels == i].sum()) for i, c in enumerate(classes)}}  # fmt: skip
    log.info("label-issues: %d of %d images flagged (out-of-sample accuracy %.3f)", figures["flagged"], len(items),
             figures["out_of_sample_accuracy"])  # fmt: skip
    sheet = _sheet(spec, table) if spec.sheet else None
    source = ResultSource(uri=spec.data.uri, rows=len(items))
    return ComputedResult(table=table, sources=(source,), figures=figures, sheet=sheet)


def _sheet(spec: LabelIssuesJobSpec, table: pa.Table) -> bytes:
    rows = [r for r in table.slice(0, SHEET_MAX).to_pylist() if r["flagged"]]
    wanted = [Thumbnail(key=r["key"], source=r["image"], label=r["given_label"], score=r["self_confidence"],
                        runners_up=()) for r in rows]  # fmt: skip
    thumbs = made_from_sources(wanted, spec.storage, MAX_THUMB_SOURCE_BYTES)
    items = [SheetItem(thumb=t, rank=r["rank"], top=((r["suggested_label"], r["suggested_score"]),),
                       given=r["given_label"], note=f"self-confidence {r['self_confidence']:.3f}")
             for t, r in zip(thumbs, rows, strict=True)]  # fmt: skip
    title = f"Label issues: {len(rows)} likely wrong labels of {spec.data.uri}"
    return contact_sheet(title, {"data": spec.data.uri, "model": spec.base.name, "folds": spec.folds,
                                 "flagged": len(rows)}, items).encode()  # fmt: skip


def describe(figures: dict) -> list[str]:
    worst = sorted(figures["flagged_per_class"].items(), key=lambda kv: -kv[1])[:3]
    return [f"issues:   {figures['flagged']} of {figures['images']} labels flagged as likely wrong "
            f"(most in {', '.join(f'{c} {n}' for c, n in worst)})",
            f"probes:   {figures['folds']}-fold, L2 {figures['probe_l2']:g}, out-of-sample accuracy "
            f"{figures['out_of_sample_accuracy']:.3f}"
            + (f"; {figures['unreadable']} unreadable image(s) kept as error rows" if figures["unreadable"] else
               "")]  # fmt: skip


def run_label_issues_job(spec: LabelIssuesJobSpec, show_progress: bool = True) -> CurationSummary:
    return run_curation(spec, lambda: prepare(spec), describe)
