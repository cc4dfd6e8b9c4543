"""How a model version is named and recognised everywhere: in the registry, on its runs and
versions, in serving's answers and in every inference record.

Training writes these names and keys, serving and the sidecar read them, the operator's
commands and monitoring look them up. Each is written here once; every other module imports
it. Timestamps that this project writes (tags, answers, health, records' readable forms) are
written by ``utc_timestamp`` alone: ISO 8601, UTC, milliseconds, ``Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime

REGISTERED_MODEL_NAME = "credit-risk-model"
PRODUCTION_STAGE = "Production"
# The stage's successor in MLflow 3: every promotion made here moves both together.
PRODUCTION_ALIAS = "production"
PRODUCTION_MODEL_URI = f"models:/{REGISTERED_MODEL_NAME}/{PRODUCTION_STAGE}"

# SHA-256 of the training file: a run parameter and tag, a version tag, the model's own
# metadata, a parameter of every V2 answer and a field of every inference record.
DATASET_HASH = "dataset_hash"
TRAINING_CONFIG_TAG = "training_config_hash"
TEST_ROC_AUC_TAG = "test_roc_auc"

# What every training run logs beside its model, read back by the gate, serving's answers
# check, the operator's commands and monitoring.
HELD_OUT_ARTIFACT = "evaluation/held_out.parquet"  # held-out rows, label and probability
REFERENCE_SAMPLE_ARTIFACT = "reference/training_sample.parquet"  # training rows, for drift
THRESHOLD_METRIC = "threshold"  # the decision threshold chosen at training

# The experiment of the training runs (MLflow's own variable names it): where trusted runs
# live, which a version's run must be in to be loaded.
TRAINING_EXPERIMENT = "credit-risk-training"
TRAINING_EXPERIMENT_VARIABLE = "MLFLOW_EXPERIMENT_NAME"

# Every setting this project reads from the environment starts with this prefix (MLServer's
# own ``MLSERVER_*`` and MLflow's ``MLFLOW_*`` variables keep theirs).
ENV_PREFIX = "CREDIT_RISK_"


def version_uri(version: str | int) -> str:
    """``models:/credit-risk-model/<version>``."""
    return f"models:/{REGISTERED_MODEL_NAME}/{version}"


def utc_timestamp(moment: datetime | float | None = None) -> str:
    """``moment`` (a datetime, seconds since the epoch, or now) as ``2026-12-06T10:46:11.123Z``."""
    if moment is None:
        moment = datetime.now(UTC)
    elif not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=UTC)
    elif moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: say which time zone it is in")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
