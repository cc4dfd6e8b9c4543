"""Training settings: command-line flags over environment variables over defaults.

MLflow's own variables apply as usual: ``MLFLOW_TRACKING_URI`` (where runs and the registry
live) and ``MLFLOW_EXPERIMENT_NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.data import BUNDLED_SAMPLE
from training.pipeline import classifier_params

DEFAULT_EXPERIMENT = "credit-risk-training"
_SHAPING_SOURCES = ("model", "training")


def _source_hash() -> str:
    """Hash of the code that shapes a model, so a code change is never mistaken for a rerun."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in _SHAPING_SOURCES:
        for source in sorted((root / package).glob("*.py")):
            digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingSettings:
    data: Path = field(default_factory=lambda: Path(os.environ.get("CREDIT_RISK_DATA", BUNDLED_SAMPLE)))
    experiment: str = field(
        default_factory=lambda: os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    )
    seed: int = 42
    test_size: float = 0.2
    cv_folds: int = 5
    classifier: dict[str, Any] = field(default_factory=classifier_params)
    reference_rows: int = 5000
    gate_tolerance: float = 0.0
    force_promote: bool = False
    # How long to wait for the tracking server to answer (containers may start together).
    mlflow_wait_s: float = field(
        default_factory=lambda: float(os.environ.get("CREDIT_RISK_MLFLOW_WAIT_S", "0"))
    )
    # Where people open the MLflow UI when that differs from MLFLOW_TRACKING_URI (containers).
    ui_url: str | None = field(default_factory=lambda: os.environ.get("CREDIT_RISK_MLFLOW_UI_URL"))
    # Processes for the independent fits (CV folds beside the final fit) and the permutation
    # importance; the model is the same whatever the number.
    train_jobs: int = field(
        default_factory=lambda: int(os.environ.get("CREDIT_RISK_TRAIN_JOBS", "0")) or os.cpu_count() or 1
    )
    retrain: bool = field(default_factory=lambda: os.environ.get("CREDIT_RISK_RETRAIN", "0") == "1")

    def __post_init__(self):
        if not 0 < self.test_size < 1:
            raise ValueError(f"test_size must be between 0 and 1, got {self.test_size}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")
        if self.train_jobs < 1:
            raise ValueError(f"CREDIT_RISK_TRAIN_JOBS must be at least 1, got {self.train_jobs}")
        if self.gate_tolerance < 0:
            raise ValueError(f"gate_tolerance must be >= 0, got {self.gate_tolerance}")

    def config_hash(self) -> str:
        """Identifies everything that shapes the model besides the data and the code."""
        shaping = {
            key: value
            for key, value in asdict(self).items()
            if key in ("seed", "test_size", "cv_folds", "classifier")
        }
        shaping["code"] = _source_hash()
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
