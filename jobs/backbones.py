"""`bulklabel compare-backbones`: which pre-trained model suits a labelled set, measured on it.

For each base, one pass of the fine-tune's embedding actor (workers.finetune.embed: read, decode, embed every image
with the frozen backbone, timed); one split for every base (grouped by the first available base's near-duplicates,
so no base is scored on copies of its training images, and every base on the same held-out images); a linear probe
per base (the `linear-probe` method's convex fit) scored on the held-out images, with its 95 % interval. A base whose
weights are not on this machine (nor downloadable) is reported unavailable, never guessed.

The recommendation: among the bases within `--budget-ms` (embedding time per image, measured here), those whose
interval reaches the best accuracy's lower bound (not measurably worse than the best), the cheapest (GFLOPs).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass

from jobs.cluster import ensure_ray
from jobs.errors import EXIT_BAD_INPUT, exit_code_for
from jobs.finetune import embedding_pass, unreadable_images
from jobs.label.warm import release_kept
from schemas.catalog import check_model, model_gflops
from schemas.finetune import FinetuneJobSpec
from schemas.ship import BackboneResult, CompareBackbonesSpec
from workers.finetune.artifacts import wilson_interval
from workers.finetune.dataplan import DataPlan, Listing, list_data, split_data
from workers.io.storage import open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    rows: tuple[BackboneResult, ...]
    recommended: BackboneResult | None
    why: str
    images: int

    def lines(self) -> list[str]:
        head = f"{'base':<34} {'val acc':>8} {'95% CI':>13} {'ms/image':>9} {'GFLOPs':>7} {'width':>6}"
        out = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: -(r.val_accuracy or -1)):
            name = f"{r.model}:{r.weights}" if r.weights else r.model
            if not r.available:
                out.append(f"{name:<34} unavailable: {r.reason}")
                continue
            low, high = r.val_accuracy_ci95
            gflops = f"{r.gflops:.2f}" if r.gflops is not None else "-"
            out.append(f"{name:<34} {r.val_accuracy:>8.3f} {f'{low:.3f}-{high:.3f}':>13} {r.ms_per_image:>9.1f} "
                       f"{gflops:>7} {r.embedding_width or 0:>6}")  # fmt: skip
        out.append(f"held out: {self.rows[0].val_images if self.rows[0].available else '?'} of {self.images} images, "
                   "the same for every base; a linear probe on each base's frozen embeddings")  # fmt: skip
        out.append(f"recommended: {self.recommended.model if self.recommended else 'none'} ({self.why})")
        return out


def compare_backbones(spec: CompareBackbonesSpec) -> Comparison:
    for base in spec.bases:
        check_model(base)  # a misspelt name fails before any work, in one line
    listing = list_data(spec.data, open_storage(spec.data.uri, spec.storage))
    cluster = ensure_ray()
    release_kept("released for compare-backbones")
    plan: DataPlan | None = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bulklabel-compare-") as scratch:  # an output no fine-tune writes
        for base in spec.bases:
            tune = FinetuneJobSpec(data=spec.data, base=base, output=scratch, storage=spec.storage,
                                   training={"method": "linear-probe", "seed": spec.seed})  # fmt: skip
            try:
                row, plan = _measure(tune, listing, plan, cluster)
            except Exception as exc:
                cause = _innermost(exc)
                if exit_code_for(cause) != EXIT_BAD_INPUT:  # a cluster or store failure is not the base's
                    raise
                reason = str(cause).splitlines()[0]
                if " and downloading " in reason:  # the weights file is not here and could not be fetched
                    reason = reason.split(" and downloading ")[0] + ", and it could not be downloaded"
                reason = reason[:300]
                log.warning("base %s unavailable: %s", base.name, reason)
                row = BackboneResult(model=base.name, weights=base.weights, available=False, reason=reason)
            rows.append(row)
    recommended, why = recommend(rows, spec.budget_ms)
    return Comparison(tuple(rows), recommended, why, len(listing.examples))


def _measure(tune: FinetuneJobSpec, listing: Listing, plan: DataPlan | None, cluster):
    items = listing.items()
    with embedding_pass(tune, cluster, cache=True) as embedder:  # a second comparison reuses each base's pass
        embedded = embedder("embed", items, True)
        if plan is None:  # the first available base's groups split the data for every base
            groups = embedder("groups", len(listing.examples), embedded.sha256s, tune.data.duplicate_cosine)
            plan = split_data(listing, tune.data, tune.training.seed, groups, unreadable_images(listing, embedded))
        row_of = {}
        for i, (uri, _) in enumerate(items):
            row_of.setdefault(uri, i)
        fit = embedder("fit", [row_of[u] for u, _ in plan.train], [row_of[u] for u, _ in plan.val],
                       len(plan.class_names), 0.0)  # fmt: skip
    n = len(plan.val)
    correct = round(fit.val_accuracy * n)
    ci95 = wilson_interval(correct, n)
    result = BackboneResult(
        model=tune.base.name, weights=tune.base.weights, available=True, val_accuracy=round(fit.val_accuracy, 4),
        val_accuracy_ci95=(round(ci95[0], 4), round(ci95[1], 4)), val_images=n,
        ms_per_image=round(embedded.seconds / len(items) * 1000, 2), gflops=model_gflops(tune.base),
        embedding_width=embedded.dim,
    )  # fmt: skip
    return result, plan


def _innermost(exc: BaseException) -> BaseException:
    """What the embedding actor raised: an actor that died in its constructor (its weights missing) reaches the
    driver as Ray's ActorDiedError around a task error around the worker's own exception."""
    seen = exc
    for _ in range(5):
        inner = getattr(seen, "creation_task_error", None) or getattr(seen, "cause", None)
        if inner is None or inner is seen:
            return seen
        seen = inner
    return seen


def recommend(rows: list[BackboneResult], budget_ms: float | None) -> tuple[BackboneResult | None, str]:
    """The cheapest base within the budget that is not measurably worse than the best (its interval reaches the
    best's lower bound); plain logic, tested without a cluster."""
    measured = [r for r in rows if r.available]
    within = [r for r in measured if budget_ms is None or r.ms_per_image <= budget_ms]
    if not within:
        return None, "no base measured" if not measured else f"none within {budget_ms:g} ms per image"
    best = max(within, key=lambda r: r.val_accuracy)
    close = [r for r in within if r.val_accuracy_ci95[1] >= best.val_accuracy_ci95[0]]
    pick = min(close, key=lambda r: (r.gflops if r.gflops is not None else math.inf, r.ms_per_image))
    if pick is best:
        return pick, "the best held-out accuracy" + (f" within {budget_ms:g} ms per image" if budget_ms else "")
    return pick, (f"not measurably worse than {best.model} ({best.val_accuracy:.3f}), at {pick.gflops} GFLOPs "
                  f"against {best.gflops}")  # fmt: skip
