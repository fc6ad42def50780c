"""Batched forward passes: uint8 pixels in, top-k classes and embeddings out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from workers.models import LoadedModel


@dataclass(frozen=True)
class Predictions:
    """Per image: top-k class indices and probabilities, and the embedding (None when not kept)."""

    topk_indices: np.ndarray  # (n, k) int32
    topk_scores: np.ndarray  # (n, k) float32
    embeddings: np.ndarray | None  # (n, d) float32


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on GPU by default; fp32 on CPU, where bf16 without native support is several times slower."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}[precision]


class Predictor:
    """Holds a model resident on its device and runs batches through it."""

    def __init__(self, loaded: LoadedModel, device: torch.device, precision: str, top_k: int, embeddings: bool):
        self.device = device
        self.top_k = min(top_k, len(loaded.categories))
        self.keep_embeddings = embeddings
        self.amp_dtype = autocast_dtype(device, precision)
        self.backbone = loaded.backbone.to(device, memory_format=torch.channels_last).eval()
        self.head = loaded.head.to(device).eval()
        pre = loaded.preprocess
        # Normalisation constants pre-scaled by 1/255, so uint8 → normalised float is one fused step.
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> Predictions:
        """Predict a (n, h, w, 3) uint8 batch."""
        batch = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        # NHWC → NCHW as a view: the strides are already channels_last, so no copy is made.
        x = (batch.permute(0, 3, 1, 2).float() - self.mean) / self.std
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with autocast:
            features = self.backbone(x)
            logits = self.head(features)
        probs = torch.softmax(logits.float(), dim=1)
        scores, indices = torch.topk(probs, self.top_k, dim=1)
        return Predictions(
            topk_indices=indices.to(torch.int32).cpu().numpy(),
            topk_scores=scores.cpu().numpy(),
            embeddings=features.float().cpu().numpy() if self.keep_embeddings else None,
        )
