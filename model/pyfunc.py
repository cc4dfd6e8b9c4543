"""The MLflow pyfunc: validation, preprocessing and classifier behind one ``predict``.

``predict`` takes a DataFrame with the ten features (NaN or None for missing) and returns a
DataFrame with ``prediction`` (0/1 at the threshold chosen at training) and ``probability``
(of serious delinquency within two years).
"""

from __future__ import annotations

import logging
from pathlib import Path

import joblib
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from model.forest import MAX_ROWS as FLAT_FOREST_MAX_ROWS
from model.forest import checked_forest
from model.preprocessing import CreditFeatureEngineer
from model.schema import (
    FEATURES,
    OUTPUT_PREDICTION,
    OUTPUT_PROBABILITY,
    InvalidFeatures,
    validate_features,
)

PIPELINE_ARTIFACT = "pipeline"
THRESHOLD_CONFIG = "threshold"

logger = logging.getLogger(__name__)


def model_signature() -> ModelSignature:
    """Every feature a required, nullable double; ints are accepted and widened by MLflow."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.double, name) for name in FEATURES]),
        outputs=Schema(
            [
                ColSpec(DataType.long, OUTPUT_PREDICTION),
                ColSpec(DataType.double, OUTPUT_PROBABILITY),
            ]
        ),
    )


class CreditRiskModel(mlflow.pyfunc.PythonModel):
    """Loads the fitted sklearn pipeline from its artifact and the threshold from the config.

    ``predict`` is MLflow's entry point (DataFrame in and out, ``mlflow models serve``,
    ``mlflow.pyfunc``); ``score`` is the same computation on a validated float64 matrix, which
    serving calls directly to skip the DataFrames.
    """

    def load_context(self, context):
        self.pipeline = joblib.load(context.artifacts[PIPELINE_ARTIFACT])
        self.threshold = float(context.model_config[THRESHOLD_CONFIG])
        self._engineer, self._classifier = self.pipeline[0], self.pipeline[-1]
        if len(self.pipeline) != 2 or not isinstance(self._engineer, CreditFeatureEngineer):
            raise TypeError(f"expected [CreditFeatureEngineer, classifier], got {self.pipeline!r}")
        self._forest, self.fast_path_status = checked_forest(
            self._classifier, _example_rows(context, self._engineer)
        )
        if self._forest is None:
            logger.warning(f"fast tree evaluation off, using scikit-learn's: {self.fast_path_status}")

    @property
    def fast_path(self) -> bool:
        """Whether small batches go through the verified ``FlatForest``."""
        return self._forest is not None

    # The DataFrame hint tells MLflow not to infer a schema from hints: the explicit
    # signature logged with the model is the contract.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            features = validate_features(model_input)
        except InvalidFeatures as error:
            # MLflow's scoring server (`mlflow models serve`) answers this error code with 400.
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error
        prediction, probability = self.score(features.to_numpy())
        return pd.DataFrame(
            {OUTPUT_PREDICTION: prediction, OUTPUT_PROBABILITY: probability}, index=features.index
        )

    def score(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(prediction, probability)`` for a float64 matrix already checked by
        ``model.schema.check_values``; probability is exactly
        ``pipeline.predict_proba(values)[:, 1]``."""
        engineered = self._engineer.transform_values(values)
        if self._forest is not None and len(engineered) <= FLAT_FOREST_MAX_ROWS:
            probability = self._forest.predict_proba(engineered)[:, 1]
        else:
            probability = self._classifier.predict_proba(engineered)[:, 1]
        return (probability >= self.threshold).astype(np.int64), probability


def _example_rows(context, engineer: CreditFeatureEngineer) -> np.ndarray | None:
    """The logged input example as the classifier sees it: extra rows for the fast path's check."""
    model_dir = Path(context.artifacts[PIPELINE_ARTIFACT]).parent.parent
    try:
        example = Model.load(str(model_dir)).load_input_example(str(model_dir))
        return engineer.transform_values(validate_features(example).to_numpy())
    except Exception as error:  # the example is a bonus for the check, never a reason not to load
        logger.info(f"no input example for the fast path's check ({error}); probe rows only")
        return None
