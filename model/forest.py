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
scikit-learn version pinned in ``requirements.lock``. Private fields can change meaning, so it
is never trusted blindly: ``checked_forest`` builds it only for fitted state it understands and
proves it bit for bit against the classifier itself, or says why not, so the caller keeps
scikit-learn's own path instead of a silently wrong answer.
"""

from __future__ import annotations

import numpy as np

# Above this many rows sklearn's own loop is faster and the node arrays would grow large.
MAX_ROWS = 256
# Probe rows are scored in slices of this many, to bound the (rows x trees) node arrays.
_PROBE_SLICE = 512


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
        # Node i's children sit at 2i (right) and 2i + 1 (left), so that one gather at
        # 2i + go_left moves a row on. Leaves point to themselves: rows that reached one stay.
        own = np.arange(len(nodes), dtype=np.intp)
        left = np.where(self._is_leaf, own, nodes["left"].astype(np.intp) + shift)
        right = np.where(self._is_leaf, own, nodes["right"].astype(np.intp) + shift)
        self._children = np.column_stack([right, left]).ravel()
        self._depth = int(nodes["depth"].max())
        self._baseline = float(np.asarray(classifier._baseline_prediction).ravel()[0])
        self._loss = classifier._loss

    def raw_predict(self, X: np.ndarray) -> np.ndarray:
        # Every split of every tree decided at once (a handful of numpy calls, whatever the
        # depth), then each row walks down its trees by table lookups. Comparisons with NaN
        # are False and raise no warning.
        rows = X.shape[0]
        values = X.take(self._feature, axis=1)
        go_left = values <= self._threshold  # False for NaN ...
        go_left |= np.isnan(values) & self._missing_left  # ... which goes where training sent it
        decisions = go_left.view(np.uint8).ravel()
        # Row r's decision at node i is decisions[r * n_nodes + i]; one row needs no offset,
        # and a served request is usually one row.
        row_start = None if rows == 1 else (np.arange(rows, dtype=np.intp) * len(self._feature))[:, None]
        node = self._roots  # broadcast against row_start on the first step
        for _ in range(self._depth):
            at = node if row_start is None else row_start + node
            node = self._children[2 * node + decisions[at]]
        if node.ndim == 1 and rows > 1:  # depth 0: every tree a single leaf
            node = np.broadcast_to(node, (rows, len(node)))
        leaves = self._value[node].reshape(rows, -1)
        # sklearn's order: baseline + tree 1, then + tree 2, ...; cumsum adds sequentially.
        leaves[:, 0] += self._baseline
        return np.cumsum(leaves, axis=1)[:, -1]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._loss.predict_proba(self.raw_predict(X)[:, None])


def _probe_rows(forest: FlatForest, n_features: int, seed: int = 0) -> np.ndarray:
    """Rows that walk every branch kind: each split's feature exactly on its threshold (it
    goes left) and just above it, each feature missing on its own, all missing, and random
    mixes of thresholds and missing values."""
    split = ~forest._is_leaf
    features, thresholds = forest._feature[split], forest._threshold[split]
    on = np.full((len(features), n_features), np.nan)
    on[np.arange(len(features)), features] = thresholds
    above = on.copy()
    above[np.arange(len(features)), features] = np.nextafter(thresholds, np.inf)
    rng = np.random.default_rng(seed)
    mixed = np.full((len(features), n_features), np.nan)
    for column in range(n_features):
        choices = thresholds[features == column]
        if len(choices):
            values = rng.choice(choices, size=len(features))
            values = np.where(rng.random(len(features)) < 0.5, values, np.nextafter(values, np.inf))
            mixed[:, column] = np.where(rng.random(len(features)) < 0.2, np.nan, values)
    one_missing = np.where(np.eye(n_features, dtype=bool), np.nan, 0.0)
    return np.vstack([on, above, mixed, one_missing, np.full((1, n_features), np.nan)])


def checked_forest(classifier, examples: np.ndarray | None = None) -> tuple[FlatForest | None, str]:
    """A ``FlatForest`` proven bit-identical to ``classifier.predict_proba`` on ``examples``
    plus probe rows, or ``None`` and the reason it cannot be used."""
    if getattr(classifier, "_preprocessor", None) is not None:
        return None, "the classifier transforms its input itself (categorical features)"
    try:
        forest = FlatForest(classifier)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        return None, f"fitted state not understood: {error}"
    probe = _probe_rows(forest, classifier.n_features_in_)
    if examples is not None:
        probe = np.vstack([np.asarray(examples, dtype=np.float64), probe])
    for start in range(0, len(probe), _PROBE_SLICE):
        rows = probe[start : start + _PROBE_SLICE]
        if forest.predict_proba(rows).tobytes() != classifier.predict_proba(rows).tobytes():
            return None, f"differs from predict_proba on probe rows {start}..{start + len(rows) - 1}"
    return forest, f"bit-identical to predict_proba on {len(probe)} probe rows"
