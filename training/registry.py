"""The model's place in MLflow: registry names, lookups, registration, promotion and its
history, and the experiments this project logs to.

Stages are deprecated in MLflow 3 but still the contract serving relies on
(``models:/credit-risk-model/Production``); the ``production`` alias, their successor, is
moved with the stage by every promotion made here, and a divergence between them is reported,
never silently repaired.

Promotion history lives in the registry, as tags on the versions, so that every machine sees
the same history. Each promotion (by the gate, ``credit-risk promote`` or ``rollback``) writes
on the version it moves into Production ``promotion.seq`` (one counter for the whole model: the
highest recorded plus one), ``promotion.at`` (UTC), ``promotion.by``, ``promotion.reason``,
``promotion.source`` and ``promotion.previous``; a rollback marks the promotion it undoes with
``promotion.rolled_back_seq`` and ``promotion.rolled_back_at``.

A version carries only its latest promotion. The versions whose latest promotion was not
rolled back, in ``promotion.seq`` order, form a stack whose top is the Production version, and
a rollback pops it: Production goes to the version that held it before the current holder got
it, skipping holders that were themselves rolled back. Consecutive rollbacks therefore walk
back through distinct versions and never flip between two. A Production version that is not
the top of the stack was put there outside credit-risk (by hand in the MLflow UI, or before
promotions were recorded): it counts as the newest holder and is recorded, with source
``outside``, by the next promotion or rollback.
"""

from __future__ import annotations

import getpass
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model import scoring
from model.identity import (
    DATASET_HASH,
    PRODUCTION_ALIAS,
    PRODUCTION_MODEL_URI,
    PRODUCTION_STAGE,
    REGISTERED_MODEL_NAME,
    TRAINING_CONFIG_TAG,
)
from training.data import BUNDLED_SAMPLE, load_training_data

# The experiment tag the MLflow UI reads to tell model training from GenAI work
# (``EXPERIMENT_KIND_TAG_KEY`` and ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` in its source).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The 3.17 UI opens every experiment in the view chosen by its "GenAI | Model training" switch
# (GenAI in a new browser), whatever the tag says, unless the address asks for one.
UI_MODEL_TRAINING_QUERY = "workflowType=machine_learning"

# Who promotes, when the default (user@host) is not the right name, e.g. in CI or a container.
ACTOR_VARIABLE = "CREDIT_RISK_ACTOR"

_READY_TIMEOUT_S = 300
_PROMOTION = "promotion."
_NO_VERSION = "none"


class PromotionError(Exception):
    """A promotion or rollback was refused; nothing in the registry changed."""


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
    if version.status != ModelVersionStatus.to_string(ModelVersionStatus.READY):
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


# --- Promotion history ----------------------------------------------------------------------


def current_actor() -> str:
    """``$CREDIT_RISK_ACTOR``, else ``user@host``."""
    if actor := os.environ.get(ACTOR_VARIABLE, "").strip():
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Promotion:
    """The latest promotion of one version, as recorded in its ``promotion.*`` tags."""

    version: str
    seq: int
    at: str
    by: str
    reason: str
    source: str  # "gate", "cli", "rollback", "outside" (found without a record) or "api"
    previous: str | None  # the version that held Production just before
    rolled_back_at: str | None = None  # set when a rollback undid this promotion

    @property
    def rolled_back(self) -> bool:
        return self.rolled_back_at is not None

    @classmethod
    def from_version(cls, version: ModelVersion) -> Promotion | None:
        tags = version.tags
        try:
            seq = int(tags[f"{_PROMOTION}seq"])
        except (KeyError, ValueError):
            return None
        previous = tags.get(f"{_PROMOTION}previous", _NO_VERSION)
        undone = tags.get(f"{_PROMOTION}rolled_back_seq") == str(seq)
        return cls(
            version=str(version.version),
            seq=seq,
            at=tags.get(f"{_PROMOTION}at", ""),
            by=tags.get(f"{_PROMOTION}by", ""),
            reason=tags.get(f"{_PROMOTION}reason", ""),
            source=tags.get(f"{_PROMOTION}source", ""),
            previous=None if previous == _NO_VERSION else previous,
            rolled_back_at=tags.get(f"{_PROMOTION}rolled_back_at", "") if undone else None,
        )

    def tags(self) -> dict[str, str]:
        return {
            f"{_PROMOTION}seq": str(self.seq),
            f"{_PROMOTION}at": self.at,
            f"{_PROMOTION}by": self.by,
            f"{_PROMOTION}reason": self.reason,
            f"{_PROMOTION}source": self.source,
            f"{_PROMOTION}previous": self.previous or _NO_VERSION,
        }

    def as_dict(self) -> dict:
        return {**asdict(self), "rolled_back": self.rolled_back}


