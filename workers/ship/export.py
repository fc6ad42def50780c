"""`bulklabel export`: a zoo model or a fine-tuned artifact as an ONNX file (dynamic batch) or a TorchScript module,
with a JSON sidecar (schemas.ship) and a parity check at export time.

The exported graph is the label job's model: backbone, head and softmax, taking the preprocessed batch (NCHW float32,
normalised) and giving `probabilities` and `embedding`. Parity: sample images (an artifact's own validation images,
and any `--samples`) are decoded and preprocessed as a label job does (workers.ship.predict), then run through the
eager model and through the file (onnxruntime, or the TorchScript module reloaded); the top-1 must be equal and every
probability within 1e-4, or the export is refused and nothing is left at `--out`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.ship import ExportFormat, ExportSidecar, ModelInput, ParityCheck
from workers.io.storage import StorageError, join, open_storage
from workers.ship.predict import Model

log = logging.getLogger(__name__)

OPSET = 18
MAX_SAMPLES = 64  # images the parity check runs
SPLIT_FILE = "split.csv"  # an artifact's split (workers.finetune.artifacts.SPLIT_NAME)


class ExportRefused(ValueError):
    """The export cannot be made or did not pass its parity check: nothing was written."""


class Exported(nn.Module):
    """Backbone, head and softmax: what a label job computes from a preprocessed batch."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(pixels)
        return torch.softmax(self.head(embedding), dim=1), embedding


def export_model(model: Model, fmt: ExportFormat, out: Path, samples: list[str], artifact: str | None
                 ) -> ExportSidecar:  # fmt: skip
    """Write `out` and `out`.json; raises ExportRefused (nothing written) when the parity check fails."""
    images, sample_from = _samples(model, samples, artifact)
    pixels = _preprocessed(model, images)
    module = Exported(model.loaded.backbone, model.loaded.head).eval()
    with torch.inference_mode():
        expected = module(torch.from_numpy(pixels))[0].numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        written = Path(tmp) / out.name
        if fmt is ExportFormat.ONNX:
            _to_onnx(module, pixels, written)
            got, runtime = _run_onnx(written, pixels)
        else:
            _to_torchscript(module, pixels, written)
            got, runtime = _run_torchscript(written, pixels)
        parity = ParityCheck(images=len(pixels), sample_from=sample_from, runtime=runtime,
                             top1_equal=bool((got.argmax(1) == expected.argmax(1)).all()),
                             max_probability_diff=float(np.abs(got - expected).max()))  # fmt: skip
        if not parity.passed:
            raise ExportRefused(
                f"the {fmt.value} file disagrees with the model on {sample_from}: top-1 equal {parity.top1_equal}, "
                f"largest probability difference {parity.max_probability_diff:.2e} (limit {parity.limit:.0e}); "
                "nothing written"
            )
        sidecar = ExportSidecar(
            format=fmt, file=out.name, model_id=model.model_id, class_names=list(model.categories),
            input=ModelInput(preprocess=model.loaded.preprocess),
            outputs={"probabilities": f"(batch, {len(model.categories)}) softmax over class_names",
                     "embedding": f"(batch, {model.loaded.embedding_dim}) the penultimate layer"},
            opset=OPSET if fmt is ExportFormat.ONNX else None,
            exported_with=f"torch {torch.__version__}" + (" (dynamo exporter)" if fmt is ExportFormat.ONNX else
                                                           " (torch.jit.trace)"),
            parity=parity,
        )  # fmt: skip
        os.replace(written, out)  # the model file, then its sidecar: a sidecar always describes a file beside it
        sidecar_path = out.with_name(out.name + ".json")
        sidecar_path.write_text(sidecar.model_dump_json(indent=2) + "\n")
    log.info("exported %s to %s: parity on %d image(s) of %s, top-1 equal, max |Δp| %.1e", model.model_id, out,
             parity.images, sample_from, parity.max_probability_diff)  # fmt: skip
    return sidecar


def _samples(model: Model, given: list[str], artifact: str | None) -> tuple[list[str], str]:
    images, sources = [], []
    if artifact is not None:
        val = _validation_images(artifact, model)
        if val:
            images += val
            sources.append(f"{len(val)} validation image(s) of {artifact}")
    for item in given:
        found = sorted(str(p) for p in Path(item).iterdir() if p.is_file()) if Path(item).is_dir() else [item]
        images += found
        sources.append(item)
    if not images:
        raise ExportRefused("no images to check the export on: give --samples (a folder or files); an artifact "
                            "uses its own validation images")  # fmt: skip
    return images[:MAX_SAMPLES], " and ".join(sources)


def _validation_images(artifact: str, model: Model) -> list[str]:
    storage = open_storage(artifact, model.storage)
    try:
        text = storage.read_bytes(join(artifact.rstrip("/"), SPLIT_FILE)).decode()
    except (StorageError, OSError):
        return []
    return [row["key"] for row in csv.DictReader(io.StringIO(text)) if row.get("split") == "val"][:MAX_SAMPLES]


def _preprocessed(model: Model, images: list[str]) -> np.ndarray:
    """The images as the exported graph takes them: decoded, resized and cropped as a label job does, normalised."""
    pixels, bad = model.pixels(images)
    if bad:
        log.warning("%d sample image(s) could not be read and were left out of the check, e.g. %s", len(bad), bad[0])
    if pixels is None:
        raise ExportRefused(f"none of the {len(images)} sample image(s) could be read (e.g. {bad[0]})")
    pre = model.loaded.preprocess
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean, std = np.array(pre.mean, np.float32).reshape(1, 3, 1, 1), np.array(pre.std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _to_onnx(module: nn.Module, pixels: np.ndarray, path: Path) -> None:
    example = torch.from_numpy(pixels[:2])
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress to stdout and its optimiser logs each pass: kept out of the command's output.
    chatter = io.StringIO()
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["pixels"],
                                        output_names=["probabilities", "embedding"], dynamic_shapes=({0: batch},),
                                        opset_version=OPSET, verbose=False)  # fmt: skip
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    log.debug("torch.onnx: %s", chatter.getvalue().strip())
    program.save(str(path))


def _run_onnx(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": pixels})[0], f"onnxruntime {ort.__version__}"


def _to_torchscript(module: nn.Module, pixels: np.ndarray, path: Path) -> None:
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(module, torch.from_numpy(pixels[:2]), check_trace=False)
    traced.save(str(path))


def _run_torchscript(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, str]:
    loaded = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        return loaded(torch.from_numpy(pixels))[0].numpy(), f"torch {torch.__version__} (torch.jit.load)"
