"""workers/curate/uncertainty.py: the measures, the ranking, the diverse cover, the per-label split."""

from __future__ import annotations

import numpy as np
import pytest

from workers.curate import uncertainty as u
from workers.curate.neighbours import unit_rows

P = np.array([[0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [0.34, 0.33, 0.33]])


def test_each_measure_orders_a_confident_a_tied_and_a_flat_distribution():
    margin = u.uncertainty(u.MARGIN, P)
    assert np.allclose(margin, [1 - 0.85, 1 - 0.05, 1 - 0.01])
    assert np.allclose(u.uncertainty(u.LEAST_CONFIDENCE, P), [0.1, 0.5, 0.66])
    entropy = u.uncertainty(u.ENTROPY, P)
    assert entropy[0] < entropy[1] < entropy[2] <= 1.0 and entropy[2] > 0.99
    assert u.ranked(margin).tolist() == [2, 1, 0]


def test_topk_scores_get_the_rest_of_the_mass_as_a_class():
    dist = u.with_rest(np.array([[0.6, 0.3], [0.2, 0.1]]))
    assert np.allclose(dist, [[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    with pytest.raises(ValueError, match="two scores"):
        u.uncertainty(u.MARGIN, np.array([[1.0]]))


def test_ties_rank_by_index_so_a_queue_is_the_same_every_run():
    assert u.ranked(np.array([0.5, 0.7, 0.5, 0.7])).tolist() == [1, 3, 0, 2]


def test_diverse_takes_one_of_a_cluster_of_near_copies_then_covers_the_rest():
    rng = np.random.default_rng(0)
    hard = rng.standard_normal(16)
    copies = hard + 0.01 * rng.standard_normal((10, 16))  # ten near-copies of one hard case: most uncertain
    others = rng.standard_normal((10, 16))
    unit = unit_rows(np.concatenate([copies, others]))
    scores = np.concatenate([np.full(10, 0.9) + np.arange(10) * 1e-3, np.full(10, 0.6)])
    plain = u.ranked(scores)[:5]
    assert set(plain.tolist()) <= set(range(10))  # by uncertainty alone: five copies of one case
    chosen = u.diverse(scores, unit, 5)
    assert chosen[0] == 9  # the most uncertain first
    assert sum(1 for c in chosen if c < 10) == 1 and len(set(chosen.tolist())) == 5


def test_per_label_round_robins_over_labels_in_each_labels_order():
    order = np.array([0, 1, 2, 3, 4, 5])
    labels = ["a", "a", "a", "b", "c", "a"]
    assert u.per_label(order, labels, 4).tolist() == [0, 3, 4, 1]
    assert u.per_label(order, labels, 10).tolist() == [0, 3, 4, 1, 2, 5]
