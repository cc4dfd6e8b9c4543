"""``heal_once``: one evaluation of the healing policy, from the Production version's windows
to a challenger trained, gated and (by the policy) promoted, with every decision on record.

The steps, each of which may end the attempt (its final ``heal.state`` in brackets):

1. **Guardrails**: the local lock, then the lease (``healing.attempts``) [skipped].
2. **Monitor**: Production's drift and outcome windows, and every trigger's verdict
   (``healing.assess``) [not-triggered].
3. **Cooldown** since the last attempt that trained (``healing.attempts``) [skipped].
4. **Data**: the original file, checked against the file Production's line was trained on
   (the ``heal.original_dataset_hash`` tag a challenger inherits, else ``dataset_hash``;
   another file only with ``allow_other_data``) [refused]; the labelled production rows and
   the out-of-time holdout (``healing.challenger_data``) [skipped: too few rows].
5. **Train** the combined file with the normal trainer (``training.train.train_candidate``):
   fingerprint, content split, CV, evaluation, registration, like any training [failed].
6. **Gate** out of time (``training.gate.challenge``) [refused, rejected].
7. **Promote** by the mode: ``manual`` leaves a passed challenger waiting for ``credit-risk
   promote``; ``auto`` promotes it (promotion source ``heal``), unless Production moved during
   the attempt [waiting, promoted]. Serving follows the registry by itself.

Invariants: every call ends its attempt run, once, with a final state and its reasons, and
returns a ``HealResult`` (``to_dict()`` is the ``--json`` object); an error in steps 2-7 is
recorded (``failed``, with the error) and returned, never raised, and leaves Production as
it was. The registry changes only in step 5 (a new version, never in a stage) and step 7.
Only a bad policy or settings, or a tracking server that does not answer before the attempt
run exists, raise.

The tracking server is the process's (``MLFLOW_TRACKING_URI``): the trainer logs through
MLflow's fluent API.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from healing import tags as T
from healing.assess import Assessment, assess, production_profile, production_windows
from healing.attempts import Attempt, local_lock
from healing.challenger_data import (
    RECORD_COLUMNS,
    ChallengerData,
    NotEnoughRows,
    build,
    labelled_rows,
    write_training_file,
)
from healing.policy import AUTO, MANUAL, LoadedPolicy, load_policy
from healing.settings import HealSettings
from logging_sidecar.reader import read_records
from model.identity import DATASET_HASH, utc_timestamp
from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY, TARGET
from monitoring.outcomes import read_outcomes
from monitoring.status import Thresholds
from monitoring.window import json_safe
from training import gate, registry
from training.data import DataError, TrainingData, load_training_data
from training.settings import TrainingParameters
from training.split import row_digests

_TAG_ROWS = 40  # outcome sources listed in a tag; all of them are in heal/lineage.json


@dataclass
class HealResult:
    """What one attempt did; ``to_dict()`` is the ``credit-risk heal --once --json`` object."""

    attempt_run_id: str | None
    mode: str
    policy_source: str
    state: str = T.STARTED
    production_version: str | None = None
    triggered: bool = False
    reasons: list[str] = field(default_factory=list)
    trigger: dict[str, Any] = field(default_factory=dict)
    candidate_version: str | None = None
    candidate_run_id: str | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False
    data: dict[str, Any] | None = None
    error: str | None = None
    started_at: str = field(default_factory=utc_timestamp)
    ended_at: str | None = None

    @property
    def ok(self) -> bool:
        """False for a refused or failed attempt (exit code 1); every other end is a normal one."""
        return self.state not in (T.REFUSED, T.FAILED)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a figure that does not exist (NaN) is null."""
        gate_keys = (
            "decision",
            "reason",
            "candidate_roc_auc_recent",
            "production_roc_auc_recent",
            "rows_recent",
            "candidate_roc_auc_original",
            "production_roc_auc_original",
            "rows_original",
            "comparable",
        )
        return json_safe(
            {
                "attempt_run_id": self.attempt_run_id,
                "state": self.state,
                "mode": self.mode,
                "policy": self.policy_source,
                "production_version": self.production_version,
                "triggered": self.triggered,
                "reasons": list(self.reasons),
                "trigger": self.trigger,
                "candidate_version": self.candidate_version,
                "candidate_run_id": self.candidate_run_id,
                "gate": {key: self.gate.get(key) for key in gate_keys},
                "promoted": self.promoted,
                "data": self.data,
                "error": self.error,
                "started_at": self.started_at,
                "ended_at": self.ended_at,
            }
        )


