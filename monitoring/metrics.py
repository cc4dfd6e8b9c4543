"""The monitor service's Prometheus metrics, rendered at each scrape from its latest snapshot.

A collector (not gauges set one by one) so that a scrape always sees one window whole, and a
version that left Production leaves ``/metrics`` with its window: only the last successful
window's version is exported. When attempts fail (MLflow down), the last window's gauges stay,
marked ``credit_risk_window_stale 1``, rather than vanish: a dashboard keeps the last known
drift, and says it is old.

Labels: ``model`` is the served model's name (``credit-risk``, as on serving's metrics),
``version`` the registry version the window watched, ``feature`` a feature's training name.

Statuses are numbers, the same levels as the ``status_level`` metric of monitoring runs
(``monitoring.status.LEVEL``): **-1 insufficient** (too few rows to judge), **0 ok**,
**1 warn**, **2 alert**. A figure that does not exist (no rows, no outcomes) is not exported.

| metric | labels | meaning |
| --- | --- | --- |
| ``credit_risk_drift_psi`` | model, version, feature | PSI of the feature in the last window |
| ``credit_risk_drift_ks`` | model, version, feature | two-sample KS statistic against training |
| ``credit_risk_drift_missing_rate`` | model, version, feature | share of missing values in the window |
| ``credit_risk_drift_out_of_range_share`` | model, version, feature | share outside the training range |
| ``credit_risk_drift_status`` | model, version, feature | the feature's status (level) |
| ``credit_risk_score_psi`` | model, version | PSI of the probability on the training deciles |
| ``credit_risk_score_status`` | model, version | the score's status (level) |
| ``credit_risk_score_mean_probability`` | model, version | mean predicted probability in the window |
| ``credit_risk_window_status`` | model, version | the window's status: the worst of features and score |
| ``credit_risk_window_rows`` | model, version | records in the window |
| ``credit_risk_window_end_timestamp_seconds`` | model, version | the window's end (``until``), Unix time |
| ``credit_risk_window_stale`` | model, version | 1 while these gauges are not current: the last attempt failed (MLflow down, ...) or none was recorded for three intervals; 0 otherwise |
| ``credit_risk_outcome_roc_auc`` | model, version | ROC AUC on the window's labelled rows |
| ``credit_risk_outcome_rows`` | model, version | labelled rows in the window |
| ``credit_risk_outcome_status`` | model, version | -1 too few labelled rows (or of one class), 0 ok |
| ``credit_risk_labelled_share`` | model, version | labelled share of the window |
| ``credit_risk_training_roc_auc`` | model, version | the version's held-out ROC AUC at training (``test_roc_auc``) |
| ``credit_risk_monitor_auc_margin`` | model | ``CREDIT_RISK_MONITOR_AUC_MARGIN``, for the AUC alert |
| ``credit_risk_monitor_interval_seconds`` | model | the service's interval |
| ``credit_risk_monitor_last_success_timestamp_seconds`` | model | when the last window was recorded |
| ``credit_risk_monitor_last_error`` | model | 1 while the last attempt failed, else 0 |
| ``credit_risk_monitor_mlflow_up`` | model | 1 while MLflow's ``/health`` answers, else 0 |
| ``credit_risk_monitor_window_failures_total`` | model | failed attempts since the process started |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitoring.job import MonitoredWindow
from monitoring.status import LEVEL

_VERSION = ("model", "version")
_FEATURE = ("model", "version", "feature")
_PROCESS = ("model",)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    labels: tuple[str, ...]
    help: str
    counter: bool = False


def _spec(name: str, labels: tuple[str, ...], text: str, counter: bool = False) -> MetricSpec:
    return MetricSpec(f"credit_risk_{name}", labels, text, counter)


# Every metric this module exports, in the order of the table above.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        _spec("drift_psi", _FEATURE, "PSI of the feature in the last window against training"),
        _spec("drift_ks", _FEATURE, "Two-sample KS statistic of the feature against training"),
        _spec("drift_missing_rate", _FEATURE, "Share of missing values of the feature in the window"),
        _spec(
            "drift_out_of_range_share", _FEATURE, "Share of the feature's values outside the training range"
        ),
        _spec("drift_status", _FEATURE, "Feature status: -1 insufficient, 0 ok, 1 warn, 2 alert"),
        _spec("score_psi", _VERSION, "PSI of the predicted probability on the training score deciles"),
        _spec("score_status", _VERSION, "Score status: -1 insufficient, 0 ok, 1 warn, 2 alert"),
        _spec("score_mean_probability", _VERSION, "Mean predicted probability in the window"),
        _spec(
            "window_status", _VERSION, "Window status, the worst item: -1 insufficient, 0 ok, 1 warn, 2 alert"
        ),
        _spec("window_rows", _VERSION, "Records in the window"),
        _spec("window_end_timestamp_seconds", _VERSION, "End of the last window (exclusive), Unix time"),
        _spec(
            "window_stale",
            _VERSION,
            "1 while the window's gauges are not current (last attempt failed, or none for three intervals)",
        ),
        _spec("outcome_roc_auc", _VERSION, "ROC AUC on the window's rows with a known outcome"),
        _spec("outcome_rows", _VERSION, "Rows of the window with a known outcome"),
        _spec("outcome_status", _VERSION, "Outcome status: -1 insufficient labelled rows, 0 ok"),
        _spec("labelled_share", _VERSION, "Share of the window's rows with a known outcome"),
        _spec("training_roc_auc", _VERSION, "The version's held-out ROC AUC at training"),
        _spec("monitor_auc_margin", _PROCESS, "Outcome AUC this far below the training AUC alerts"),
        _spec("monitor_interval_seconds", _PROCESS, "The monitor service's interval between windows"),
        _spec(
            "monitor_last_success_timestamp_seconds", _PROCESS, "When the last window was recorded, Unix time"
        ),
        _spec("monitor_last_error", _PROCESS, "1 while the last window attempt failed, else 0"),
        _spec("monitor_mlflow_up", _PROCESS, "1 while the MLflow tracking server answers its health check"),
        _spec("monitor_window_failures", _PROCESS, "Window attempts that failed", counter=True),
    )
}


@dataclass(frozen=True)
class MetricsView:
    """What the collector reads: the process's state and its last successful window."""

    window: MonitoredWindow | None
    last_success_at: float | None
    last_attempt_failed: bool
    mlflow_up: bool | None
    failures: int
    interval_s: float
    auc_margin: float
    window_stale: bool = False  # the window's gauges are not current (``MonitorService.stale``)


