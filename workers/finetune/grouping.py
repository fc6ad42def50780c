"""Near-duplicate groups for an honest split: images that show the same thing stay on one side of it.

Two images are joined when their bytes are identical (same sha256, whatever their labels) or when, within one
class, the cosine of their frozen-backbone embeddings reaches a threshold; groups are the connected components
(union-find), so a chain of near-copies is one group. Plain numpy, no torch: the embeddings come from the
embedding pass (workers.finetune.embed), the split from workers.finetune.dataplan.

Cost: the cosine search is per class, in blocks of BLOCK rows, so it is O(n^2 / classes) dot products and never
holds more than BLOCK x n_class similarities: 600 plants images take milliseconds; 100,000 images in 100 classes
about 1e8 dot products of length d, seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK = 2048


@dataclass(frozen=True)
class Groups:
    """`ids[i]` is image i's group (0..count-1, numbered by first appearance); `content_ids[i]` its group of
    byte-identical images alone (what the split falls back to where embedding groups swallow a whole class)."""

    ids: tuple[int, ...]
    content_ids: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(set(self.ids))

    def sizes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for group in self.ids:
            out[group] = out.get(group, 0) + 1
        return out

    @property
    def duplicate_groups(self) -> int:
        return sum(1 for n in self.sizes().values() if n > 1)

    @property
    def grouped_images(self) -> int:
        return sum(n for n in self.sizes().values() if n > 1)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_groups(
    labels: Sequence[int],
    sha256s: Sequence[str | None],
    embeddings: np.ndarray | None,
    threshold: float,
) -> Groups:
    """Group images by identical content (sha256; None = unreadable, never joined) and, within a class, by
    embedding cosine >= `threshold` (rows of `embeddings` that are all zero, e.g. unreadable images, join none)."""
    n = len(labels)
    uf = _UnionFind(n)
    first_with: dict[str, int] = {}
    for i, digest in enumerate(sha256s):
        if digest is not None:
            uf.union(first_with.setdefault(digest, i), i)
    content = _numbered(uf, n)
    if embeddings is not None and n:
        _join_similar(uf, np.asarray(labels), _unit_rows(embeddings), threshold)
    return Groups(_numbered(uf, n), content)


def _numbered(uf: _UnionFind, n: int) -> tuple[int, ...]:
    numbering: dict[int, int] = {}
    return tuple(numbering.setdefault(uf.find(i), len(numbering)) for i in range(n))


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _join_similar(uf: _UnionFind, labels: np.ndarray, unit: np.ndarray, threshold: float) -> None:
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        x = unit[members]
        for start in range(0, len(members), BLOCK):
            sims = x[start : start + BLOCK] @ x.T
            rows, cols = np.nonzero(sims >= threshold)
            for r, c in zip(rows + start, cols, strict=True):
                if r < c:  # each pair once; the diagonal (an image with itself) never
                    uf.union(int(members[r]), int(members[c]))
