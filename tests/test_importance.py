"""The fast permutation importance is scikit-learn's, bit for bit."""

import numpy as np
from sklearn.inspection import permutation_importance

from training.data import load_training_data
from training.importance import permutation_importances
from training.pipeline import build_pipeline, classifier_params
from training.split import ContentSplit


def test_same_importances_as_scikit_learn_bit_for_bit(sample_path):
    data = load_training_data(sample_path)
    held = ContentSplit.of(data.features, data.target, 0.2).evaluation
    pipeline = build_pipeline(classifier_params({"max_iter": 60}), seed=3)
    pipeline.fit(data.features[~held], data.target[~held])
    x_test, y_test = data.features[held], data.target[held]

    expected = permutation_importance(
        pipeline, x_test, y_test, scoring="roc_auc", n_repeats=3, random_state=11
    )
    for jobs in (1, 2):
        fast = permutation_importances(pipeline, x_test, y_test, repeats=3, seed=11, jobs=jobs)
        assert fast.importances.tobytes() == expected.importances.tobytes(), jobs
        assert fast.importances_mean.tobytes() == expected.importances_mean.tobytes()
        assert fast.importances_std.tobytes() == expected.importances_std.tobytes()
    assert np.count_nonzero(expected.importances) > 10  # shuffles that change the score were compared
