"""Which images a person should look at first: uncertainty measures over a model's class scores, and a k-center
greedy cover of the most uncertain images' embeddings, so a queue is not hundreds of near-copies of one hard case.
Plain numpy.

Measures (higher: more uncertain), on the full softmax where a label job stored it (`probabilities: true`), else on
its top-k scores with the mass outside them as one more class (an approximation, said in each row's `measured_on`):
- margin: 1 - (p1 - p2), two classes nearly tied;
- least confidence: 1 - p1;
- entropy: of the distribution, divided by the log of its size, so it lies in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MARGIN, ENTROPY, LEAST_CONFIDENCE = "margin", "entropy", "least-confidence"
POOL_PER_PICK = 3  # diverse: the cover chooses among this many times the queue's size of the most uncertain


def with_rest(topk_scores: np.ndarray) -> np.ndarray:
    """Top-k scores (rows, sorted high first) with one more column: the probability mass outside them."""
    scores = np.clip(np.asarray(topk_scores, dtype=np.float64), 0.0, 1.0)
    rest = np.clip(1.0 - scores.sum(axis=1, keepdims=True), 0.0, 1.0)
    return np.concatenate([scores, rest], axis=1)


def uncertainty(measure: str, probabilities: np.ndarray) -> np.ndarray:
    """Each row's uncertainty under `measure`; rows are distributions over classes (any order)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"uncertainty needs at least two scores per image, got shape {p.shape}")
    top2 = -np.sort(-np.partition(p, p.shape[1] - 2, axis=1)[:, -2:], axis=1)  # p1 >= p2 per row
    if measure == MARGIN:
        return 1.0 - (top2[:, 0] - top2[:, 1])
    if measure == LEAST_CONFIDENCE:
        return 1.0 - top2[:, 0]
    if measure == ENTROPY:
        safe = np.where(p > 0, p, 1.0)
        return -(p * np.log(safe)).sum(axis=1) / np.log(p.shape[1])
    raise ValueError(f"unknown uncertainty measure {measure!r}")


def ranked(scores: np.ndarray) -> np.ndarray:
    """Indices by score, highest first; ties by index, so a queue is the same every run."""
    return np.lexsort((np.arange(len(scores)), -np.asarray(scores)))


def diverse(scores: np.ndarray, unit: np.ndarray, size: int) -> np.ndarray:
    """`size` indices covering the most uncertain images: among the POOL_PER_PICK x size most uncertain, first the
    most uncertain, then each time the one farthest (cosine distance) from every one chosen so far: a k-center
    greedy cover (Sener & Savarese 2018's core-set selection) of the uncertain pool, so a near-copy of a chosen
    image is taken only once the pool has nothing farther. Rows of `unit` are unit vectors (zero: no embedding)."""
    pool = ranked(scores)[: max(size, min(len(scores), size * POOL_PER_PICK))]
    if len(pool) == 0:
        return pool
    x = unit[pool]
    nearest = np.full(len(pool), np.inf)  # cosine distance to the nearest chosen
    chosen = [0]
    for _ in range(min(size, len(pool)) - 1):
        nearest = np.minimum(nearest, 1.0 - x @ x[chosen[-1]])
        nearest[chosen[-1]] = -np.inf  # never again
        chosen.append(int(np.argmax(nearest)))  # first of equals: the more uncertain (the pool is in rank order)
    return pool[np.array(chosen)]


def per_label(order: np.ndarray, labels: Sequence[str], size: int) -> np.ndarray:
    """`order` (best first) split evenly over the labels: round-robin over each label's own order, labels taken by
    their best image, until `size` (a label with fewer images leaves its turns to the others)."""
    queues: dict[str, list[int]] = {}
    for index in order.tolist():
        queues.setdefault(labels[index], []).append(index)
    lanes = list(queues.values())
    out: list[int] = []
    depth = 0
    while len(out) < size and any(depth < len(lane) for lane in lanes):
        out += [lane[depth] for lane in lanes if depth < len(lane)][: size - len(out)]
        depth += 1
    return np.array(out, dtype=np.int64)
