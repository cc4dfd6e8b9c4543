"""Fits run side by side give the same model and the same CV as fits run one after another."""

from training.data import load_training_data
from training.pipeline import build_pipeline, classifier_params
from training.train import _fit_and_cross_validate


def test_the_model_and_cv_do_not_depend_on_the_number_of_jobs(sample_path):
    data = load_training_data(sample_path)
    pipeline = build_pipeline(classifier_params({"max_iter": 40}), seed=5)
    results = {
        jobs: _fit_and_cross_validate(pipeline, data.features, data.target, 3, 5, jobs, final=True)
        for jobs in (1, 2)
    }
    (one, oof_one, folds_one), (two, oof_two, folds_two) = results[1], results[2]
    assert oof_one.tobytes() == oof_two.tobytes() and folds_one == folds_two
    assert one.predict_proba(data.features).tobytes() == two.predict_proba(data.features).tobytes()
    assert one is not pipeline and 0.6 < min(folds_one) < 1  # fitted copies, real scores
