"""The policy's look at the Production version: its windows, and whether they call for a
challenger.

Two windows, both ending at the attempt's ``now``, both over the Production version's records
only (another version's probabilities say nothing about this one):

- the **drift window**, ``[trigger.drift] window_hours`` long: PSI per feature and of the
  score against the version's reference profile (``monitoring.window.monitor_window``);
- the **outcome window**, ``[trigger.outcomes] window_days`` long, with the outcomes known so
  far: the version's ROC AUC on its labelled records, against its training AUC (the version's
  ``test_roc_auc`` tag). Labels arrive months after the answers, so this window is long.

``assess`` turns them into an ``Assessment``: whether any trigger fired, and for every
trigger, fired or not, one line saying why, with its figures (a run that says "not
triggered" must say what was looked at). Pure: windows and policy in, assessment out.

The profile is the one logged with the version's training run, or, for a version trained
before profiles existed, one reconstructed from its logged rows (``monitoring.store``),
which the assessment names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from model.identity import TEST_ROC_AUC_TAG
from monitoring.status import ALERT, INSUFFICIENT, OK, Thresholds
from monitoring.window import WindowResult, monitor_window
from training.profile import ReferenceProfile
from training.promotion_history import AT_TAG

DRIFT, OUTCOMES, SCHEDULE = "drift", "outcomes", "schedule"


@dataclass(frozen=True, eq=False)
class Windows:
    drift: WindowResult
    outcomes: WindowResult  # its ``outcomes`` is None when no record of the window is labelled


@dataclass(frozen=True)
class Verdict:
    """One trigger's finding: fired or not, why, and the figures behind it."""

    name: str
    fired: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"fired": self.fired, "reason": self.reason, **self.figures}


@dataclass(frozen=True)
class Assessment:
    production_version: str
    verdicts: tuple[Verdict, ...]

    @property
    def triggered(self) -> bool:
        return any(verdict.fired for verdict in self.verdicts)

    @property
    def reasons(self) -> list[str]:
        """Fired triggers first, then the others: every trigger says what it saw."""
        ordered = sorted(self.verdicts, key=lambda verdict: not verdict.fired)
        return [f"{'TRIGGER' if v.fired else 'no trigger'}: {v.reason}" for v in ordered]

    def to_dict(self) -> dict[str, Any]:
        return {verdict.name: verdict.to_dict() for verdict in self.verdicts}


def training_roc_auc(version: ModelVersion) -> float | None:
    try:
        value = float(version.tags[TEST_ROC_AUC_TAG])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def production_profile(client: MlflowClient, version: ModelVersion) -> ReferenceProfile:
    """The version's reference profile: logged at training, else reconstructed from its run."""
    from monitoring.job import version_scorer
    from monitoring.store import load_profile, reconstruct_from_run

    profile = load_profile(client, version.run_id)
    if profile is not None:
        return profile
    return reconstruct_from_run(client, version.run_id, version_scorer(version))


def production_windows(
    records: pd.DataFrame,
    outcomes: pd.DataFrame,
    profile: ReferenceProfile,
    version: ModelVersion,
    triggers,
    now: datetime,
    thresholds: Thresholds,
) -> Windows:
    """The drift and outcome windows of ``version``'s ``records`` (read back at least as far as
    the outcome window; records of other versions are left out here)."""
    mine = records[records["model_version"].astype(str) == str(version.version)]
    drift = monitor_window(
        mine,
        profile,
        model_version=version.version,
        since=now - timedelta(hours=triggers.drift.window_hours),
        until=now,
        thresholds=thresholds,
    )
    labelled = monitor_window(
        mine,
        profile,
        model_version=version.version,
        since=now - timedelta(days=triggers.outcomes.window_days),
        until=now,
        outcomes=outcomes,
        thresholds=thresholds.model_copy(update={"min_labelled_rows": triggers.outcomes.min_labelled_rows}),
        training_roc_auc=training_roc_auc(version),
    )
    return Windows(drift, labelled)


