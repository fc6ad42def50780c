"""Label errors by confident learning: stratified folds for out-of-sample probabilities, then cleanlab's
`find_label_issues` (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 70). numpy here; cleanlab (scikit-learn underneath) imported when called. No torch: the probes that
produce the probabilities are fitted where the embeddings live (workers.finetune.embed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The probes' L2 penalties tried (sklearn's C from 1 to 0.001): on plants with 10% of labels flipped, the
# out-of-sample log loss of the given labels fell from C=1 to C=0.003, and so did the false flags.
PROBE_L2_GRID = (1.0, 10.0, 100.0, 300.0, 1000.0)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold (0..folds-1): every class spread evenly over the folds, in a seeded order."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        out[members] = (offset + np.arange(len(members))) % folds  # classes start where the last left off
        offset += len(members)
    return out


@dataclass(frozen=True)
class Issues:
    """Per row: whether its label is flagged, its rank among the flagged (1 first; 0 unflagged), and its
    self-confidence (the out-of-sample probability of its given label)."""

    flagged: np.ndarray  # bool
    rank: np.ndarray  # int
    self_confidence: np.ndarray  # float


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> Issues:
    """Confident learning over out-of-sample `probabilities` (rows sum to 1) of the given `labels`; flagged rows
    ranked by self-confidence, lowest first."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    # n_jobs=1: by default cleanlab forks a multiprocessing pool (one process per physical core) for its per-class
    # pruning. Forked from a Ray worker or a driver with Ray's threads running, a child can inherit a lock held by
    # one of them and wait for ever: a label-issues job through the job service hung so, with no CPU in use. The
    # per-class work is a few numpy passes; the pool bought nothing here.
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[ranked] = True
    rank = np.zeros(len(labels), dtype=np.int64)
    rank[ranked] = np.arange(1, len(ranked) + 1)
    return Issues(flagged, rank, probabilities[np.arange(len(labels)), labels])
