"""Fine-tuning benchmark: `full` vs `linear-probe` vs the same network from random initialisation.

    python -m bench.finetune                       # plants (5 classes x 120 photos), MobileNetV2, 5 epochs
    python -m bench.finetune --image-size 224 --epochs 3 --methods full

Every method trains on the same stratified split (same seed) for the same epochs on one local Ray worker; the
table gives each one's validation accuracy (of its published epoch: the lowest validation loss), the last epoch's
validation accuracy, and the wall time (job start to published artifact; `train s` is the epochs alone). Then a
label job with the `full` artifact labels the validation images, and its accuracy is compared with the one in the
card: they must agree, because label jobs use the card's evaluation preprocessing.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import local_ray

PLANTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "plants"
METHODS = ("full", "linear-probe", "random-init")
CARD_TOLERANCE = 0.01  # issue 3: a label job over the validation images gives the card's accuracy ± 0.01

log = logging.getLogger("bench.finetune")


@dataclass(frozen=True)
class Outcome:
    method: str
    accuracy: float
    last_accuracy: float
    macro_f1: float
    best_epoch: int
    epochs: int
    train_seconds: float
    wall_seconds: float
    artifact: str

    def line(self) -> str:
        return (f"{self.method:<13} {self.accuracy:>8.4f} {self.last_accuracy:>8.4f} {self.macro_f1:>8.4f} "
                f"{self.best_epoch:>5}/{self.epochs:<3}"
                f" {self.train_seconds:>9.1f} {self.wall_seconds:>9.1f}  {self.artifact}")  # fmt: skip


HEADER = (f"{'method':<13} {'val acc':>8} {'last ep':>8} {'macro F1':>8} {'epoch':>9} {'train s':>9} {'wall s':>9}"
          "  artifact")  # fmt: skip


def finetune(method: str, args: argparse.Namespace, output: Path) -> Outcome:
    """Train one method and publish its artifact under `output/<method>`."""
    from jobs.finetune import run_finetune_job
    from schemas.finetune import FinetuneJobSpec

    spec = FinetuneJobSpec(
        data={"uri": str(args.data), "key_column": args.key_column},
        base={"name": args.model, "weights": None if method == "random-init" else args.weights},
        output=str(output / method),
        training={
            "method": "linear-probe" if method == "linear-probe" else "full",
            # From random weights there are no pre-trained features to protect: every layer at the head's rate.
            "backbone_lr_scale": 1.0 if method == "random-init" else 0.1,
            "epochs": args.epochs,
            "image_size": args.image_size,
            "seed": args.seed,
            "early_stopping_patience": 0,  # every method runs every epoch: the comparison is per epoch budget
        },
    )
    started = time.perf_counter()
    summary = run_finetune_job(spec, show_progress=not args.quiet)
    wall = time.perf_counter() - started
    card = summary.card
    log.info("%s: %s", method, "; ".join(line.strip() for line in summary.lines()[1:3]))
    m = card.metrics
    return Outcome(method, m.val_accuracy, m.history[-1].val_accuracy, m.macro_f1, m.best_epoch, card.epochs_run,
                   card.train_seconds, wall, summary.artifact)  # fmt: skip


def label_check(artifact: str, output: Path) -> tuple[float, float, int, float]:
    """Label the artifact's validation images with a label job; returns (label accuracy, card accuracy, images,
    seconds)."""
    import pyarrow.dataset as ds

    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec
    from workers.training.artifacts import SPLIT_NAME, read_card

    card = read_card(artifact)
    with open(Path(artifact, SPLIT_NAME), newline="") as fh:
        truth = {row["key"]: row["label"] for row in csv.DictReader(fh) if row["split"] == "val"}
    manifest = output / "validation.csv"
    manifest.write_text("key\n" + "".join(f"{key}\n" for key in truth))
    spec = LabelJobSpec(
        input={"uri": str(manifest), "format": "manifest"},
        output=str(output / "labels"),
        model={"name": artifact},
        top_k=min(5, len(card.class_names)),
        num_workers=1,
    )
    started = time.perf_counter()
    run_label_job(spec, show_progress=False)
    seconds = time.perf_counter() - started
    rows = ds.dataset(output / "labels", format="parquet").to_table(columns=["key", "label", "model"]).to_pylist()
    assert {r["model"] for r in rows} == {card.artifact_id}, "label rows must carry the artifact's id"
    accuracy = sum(truth[r["key"]] == r["label"] for r in rows) / len(rows)
    return accuracy, card.metrics.val_accuracy, len(rows), seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, default=PLANTS, help="class-per-folder data (default: shared plants)")
    parser.add_argument("--key-column", default="key", help="labels-file key column, when --data is a labels file")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=160, help="training crop (evaluation keeps the preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--output", type=Path, help="where artifacts go (default: a temporary folder)")
    parser.add_argument("--no-label-check", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.train", "botocore", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    output = args.output or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    output = output / time.strftime("%Y%m%d-%H%M%S")  # a fresh job (and version) every run
    with local_ray(args.cpus):
        outcomes = [finetune(method, args, output) for method in args.methods]
        check = None
        if "full" in args.methods and not args.no_label_check:
            check = label_check(next(o.artifact for o in outcomes if o.method == "full"), output)
    print(f"\n{args.model} on {args.data} ({args.epochs} epochs, {args.image_size} px training crops, seed "
          f"{args.seed}, {args.cpus} CPUs)")  # fmt: skip
    print(HEADER)
    print("\n".join(o.line() for o in outcomes))
    if check:
        label_acc, card_acc, images, seconds = check
        verdict = "agrees" if abs(label_acc - card_acc) <= CARD_TOLERANCE else "DISAGREES"
        print(f"label job over the {images} validation images: accuracy {label_acc:.4f}, card {card_acc:.4f} "
              f"({verdict}, tolerance {CARD_TOLERANCE}), {seconds:.1f}s")  # fmt: skip
        return 0 if verdict == "agrees" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
