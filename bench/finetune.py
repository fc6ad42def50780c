"""Fine-tuning benchmark: do fine-tunes hold up on photos they have never seen?

    python -m bench.finetune                      # plants, MobileNetV2, 8 / 24 / 96 training images per class
    python -m bench.finetune --sizes 8 --methods default linear-probe

Held-out photos are chosen first and never used for training or model selection: per class, HELD_OUT images,
taken as whole near-duplicate groups (the product's own grouping: MobileNetV2 embeddings, cosine >= 0.93, or the
same bytes), so no held-out photo has a copy of itself in any training set. Training sets of 8, 24 and 96 images
per class are nested seeded draws from the rest. Each method publishes an artifact from a training set (its own
validation split carved out of it, as a user's run would), then a label job with that artifact labels the held-out
photos: the table gives the held-out accuracy beside the accuracy (and 95 % CI) the card claimed.

Methods: `default` (every default: lp-ft, min_steps, grouped split, label smoothing by size, and refit auto: on
these small sets the published model trains on every image of its set once the validation run chose its epochs),
`default-no-refit` (the same with refit never: the published model never saw its validation split), `full` as it
was before (a random head and every layer for 5 epochs, min_steps 0, label smoothing 0.1, an ungrouped split),
`linear-probe` (the fast probe: embeddings once, a convex fit; refit auto: the L2 chosen by cross-validation, the
head fitted on every image), `linear-probe-no-refit`, `random-init` (`full` from random weights).
Every method trains at the same crop (--image-size, 160 by default: CPU time) on one local Ray worker.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import local_ray

PLANTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "plants"
METHODS = ("default", "default-no-refit", "full", "linear-probe", "linear-probe-no-refit", "random-init")
SIZES = (8, 24, 96)
HELD_OUT = 24  # per class: 120 photos a class leaves 96 for the largest training set

log = logging.getLogger("bench.finetune")


@dataclass(frozen=True)
class Outcome:
    size: int
    method: str
    val_accuracy: float
    val_ci: tuple[float, float]
    val_images: int
    held_out_accuracy: float
    held_out_images: int
    train_seconds: float
    wall_seconds: float
    trained_images: int  # the images the published model trained on: all of its set when refitted

    @property
    def within_ci(self) -> bool:
        return self.val_ci[0] <= self.held_out_accuracy <= self.val_ci[1]

    def row(self) -> str:
        low, high = self.val_ci
        return (f"| {self.size} | {self.method} | {self.trained_images} "
                f"| {self.val_accuracy:.3f} [{low:.3f}, {high:.3f}] ({self.val_images}) "
                f"| {self.held_out_accuracy:.3f} ({self.held_out_images}) | {'yes' if self.within_ci else 'no'} "
                f"| {self.train_seconds:.1f} | {self.wall_seconds:.1f} |")  # fmt: skip


HEADER = (
    "| per class | method | published model trained on | card val acc [95% CI] (images) "
    "| held-out acc (images) | held-out in card CI | train s | wall s |\n|---|---|---|---|---|---|---|---|"
)


def list_plants(root: Path) -> list[tuple[str, str]]:
    """(absolute path, class) of every photo, sorted."""
    return sorted((str(p), p.parent.name) for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def choose_held_out(photos: list[tuple[str, str]], args: argparse.Namespace) -> tuple[list, list]:
    """(held-out, pool): HELD_OUT photos a class as whole near-duplicate groups, and the rest."""
    from schemas.finetune import FinetuneJobSpec
    from workers.finetune.embed import EmbeddingPass

    classes = sorted({label for _, label in photos})
    spec = FinetuneJobSpec(data={"uri": str(args.data)}, base={"name": args.model, "weights": args.weights},
                           output=f"{args.data}-unused", training={"image_size": args.image_size})  # fmt: skip
    embedder = EmbeddingPass(spec, threads=args.cpus)
    try:
        items = [(path, classes.index(label)) for path, label in photos]
        embedded = embedder.embed(items)
        groups = embedder.groups(len(items), embedded.sha256s, spec.data.duplicate_cosine)
    finally:
        embedder.close()
    members: dict[int, list[int]] = {}
    for i, group in enumerate(groups.ids):
        members.setdefault(group, []).append(i)
    held = set()
    for c, name in enumerate(classes):
        order = sorted({g for i, g in enumerate(groups.ids) if items[i][1] == c})
        random.Random(f"held-out:{args.seed}:{name}").shuffle(order)
        taken = 0
        for group in order:
            if taken + len(members[group]) <= HELD_OUT:
                held.update(members[group])
                taken += len(members[group])
    log.info("held out %d photos (%d near-duplicate groups in the sample)", len(held), groups.duplicate_groups)
    return [photos[i] for i in sorted(held)], [photos[i] for i in range(len(photos)) if i not in held]


def training_sets(pool: list[tuple[str, str]], sizes: list[int], seed: int) -> dict[int, list[tuple[str, str]]]:
    """Nested seeded draws: the 8-image set is inside the 24-image set, which is inside the 96-image one."""
    by_class: dict[str, list[tuple[str, str]]] = {}
    for photo in pool:
        by_class.setdefault(photo[1], []).append(photo)
    for name, items in by_class.items():
        random.Random(f"train:{seed}:{name}").shuffle(items)
    return {n: [p for items in by_class.values() for p in items[:n]] for n in sizes}


def write_labels(photos: list[tuple[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "label"])
        writer.writerows(photos)
    return path


def training_fields(method: str, args: argparse.Namespace) -> tuple[dict, dict, str | None]:
    """(training, data extras, weights) of a method; `default` sets nothing but the shared crop and seed."""
    shared = {"image_size": args.image_size, "seed": args.seed}
    if method.endswith("-no-refit"):
        shared |= {"refit": "never"}
        method = method.removesuffix("-no-refit")
    if method == "default":
        return shared, {}, args.weights
    if method == "linear-probe":
        return shared | {"method": "linear-probe"}, {}, args.weights
    as_before = shared | {"method": "full", "epochs": 5, "min_steps": 0, "label_smoothing": 0.1}
    if method == "full":
        return as_before, {"group_duplicates": False}, args.weights
    # From random weights there are no pre-trained features to protect: every layer at the head's rate.
    return as_before | {"backbone_lr_scale": 1.0}, {"group_duplicates": False}, None


def run_one(size: int, method: str, labels: Path, held_out: Path, truth: dict[str, str], args, work: Path
            ) -> Outcome:  # fmt: skip
    from jobs.finetune import run_finetune_job
    from schemas.finetune import FinetuneJobSpec

    training, data, weights = training_fields(method, args)
    # The labels files name the photos where they are (absolute keys outside the file's folder): allowed by name.
    data = {"uri": str(labels), "allowed_roots": [str(args.data)], **data}
    spec = FinetuneJobSpec(data=data, base={"name": args.model, "weights": weights},
                           output=str(work / "models" / f"{method}-{size}"), training=training)  # fmt: skip
    started = time.perf_counter()
    summary = run_finetune_job(spec, show_progress=False)
    wall = time.perf_counter() - started
    for line in summary.lines():
        log.info("%s/%d %s", method, size, line)
    accuracy, images = label_held_out(summary.artifact, held_out, truth, work / "labels" / f"{method}-{size}")
    card = summary.card
    m, refit = card.metrics, card.recipe.refit if card.recipe else None
    return Outcome(size, method, m.val_accuracy, m.val_accuracy_ci95, m.val_images, accuracy, images,
                   card.train_seconds, wall, refit.images if refit else card.dataset.train_images)  # fmt: skip


def label_held_out(artifact: str, manifest: Path, truth: dict[str, str], output: Path) -> tuple[float, int]:
    """Accuracy of a label job with `artifact` over the held-out photos (the product's labelling path)."""
    import pyarrow.dataset as ds

    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    spec = LabelJobSpec(input={"uri": str(manifest), "format": "manifest", "allowed_roots": [str(PLANTS)]},
                        output=str(output), model={"name": artifact}, top_k=1, num_workers=1,
                        embeddings=False)  # fmt: skip
    run_label_job(spec, show_progress=False)
    rows = ds.dataset(output, format="parquet").to_table(columns=["key", "label"]).to_pylist()
    return sum(truth[r["key"]] == r["label"] for r in rows) / len(rows), len(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, default=PLANTS, help="class-per-folder photos (default: shared plants)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--image-size", type=int, default=160, help="crop for training, evaluation and labelling")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="training images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--output", type=Path, help="where artifacts go (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.train", "botocore", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = (args.output or Path(tempfile.mkdtemp(prefix="bench-finetune-"))) / time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    held, pool = choose_held_out(list_plants(args.data), args)
    manifest = work / "held-out.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("key\n" + "".join(f"{path}\n" for path, _ in held))
    truth = dict(held)
    sets = {n: write_labels(photos, work / "sets" / f"n{n}" / "labels.csv")
            for n, photos in training_sets(pool, args.sizes, args.seed).items()}  # fmt: skip
    outcomes = []
    with local_ray(args.cpus):
        for size in args.sizes:
            for method in args.methods:
                outcomes.append(run_one(size, method, sets[size], manifest, truth, args, work))
                log.info("%s", outcomes[-1].row())
    print(f"\n{args.model} ({args.weights}) on {args.data}: {len(held)} held-out photos, {args.image_size} px crops, "
          f"seed {args.seed}, {args.cpus} CPUs; load average before {load_before[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}\n{HEADER}")  # fmt: skip
    print("\n".join(o.row() for o in outcomes))
    return _verdict(outcomes)


def _verdict(outcomes: list[Outcome]) -> int:
    """0 when, at every size, the default recipe's held-out accuracy is at least the linear probe's and lies inside
    the default card's confidence interval."""
    by = {(o.size, o.method): o for o in outcomes}
    failures = []
    for size in sorted({o.size for o in outcomes}):
        default, probe = by.get((size, "default")), by.get((size, "linear-probe"))
        if default and probe and default.held_out_accuracy < probe.held_out_accuracy:
            failures.append(f"{size}/class: default {default.held_out_accuracy:.3f} < probe "
                            f"{probe.held_out_accuracy:.3f}")  # fmt: skip
        if default and not default.within_ci:
            failures.append(f"{size}/class: held-out {default.held_out_accuracy:.3f} outside the card's CI")
    for size in sorted({o.size for o in outcomes}):
        for method in ("default", "linear-probe"):
            refit, held = by.get((size, method)), by.get((size, f"{method}-no-refit"))
            if refit and held:
                print(f"{size}/class {method}: held-out {refit.held_out_accuracy:.3f} refitted on "
                      f"{refit.trained_images} images, {held.held_out_accuracy:.3f} on {held.trained_images} "
                      f"({refit.held_out_accuracy - held.held_out_accuracy:+.3f})")  # fmt: skip
    print("\n".join(failures) or "default >= linear probe at every size, held-out inside the card's CI")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
