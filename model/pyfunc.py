"""The MLflow pyfunc: validation, preprocessing and classifier behind one ``predict``.

``predict`` takes a DataFrame with the ten features (NaN or None for missing) and returns a
DataFrame with ``prediction`` (0/1 at the threshold chosen at training) and ``probability``
(of serious delinquency within two years).
"""

from __future__ import annotations

import joblib
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from model.forest import MAX_ROWS as FLAT_FOREST_MAX_ROWS
from model.forest import FlatForest
from model.schema import (
    FEATURES,
    OUTPUT_PREDICTION,
    OUTPUT_PROBABILITY,
    InvalidFeatures,
    validate_features,
)

PIPELINE_ARTIFACT = "pipeline"
THRESHOLD_CONFIG = "threshold"
DATASET_HASH_METADATA = "dataset_hash"


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
    """Loads the fitted sklearn pipeline from its artifact and the threshold from the config."""

    def load_context(self, context):
        self.pipeline = joblib.load(context.artifacts[PIPELINE_ARTIFACT])
        self.threshold = float(context.model_config[THRESHOLD_CONFIG])
        self._forest = FlatForest(self.pipeline[-1])

    # The DataFrame hint tells MLflow not to infer a schema from hints: the explicit
    # signature logged with the model is the contract.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            features = validate_features(model_input)
        except InvalidFeatures as error:
            # MLflow's scoring server (`mlflow models serve`) answers this error code with 400.
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error
        probability = self.probability(features)
        return pd.DataFrame(
            {
                OUTPUT_PREDICTION: (probability >= self.threshold).astype("int64"),
                OUTPUT_PROBABILITY: probability,
            },
            index=features.index,
        )

    def probability(self, features: pd.DataFrame) -> np.ndarray:
        """Exactly ``pipeline.predict_proba(features)[:, 1]``, fast for small batches."""
        engineered = self.pipeline[:-1].transform(features)
        if len(engineered) <= FLAT_FOREST_MAX_ROWS:
            return self._forest.predict_proba(engineered)[:, 1]
        return self.pipeline[-1].predict_proba(engineered)[:, 1]