class _End(Exception):
    """Ends the attempt early with a final state and one more reason."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


def gate_summary(decision: gate.ChallengeDecision) -> dict[str, Any]:
    recent, original = decision.recent, decision.original
    return {
        "decision": decision.outcome,
        "reason": decision.reason,
        "candidate_roc_auc_recent": recent.candidate if recent else None,
        "production_roc_auc_recent": recent.production if recent else None,
        "rows_recent": recent.rows if recent else None,
        "candidate_roc_auc_original": original.candidate if original else None,
        "production_roc_auc_original": original.production if original else None,
        "rows_original": original.rows if original else None,
        "comparable": decision.comparable,
    }


@dataclass
class _Flow:
    """The steps of one attempt, sharing what they found."""

    client: MlflowClient
    settings: HealSettings
    loaded: LoadedPolicy
    attempt: Attempt
    result: HealResult
    now: datetime
    allow_other_data: bool
    original: TrainingData | None

    @property
    def policy(self):
        return self.loaded.policy

    def say(self, reason: str) -> None:
        self.result.reasons.append(reason)

    # 1. guardrails ------------------------------------------------------------------------------
    def take_lease(self, locked: bool, lock_path: Path) -> None:
        if not locked:
            raise _End(T.SKIPPED, f"skipped: another heal attempt on this machine holds the lock {lock_path}")
        if why := self.attempt.claim(self.policy.attempts.lease_ttl_minutes):
            raise _End(T.SKIPPED, f"skipped: {why}")

    def production(self) -> ModelVersion:
        production = registry.production_version(self.client)
        if production is None:
            raise _End(T.SKIPPED, "skipped: no version in Production, nothing to challenge (train one first)")
        self.result.production_version = str(production.version)
        self.attempt.tag({T.PRODUCTION_VERSION: str(production.version)})
        return production

    # 2. monitor ---------------------------------------------------------------------------------
    def read(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Every record back to the longest of the policy's spans, and every outcome."""
        policy = self.policy
        span = max(
            timedelta(hours=policy.trigger.drift.window_hours),
            timedelta(days=policy.trigger.outcomes.window_days),
            timedelta(days=policy.data.lookback_days),
        )
        records = read_records(
            since=self.now - span,
            until=self.now,
            columns=[*RECORD_COLUMNS, OUTPUT_PREDICTION, OUTPUT_PROBABILITY],
            client=self.client,
        )
        if skipped := records.attrs.get("skipped"):
            self.say(f"warning: {len(skipped)} record batch(es) could not be read and were left out")
        return records, read_outcomes(client=self.client)

    def monitor(self, production: ModelVersion, records: pd.DataFrame, outcomes: pd.DataFrame) -> Assessment:
        profile = production_profile(self.client, production)
        windows = production_windows(
            records, outcomes, profile, production, self.policy.trigger, self.now, Thresholds()
        )
        assessment = assess(windows, production, self.policy.trigger, self.now)
        self.result.triggered = assessment.triggered
        self.result.trigger = assessment.to_dict()
        self.result.reasons.extend(assessment.reasons)
        self.attempt.tag({T.TRIGGERED: str(assessment.triggered).lower()})
        self.attempt.log_json(windows.drift.to_dict(), f"{T.WINDOWS_DIR}/drift.json")
        self.attempt.log_json(windows.outcomes.to_dict(), f"{T.WINDOWS_DIR}/outcomes.json")
        self.attempt.metrics(_window_metrics(windows.drift, windows.outcomes, profile.reconstructed))
        if not assessment.triggered:
            raise _End(T.NOT_TRIGGERED, "nothing trained: no trigger fired")
        return assessment

    # 3. cooldown --------------------------------------------------------------------------------
    def cooldown(self) -> None:
        if why := self.attempt.cooldown(self.policy.attempts.cooldown_hours):
            raise _End(T.SKIPPED, f"skipped, nothing trained: {why}")

    # 4. data ------------------------------------------------------------------------------------
    def original_data(self, production: ModelVersion) -> TrainingData:
        try:
            original = self.original or load_training_data(self.settings.training.data)
        except DataError as error:
            raise _End(T.REFUSED, f"refused: the original training file cannot be used: {error}") from None
        expected = production.tags.get(T.ORIGINAL_DATASET_HASH) or production.tags.get(DATASET_HASH)
        found = original.fingerprint.sha256
        if expected != found:
            what = (
                f"the original training file {original.path} (sha256 {found}) is not the file Production "
                f"v{production.version} was trained on (sha256 {expected})"
            )
            if not self.allow_other_data:
                raise _End(T.REFUSED, f"refused: {what}; pass --allow-other-data to train on it anyway")
            self.say(f"warning: {what}; training on it anyway, as asked (--allow-other-data)")
            self.attempt.tag({f"{T.DATA_PREFIX}other_file": "true"})
        return original

    def challenger_data(
        self, production: ModelVersion, original: TrainingData, records: pd.DataFrame, outcomes: pd.DataFrame
    ) -> ChallengerData:
        since = self.now - timedelta(days=self.policy.data.lookback_days)
        stamps = pd.DatetimeIndex(records["timestamp"]) if len(records) else pd.DatetimeIndex([], tz="UTC")
        recent_records = records[stamps >= since] if len(records) else records
        labelled = labelled_rows(recent_records, outcomes)
        try:
            data = build(
                original, labelled, self.policy.data, self.policy.gate, _trained_rows(self.client, production)
            )
        except NotEnoughRows as error:
            raise _End(T.SKIPPED, f"skipped, nothing trained: {error}") from None
        lineage = {
            **data.lineage(),
            "labelled_rows": len(labelled),
            "lookback_since": utc_timestamp(since),
            "outcome_batches": outcomes.attrs.get("batches", []),
        }
        self.result.data = lineage
        return data

    # 5. train -----------------------------------------------------------------------------------
    def train(self, production: ModelVersion, data: ChallengerData, assessment: Assessment, directory: Path):
        from training.train import CandidateRun, train_candidate

        self.attempt.tag({T.TRAINED: "true", T.STATE: T.TRAINING})
        lineage = self.result.data
        path = write_training_file(data.training, directory / f"challenger-{self.attempt.run_id[:12]}.csv")
        self.attempt.log_file(path, T.TRAINING_FILE_DIR)
        self.attempt.log_json(lineage, T.LINEAGE_ARTIFACT)
        tags = self._lineage_tags(production, data, assessment)
        self.attempt.tag({key: value for key, value in tags.items() if key.startswith(T.DATA_PREFIX)})
        settings = self.settings.training.model_copy(update={"data": path, "retrain": True})
        run = CandidateRun(
            run_name=f"challenger-of-v{production.version}",
            tags={"mlflow.parentRunId": self.attempt.run_id, **tags},
        )
        with _experiment_kept():
            candidate = train_candidate(settings, TrainingParameters(), run)
        version = str(candidate.version.version)
        self.result.candidate_version, self.result.candidate_run_id = version, candidate.run_id
        self.attempt.tag({T.CANDIDATE_VERSION: version, T.CANDIDATE_RUN: candidate.run_id})
        registry.tag_version(
            self.client,
            version,
            {
                key: tags[key]
                for key in (T.ATTEMPT_RUN, T.CHALLENGES, T.ORIGINAL_DATASET_HASH, T.TRIGGER, T.MODE)
            },
        )
        _log_rows(self.client, candidate.run_id, data)
        self.say(
            f"trained challenger v{version} on {lineage['training_rows']} rows: {original_rows(data)} original, "
            f"{len(data.production)} labelled production rows x {data.weight} (run {candidate.run_id})"
        )
        return candidate

    def _lineage_tags(self, production: ModelVersion, data: ChallengerData, assessment: Assessment) -> dict:
        lineage = self.result.data
        batches = lineage["outcome_batches"]
        sources = sorted({b["source_sha256"] for b in batches if b.get("source_sha256")})
        listed = ",".join(sources[:_TAG_ROWS]) + (
            f",... ({len(sources)} in all)" if len(sources) > _TAG_ROWS else ""
        )
        fired = [v.reason for v in assessment.verdicts if v.fired]
        production_span, recent_span = lineage["production"], lineage["recent"]
        return {
            T.ATTEMPT_RUN: self.attempt.run_id,
            T.CHALLENGES: str(production.version),
            T.MODE: self.result.mode,
            T.ORIGINAL_DATASET_HASH: data.original.fingerprint.sha256,
            T.TRIGGER: " | ".join(fired)[:5000],
            f"{T.DATA_PREFIX}original_rows": str(original_rows(data)),
            f"{T.DATA_PREFIX}production_rows": str(len(data.production)),
            f"{T.DATA_PREFIX}production_weight": str(data.weight),
            f"{T.DATA_PREFIX}production_first_record_at": str(production_span.get("first_record_at", "")),
            f"{T.DATA_PREFIX}production_last_record_at": str(production_span.get("last_record_at", "")),
            f"{T.DATA_PREFIX}production_fingerprint": str(production_span.get("fingerprint", "")),
            f"{T.DATA_PREFIX}lookback_since": lineage["lookback_since"],
            f"{T.DATA_PREFIX}drift_window": _window_text(self.result.trigger.get("drift", {})),
            f"{T.DATA_PREFIX}outcome_window_days": repr(self.policy.trigger.outcomes.window_days),
            f"{T.DATA_PREFIX}outcome_batches": str(len(batches)),
            f"{T.DATA_PREFIX}outcome_sources_sha256": listed,
            f"{T.RECENT_PREFIX}rows": str(recent_span["rows"]),
            f"{T.RECENT_PREFIX}defaults": str(recent_span.get("defaults", 0)),
            f"{T.RECENT_PREFIX}fingerprint": str(recent_span.get("fingerprint", "")),
            f"{T.RECENT_PREFIX}first_record_at": str(recent_span.get("first_record_at", "")),
            f"{T.RECENT_PREFIX}last_record_at": str(recent_span.get("last_record_at", "")),
        }

    # 6. gate ------------------------------------------------------------------------------------
    def gate(self, production: ModelVersion, data: ChallengerData, candidate) -> gate.ChallengeDecision:
        recent = data.recent
        rows = gate.RecentRows(
            recent[list(FEATURES)].reset_index(drop=True),
            recent[TARGET].reset_index(drop=True),
            recent[["request_id", "row_index", "timestamp"]].reset_index(drop=True),
        )
        version = str(candidate.version.version)
        try:
            decision = gate.challenge(
                self.client,
                version,
                candidate.run_id,
                candidate.held_out,
                frozenset(row_digests(data.original.features, data.original.target)),
                rows,
                production=production,
                tolerance=self.policy.gate.tolerance,
                margin=self.policy.gate.margin,
            )
        except gate.GateRefused as refusal:
            registry.tag_version(self.client, version, {T.CHALLENGER: T.REFUSED})
            self.result.gate = {"decision": gate.REFUSED, "reason": str(refusal)}
            raise _End(T.REFUSED, f"refused by the gate, never promoted: {refusal}") from None
        self.result.gate = gate_summary(decision)
        self.attempt.tag({f"gate.{key}": value for key, value in _flat(self.result.gate).items()})
        if not decision.passed:
            registry.tag_version(self.client, version, {T.CHALLENGER: T.REJECTED})
            raise _End(T.REJECTED, f"rejected by the gate, not promoted: {decision.reason}")
        self.say(f"passed the gate: {decision.reason}")
        return decision

    # 7. promote ---------------------------------------------------------------------------------
    def promote(self, production: ModelVersion, candidate, decision: gate.ChallengeDecision) -> None:
        version = str(candidate.version.version)
        command = f"credit-risk promote --version {version} --reason 'reviewed challenger v{version}'"
        if self.result.mode == MANUAL:
            self.leave_waiting(version)
            raise _End(T.WAITING, f"waiting for an operator (mode manual): {command}")
        current = registry.production_version(self.client)
        if current is None or str(current.version) != str(production.version):
            self.leave_waiting(version)
            now = f"v{current.version}" if current else "nothing"
            raise _End(
                T.WAITING,
                f"not promoted automatically: Production moved from v{production.version} to {now} during the "
                f"attempt, so the comparison no longer holds; left waiting: {command}",
            )
        registry.promote(
            self.client,
            version,
            actor=self.settings.training.actor,
            reason=f"heal (auto, attempt {self.attempt.run_id}): {decision.reason}"[:5000],
            source="heal",
        )
        registry.tag_version(self.client, version, {T.CHALLENGER: T.PROMOTED_STATE})
        self.result.promoted = True
        self.attempt.tag({T.PROMOTED: "true"})
        raise _End(
            T.PROMOTED_STATE,
            f"promoted v{version} to Production (mode auto, source heal), replacing v{production.version}; "
            "serving follows the registry",
        )

    def leave_waiting(self, version: str) -> None:
        """Tag ``version`` waiting for an operator, and any challenger that waited before it
        superseded: at most one challenger waits at a time (the policy's one in flight), the
        newest, trained on the most recent rows and gated against Production as it is now. An
        operator may still promote a superseded version by its number."""
        registry.tag_version(self.client, version, {T.CHALLENGER: T.WAITING})
        state = registry.read_state(self.client)
        for number, older in sorted(state.versions.items(), key=lambda item: int(item[0])):
            if number != version and T.is_waiting(number, older.tags, state.holder):
                registry.tag_version(
                    self.client, number, {T.CHALLENGER: T.SUPERSEDED, T.SUPERSEDED_BY: version}
                )
                self.say(f"v{number}, the challenger that waited before, is superseded by v{version}")

    def run(self, locked: bool, lock_path: Path) -> None:
        self.take_lease(locked, lock_path)
        production = self.production()
        records, outcomes = self.read()
        assessment = self.monitor(production, records, outcomes)
        self.cooldown()
        original = self.original_data(production)
        data = self.challenger_data(production, original, records, outcomes)
        with tempfile.TemporaryDirectory(prefix="credit-risk-heal-") as directory:
            candidate = self.train(production, data, assessment, Path(directory))
        decision = self.gate(production, data, candidate)
        self.promote(production, candidate, decision)


