"""workers/curate/confident.py: stratified folds, and confident learning over out-of-sample probabilities."""

from __future__ import annotations

import numpy as np

from workers.curate.confident import label_issues, stratified_folds


def test_folds_spread_every_class_evenly_and_follow_the_seed():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 5, seed=1)
    for label in (0, 1, 2):
        counts = np.bincount(folds[labels == label], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds, minlength=5).tolist() == [4, 4, 4, 4, 4]
    assert (stratified_folds(labels, 5, seed=1) == folds).all() and (stratified_folds(labels, 5, seed=2) != folds).any()


def test_the_labels_the_probabilities_contradict_are_flagged_lowest_self_confidence_first():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), truth] = 0.9
    given = truth.copy()
    wrong = np.array([3, 50, 120, 200, 280])
    given[wrong] = (truth[wrong] + 1) % 3
    probs[wrong[0]] = 0.02
    probs[wrong[0], truth[wrong[0]]] = 0.96  # the surest contradiction (self-confidence 0.02): ranked first
    found = label_issues(given, probs)
    assert set(np.flatnonzero(found.flagged)) == set(wrong.tolist())
    assert found.rank[wrong[0]] == 1 and sorted(found.rank[wrong].tolist()) == [1, 2, 3, 4, 5]
    assert np.allclose(found.self_confidence, probs[np.arange(300), given]) and (found.rank[~found.flagged] == 0).all()


def test_confident_learning_starts_no_process(monkeypatch):
    """cleanlab forks a pool per physical core unless told not to; forked beside Ray's threads (a service task, a
    driver) a child can wait for ever on a lock it inherited held. Every way it could start one fails here."""
    import multiprocessing
    import os

    def refuse(*args, **kwargs):
        raise AssertionError("confident learning started a process")

    monkeypatch.setattr(multiprocessing, "Pool", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    rng = np.random.default_rng(1)
    given = rng.integers(0, 4, 400)
    probs = rng.dirichlet(np.ones(4), 400)
    found = label_issues(given, probs)
    assert found.flagged.any() and len(found.rank) == 400
