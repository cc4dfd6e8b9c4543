"""Permutation feature importance of the fitted pipeline, exactly as scikit-learn computes it,
in a fraction of the time.

``sklearn.inspection.permutation_importance`` re-scores the whole pipeline for every shuffle:
10 features x 5 repeats = 50 predictions of every tree on every held-out row. A shuffled raw
column changes only a few engineered columns, and only the trees that split on those change
their answers, and only for the rows whose values moved. So each tree's leaf values are computed once for the unshuffled rows, and for
a shuffle only the affected trees are evaluated again; the leaves are then summed in
scikit-learn's own order (baseline, tree 1, 2, ...) and passed through the classifier's link,
so every probability, and hence every score, is bit for bit scikit-learn's.

The shuffles are scikit-learn's own (same seeds, same cumulative in-place shuffling), columns
are spread over ``jobs`` processes, and the result is checked: unless the unshuffled
probabilities equal ``pipeline.predict_proba`` bit for bit, scikit-learn computes it instead.
It reads the classifier's fitted ``_predictors``, ``_bin_mapper``, ``_baseline_prediction``
and ``_loss`` of the pinned scikit-learn (as ``model/forest.py`` does), hence that check.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.inspection import permutation_importance
from sklearn.metrics import roc_auc_score
from sklearn.utils import Bunch, check_random_state

logger = logging.getLogger(__name__)


class _Leaves:
    """Per-tree leaf values of one fitted binary ``HistGradientBoostingClassifier``."""

    def __init__(self, classifier):
        self.classifier = classifier
        self.trees = [predictors[0] for predictors in classifier._predictors]
        self.bitsets, self.feature_map = classifier._bin_mapper.make_known_categories_bitsets()
        self.tree_features = [
            set(tree.nodes["feature_idx"][~tree.nodes["is_leaf"].astype(bool)]) for tree in self.trees
        ]

    def of(self, engineered: np.ndarray, trees) -> dict[int, np.ndarray]:
        return {
            t: self.trees[t].predict(
                engineered, known_cat_bitsets=self.bitsets, f_idx_map=self.feature_map, n_threads=1
            )
            for t in trees
        }

    def matrix(self, engineered: np.ndarray) -> np.ndarray:
        """Every tree's leaf values, one column per tree (shared with workers as one array)."""
        leaves = np.empty((len(engineered), len(self.trees)), order="F")
        for t, values in self.of(engineered, range(len(self.trees))).items():
            leaves[:, t] = values
        return leaves

    def probability(self, leaves: list[np.ndarray]) -> np.ndarray:
        """``predict_proba(...)[:, 1]`` from per-tree leaf values, summed as scikit-learn sums."""
        raw = np.zeros((len(leaves[0]), 1), order="F")
        raw += self.classifier._baseline_prediction
        for values in leaves:
            raw[:, 0] += values
        return self.classifier._loss.predict_proba(raw)[:, 1]


def _changes(before: np.ndarray, after: np.ndarray) -> tuple[set[int], np.ndarray]:
    """The engineered columns a shuffle changed, and the rows it changed."""
    same = (before == after) | (np.isnan(before) & np.isnan(after))
    return set(np.flatnonzero(~same.all(axis=0)).tolist()), ~same.all(axis=1)


def _column_scores(pipeline, values, target, base_leaves, column, seed, repeats) -> list[float]:
    """Scores with ``column`` shuffled ``repeats`` times, as scikit-learn shuffles it."""
    engineer, leaves = pipeline[0], _Leaves(pipeline[-1])
    engineered = engineer.transform_values(values)
    permuted = values.copy()
    random_state = check_random_state(seed)
    shuffling = np.arange(len(values))
    scores = []
    for _ in range(repeats):
        random_state.shuffle(shuffling)
        permuted[:, column] = permuted[shuffling, column]
        shuffled = engineer.transform_values(permuted)
        columns, rows = _changes(engineered, shuffled)
        affected = [t for t, used in enumerate(leaves.tree_features) if used & columns]
        current = [base_leaves[:, t] for t in range(base_leaves.shape[1])]
        # Rows the shuffle left as they were (a count that is 0 in most rows, say) keep their leaves.
        for t, answer in leaves.of(np.ascontiguousarray(shuffled[rows]), affected).items():
            current[t] = current[t].copy()
            current[t][rows] = answer
        scores.append(roc_auc_score(target, leaves.probability(current)))
    return scores


def permutation_importances(
    pipeline, features: pd.DataFrame, target: pd.Series, *, repeats: int, seed: int, jobs: int
):
    """What ``permutation_importance(pipeline, features, target, scoring="roc_auc",
    n_repeats=repeats, random_state=seed)`` returns (``importances_mean``, ``_std``,
    ``importances``), bit for bit."""
    values = features.to_numpy(dtype=np.float64)
    y = target.to_numpy()
    leaves = _Leaves(pipeline[-1])
    base_leaves = leaves.matrix(pipeline[0].transform_values(values))
    base_probability = leaves.probability([base_leaves[:, t] for t in range(base_leaves.shape[1])])
    if base_probability.tobytes() != pipeline.predict_proba(features)[:, 1].tobytes():
        logger.warning("fast permutation importance differs from predict_proba; using scikit-learn's")
        return permutation_importance(
            pipeline, features, target, scoring="roc_auc", n_repeats=repeats, random_state=seed, n_jobs=jobs
        )
    # scikit-learn draws one seed for every column's shuffles from ``random_state``.
    column_seed = check_random_state(seed).randint(np.iinfo(np.int32).max + 1)
    permuted = Parallel(n_jobs=jobs)(
        delayed(_column_scores)(pipeline, values, y, base_leaves, column, column_seed, repeats)
        for column in range(values.shape[1])
    )
    importances = roc_auc_score(y, base_probability) - np.array(permuted)
    return Bunch(
        importances_mean=np.mean(importances, axis=1),
        importances_std=np.std(importances, axis=1),
        importances=importances,
    )
