"""One monitoring window against MLflow, end to end: which version, its profile, the window's
records and the outcomes in, ``monitor_window``, the monitoring run out.

``credit-risk monitor`` runs it once; the service (``monitoring.service``) runs it on its
schedule; the healing loop can call it the same way. Steps:

1. **the version**: the one asked for, else the version in the ``Production`` stage (the URI
   serving follows); ``MonitorError`` when there is none or it does not exist;
2. **its profile**: ``monitoring/reference.json`` of its training run, else one reconstructed
   from the run's training sample and held-out rows, scored by the version itself loaded as
   serving loads it (``model.scoring``). A reconstruction is said in the result
   (``profile_source``) and never written back: a monitor reads runs and writes its own.
   ``Profiles`` keeps them per version for a long-lived process (a version's profile never
   changes);
3. **the records**: ``read_records`` of that version in ``since <= timestamp < until``, only
   the columns the window needs (``RECORD_COLUMNS``: Parquet is read column by column);
4. **the outcomes**: every committed outcome (``read_outcomes``), joined by
   ``monitor_window`` on ``(request_id, row_index)``;
5. **the run**: ``report.log_monitoring_run`` in the monitoring experiment (``log=False``
   computes without writing, for callers that only want the figures).

Any failure to compute raises: ``MonitorError`` for a finding about the registry or the
profile, MLflow's and the network's own errors otherwise. A window with few or no records is
not a failure: its items are ``insufficient``.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from logging_sidecar.reader import read_records
from model import verified
from model.identity import PRODUCTION_STAGE, REGISTERED_MODEL_NAME, TEST_ROC_AUC_TAG
from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY
from model.verified import VersionRefused
from monitoring.outcomes import read_outcomes
from monitoring.report import log_monitoring_run
from monitoring.settings import Experiments
from monitoring.status import Thresholds
from monitoring.store import load_profile, reconstruct_from_run
from monitoring.window import WindowResult, monitor_window
from training.profile import ProfileError, ReferenceProfile

# What a window reads of each record: the join key, the time, the version, the features and
# the answers (not the model's name, data hash, replica or latency).
RECORD_COLUMNS = (
    "request_id",
    "row_index",
    "timestamp",
    "model_version",
    *FEATURES,
    OUTPUT_PREDICTION,
    OUTPUT_PROBABILITY,
)


class MonitorError(RuntimeError):
    """The window cannot be computed (no such version, no usable profile); the message says why."""


@dataclass(frozen=True)
class Window:
    """A half-open window ``since <= t < until``, both UTC."""

    since: datetime
    until: datetime

    @classmethod
    def ending(cls, until: datetime | None, length: timedelta, since: datetime | None = None) -> Window:
        """The window of ``length`` ending at ``until`` (default now), unless ``since`` is given."""
        until = until or datetime.now(UTC)
        window = cls(since or until - length, until)
        if window.since >= window.until:
            raise ValueError(f"the window is empty: since {window.since} is not before until {window.until}")
        return window


@dataclass(frozen=True, eq=False)
class MonitoredWindow:
    """What one window gave: the result, and where it was recorded."""

    result: WindowResult
    version: str
    run_id: str | None  # the monitoring run; None when not logged
    experiment_id: str | None
    profile_reconstructed: bool
    training_roc_auc: float | None  # the version's ``test_roc_auc`` tag
    skipped_batches: list[tuple[str, str]]  # batches read_records could not read
    seconds: dict[str, float]  # per step: profile, records, outcomes, compute, log
    finished_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        """``credit-risk monitor --json``: the window's object, and the run and the reading."""
        return {
            **self.result.to_dict(),
            "monitoring_run_id": self.run_id,
            "seconds": {step: round(value, 3) for step, value in self.seconds.items()},
            "skipped_batches": [{"batch": name, "reason": reason} for name, reason in self.skipped_batches],
        }


def _stage_lookup(client: MlflowClient) -> list[ModelVersion]:
    with warnings.catch_warnings():  # stages are deprecated in MLflow 3, and serving's contract
        warnings.filterwarnings("ignore", category=FutureWarning)
        return client.get_latest_versions(REGISTERED_MODEL_NAME, [PRODUCTION_STAGE])