def _drift_verdict(window: WindowResult, policy) -> Verdict:
    alerts = sorted(name for name, item in window.features.items() if item.status == ALERT)
    psi = {name: round(item.psi, 4) for name, item in window.features.items() if math.isfinite(item.psi)}
    figures = {
        "rows": window.rows,
        "alert_features": alerts,
        "psi": psi,
        "since": window.to_dict()["window"]["since"],
        "until": window.to_dict()["window"]["until"],
    }
    needed = policy.min_alert_features
    if window.rows and all(item.status == INSUFFICIENT for item in window.features.values()):
        return Verdict(
            DRIFT,
            False,
            f"drift: {window.rows} rows in the last {policy.window_hours:g} h, too few to judge "
            f"(monitoring needs {window.thresholds.min_rows})",
            figures,
        )
    if not window.rows:
        return Verdict(DRIFT, False, f"drift: no records in the last {policy.window_hours:g} h", figures)
    if needed and len(alerts) >= needed:
        named = ", ".join(f"{name} (PSI {window.features[name].psi:.3f})" for name in alerts)
        return Verdict(
            DRIFT,
            True,
            f"drift: PSI alert on {len(alerts)} feature(s) over {window.rows} rows of the last "
            f"{policy.window_hours:g} h: {named} (at least {needed} needed)",
            figures,
        )
    largest = max(psi.items(), key=lambda item: item[1], default=("none", float("nan")))
    off = " (feature drift is not a trigger: min_alert_features = 0)" if not needed else ""
    return Verdict(
        DRIFT,
        False,
        f"drift: PSI alert on {len(alerts)} feature(s) over {window.rows} rows, at least {needed} needed; "
        f"largest PSI {largest[0]} {largest[1]:.3f}{off}",
        figures,
    )


def _score_verdict(window: WindowResult, policy) -> Verdict:
    score = window.score
    figures = {
        "psi": score.distribution.psi,
        "status": score.status,
        "mean_probability": score.mean_probability,
    }
    if not window.rows:  # no PSI to show: the window has no score to compare
        return Verdict("score", False, f"score: no records in the last {policy.window_hours:g} h", figures)
    text = f"score: PSI {score.distribution.psi:.3f} ({score.status}) over {window.rows} rows"
    if not policy.score:
        return Verdict("score", False, f"{text}; score drift is not a trigger (score = false)", figures)
    return Verdict("score", score.status == ALERT, text, figures)


def _outcome_verdict(window: WindowResult, policy, training_auc: float | None) -> Verdict:
    metrics = window.outcomes
    figures: dict[str, Any] = {"training_roc_auc": training_auc, "auc_margin": policy.auc_margin}
    span = f"the last {policy.window_days:g} days"
    if not policy.enabled:
        return Verdict(OUTCOMES, False, "outcomes: not a trigger (enabled = false)", figures)
    if metrics is None:
        return Verdict(OUTCOMES, False, f"outcomes: no labelled record of {span}", {**figures, "rows": 0})
    figures.update(rows=metrics.rows, defaults=metrics.defaults, roc_auc=metrics.roc_auc)
    if metrics.status != OK:
        return Verdict(
            OUTCOMES,
            False,
            f"outcomes: {metrics.rows} labelled rows ({metrics.defaults} defaults) in {span}, too few to judge "
            f"(at least {policy.min_labelled_rows} rows and {window.thresholds.min_class_rows} of each outcome)",
            figures,
        )
    if training_auc is None:
        return Verdict(
            OUTCOMES,
            False,
            f"outcomes: ROC AUC {metrics.roc_auc:.4f} on {metrics.rows} labelled rows, but the version has "
            f"no {TEST_ROC_AUC_TAG} tag to compare with",
            figures,
        )
    drop = training_auc - metrics.roc_auc
    figures["drop"] = drop
    fired = drop > policy.auc_margin
    return Verdict(
        OUTCOMES,
        fired,
        f"outcomes: ROC AUC {metrics.roc_auc:.4f} on {metrics.rows} labelled rows ({metrics.defaults} defaults) "
        f"of {span}, {abs(drop):.4f} {'below' if drop >= 0 else 'above'} the training AUC {training_auc:.4f} "
        f"({'more' if fired else 'not more'} than the margin {policy.auc_margin:g})",
        figures,
    )


def _schedule_verdict(version: ModelVersion, policy, now: datetime) -> Verdict:
    if not policy.every_days:
        return Verdict(SCHEDULE, False, "schedule: off (every_days = 0)", {})
    since_text = version.tags.get(AT_TAG)
    since = (
        pd.Timestamp(since_text)
        if since_text
        else pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC")
    )
    age_days = (pd.Timestamp(now) - since).total_seconds() / 86400
    fired = age_days > policy.every_days
    return Verdict(
        SCHEDULE,
        fired,
        f"schedule: Production v{version.version} in place for {age_days:.1f} days "
        f"({'longer' if fired else 'not longer'} than every_days = {policy.every_days:g})",
        {"age_days": age_days},
    )


def assess(windows: Windows, version: ModelVersion, triggers, now: datetime) -> Assessment:
    """Every trigger's verdict on the Production ``version``'s ``windows``."""
    return Assessment(
        str(version.version),
        (
            _drift_verdict(windows.drift, triggers.drift),
            _score_verdict(windows.drift, triggers.drift),
            _outcome_verdict(windows.outcomes, triggers.outcomes, training_roc_auc(version)),
            _schedule_verdict(version, triggers.schedule, now),
        ),
    )
