"""The model's place in the MLflow registry: names, lookups, registration and promotion.

Stages are deprecated in MLflow 3 but still the contract serving relies on
(``models:/credit-risk-model/Production``); the ``production`` alias, their successor, is
kept in step with the stage on every promotion.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from mlflow.entities.model_registry import ModelVersion
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

REGISTERED_MODEL_NAME = "credit-risk-model"
PRODUCTION_STAGE = "Production"
PRODUCTION_ALIAS = "production"
PRODUCTION_MODEL_URI = f"models:/{REGISTERED_MODEL_NAME}/{PRODUCTION_STAGE}"

DATASET_HASH_TAG = "dataset_hash"
TRAINING_CONFIG_TAG = "training_config_hash"

_READY_TIMEOUT_S = 300


@contextmanager
def _stages_api():
    """Silence the per-call deprecation warning of the stage API we deliberately use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def production_version(client: MlflowClient) -> ModelVersion | None:
    """The version currently in the Production stage, or None (also when the model is new)."""
    with _stages_api():
        try:
            versions = client.get_latest_versions(REGISTERED_MODEL_NAME, [PRODUCTION_STAGE])
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
    return versions[0] if versions else None


def versions_trained_on(
    client: MlflowClient, dataset_hash: str, training_config_hash: str
) -> list[ModelVersion]:
    """Registered versions trained on these exact bytes with this exact configuration."""
    found = client.search_model_versions(
        f"name = '{REGISTERED_MODEL_NAME}' and tag.{DATASET_HASH_TAG} = '{dataset_hash}'"
    )
    return [v for v in found if v.tags.get(TRAINING_CONFIG_TAG) == training_config_hash]


def register(
    client: MlflowClient, model_info, run_id: str, tags: dict[str, str], description: str
) -> ModelVersion:
    """Register a logged model as a new version; MLflow waits until it is READY."""
    try:
        client.create_registered_model(REGISTERED_MODEL_NAME)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        REGISTERED_MODEL_NAME,
        model_info.model_uri,
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model_info.model_id,
        await_creation_for=_READY_TIMEOUT_S,
    )
    version = client.get_model_version(REGISTERED_MODEL_NAME, version.version)
    if version.status != ModelVersionStatus.to_string(ModelVersionStatus.READY):
        raise MlflowException(
            f"version {version.version} is {version.status}, not READY: {version.status_message}"
        )
    return version


def promote(client: MlflowClient, version: str) -> None:
    """Move ``version`` to Production (archiving the previous one) and point the alias at it."""
    with _stages_api():
        client.transition_model_version_stage(
            REGISTERED_MODEL_NAME, version, PRODUCTION_STAGE, archive_existing_versions=True
        )
    client.set_registered_model_alias(REGISTERED_MODEL_NAME, PRODUCTION_ALIAS, version)


def tag_version(client: MlflowClient, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(REGISTERED_MODEL_NAME, version, key, value)
