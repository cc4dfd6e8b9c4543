"""The flat forest gives exactly sklearn's probabilities, only faster."""

import numpy as np
import pytest

from model.forest import FlatForest
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
