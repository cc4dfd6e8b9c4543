"""A monitoring window as a person and a dashboard see it: figures, and a run in MLflow.

``drift_figure``: for each feature and for the score, the reference's and the window's share
of rows per reference bin (missing bin last), titled with the item's PSI and status.
``calibration_figure``: expected against observed default rate per reference score decile,
with the rows of each decile. ``log_monitoring_run`` records one window as one run of the
experiment ``credit-risk-monitoring`` through the given ``MlflowClient``:

- tags ``model_version``, ``registered_model``, ``window.since``, ``window.until``,
  ``status``, ``profile.source``;
- metrics, all at the window's end (``timestamp`` = ``until``, so that a chart over runs is a
  time series): ``rows``, ``status_level`` (-1 insufficient, 0 ok, 1 warn, 2 alert),
  ``psi/<feature>``, ``ks/<feature>``, ``missing_rate/<feature>``,
  ``missing_rate_change/<feature>``, ``out_of_range_share/<feature>``, ``score_psi``,
  ``score_ks``, ``mean_probability``, ``training_mean_probability``, ``prediction_rate``,
  ``training_prediction_rate``, ``mean_entropy``, and with outcomes ``outcome_rows``,
  ``labelled_share``, ``outcome_roc_auc``, ``outcome_gini``, ``outcome_ks``,
  ``outcome_brier``. A figure that does not exist (NaN) is not logged;
- artifacts ``result.json`` (``WindowResult.to_dict()``), ``figures/drift.png`` and, with
  outcomes, ``figures/calibration.png``.
"""

from __future__ import annotations

import math
import time

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from model.identity import REGISTERED_MODEL_NAME
from monitoring.drift import ColumnDrift
from monitoring.settings import MONITORING_EXPERIMENT
from monitoring.status import LEVEL
from monitoring.store import experiment_id
from monitoring.window import WindowResult
from training.profile import bin_labels


def _bars(axes, title: str, item: ColumnDrift, missing: bool = True) -> None:
    bins = len(item.edges) + 1 + missing  # a score is never missing: no bar for it
    labels = bin_labels(item.edges)[:bins]
    positions = np.arange(bins)
    axes.bar(positions - 0.2, item.reference_shares[:bins], width=0.4, label="reference")
    axes.bar(positions + 0.2, np.nan_to_num(item.window_shares[:bins]), width=0.4, label="window")
    axes.set_xticks(positions, labels, rotation=60, ha="right", fontsize=6)
    psi = "n/a" if math.isnan(item.psi) else f"{item.psi:.3f}"
    axes.set_title(f"{title}\nPSI {psi} ({item.status})", fontsize=8)
    axes.tick_params(axis="y", labelsize=6)


def drift_figure(result: WindowResult) -> plt.Figure:
    """Reference against window shares per bin, for every feature and the score."""
    items = [(name, item, True) for name, item in result.features.items()]
    items.append(("score (probability)", result.score.distribution, False))
    columns = 4
    rows = math.ceil(len(items) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axes, (name, item, missing) in zip(grid.flat, items, strict=False):
        _bars(axes, name, item, missing)
    for axes in grid.flat[len(items) :]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=7)
    figure.suptitle(
        f"version {result.model_version}: {result.rows} rows, status {result.status} (share of rows per bin)"
    )
    figure.tight_layout()
    return figure


def calibration_figure(result: WindowResult) -> plt.Figure | None:
    """Observed against expected default rate per reference score decile; None without outcomes."""
    if result.outcomes is None:
        return None
    bins = [item for item in result.outcomes.calibration if item.rows]
    expected = [item.expected for item in bins]
    observed = [item.observed for item in bins]
    figure, axes = plt.subplots(figsize=(6, 5))
    top = max([*expected, *observed, 0.01]) * 1.1
    axes.plot([0, top], [0, top], linestyle="--", color="grey", label="perfectly calibrated")
    axes.plot(expected, observed, marker="o", label="window")
    for item in bins:
        axes.annotate(
            f"{item.rows}",
            (item.expected, item.observed),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    axes.set_xlabel("expected default rate (mean probability)")
    axes.set_ylabel("observed default rate")
    auc = result.outcomes.roc_auc
    axes.set_title(
        f"version {result.model_version}: {result.outcomes.rows} labelled rows, "
        f"AUC {'n/a' if math.isnan(auc) else f'{auc:.3f}'} ({result.outcomes.status})\n"
        "per reference score decile, labelled with its rows",
        fontsize=9,
    )
    axes.legend()
    figure.tight_layout()
    return figure


def window_metrics(result: WindowResult) -> dict[str, float]:
    """The window's figures under the names a dashboard charts (NaN ones left out)."""
    score = result.score
    metrics = {
        "rows": result.rows,
        "status_level": LEVEL[result.status],
        "score_psi": score.distribution.psi,
        "score_ks": score.distribution.ks,
        "mean_probability": score.mean_probability,
        "training_mean_probability": score.training_mean_probability,
        "prediction_rate": score.prediction_rate,
        "training_prediction_rate": score.training_prediction_rate,
        "mean_entropy": score.mean_entropy,
    }
    for name, item in result.features.items():
        metrics |= {
            f"psi/{name}": item.psi,
            f"ks/{name}": item.ks,
            f"missing_rate/{name}": item.missing_rate,
            f"missing_rate_change/{name}": item.missing_rate_change,
            f"out_of_range_share/{name}": item.out_of_range_share,
        }
    if (outcomes := result.outcomes) is not None:
        metrics |= {
            "outcome_rows": outcomes.rows,
            "labelled_share": outcomes.labelled_share,
            "outcome_roc_auc": outcomes.roc_auc,
            "outcome_gini": outcomes.gini,
            "outcome_ks": outcomes.ks,
            "outcome_brier": outcomes.brier,
        }
    return {name: float(value) for name, value in metrics.items() if not math.isnan(float(value))}


def _stamp(result: WindowResult, which: str) -> str:
    return result.to_dict()["window"][which] or ""


def log_monitoring_run(
    client: MlflowClient, result: WindowResult, *, experiment: str = MONITORING_EXPERIMENT
) -> str:
    """Record ``result`` as a finished run of ``experiment``; returns its run id."""
    since, until = _stamp(result, "since"), _stamp(result, "until")
    tags = {
        "model_version": result.model_version,
        "registered_model": REGISTERED_MODEL_NAME,
        "window.since": since,
        "window.until": until,
        "status": result.status,
        "profile.source": result.profile_source,
    }
    run = client.create_run(
        experiment_id(client, experiment, restore_deleted=True),
        run_name=f"v{result.model_version} {since or '...'} to {until or '...'}",
        tags=tags,
    )
    run_id = run.info.run_id
    at = int(result.until.timestamp() * 1000) if result.until is not None else int(time.time() * 1000)
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(name, value, at, 0) for name, value in window_metrics(result).items()],
        )
        client.log_dict(run_id, result.to_dict(), "result.json")
        for name, figure in (("drift", drift_figure(result)), ("calibration", calibration_figure(result))):
            if figure is not None:
                client.log_figure(run_id, figure, f"figures/{name}.png")
                plt.close(figure)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
