"""What a training run is told: ``TrainingSettings``, the process's environment (flags of
``credit-risk train`` override it), and ``TrainingParameters``, what the flags alone set and
what, with the data and the code, decides the model (``config_hash``).

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_DATA`` | the bundled sample | training CSV (``--data``) |
| ``MLFLOW_EXPERIMENT_NAME`` | ``credit-risk-training`` | experiment of the run (``--experiment``) |
| ``CREDIT_RISK_RETRAIN`` | 0 | train even when a version of these bytes and configuration exists (``--retrain``) |
| ``CREDIT_RISK_TRAIN_JOBS`` | 0: one per core | processes for the independent fits and permutation importance |
| ``CREDIT_RISK_MLFLOW_WAIT_S`` | 0 | how long to wait for the tracking server to answer |
| ``CREDIT_RISK_MLFLOW_UI_URL`` | ``MLFLOW_TRACKING_URI`` | where people open the MLflow UI, for the run link |
| ``CREDIT_RISK_ACTOR`` | ``user@host`` | who the gate's promotions are recorded as made by |

MLflow's own ``MLFLOW_TRACKING_URI`` says where runs and the registry live.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import ENV_PREFIX, TRAINING_EXPERIMENT, TRAINING_EXPERIMENT_VARIABLE
from training.data import BUNDLED_SAMPLE
from training.pipeline import classifier_params
from training.promotion_history import ACTOR_VARIABLE, default_actor

DEFAULT_EXPERIMENT = TRAINING_EXPERIMENT
_SHAPING_SOURCES = ("model", "training")
# The parameters that, with the data and the code, decide the model.
_SHAPING_PARAMETERS = ("seed", "test_size", "cv_folds", "classifier")


def _source_hash() -> str:
    """Hash of the code that shapes a model, so a code change is never mistaken for a rerun."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in _SHAPING_SOURCES:
        for source in sorted((root / package).glob("*.py")):
            digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


class TrainingSettings(BaseSettings):
    """The training process's settings, from the environment; flags override them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    data: Path = Field(
        BUNDLED_SAMPLE,
        validation_alias="CREDIT_RISK_DATA",
        description="training CSV (cs-training.csv layout)",
    )
    experiment: str = Field(
        DEFAULT_EXPERIMENT,
        min_length=1,
        validation_alias=TRAINING_EXPERIMENT_VARIABLE,
        description="the MLflow experiment of the run",
    )
    retrain: bool = Field(
        False,
        validation_alias="CREDIT_RISK_RETRAIN",
        description="train even if a version with this data and configuration exists",
    )
    train_jobs: int = Field(
        0,
        ge=0,
        validation_alias="CREDIT_RISK_TRAIN_JOBS",
        description="processes for the independent fits (CV folds beside the final fit) and the "
        "permutation importance; 0: one per core. The model is the same whatever the number",
    )
    mlflow_wait_s: float = Field(
        0,
        ge=0,
        validation_alias="CREDIT_RISK_MLFLOW_WAIT_S",
        description="how long to wait for the tracking server to answer (containers may start together)",
    )
    mlflow_ui_url: str | None = Field(
        None,
        validation_alias="CREDIT_RISK_MLFLOW_UI_URL",
        description="where people open the MLflow UI, when that differs from MLFLOW_TRACKING_URI",
    )
    actor: str = Field(
        default_factory=default_actor,
        validation_alias=ACTOR_VARIABLE,
        description="who the gate's promotions are recorded as made by (default user@host)",
    )

    @field_validator("data")
    @classmethod
    def _a_file(cls, value: Path) -> Path:
        # Its contents are checked when it is read (``training.data``); a path that is no file
        # is refused here, before anything starts.
        if not value.is_file():
            raise ValueError("no such file")
        return value

    @field_validator("train_jobs")
    @classmethod
    def _one_per_core(cls, value: int) -> int:
        return value or os.cpu_count() or 1

    @field_validator("actor")
    @classmethod
    def _someone(cls, value: str) -> str:
        return value.strip() or default_actor()


class TrainingParameters(BaseModel):
    """What the flags of ``credit-risk train`` alone set: the split, the cross-validation and
    the classifier, which shape the model, and how the gate decides."""

    model_config = ConfigDict(frozen=True)

    seed: int = 42
    test_size: float = Field(0.2, gt=0, lt=1, description="held-out share")
    cv_folds: int = Field(5, ge=2)
    classifier: dict[str, Any] = Field(
        default_factory=classifier_params, description="HistGradientBoostingClassifier parameters"
    )
    reference_rows: int = Field(5000, ge=1, description="training rows kept as the drift reference")
    gate_tolerance: float = Field(0.0, ge=0, description="promote when ROC AUC >= Production's minus this")
    force_promote: bool = False

    @field_validator("classifier")
    @classmethod
    def _known_classifier_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return classifier_params(value)

    def config_hash(self) -> str:
        """Identifies everything that shapes the model besides the data and the code."""
        shaping = self.model_dump(include=set(_SHAPING_PARAMETERS))
        shaping["code"] = _source_hash()
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
