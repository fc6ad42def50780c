"""`python -m bench.export_parity`: exported files label as bulklabel does, on every photo, not only the export's
own check sample.

1. The zoo's MobileNetV2 (IMAGENET1K_V1) exported to ONNX and TorchScript, labelling the 200 ImageNet sample photos.
2. A fine-tuned artifact (`--artifact`, else a linear-probe fine-tune of the plants sample made here) exported both
   ways, labelling its own validation photos (its split.csv).
For each: top-1 of onnxruntime (run as the README's app lines do: Pillow resize and crop, numpy normalisation) and
of the TorchScript module (fed bulklabel's own preprocessed pixels) against `load_model(...).predict`, the largest
probability difference, and the export's own parity record. Prints the load average.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image, ImageOps

from schemas.ship import ExportFormat
from workers.ship.export import _preprocessed, export_model
from workers.ship.predict import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def app_probabilities(onnx_file: Path, images: list[str]) -> np.ndarray:
    """The README's app lines ("Ship the model"), image by image: the ONNX file and its sidecar, nothing else."""
    meta = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    pre = meta["input"]["preprocess"]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    out = []
    for path in images:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        size, crop, (w, h) = pre["resize_size"], pre["crop_size"], image.size
        image = image.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BILINEAR)
        left, top = round((image.width - crop) / 2), round((image.height - crop) / 2)
        x = (np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255 - pre["mean"]) / pre["std"]
        out.append(session.run(["probabilities"], {"pixels": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0])
    return np.stack(out)


def compare(name: str, weights: str | None, images: list[str], samples: list[str], artifact: str | None,
            tmp: Path) -> None:  # fmt: skip
    with load_model(name, weights, top_k=1) as model:
        ours = model.predict(images)
        labels = np.array([model.categories.index(p.label) for p in ours])
        pixels = _preprocessed(model, images)
        for fmt in ExportFormat:
            out = tmp / f"{name.strip('/').replace('/', '_')}{fmt.suffix}"
            sidecar = export_model(model, fmt, out, samples, artifact)
            if fmt is ExportFormat.ONNX:
                session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                own = session.run(["probabilities"], {"pixels": pixels})[0]
                print(f"{model.model_id} onnx        onnxruntime, bulklabel's pixels      : top-1 equal on "
                      f"{int((own.argmax(1) == labels).sum())}/{len(images)}")  # fmt: skip
                probs = app_probabilities(out, images)
                how = "onnxruntime, the README's app lines"
            else:
                with torch.no_grad():
                    probs = torch.jit.load(str(out))(torch.from_numpy(pixels))[0].numpy()
                how = "TorchScript, bulklabel's pixels"
            ours_p = np.array([p.score for p in ours])
            agree = int((probs.argmax(1) == labels).sum())
            diff = float(np.abs(probs.max(1) - ours_p).max())
            print(f"{model.model_id} {fmt.value:<11} {how:<36}: top-1 equal on {agree}/{len(images)}, largest top-1 "
                  f"probability difference {diff:.1e}; export's own check: {sidecar.parity.images} images, max "
                  f"|Δp| {sidecar.parity.max_probability_diff:.1e}")  # fmt: skip


def plants_artifact(tmp: Path) -> str:
    from jobs.finetune import run_finetune_job
    from schemas.finetune import FinetuneJobSpec

    spec = FinetuneJobSpec(data={"uri": str(SHARED / "plants")}, base={"name": "mobilenet_v2",
                           "weights": "IMAGENET1K_V1"}, training={"method": "linear-probe"},
                           output=str(tmp / "models" / "plants"))  # fmt: skip
    return run_finetune_job(spec, show_progress=False).artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="a fine-tuned version folder (default: fine-tune the plants sample here)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="export-parity-") as tmp:
        tmp = Path(tmp)
        imagenet = sorted(str(p) for p in (SHARED / "imagenet-sample").glob("*.JPEG"))
        compare("mobilenet_v2", "IMAGENET1K_V1", imagenet, imagenet[:64], None, tmp)
        artifact = args.artifact or plants_artifact(tmp)
        with open(Path(artifact) / "split.csv") as fh:
            val = [row["key"] for row in csv.DictReader(fh) if row["split"] == "val"]
        compare(artifact, None, val, [], artifact, tmp)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