def original_rows(data: ChallengerData) -> int:
    return len(data.original.target)


def _flat(gate_dict: dict[str, Any]) -> dict[str, str]:
    """The gate's summary as run tags (JSON spelling: ``true``, not ``True``)."""
    return {
        key: json.dumps(value) for key, value in gate_dict.items() if value is not None and key != "reason"
    }


def _window_text(drift: dict[str, Any]) -> str:
    return f"{drift.get('since')} to {drift.get('until')}"


def _window_metrics(drift, outcomes, reconstructed: bool) -> dict[str, float]:
    metrics = {
        "drift_rows": drift.rows,
        "score_psi": drift.score.distribution.psi,
        "profile_reconstructed": float(reconstructed),
    }
    metrics |= {f"psi/{name}": item.psi for name, item in drift.features.items()}
    if outcomes.outcomes is not None:
        metrics |= {
            "outcome_rows": outcomes.outcomes.rows,
            "outcome_roc_auc": outcomes.outcomes.roc_auc,
        }
    return metrics


def _trained_rows(client: MlflowClient, production: ModelVersion) -> pd.DataFrame | None:
    """The keys of the labelled production rows Production trained on, when it is itself a
    challenger (its run's ``heal/production_rows.parquet``); None otherwise."""
    if T.ATTEMPT_RUN not in production.tags or not production.run_id:
        return None
    with tempfile.TemporaryDirectory() as directory:
        rows = pd.read_parquet(
            client.download_artifacts(production.run_id, T.PRODUCTION_ROWS_ARTIFACT, directory)
        )
    return rows[rows["role"] == "train"]


