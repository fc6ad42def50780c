"""The commands that run a model in the user's own process (`bulklabel predict`, later `export`): torch loads here,
never in the driver. jobs/cli.py parses their flags and calls them by module name (it imports no torch)."""

from __future__ import annotations

import argparse
import json

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
