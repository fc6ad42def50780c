"""The commands that run a model in the user's own process (`bulklabel predict`, later `export`): torch loads here,
never in the driver. jobs/cli.py parses their flags and calls them by module name (it imports no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from schemas.catalog import is_artifact_location
from schemas.ship import ExportFormat
from schemas.specs import StorageOptions
from workers.ship.predict import Prediction, load_model


def predict(args: argparse.Namespace) -> tuple[list[str], int]:
    """`bulklabel predict`: (lines to print, exit code: 1 when an image could not be read, each saying why)."""
    with load_model(args.model, args.weights, weights_dir=args.weights_dir, top_k=args.top_k, embeddings=False,
                    device=args.device, storage=StorageOptions(endpoint_url=args.endpoint_url)) as model:  # fmt: skip
        predictions = model.predict(args.images)
    lines = [json.dumps(p.as_dict()) for p in predictions] if args.json else table(predictions, model.model_id)
    return lines, 1 if any(p.error for p in predictions) else 0


def table(predictions: list[Prediction], model_id: str) -> list[str]:
    width = max([len(p.source) for p in predictions] + [5])
    out = [f"{'image':<{width}}  {'label':<28} {'score':>6}  runners-up ({model_id})", "-" * (width + 70)]
    for p in predictions:
        if p.error:
            out.append(f"{p.source:<{width}}  error: {p.error}")
            continue
        rest = ", ".join(f"{label} {score:.3f}" for label, score in p.topk[1:])
        out.append(f"{p.source:<{width}}  {p.label:<28} {p.score:>6.3f}  {rest}")
    return out


def export(args: argparse.Namespace) -> tuple[list[str], int]:
    """`bulklabel export`: the file and its sidecar, or ExportRefused (exit 2) with nothing written."""
    from workers.ship.export import export_model

    fmt = ExportFormat(args.format)
    out = Path(args.out) if args.out else Path(args.model.rstrip("/").rsplit("/", 1)[-1] + fmt.suffix)
    artifact = args.model if is_artifact_location(args.model) else None
    with load_model(args.model, args.weights, weights_dir=args.weights_dir, top_k=1, embeddings=False,
                    storage=StorageOptions(endpoint_url=args.endpoint_url)) as model:  # fmt: skip
        sidecar = export_model(model, fmt, out, args.samples, artifact)
    p = sidecar.parity
    return [f"{out} ({fmt.value}{f', opset {sidecar.opset}' if sidecar.opset else ''}) and {out}.json: "
            f"{model.model_id}, {len(sidecar.class_names)} classes, input {sidecar.input.preprocess.crop_size}px",
            f"parity on {p.images} image(s) ({p.sample_from}) through {p.runtime}: top-1 equal, largest probability "
            f"difference {p.max_probability_diff:.1e}"], 0  # fmt: skip


def models(args: argparse.Namespace) -> tuple[list[str], int]:
    """`bulklabel models`: the zoo, best top-1 first (JSON lines with --json)."""
    from workers.ship.zoo import zoo

    entries = zoo(args.names, args.max_gflops, args.offline)
    if args.json:
        return [json.dumps(e.as_dict()) for e in entries], 0
    head = f"{'model':<22} {'weights':<26} {'top-1':>6} {'top-5':>6} {'GFLOPs':>8} {'params M':>9} {'MB':>7} " \
           f"{'embedding':>9} {'since':>5}  here"  # fmt: skip
    lines = [head, "-" * len(head)]
    for e in entries:
        lines.append(f"{e.model:<22} {e.weights:<26} {_num(e.top1, 6, 2)} {_num(e.top5, 6, 2)} {_num(e.gflops, 8, 2)} "
                     f"{e.params_m:>9.1f} {_num(e.file_mb, 7, 1)} {_num(e.embedding_width, 9, 0)} {e.since:>5}  "
                     f"{'yes' if e.here else 'no'}")  # fmt: skip
    here = sum(e.here for e in entries)
    lines.append(f"{len(entries)} weights of {len({e.model for e in entries})} models; {here} here (usable "
                 "offline); top-1/top-5: ImageNet-1K as torchvision reports them; since: the first torchvision "
                 f"release with the model ({_first_release()} means that one or earlier)")  # fmt: skip
    return lines, 0


def _first_release() -> str:
    from workers.ship.history import history

    return history()["releases"][0]


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
