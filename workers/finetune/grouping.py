"""Near-duplicate groups for an honest split: images that show the same thing stay on one side of it.

Two images are joined when their bytes are identical (same sha256, whatever their labels) or when, within one
class, the cosine of their frozen-backbone embeddings reaches a threshold; groups are the connected components
(connected components), so a chain of near-copies is one group. The cosine search and the components are
workers.curate.neighbours', the one implementation `bulklabel dedupe` uses too. No torch: the embeddings come from
the embedding pass (workers.finetune.embed), the split from workers.finetune.dataplan.

Cost: the search is per class (exact, in blocks), O(n^2 / classes) dot products: 600 plants images take
milliseconds; 100,000 images in 100 classes about 1e8 dot products of length d, seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers.curate.neighbours import components, same_content_pairs, similar_pairs, unit_rows


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


def near_duplicate_groups(
    labels: Sequence[int],
    sha256s: Sequence[str | None],
    embeddings: np.ndarray | None,
    threshold: float,
) -> Groups:
    """Group images by identical content (sha256; None = unreadable, never joined) and, within a class, by
    embedding cosine >= `threshold` (rows of `embeddings` that are all zero, e.g. unreadable images, join none)."""
    n = len(labels)
    same = same_content_pairs(list(sha256s))
    content = tuple(components(n, same).tolist())
    edges = [same]
    if embeddings is not None and n:
        unit, by_label = unit_rows(embeddings), np.asarray(labels)
        for label in np.unique(by_label):
            members = np.flatnonzero(by_label == label)
            pairs = similar_pairs(unit[members], threshold, method="exact")
            edges.append((members[pairs.left], members[pairs.right]))
    return Groups(tuple(components(n, *edges).tolist()), content)
