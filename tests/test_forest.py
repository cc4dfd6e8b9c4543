"""The flat forest gives exactly sklearn's probabilities, only faster."""

import numpy as np
import pytest

from model.forest import FlatForest, checked_forest
from training.data import load_training_data
from training.pipeline import build_pipeline, classifier_params


@pytest.fixture(scope="module")
def fitted(sample_path):
    data = load_training_data(sample_path)
    pipeline = build_pipeline(classifier_params(), seed=42).fit(data.features, data.target)
    return pipeline, pipeline[:-1].transform(data.features)


def test_bit_identical_to_predict_proba(fitted):
    pipeline, engineered = fitted
    forest = FlatForest(pipeline[-1])
    for rows in (engineered[:1], engineered[:256], engineered):
        assert forest.predict_proba(rows).tobytes() == pipeline[-1].predict_proba(rows).tobytes()


def test_missing_values_and_values_on_thresholds_take_sklearn_paths(fitted):
    pipeline, engineered = fitted
    forest = FlatForest(pipeline[-1])
    rng = np.random.default_rng(0)
    probe = engineered[:200].copy()
    probe[rng.random(probe.shape) < 0.3] = np.nan  # missing everywhere, not only where trained
    thresholds = forest._threshold[~forest._is_leaf]
    features = forest._feature[~forest._is_leaf]
    probe[np.arange(100), features[:100]] = thresholds[:100]  # exactly on a split: goes left
    assert forest.predict_proba(probe).tobytes() == pipeline[-1].predict_proba(probe).tobytes()


def test_checked_forest_proves_itself_on_probe_rows(fitted):
    pipeline, engineered = fitted
    forest, status = checked_forest(pipeline[-1], engineered[:5])
    assert forest is not None, status
    assert "bit-identical" in status


def test_a_forest_that_would_answer_differently_is_refused(fitted, monkeypatch):
    pipeline, _ = fitted
    original = FlatForest.__init__

    def off_by_one_threshold(self, classifier):
        original(self, classifier)
        split = np.flatnonzero(~self._is_leaf)[0]
        self._threshold = self._threshold.copy()
        self._threshold[split] = np.nextafter(self._threshold[split], -np.inf)

    monkeypatch.setattr(FlatForest, "__init__", off_by_one_threshold)
    forest, status = checked_forest(pipeline[-1])
    assert forest is None and "differs from predict_proba" in status


def test_categorical_features_fall_back_to_sklearn(sample_path):
    """`--set categorical_features=[...]` gives the classifier its own preprocessor, which the
    flat forest does not replay: scikit-learn must answer instead."""
    data = load_training_data(sample_path)
    params = classifier_params({"categorical_features": [10], "max_iter": 20})
    pipeline = build_pipeline(params, seed=42).fit(data.features, data.target)
    forest, status = checked_forest(pipeline[-1])
    assert forest is None and "categorical" in status
