"""workers/curate/neighbours.py: the pairs above a cosine threshold, exact and through IVF, and their groups."""

from __future__ import annotations

import numpy as np
import pytest

from workers.curate.neighbours import components, same_content_pairs, similar_pairs, unit_rows


def _planted(n: int, d: int, copies: int, noise: float, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n random unit rows (nearly orthogonal in high d) and `copies` of them perturbed, appended: the planted pairs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    picked = rng.choice(n, size=copies, replace=False)
    near = x[picked] + noise * rng.standard_normal((copies, d)).astype(np.float32)
    pairs = {(int(p), n + i) for i, p in enumerate(picked)}
    return unit_rows(np.concatenate([x, near])), pairs


def _brute(unit: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = unit @ unit.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize(("method", "width"), [("exact", 64), ("ivf", 64), ("ivf", 512)])
def test_planted_near_copies_are_found_and_nothing_else(method, width):
    unit, planted = _planted(3000, width, copies=40, noise=0.2)  # cosine about 0.98 to the original
    pairs = similar_pairs(unit, 0.9, method=method)
    found = set(zip(pairs.left.tolist(), pairs.right.tolist(), strict=True))
    assert found == planted == _brute(unit, 0.9)
    assert np.all(pairs.cosine >= 0.9) and np.all(pairs.left < pairs.right)
    expected = np.einsum("ij,ij->i", unit[pairs.left], unit[pairs.right])
    assert np.allclose(pairs.cosine, expected, atol=1e-6)


def test_the_threshold_is_inclusive_and_zero_rows_match_nothing():
    a = np.array([1.0, 0.0], dtype=np.float32)
    at = np.array([0.6, 0.8], dtype=np.float32)  # cosine with a: exactly 0.6
    unit = unit_rows(np.stack([a, at, np.zeros(2, np.float32), np.zeros(2, np.float32)]))
    pairs = similar_pairs(unit, 0.6, method="exact")
    assert list(zip(pairs.left.tolist(), pairs.right.tolist(), strict=True)) == [(0, 1)]
    assert len(similar_pairs(unit, 0.61, method="exact")) == 0
    assert len(similar_pairs(unit[:1], 0.5)) == 0


def test_exact_search_matches_all_pairs_on_random_data_at_a_low_threshold():
    rng = np.random.default_rng(3)
    unit = unit_rows(rng.standard_normal((5000, 8)))  # low d: many pairs above 0.8, queries in two blocks
    pairs = similar_pairs(unit, 0.8, method="exact")
    assert set(zip(pairs.left.tolist(), pairs.right.tolist(), strict=True)) == _brute(unit, 0.8)
    assert len(pairs) > 500  # more than one block of results


def test_a_chain_of_near_copies_is_one_group_numbered_by_first_appearance():
    chained = (np.array([4, 1]), np.array([5, 4]))  # 1-4-5 chained
    assert components(7, chained, same_content_pairs([None, None, "a", None, None, None, "a"])).tolist() == [
        0, 1, 2, 3, 1, 1, 2]  # fmt: skip
    assert components(3).tolist() == [0, 1, 2]
