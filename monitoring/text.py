"""A monitored window as a person reads it in a terminal: ``credit-risk monitor``'s table.

One line per feature (PSI, KS, missing rate against training, out-of-range share, status),
one for the score, one for the outcomes, and what the statuses mean. Figures that do not
exist (no rows, no outcomes) show as ``-``.
"""

from __future__ import annotations

import math

from monitoring.job import MonitoredWindow
from monitoring.status import INSUFFICIENT


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _share(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def window_table(monitored: MonitoredWindow) -> str:
    result = monitored.result
    window = result.to_dict()["window"]
    thresholds = result.thresholds
    lines = [
        f"model version {monitored.version}, window {window['since']} to {window['until']} (half-open): "
        f"{result.rows:,} rows, status {result.status}",
        f"reference profile: {result.profile_source}"
        + (" (the version's training run has none)" if monitored.profile_reconstructed else ""),
    ]
    if monitored.skipped_batches:
        lines.append(
            f"warning: {len(monitored.skipped_batches)} shipped batch(es) could not be read and are left out"
        )
    width = max(len(name) for name in result.features)
    lines += [
        "",
        f"{'feature':<{width}}  {'PSI':>7}  {'KS':>6}  {'missing (training)':>18}  {'out of range':>12}  status",
    ]
    for name, item in result.features.items():
        missing = f"{_share(item.missing_rate)} ({_share(item.reference_missing_rate)})"
        lines.append(
            f"{name:<{width}}  {_number(item.psi):>7}  {_number(item.ks):>6}  {missing:>18}  "
            f"{_share(item.out_of_range_share):>12}  {item.status}"
        )
    score = result.score
    lines.append(
        f"{'score (probability)':<{width}}  {_number(score.distribution.psi):>7}  "
        f"{_number(score.distribution.ks):>6}  mean {_number(score.mean_probability, 4)} "
        f"(training {_number(score.training_mean_probability, 4)}), predicted 1: "
        f"{_share(score.prediction_rate)} (training {_share(score.training_prediction_rate)})  {score.status}"
    )
    lines.append("")
    outcomes = result.outcomes
    if outcomes is None:
        lines.append("outcomes: none known yet for this window's rows")
    else:
        training = "" if outcomes.training_roc_auc is None else f" (training {outcomes.training_roc_auc:.4f})"
        lines.append(
            f"outcomes: {outcomes.rows:,} labelled rows ({_share(outcomes.labelled_share)} of the window), "
            f"{outcomes.defaults:,} defaults: ROC AUC {_number(outcomes.roc_auc, 4)}{training}, "
            f"Gini {_number(outcomes.gini, 4)}, KS {_number(outcomes.ks, 4)}, "
            f"Brier {_number(outcomes.brier, 4)}; {outcomes.status}"
        )
    lines.append(
        f"statuses: PSI from {thresholds.psi_warn:g} warn, from {thresholds.psi_alert:g} alert; "
        f"{INSUFFICIENT} below {thresholds.min_rows} rows (outcomes: {thresholds.min_labelled_rows} "
        f"labelled, {thresholds.min_class_rows} of each class)"
    )
    return "\n".join(lines)
