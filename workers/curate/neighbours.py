"""Near-duplicates by embedding: the pairs whose cosine reaches a threshold, found through a faiss index (never all
pairs held at once), and the groups they make (connected components, so a chain of near-copies is one group).

One implementation for every caller: `bulklabel dedupe` (jobs/curate/dedupe.py) and the fine-tune's grouped split
(workers/finetune/grouping.py). Plain numpy and faiss, no torch.

Search. Below EXACT_MAX_ROWS, exact: faiss's flat inner-product range search over unit vectors, in blocks of
queries (BLAS; memory is the pairs found, not n x n). From there (or `method="ivf"`), approximate: an IVF index of
sqrt-scaled lists over float16 codes finds candidates in the NPROBE nearest lists, and each candidate's cosine is
then computed exactly from the float32 rows, so no pair below the threshold is ever reported; what IVF can miss is
a pair whose two images fall in lists far apart (bench/dedupe.py measures the recall of planted copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

EXACT_MAX_ROWS = 50_000  # exact search is n^2 d flops: 50,000 x 1280 is ~3 TFLOP, a minute on 2 cores
QUERY_BLOCK = 4096
NPROBE = 16
TRAIN_PER_LIST = 40  # faiss warns below 39 training points per list


@dataclass(frozen=True)
class Pairs:
    """Pairs (i < j) of rows whose cosine is at least the threshold, and that cosine."""

    left: np.ndarray  # int64
    right: np.ndarray  # int64
    cosine: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.left)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32, C order); an all-zero row stays zero and so matches nothing."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def similar_pairs(unit: np.ndarray, threshold: float, method: str = "auto") -> Pairs:
    """Every pair of rows of `unit` (unit vectors) with cosine >= `threshold`, each once. `method`: exact, ivf, or
    auto (exact up to EXACT_MAX_ROWS rows)."""
    n = len(unit)
    if n < 2:
        return _pairs([], [], [])
    use_ivf = method == "ivf" or (method == "auto" and n > EXACT_MAX_ROWS)
    return _ivf_pairs(unit, threshold) if use_ivf else _exact_pairs(unit, threshold)


def _range_radius(threshold: float) -> float:
    # faiss's inner-product range search keeps results strictly above the radius: a hair below the threshold, then
    # the exact cosine decides (>=), as the docstring promises.
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def _exact_pairs(unit: np.ndarray, threshold: float) -> Pairs:
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return _searched(index, unit, threshold)


def _ivf_pairs(unit: np.ndarray, threshold: float) -> Pairs:
    n, d = unit.shape
    lists = max(1, min(int(4 * np.sqrt(n)), n // TRAIN_PER_LIST))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, lists, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    rng = np.random.default_rng(0)
    sample = unit[np.sort(rng.choice(n, size=min(n, lists * TRAIN_PER_LIST * 2), replace=False))]
    index.train(sample)
    for start in range(0, n, QUERY_BLOCK * 16):
        index.add(unit[start : start + QUERY_BLOCK * 16])
    index.nprobe = min(NPROBE, lists)
    # fp16 codes shift an inner product by ~1e-3: candidates are searched a little below the threshold and kept
    # only where the float32 cosine reaches it.
    return _searched(index, unit, threshold, slack=2e-3)


def _searched(index: faiss.Index, unit: np.ndarray, threshold: float, slack: float = 0.0) -> Pairs:
    left, right, cosine = [], [], []
    radius = _range_radius(threshold - slack)
    for start in range(0, len(unit), QUERY_BLOCK):
        block = unit[start : start + QUERY_BLOCK]
        lims, _, found = index.range_search(block, radius)
        rows = np.repeat(np.arange(start, start + len(block), dtype=np.int64), np.diff(lims).astype(np.int64))
        keep = rows < found  # each pair once, never a row with itself
        i, j = rows[keep], found[keep].astype(np.int64)
        cos = np.einsum("ij,ij->i", unit[i], unit[j]) if len(i) else np.zeros(0, np.float32)
        ok = cos >= np.float32(threshold)
        left.append(i[ok])
        right.append(j[ok])
        cosine.append(cos[ok].astype(np.float32))
    return _pairs(left, right, cosine)


def _pairs(left, right, cosine) -> Pairs:
    if not left:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Pairs(np.concatenate(left), np.concatenate(right), np.concatenate(cosine))


class UnionFind:
    """Disjoint sets over 0..n-1; the smaller index is each set's root, so numbering follows first appearance."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, left: np.ndarray, right: np.ndarray) -> None:
        for a, b in zip(left.tolist(), right.tolist(), strict=True):
            self.union(a, b)

    def numbered(self) -> np.ndarray:
        """Each element's set, numbered 0.. by the set's first element."""
        roots = np.fromiter((self.find(i) for i in range(len(self.parent))), dtype=np.int64, count=len(self.parent))
        _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))  # unique sorts by root value; renumber by first appearance
        return order[inverse]