def _by_number(versions) -> list[str]:
    return sorted((str(v) for v in versions), key=int)


@dataclass(frozen=True)
class RegistryState:
    """Production as the registry shows it at one moment: stage, alias and recorded history."""

    versions: dict[str, ModelVersion]
    alias_version: str | None

    @property
    def stage_versions(self) -> list[str]:
        return _by_number(v for v, mv in self.versions.items() if mv.current_stage == PRODUCTION_STAGE)

    @property
    def holder(self) -> str | None:
        """The version ``models:/credit-risk-model/Production`` resolves to (MLflow takes the
        highest version in the stage), which is what serving follows."""
        stage = self.stage_versions
        return stage[-1] if stage else None

    @property
    def history(self) -> list[Promotion]:
        """Every version's latest promotion, newest first."""
        records = (Promotion.from_version(v) for v in self.versions.values())
        return sorted((r for r in records if r is not None), key=lambda r: r.seq, reverse=True)

    @property
    def recorded_holder(self) -> Promotion | None:
        """The newest promotion that was not rolled back: who should be in Production."""
        return next((r for r in self.history if not r.rolled_back), None)

    @property
    def unrecorded_holder(self) -> bool:
        """True when Production holds a version no promotion here put there."""
        recorded = self.recorded_holder
        return self.holder is not None and (recorded is None or recorded.version != self.holder)

    @property
    def holders(self) -> list[str]:
        """The rollback stack, oldest first; its top is the Production version."""
        stack = [r.version for r in reversed(self.history) if not r.rolled_back]
        if self.unrecorded_holder:
            stack = [v for v in stack if v != self.holder] + [self.holder]
        return stack

    def next_seq(self) -> int:
        return max((r.seq for r in self.history), default=0) + 1

    def divergences(self) -> list[str]:
        """Ways in which stage ``Production`` and alias ``production`` disagree."""
        found = []
        stage = self.stage_versions
        if len(stage) > 1:
            listed = ", ".join(f"v{v}" for v in stage)
            found.append(
                f"{listed} are all in stage {PRODUCTION_STAGE} ({PRODUCTION_MODEL_URI} resolves to v{stage[-1]})"
            )
        if self.alias_version != self.holder:
            stage_text = (
                f"stage {PRODUCTION_STAGE} is v{self.holder}"
                if self.holder
                else f"no version is in stage {PRODUCTION_STAGE}"
            )
            alias_text = (
                f"alias {PRODUCTION_ALIAS} points at v{self.alias_version}"
                if self.alias_version
                else f"alias {PRODUCTION_ALIAS} is not set"
            )
            found.append(f"{stage_text} but {alias_text}")
        return found

    def outside_changes(self) -> list[str]:
        """Production changes that no promotion here recorded (the MLflow UI, most likely)."""
        recorded = self.recorded_holder
        if self.unrecorded_holder:
            if Promotion.from_version(self.versions[self.holder]) is None:
                what = f"v{self.holder} in {PRODUCTION_STAGE} without a promotion record"
            else:
                what = (
                    f"v{self.holder} in {PRODUCTION_STAGE}, but the latest recorded promotion is "
                    f"v{recorded.version}'s (#{recorded.seq})"
                    if recorded
                    else f"v{self.holder} in {PRODUCTION_STAGE}, but its promotion was rolled back"
                )
            return [f"{what}: changed outside credit-risk (MLflow UI?)"]
        if self.holder is None and recorded is not None:
            return [
                f"no version in {PRODUCTION_STAGE}, but the latest recorded promotion put "
                f"v{recorded.version} there (#{recorded.seq}): changed outside credit-risk (MLflow UI?)"
            ]
        return []

    def rollback_target(self) -> str:
        """The version a rollback would put in Production; raises ``PromotionError`` if none."""
        if self.holder is None:
            raise PromotionError(
                f"no version is in {PRODUCTION_STAGE}, so there is nothing to roll back; "
                "choose one with: credit-risk promote --version N --reason TEXT"
            )
        stack = self.holders
        if len(stack) < 2:
            undone = any(record.rolled_back for record in self.history)
            raise PromotionError(
                f"nothing to roll back to: no version is recorded in {PRODUCTION_STAGE} before "
                f"v{self.holder}" + (" other than ones already rolled back" if undone else "")
            )
        return stack[-2]

    def version(self, number: str) -> ModelVersion:
        """The registered version ``number``; raises ``PromotionError`` if there is none."""
        if number not in self.versions:
            known = ", ".join(_by_number(self.versions)) or "none"
            raise PromotionError(f"{REGISTERED_MODEL_NAME} has no version {number} (versions: {known})")
        return self.versions[number]


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


