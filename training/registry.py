"""The model's place in MLflow: lookups and registration of ``credit-risk-model``, the
experiments this project logs to, links into the MLflow UI, and the registry writes of a
promotion or rollback (planned by ``training.promotion_history``, which owns the rules).

Stages are deprecated in MLflow 3 but still the contract serving relies on
(``models:/credit-risk-model/Production``); the ``production`` alias, their successor, is
moved with the stage by every promotion made here, and a divergence between them is reported,
never silently repaired. Checking that a version can be served is ``training.servability``'s.

MLflow has no transactions across tags, so each write is ordered so that a crash between two
leaves a history whose stack still ends with the version in Production.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from mlflow.entities.model_registry import ModelVersion
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model.identity import (
    DATASET_HASH,
    PRODUCTION_ALIAS,
    PRODUCTION_STAGE,
    REGISTERED_MODEL_NAME,
    TRAINING_CONFIG_TAG,
    utc_timestamp,
)
from training.promotion_history import (
    Promotion,
    PromotionError,
    RegistryState,
    default_actor,
    plan_promotion,
    plan_rollback,
)

# The experiment tag the MLflow UI reads to tell model training from GenAI work
# (``EXPERIMENT_KIND_TAG_KEY`` and ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` in its source).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The 3.17 UI opens every experiment in the view chosen by its "GenAI | Model training" switch
# (GenAI in a new browser), whatever the tag says, unless the address asks for one.
UI_MODEL_TRAINING_QUERY = "workflowType=machine_learning"

_READY_TIMEOUT_S = 300
_READY = ModelVersionStatus.to_string(ModelVersionStatus.READY)


@contextmanager
def _stages_api():
    """Silence the per-call deprecation warning of the stage API we deliberately use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


# --- lookups and registration ---------------------------------------------------------------


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
        f"name = '{REGISTERED_MODEL_NAME}' and tag.{DATASET_HASH} = '{dataset_hash}'"
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
    if version.status != _READY:
        raise MlflowException(
            f"version {version.version} is {version.status}, not READY: {version.status_message}"
        )
    return version


def tag_version(client: MlflowClient, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(REGISTERED_MODEL_NAME, version, key, value)


def model_training_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed and tagged so that the MLflow UI opens
    it as model training rather than GenAI."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException as error:  # created by someone else meanwhile
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def ui_url(tracking_uri: str, route: str) -> str | None:
    """A link to ``route`` (e.g. ``experiments/1/runs/<id>``) in the MLflow UI served at
    ``tracking_uri`` that opens in the model-training view; None if it is not a server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/{route.strip('/')}?{UI_MODEL_TRAINING_QUERY}"


# --- Production: read, promote, roll back ----------------------------------------------------


def read_state(client: MlflowClient) -> RegistryState:
    """Read stage, alias and history; ``PromotionError`` when the model is not registered."""
    try:
        model = client.get_registered_model(REGISTERED_MODEL_NAME)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PromotionError(
                f"no registered model {REGISTERED_MODEL_NAME!r} in the registry at "
                f"{client.tracking_uri}; train one first: credit-risk train"
            ) from error
        raise
    versions, token = {}, None
    while True:
        page = client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'", page_token=token)
        versions.update({str(v.version): v for v in page})
        token = page.token
        if not token:
            break
    alias = model.aliases.get(PRODUCTION_ALIAS)
    return RegistryState(versions, None if alias is None else str(alias))


def _move_production(client: MlflowClient, version: str) -> None:
    """Stage and alias to ``version``; the stage archives whatever held it before."""
    with _stages_api():
        client.transition_model_version_stage(
            REGISTERED_MODEL_NAME, version, PRODUCTION_STAGE, archive_existing_versions=True
        )
    client.set_registered_model_alias(REGISTERED_MODEL_NAME, PRODUCTION_ALIAS, version)


def promote(
    client: MlflowClient,
    version: str | int,
    *,
    actor: str | None = None,
    reason: str = "",
    source: str = "api",
) -> Promotion:
    """Move ``version`` into Production, stage and alias together (the previous holder is
    archived), and record who (``actor``, default user@host), when and why on it. Checking
    that the version can be served is the caller's job (``training.servability``); the gate
    scores it anyway."""
    version, actor = str(version), actor or default_actor()
    state = read_state(client)
    status = state.version(version).status
    if status != _READY:
        raise PromotionError(f"v{version} is {status}, not READY: it cannot be promoted")
    plan = plan_promotion(state, version, reason=reason, source=source, actor=actor, at=utc_timestamp())
    if plan.outside:
        tag_version(client, plan.outside.version, plan.outside.tags())
    _move_production(client, version)
    tag_version(client, version, plan.new.tags())
    return plan.new


def rollback(
    client: MlflowClient, *, actor: str | None = None, reason: str = "", expected: str | None = None
) -> tuple[Promotion, Promotion]:
    """Put back the version that held Production before the current holder got it.

    Returns ``(undone, new)``: the promotion rolled back and the one recorded for the version
    now in Production. ``expected`` is the target the caller checked: if the registry changed
    meanwhile and the target is another, nothing is done.
    """
    state, actor = read_state(client), actor or default_actor()
    plan = plan_rollback(state, reason=reason, actor=actor, at=utc_timestamp(), expected=expected)
    if plan.outside:
        tag_version(client, plan.outside.version, plan.outside.tags())
    _move_production(client, plan.new.version)
    # Marked before the new record is written, so that a crash in between leaves a stack whose
    # top is still the version now in Production.
    tag_version(client, plan.undone.version, plan.undone.rolled_back_tags())
    tag_version(client, plan.new.version, plan.new.tags())
    return plan.undone, plan.new
