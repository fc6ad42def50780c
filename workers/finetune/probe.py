"""The linear probe as a convex fit: multinomial logistic regression on frozen embeddings, in seconds.

Epochs of SGD through a frozen backbone recompute the same features every epoch (127 s on the plants set); the
features never change, so they are computed once (workers.finetune.embed) and the head is the minimiser of a
convex loss, found by full-batch L-BFGS. Written with torch's L-BFGS rather than scikit-learn: torch is already
in every worker, the fit runs on the worker's device, and the result is an nn.Linear's weight and bias as they are.

The loss is scikit-learn's (C = 1 / l2): mean cross-entropy + l2 / (2n) |W|^2, on features centred by the
training set's mean and divided by its overall spread; that scaling is folded back into W and b, so the head
applies to raw embeddings exactly as the label path computes them.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.finetune.recipe import PROBE_MAX_ITERATIONS as MAX_ITERATIONS
from workers.finetune.results import LinearHead

TOLERANCE = 1e-7


def fit_linear_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float = 1.0,
    sample_weights: np.ndarray | None = None,
) -> LinearHead:
    """The multinomial logistic regression of `labels` on `embeddings` (rows), as an nn.Linear head."""
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    w = torch.ones(len(y), dtype=torch.float64) if sample_weights is None else torch.as_tensor(sample_weights).double()
    w = w / w.mean()
    # One scale for every feature, not one each: a feature that is nearly constant on the training set (a ReLU
    # that rarely fires) would get a weight of 1 / its tiny spread, and fine-tuning (lp-ft), where batch-norm
    # statistics and augmentation move it, sent the loss to 18 in its first steps.
    mean, scale = x.mean(0), x.std().clamp(min=1e-6)
    z = (x - mean) / scale
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITERATIONS, tolerance_grad=TOLERANCE,
                                  tolerance_change=TOLERANCE * 1e-2, history_size=20,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = torch.nn.functional.cross_entropy(z @ weight.T + bias, y, reduction="none")
        loss = (losses * w).mean() + l2 / (2 * len(y)) * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
    with torch.no_grad():
        raw_weight = weight / scale  # W z + b = (W / s) x + (b - (W / s) m)
        raw_bias = bias - raw_weight @ mean
    return LinearHead(raw_weight.float().numpy(), raw_bias.float().numpy(), iterations)


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (classes x n_class) per sample, as the training loop's `class_weights: balanced`."""
    counts = np.bincount(labels, minlength=num_classes).clip(min=1)
    return (len(labels) / (num_classes * counts))[labels]
