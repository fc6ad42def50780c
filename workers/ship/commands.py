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