def model_version(client: MlflowClient, version: str | None = None) -> ModelVersion:
    """Registry version ``version``, or the one in Production; ``MonitorError`` if none."""
    try:
        if version is not None:
            return client.get_model_version(REGISTERED_MODEL_NAME, str(version))
        found = _stage_lookup(client)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        if version is not None:
            raise MonitorError(f"version {version} of {REGISTERED_MODEL_NAME} is not registered") from None
        raise MonitorError(f"no version of {REGISTERED_MODEL_NAME} is registered") from None
    if not found:
        raise MonitorError(
            f"no version of {REGISTERED_MODEL_NAME} is in {PRODUCTION_STAGE}; name one with --model-version"
        )
    return found[0]


def training_roc_auc(version: ModelVersion) -> float | None:
    """The version's held-out ROC AUC as training recorded it (``test_roc_auc`` tag)."""
    try:
        return float(version.tags[TEST_ROC_AUC_TAG])
    except (KeyError, ValueError):
        return None


def version_scorer(version: ModelVersion) -> Callable[[pd.DataFrame], np.ndarray]:
    """The version's scores, loaded as serving loads it: through ``model.verified`` (its files
    checked against its integrity record before anything is unpickled), never a plain
    ``models:/`` load of whatever the registry points at."""

    def score(frame: pd.DataFrame) -> np.ndarray:
        with verified.verified_version(version.name, str(version.version)) as checked:
            return checked.model.score_frame(frame)[1]

    return score


class Profiles:
    """Each version's profile, fetched (or reconstructed) once per process."""

    def __init__(self):
        self._profiles: dict[str, ReferenceProfile] = {}
        self._lock = threading.Lock()

    def get(self, client: MlflowClient, version: ModelVersion) -> ReferenceProfile:
        with self._lock:
            if (cached := self._profiles.get(version.version)) is not None:
                return cached
        try:
            profile = load_profile(client, version.run_id)
            if profile is None:
                profile = reconstruct_from_run(client, version.run_id, version_scorer(version))
        except (ProfileError, ValueError, VersionRefused) as error:
            raise MonitorError(f"version {version.version}: no usable reference profile: {error}") from error
        with self._lock:
            self._profiles[version.version] = profile
        return profile


def monitor_once(
    client: MlflowClient,
    window: Window,
    *,
    version: str | None = None,
    experiments: Experiments | None = None,
    thresholds: Thresholds | None = None,
    profiles: Profiles | None = None,
    log: bool = True,
) -> MonitoredWindow:
    """One window of ``version`` (default: Production), computed and (``log``) recorded."""
    experiments = experiments or Experiments()
    seconds: dict[str, float] = {}

    def timed(step: str, work: Callable):
        started = time.perf_counter()
        value = work()
        seconds[step] = time.perf_counter() - started
        return value

    found = model_version(client, version)
    training_auc = training_roc_auc(found)
    profile = timed("profile", lambda: (profiles or Profiles()).get(client, found))
    records = timed(
        "records",
        lambda: read_records(
            model_version=found.version,
            since=window.since,
            until=window.until,
            columns=list(RECORD_COLUMNS),
            experiment=experiments.inference,
            client=client,
        ),
    )
    outcomes = timed("outcomes", lambda: read_outcomes(client=client, experiment=experiments.outcomes))
    result = timed(
        "compute",
        lambda: monitor_window(
            records,
            profile,
            model_version=found.version,
            since=window.since,
            until=window.until,
            outcomes=outcomes,
            thresholds=thresholds,
            training_roc_auc=training_auc,
        ),
    )
    run_id = experiment_id = None
    if log:
        run_id = timed("log", lambda: log_monitoring_run(client, result, experiment=experiments.monitoring))
        experiment_id = client.get_run(run_id).info.experiment_id
    return MonitoredWindow(
        result=result,
        version=found.version,
        run_id=run_id,
        experiment_id=experiment_id,
        profile_reconstructed=profile.reconstructed,
        training_roc_auc=training_auc,
        skipped_batches=list(records.attrs.get("skipped", [])),
        seconds=seconds,
    )