def _log_rows(client: MlflowClient, run_id: str, data: ChallengerData) -> None:
    """The keys of every labelled production row the challenger trained on or was judged on."""
    columns = ["request_id", "row_index", "timestamp", "model_version"]
    frame = pd.concat(
        [data.production[columns].assign(role="train"), data.recent[columns].assign(role="recent")],
        ignore_index=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(T.PRODUCTION_ROWS_ARTIFACT).name
        frame.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(T.PRODUCTION_ROWS_ARTIFACT).parent))


class _experiment_kept:
    """The trainer pins its experiment process-wide (``mlflow.set_experiment`` exports
    ``MLFLOW_EXPERIMENT_ID``); a long-lived caller (the monitor service) gets its own back."""

    def __enter__(self):
        self.saved = os.environ.get("MLFLOW_EXPERIMENT_ID")

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = self.saved
        return False


def heal_once(
    *,
    settings: HealSettings | None = None,
    policy: LoadedPolicy | None = None,
    mode: str | None = None,
    allow_other_data: bool = False,
    original: TrainingData | None = None,
    client: MlflowClient | None = None,
    now: datetime | None = None,
) -> HealResult:
    """One evaluation of the policy (see the module's docstring). ``settings`` default to the
    environment's, ``policy`` to the file they name (or the defaults), ``mode`` to the
    policy's; ``original``, the original training file already read (else read from the
    settings when needed). The monitor service calls this after each window."""
    from training.train import check_tracking_server

    settings = settings or HealSettings()
    loaded = policy or load_policy(settings.policy)
    mode = mode or loaded.policy.mode
    if mode not in (MANUAL, AUTO):
        raise ValueError(f"mode must be {MANUAL!r} or {AUTO!r}, got {mode!r}")
    client = client or MlflowClient()
    check_tracking_server(uri=client.tracking_uri)
    experiment_id = registry.model_training_experiment(client, settings.training.experiment)
    lock_path = settings.lock_path(client.tracking_uri)
    with local_lock(lock_path) as locked:
        policy_tags = {T.MODE: mode, T.POLICY_SOURCE: loaded.source}
        if loaded.sha256:
            policy_tags[T.POLICY_SHA256] = loaded.sha256
        attempt = Attempt.start(client, experiment_id, policy_tags)
        result = HealResult(attempt.run_id, mode, loaded.source)
        now = now or datetime.now(UTC)
        flow = _Flow(client, settings, loaded, attempt, result, now, allow_other_data, original)
        failed = False
        try:
            flow.run(locked, lock_path)
        except _End as end:
            result.state = end.state
            result.reasons.append(end.reason)
        except Exception as error:  # recorded, and Production left as it was
            failed = True
            result.state, result.error = T.FAILED, f"{type(error).__name__}: {error}"
            result.reasons.append(f"failed, Production left as it was: {result.error}")
            attempt.tag({T.ERROR: result.error})
        finally:
            if result.state == T.STARTED:  # interrupted (KeyboardInterrupt): still recorded
                failed, result.state = True, T.FAILED
                result.reasons.append("failed: interrupted")
            result.ended_at = utc_timestamp()
            try:
                attempt.log_json(result.to_dict(), T.RESULT_ARTIFACT)
            finally:
                attempt.finish(result.state, result.reasons, failed=failed)
    return result
