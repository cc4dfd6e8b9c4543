"""A fitted binary ``HistGradientBoostingClassifier`` evaluated all trees at once.

scikit-learn predicts tree by tree from Python, about 17 µs of overhead per tree: with 800
trees a single row costs ~14 ms however small it is. Here every node of every tree sits in
flat arrays and one numpy pass per depth level moves all rows through all trees together, so
a served row costs well under a millisecond.

The result is bit-identical to ``predict_proba``: same comparisons (``x <= threshold``,
missing values sent where the split learned to send them), leaf values summed in sklearn's
order (baseline, then tree 1, 2, ...; ``cumsum`` adds sequentially), and the classifier's own
link function. ``tests/test_forest.py`` holds it to that. Large batches are left to sklearn,
whose compiled loop is faster there.

It reads the fitted ``_predictors``, ``_baseline_prediction`` and ``_loss`` of the exact
scikit-learn version pinned in ``requirements.lock``.
"""

from __future__ import annotations

import numpy as np

# Above this many rows sklearn's own loop is faster and the node arrays would grow large.
MAX_ROWS = 256


class FlatForest:
    def __init__(self, classifier):
        if classifier.n_trees_per_iteration_ != 1:
            raise ValueError("FlatForest supports binary classifiers only")
        trees = [predictors[0].nodes for predictors in classifier._predictors]
        if any(tree["is_categorical"].any() for tree in trees):
            raise ValueError("FlatForest does not support categorical splits")
        sizes = np.array([len(tree) for tree in trees])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        nodes = np.concatenate(trees)
        shift = np.repeat(offsets, sizes)
        self._roots = offsets.astype(np.intp)
        self._feature = nodes["feature_idx"].astype(np.intp)
        self._threshold = nodes["num_threshold"].astype(np.float64)
        self._missing_left = nodes["missing_go_to_left"].astype(bool)
        self._is_leaf = nodes["is_leaf"].astype(bool)
        self._value = nodes["value"].astype(np.float64)
        # Leaves point to themselves, so rows that reached one simply stay there.
        own = np.arange(len(nodes), dtype=np.intp)
        self._left = np.where(self._is_leaf, own, nodes["left"].astype(np.intp) + shift)
        self._right = np.where(self._is_leaf, own, nodes["right"].astype(np.intp) + shift)
        self._depth = int(nodes["depth"].max())
        self._baseline = float(np.asarray(classifier._baseline_prediction).ravel()[0])
        self._loss = classifier._loss

    def raw_predict(self, X: np.ndarray) -> np.ndarray:
        rows = np.arange(X.shape[0])[:, None]
        node = np.broadcast_to(self._roots, (X.shape[0], len(self._roots)))
        for _ in range(self._depth):
            values = X[rows, self._feature[node]]
            missing = np.isnan(values)
            with np.errstate(invalid="ignore"):
                go_left = np.where(missing, self._missing_left[node], values <= self._threshold[node])
            node = np.where(go_left, self._left[node], self._right[node])
        leaves = self._value[node]
        start = np.full((X.shape[0], 1), self._baseline)
        return np.cumsum(np.hstack([start, leaves]), axis=1)[:, -1]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._loss.predict_proba(self.raw_predict(X)[:, None])
