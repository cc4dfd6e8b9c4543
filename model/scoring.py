"""A registered model version loaded the one way serving loads it.

Serving's runtime, the promotion gate and ``credit-risk promote`` all go through ``load``
and ``LoadedModel.score``, so the version a gate or an operator checks is scored by exactly
the code that will serve it, fast path included.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow.pyfunc
import numpy as np
import pandas as pd

from model.identity import DATASET_HASH
from model.pyfunc import CreditRiskModel
from model.schema import check_values, validate_features


@dataclass(frozen=True)
class LoadedModel:
    uri: str
    pyfunc: mlflow.pyfunc.PyFuncModel  # MLflow's own wrapper: signature, metadata, ``predict``
    scorer: CreditRiskModel

    @property
    def dataset_hash(self) -> str:
        return (self.pyfunc.metadata.metadata or {}).get(DATASET_HASH, "")

    def score(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(prediction, probability)`` of a float64 matrix in ``FEATURES`` order; raises
        ``model.schema.InvalidFeatures`` naming the first bad value."""
        check_values(values)
        return self.scorer.score(values)

    def score_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return self.scorer.score(validate_features(frame).to_numpy())


def load(uri: str) -> LoadedModel:
    """Load ``uri`` (``models:/credit-risk-model/3``, a run or a local path) as serving does."""
    pyfunc = mlflow.pyfunc.load_model(uri)
    scorer = pyfunc.unwrap_python_model()
    if not isinstance(scorer, CreditRiskModel):
        raise TypeError(f"{uri} is not a credit-risk model (its python model is {type(scorer).__name__})")
    return LoadedModel(uri, pyfunc, scorer)
