"""What the embedding pass (workers.finetune.embed) hands back to the driver: numpy and plain data, no torch, so
the driver can unpickle it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.specs import PreprocessSpec


@dataclass(frozen=True)
class LinearHead:
    """An nn.Linear(dim, classes)'s parameters: logits = embeddings @ weight.T + bias."""

    weight: np.ndarray  # (classes, dim) float32
    bias: np.ndarray  # (classes,) float32
    iterations: int  # L-BFGS iterations the fit took

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings @ self.weight.T + self.bias


@dataclass(frozen=True)
class Embedded:
    """What the pass found: per image (in input order) its sha256 (None: unreadable), and the unreadable ones."""

    sha256s: tuple[str | None, ...]
    skipped: tuple[str, ...]  # "<uri>: <reason>"
    dim: int
    seconds: float
    preprocess: PreprocessSpec  # the evaluation preprocessing the embeddings were computed with


@dataclass(frozen=True)
class ProbeFit:
    """A head fitted on the embeddings, and how it scores on the training and validation rows."""

    head: LinearHead
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    confusion: tuple[tuple[int, ...], ...]
    seconds: float
