"""A registered model version loaded the one way serving loads it.

Serving's runtime, the promotion gate and ``credit-risk promote`` all go through ``load``
and ``LoadedModel.score``, so the version a gate or an operator checks is scored by exactly
the code that will serve it, fast path included. ``served_probabilities`` scores rows the two
ways serving does (small requests through the flat forest, large ones through scikit-learn's
loop): the gate and the answers check of ``model.verified`` both hold a version to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow.pyfunc
import numpy as np
import pandas as pd

from model.forest import MAX_ROWS as FLAT_FOREST_MAX_ROWS
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


def served_probabilities(loaded: LoadedModel, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of ``features`` as serving answers them: in flat-forest-sized slices (as
    single requests are scored) and in one batch (scikit-learn's loop), so that both of
    serving's tree evaluators are exercised. Returns ``(sliced, whole)``."""
    values = features.to_numpy(dtype=np.float64)
    sliced = [
        loaded.score(values[start : start + FLAT_FOREST_MAX_ROWS])[1]
        for start in range(0, len(values), FLAT_FOREST_MAX_ROWS)
    ]
    return np.concatenate(sliced) if sliced else np.empty(0), loaded.score(values)[1]


def served_probability(loaded: LoadedModel, features: pd.DataFrame) -> np.ndarray:
    """``served_probabilities``, required to agree bit for bit (else ``ValueError``)."""
    sliced, whole = served_probabilities(loaded, features)
    if sliced.tobytes() != whole.tobytes():
        differ = int(np.sum(sliced != whole))
        raise ValueError(f"{loaded.uri} answers {differ} rows differently in small and large batches")
    return whole