def _record(client: MlflowClient, promotion: Promotion) -> Promotion:
    tag_version(client, promotion.version, promotion.tags())
    return promotion


def _record_outside_holder(client: MlflowClient, state: RegistryState, actor: str) -> Promotion | None:
    """Write the record no one wrote for a holder put in Production outside credit-risk."""
    if not state.unrecorded_holder:
        return None
    return _record(
        client,
        Promotion(
            version=state.holder,
            seq=state.next_seq(),
            at=_utc_now(),
            by="unknown",
            reason=f"noticed by {actor}: in {PRODUCTION_STAGE} without a promotion record, "
            "changed outside credit-risk (MLflow UI?)",
            source="outside",
            previous=None,
        ),
    )


def _seq_after(state: RegistryState, outside: Promotion | None) -> int:
    return outside.seq + 1 if outside else state.next_seq()


def promote(
    client: MlflowClient,
    version: str | int,
    *,
    reason: str = "",
    source: str = "api",
    actor: str | None = None,
) -> Promotion:
    """Move ``version`` into Production, stage and alias together (the previous holder is
    archived), and record who, when and why on it. Checking that the version can be served is
    the caller's job (``check_servable``); the gate scores it anyway."""
    version = str(version)
    actor = actor or current_actor()
    state = read_state(client)
    status = state.version(version).status
    if status != ModelVersionStatus.to_string(ModelVersionStatus.READY):
        raise PromotionError(f"v{version} is {status}, not READY: it cannot be promoted")
    outside = _record_outside_holder(client, state, actor)
    _move_production(client, version)
    return _record(
        client,
        Promotion(
            version=version,
            seq=_seq_after(state, outside),
            at=_utc_now(),
            by=actor,
            reason=reason,
            source=source,
            previous=state.holder,
        ),
    )


def rollback(
    client: MlflowClient, *, reason: str = "", actor: str | None = None, expected: str | None = None
) -> tuple[Promotion, Promotion]:
    """Put back the version that held Production before the current holder got it.

    Returns ``(undone, new)``: the promotion rolled back and the one recorded for the version
    now in Production. ``expected`` is the target the caller checked: if the registry changed
    meanwhile and the target is another, nothing is done.
    """
    actor = actor or current_actor()
    state = read_state(client)
    target = state.rollback_target()
    if expected is not None and target != expected:
        raise PromotionError(
            f"the registry changed meanwhile: a rollback would now go to v{target}, not v{expected}; "
            "run it again"
        )
    current = state.holder
    outside = _record_outside_holder(client, state, actor)
    undone = outside or Promotion.from_version(state.versions[current])
    _move_production(client, target)
    # Marked before the new record is written, so that a crash in between leaves a stack whose
    # top is still the version now in Production.
    rolled_back_at = _utc_now()
    tag_version(
        client,
        current,
        {f"{_PROMOTION}rolled_back_seq": str(undone.seq), f"{_PROMOTION}rolled_back_at": rolled_back_at},
    )
    new = _record(
        client,
        Promotion(
            version=target,
            seq=_seq_after(state, outside),
            at=rolled_back_at,
            by=actor,
            reason=reason or f"rollback from v{current}",
            source="rollback",
            previous=current,
        ),
    )
    return replace(undone, rolled_back_at=rolled_back_at), new


def check_servable(version: str) -> str:
    """Load ``version`` exactly as serving will and score its logged input example (or rows of
    the bundled sample); raise ``PromotionError`` if it cannot. Says what was scored."""
    uri = f"models:/{REGISTERED_MODEL_NAME}/{version}"
    try:
        loaded = scoring.load(uri)
        rows, scored = loaded.pyfunc.input_example, "its input example"
        if rows is None:
            rows, scored = load_training_data(BUNDLED_SAMPLE).features.head(5), "the bundled sample"
        prediction, probability = loaded.score_frame(rows)
    # Whatever stops it here would stop serving it, so every failure is a refusal.
    except Exception as error:
        raise PromotionError(
            f"v{version} cannot be served, so Production is left as it is: loading {uri} and "
            f"scoring a few rows failed with {type(error).__name__}: {error}"
        ) from error
    if not (
        len(prediction) == len(probability) == len(rows)
        and np.all((probability >= 0) & (probability <= 1))
        and np.isin(prediction, (0, 1)).all()
    ):
        raise PromotionError(
            f"v{version} cannot be served, so Production is left as it is: {uri} answered "
            f"{len(rows)} rows of {scored} with invalid outputs"
        )
    return f"{len(rows)} rows of {scored}"