class MonitorCollector(Collector):
    """Renders ``current()`` at each scrape (``current`` must be cheap and thread-safe)."""

    def __init__(self, model: str, current: Callable[[], MetricsView]):
        self._model = model
        self._current = current

    def _families(self) -> dict[str, Metric]:
        families = {}
        for spec in METRICS.values():
            kind = CounterMetricFamily if spec.counter else GaugeMetricFamily
            families[spec.name] = kind(spec.name, spec.help, labels=list(spec.labels))
        return families

    def collect(self) -> Iterator[Metric]:
        view = self._current()
        families = self._families()

        def put(name: str, value: float | None, *labels: str) -> None:
            if value is not None and not math.isnan(float(value)):
                families[f"credit_risk_{name}"].add_metric([self._model, *labels], float(value))

        put("monitor_auc_margin", view.auc_margin)
        put("monitor_interval_seconds", view.interval_s)
        put("monitor_last_success_timestamp_seconds", view.last_success_at)
        put("monitor_last_error", int(view.last_attempt_failed))
        put("monitor_mlflow_up", None if view.mlflow_up is None else int(view.mlflow_up))
        put("monitor_window_failures", view.failures)
        if view.window is not None:
            self._window(put, view.window, view.window_stale)
        yield from families.values()

    @staticmethod
    def _window(put, window: MonitoredWindow, stale: bool) -> None:
        result, version = window.result, window.version
        for feature, item in result.features.items():
            put("drift_psi", item.psi, version, feature)
            put("drift_ks", item.ks, version, feature)
            put("drift_missing_rate", item.missing_rate, version, feature)
            put("drift_out_of_range_share", item.out_of_range_share, version, feature)
            put("drift_status", LEVEL[item.status], version, feature)
        put("score_psi", result.score.distribution.psi, version)
        put("score_status", LEVEL[result.score.status], version)
        put("score_mean_probability", result.score.mean_probability, version)
        put("window_status", LEVEL[result.status], version)
        put("window_rows", result.rows, version)
        if result.until is not None:
            put("window_end_timestamp_seconds", result.until.timestamp(), version)
        put("window_stale", int(stale), version)
        outcomes = result.outcomes
        if outcomes is not None:
            put("outcome_roc_auc", outcomes.roc_auc, version)
            put("outcome_rows", outcomes.rows, version)
            put("outcome_status", LEVEL[outcomes.status], version)
            put("labelled_share", outcomes.labelled_share, version)
        elif result.rows:  # no row of the window has a known outcome (yet)
            put("outcome_rows", 0, version)
            put("labelled_share", 0.0, version)
        put("training_roc_auc", window.training_roc_auc, version)


def registry_for(collector: MonitorCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry
