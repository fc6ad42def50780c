"""Near-duplicates by embedding: the pairs whose cosine reaches a threshold, found through a faiss index (never all
pairs held at once), and the groups they make (connected components, so a chain of near-copies is one group).

One implementation for every caller: `bulklabel dedupe` (jobs/curate/dedupe.py) and the fine-tune's grouped split
(workers/finetune/grouping.py). Plain numpy and faiss, no torch.

Search. Below EXACT_MAX_ROWS, exact: faiss's flat inner-product range search over unit vectors, in blocks of
queries (BLAS; memory is the pairs found, not n x n). From there (or `method="ivf"`), approximate: each row's
NEIGHBOURS nearest are found in a PCA-reduced space through an IVF index (the NPROBE nearest of 4 sqrt(n) lists),
and each candidate's cosine is then computed exactly from the full-width rows, so no pair below the threshold is
ever reported. What it can miss: a pair whose rows fall in lists far apart, or a row with more than NEIGHBOURS
near-copies (those beyond are usually joined through the others: groups are connected components);
bench/dedupe.py measures the recall of planted copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

EXACT_MAX_ROWS = 50_000  # exact search is n^2 d flops: 50,000 x 1280 is ~3 TFLOP, a minute on 2 cores
QUERY_BLOCK = 4096
# The approximate path (bench/dedupe.py measures its recall and time at 1,000,000 x 1280):
REDUCED_DIM = 128  # candidates are searched in the rows' top principal directions ...
PCA_SAMPLE = 100_000
NPROBE = 16  # ... in the 16 nearest of 4 sqrt(n) lists ...
NEIGHBOURS = 16  # ... as each row's 16 nearest; every candidate is then checked in the full width
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
    import faiss  # here, not at import: the fine-tune's split and `predict` load this module, few search

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return _searched(index, unit, threshold)


def _ivf_pairs(unit: np.ndarray, threshold: float) -> Pairs:
    import faiss

    n, d = unit.shape
    reduced = _reduced(unit)
    lists = max(1, min(int(4 * np.sqrt(n)), n // TRAIN_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(reduced.shape[1]), reduced.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(reduced[np.sort(rng.choice(n, size=min(n, lists * TRAIN_PER_LIST), replace=False))])
    index.add(reduced)
    index.nprobe = min(NPROBE, lists)
    left, right, cosine = [], [], []
    for start in range(0, n, QUERY_BLOCK):
        _, found = index.search(reduced[start : start + QUERY_BLOCK], NEIGHBOURS + 1)
        rows = np.repeat(np.arange(start, start + len(found), dtype=np.int64), found.shape[1])
        cols = found.reshape(-1).astype(np.int64)
        keep = (cols >= 0) & (rows < cols)  # each pair once (a pair found from both ends: deduplicated below)
        i, j = rows[keep], cols[keep]
        cos = np.einsum("ij,ij->i", unit[i], unit[j])  # the exact cosine, in the full width, decides
        ok = cos >= np.float32(threshold)
        left.append(i[ok])
        right.append(j[ok])
        cosine.append(cos[ok].astype(np.float32))
    pairs = _pairs(left, right, cosine)
    _, first = np.unique(pairs.left * n + pairs.right, return_index=True)
    return Pairs(pairs.left[first], pairs.right[first], pairs.cosine[first])


def _reduced(unit: np.ndarray) -> np.ndarray:
    """Rows projected on their REDUCED_DIM principal directions (trained on a sample), unit length again: the
    space the IVF index searches for candidates."""
    n, d = unit.shape
    if d <= REDUCED_DIM:
        return unit
    import faiss

    pca = faiss.PCAMatrix(d, REDUCED_DIM)
    rng = np.random.default_rng(1)
    pca.train(unit[np.sort(rng.choice(n, size=min(n, PCA_SAMPLE), replace=False))])
    out = np.empty((n, REDUCED_DIM), dtype=np.float32)
    for start in range(0, n, QUERY_BLOCK * 16):
        out[start : start + QUERY_BLOCK * 16] = pca.apply(unit[start : start + QUERY_BLOCK * 16])
    return unit_rows(out)


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


def nearest_cosine(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each query's highest cosine to any of `rows` (both unit vectors; -1 where `rows` is empty), exact: a flat
    index over `rows`, the queries in blocks."""
    if len(rows) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32)
    import faiss

    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(np.ascontiguousarray(rows, dtype=np.float32))
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), QUERY_BLOCK):
        best, _ = index.search(np.ascontiguousarray(queries[start : start + QUERY_BLOCK], dtype=np.float32), 1)
        out[start : start + QUERY_BLOCK] = best[:, 0]
    return out


def same_content_pairs(digests: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(first, later) index pairs of rows with the same digest (a sha256 of the bytes; None joins nothing)."""
    first_with: dict[str, int] = {}
    left, right = [], []
    for i, digest in enumerate(digests):
        if digest is not None:
            first = first_with.setdefault(digest, i)
            if first != i:
                left.append(first)
                right.append(i)
    return np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)


def components(n: int, *edges: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Each of n rows' group, the connected components of the `edges` (pairs of index arrays), numbered 0.. in the
    order of each group's first row (scipy's sparse graph search: linear in rows and pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    left = np.concatenate([np.zeros(0, np.int64), *(e[0] for e in edges)])
    right = np.concatenate([np.zeros(0, np.int64), *(e[1] for e in edges)])
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]  # renumbered by each group's first row
