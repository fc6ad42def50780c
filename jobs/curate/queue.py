"""`bulklabel review-queue`: the images of a label output a person should look at first, ranked, as a table and a
self-contained HTML contact sheet (jobs.curate.sheet). The measures and the diverse cover are
workers.curate.uncertainty's; this module reads the output, ranks, and hands the result to the output protocol.
The queue is the review app's input."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.curate.sheet import SheetItem, contact_sheet
from jobs.curate.summary import CurationSummary, run_curation
from jobs.errors import BadInput
from jobs.output.reader import LabelOutput, open_output
from jobs.output.report import Thumbnail, thumbnails_of
from jobs.output.results import ComputedResult
from schemas.curation import QUEUE_SCHEMA, QueueStrategy, ResultSource, ReviewQueueJobSpec
from workers.curate import uncertainty as u
from workers.curate.neighbours import unit_rows

log = logging.getLogger(__name__)

SHEET_MAX = 1000  # thumbnails on the sheet (the table holds the whole queue)
_MEASURE = {QueueStrategy.MARGIN: u.MARGIN, QueueStrategy.ENTROPY: u.ENTROPY,
            QueueStrategy.LEAST_CONFIDENCE: u.LEAST_CONFIDENCE, QueueStrategy.DIVERSE: u.MARGIN}  # fmt: skip


def _rows(spec: ReviewQueueJobSpec) -> tuple[LabelOutput, dict, str]:
    output = open_output(spec.source, spec.storage)
    if not output.complete:
        raise BadInput(f"label output {spec.source} is not complete (its job is running or was interrupted): finish "
                       "it before ranking it")  # fmt: skip
    columns = ["key", "source", "label", "score", "topk_labels", "topk_scores", "given_label", "probabilities"]
    diverse = spec.strategy is QueueStrategy.DIVERSE
    if diverse and output.embedding_dim is None:
        raise BadInput(f"label output {spec.source} has no embeddings (labelled with `embeddings: false`): the "
                       "diverse strategy covers the embeddings; use margin, entropy or least-confidence")  # fmt: skip
    table = output.to_table(columns=columns + (["embedding"] if diverse else []))
    table = table.filter(pc.is_valid(table["label"])).sort_by("key")  # error rows have no prediction
    if table.num_rows == 0:
        raise BadInput(f"label output {spec.source} has no labelled images to rank")
    data = table.to_pydict()
    with_probs = all(p is not None for p in data["probabilities"])
    if not with_probs and min(len(s or ()) for s in data["topk_scores"]) < 1:
        raise BadInput(f"label output {spec.source} stored no scores to rank by")
    return output, data, "probabilities" if with_probs else "topk"


def prepare(spec: ReviewQueueJobSpec):
    """Read and check the label output; the ranking is what is left to compute."""
    output, data, measured_on = _rows(spec)
    return lambda: compute(spec, output, data, measured_on)


def compute(spec: ReviewQueueJobSpec, output: LabelOutput, data: dict, measured_on: str) -> ComputedResult:
    n = len(data["key"])
    if measured_on == "probabilities":
        dist = np.asarray(data["probabilities"], dtype=np.float64)
    else:
        width = max(len(s) for s in data["topk_scores"])
        padded = np.zeros((n, width))
        for i, scores in enumerate(data["topk_scores"]):
            padded[i, : len(scores)] = scores
        dist = u.with_rest(padded)
    scores = u.uncertainty(_MEASURE[spec.strategy], dist)
    size = min(spec.size, n)
    if spec.strategy is QueueStrategy.DIVERSE:
        zero = np.zeros(output.embedding_dim or 0)
        unit = unit_rows(np.asarray([e if e is not None else zero for e in data["embedding"]]))
        order = u.diverse(scores, unit, n if spec.per_label else size)
    else:
        order = u.ranked(scores)
    if spec.per_label:
        order = u.per_label(order, data["label"], size)
    order = order[:size]
    table = pa.table({
        "rank": np.arange(1, len(order) + 1, dtype=np.int32),
        **{name: [data[name][i] for i in order] for name in ("key",)},
        "image": [data["source"][i] for i in order],
        **{name: [data[name][i] for i in order] for name in ("label", "score", "topk_labels", "topk_scores",
                                                             "given_label")},
        "uncertainty": scores[order].astype(np.float32),
        "strategy": [spec.strategy.value] * len(order), "measured_on": [measured_on] * len(order),
    }, schema=QUEUE_SCHEMA)  # fmt: skip
    labels = {data["label"][i] for i in order}
    figures = {"ranked": n, "queued": len(order), "labels_in_queue": len(labels), "strategy": spec.strategy.value,
               "measured_on": measured_on, "per_label": spec.per_label}  # fmt: skip
    sheet = _sheet(spec, output, table) if spec.sheet else None
    source = ResultSource(uri=spec.source, job_id=output.job_id, generation=output.generation, rows=n)
    return ComputedResult(table=table, sources=(source,), figures=figures, sheet=sheet)


def _sheet(spec: ReviewQueueJobSpec, output: LabelOutput, table: pa.Table) -> bytes:
    rows = table.slice(0, SHEET_MAX).to_pylist()
    wanted = [Thumbnail(key=r["key"], source=r["image"], label=r["label"], score=r["score"],
                        runners_up=tuple(zip(r["topk_labels"][1:3], r["topk_scores"][1:3], strict=False)))
              for r in rows]  # fmt: skip
    thumbs = thumbnails_of(output, wanted, spec.storage)
    items = [SheetItem(thumb=t, rank=r["rank"], top=tuple(zip(r["topk_labels"][:3], r["topk_scores"][:3],
                                                            strict=False)),
                       given=r["given_label"], note=f"{spec.strategy.value} {r['uncertainty']:.3f}")
             for t, r in zip(thumbs, rows, strict=True)]  # fmt: skip
    title = f"Review queue: {len(table)} images of {spec.source} by {spec.strategy.value}"
    return contact_sheet(title, {"source": spec.source, "strategy": spec.strategy.value,
                                 "per label": "yes" if spec.per_label else "no",
                                 "images": f"{len(table)} (sheet shows {len(items)})"}, items).encode()  # fmt: skip


def describe(figures: dict) -> list[str]:
    return [f"queue:    {figures['queued']} of {figures['ranked']} labelled images by {figures['strategy']} (on "
            f"{figures['measured_on']}), {figures['labels_in_queue']} predicted label(s)"]  # fmt: skip


def run_review_queue_job(spec: ReviewQueueJobSpec, show_progress: bool = True) -> CurationSummary:
    return run_curation(spec, lambda: prepare(spec), describe)
