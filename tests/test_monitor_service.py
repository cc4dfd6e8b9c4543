"""The monitor service without a server: its settings, the gauges it renders from a window,
and its loop (retries, the probe's verdict, what runs after a window). The loop is given the
window computation as a callable, as ``stack.monitor_cli`` gives it ``monitor_once``; the
service against a real MLflow, SIGKILL included, is ``integration/test_monitor_command.py``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from model.schema import FEATURES
from monitoring.job import MonitoredWindow
from monitoring.metrics import METRICS, MetricsView, MonitorCollector, registry_for
from monitoring.service import MlflowProbe, MonitorService
from monitoring.settings import MonitorSettings, format_duration, parse_duration
from monitoring.window import monitor_window
from stack.errors import settings_errors
from tests.helpers import NOBODY_URL
from training.data import load_training_data
from training.profile import build_profile


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("2.5", 2.5), (30, 30)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_durations_print_back_in_their_unit():
    assert [format_duration(parse_duration(t)) for t in ("15m", "24h", "90s", "7d", "1d")] == [
        "15m",
        "24h",
        "90s",
        "7d",
        "24h",
    ]


def test_bad_settings_are_named_by_their_variable(monkeypatch):
    monkeypatch.setenv("CREDIT_RISK_MONITOR_WINDOW", "a day")
    monkeypatch.setenv("CREDIT_RISK_MONITOR_PORT", "99999")
    with pytest.raises(ValidationError) as raised:
        MonitorSettings()
    lines = settings_errors(raised.value)
    assert lines[0].startswith("CREDIT_RISK_MONITOR_WINDOW='a day': must be a duration such as 90s")
    assert lines[1].startswith("CREDIT_RISK_MONITOR_PORT='99999'")
    monkeypatch.delenv("CREDIT_RISK_MONITOR_WINDOW")
    monkeypatch.delenv("CREDIT_RISK_MONITOR_PORT")
    with pytest.raises(ValidationError) as raised:
        MonitorSettings(every="0s")
    assert settings_errors(raised.value) == ["--every='0s': must be a positive duration"]


@pytest.fixture(scope="module")
def window(sample_path) -> MonitoredWindow:
    """A real window: the sample against a profile of itself, half of it labelled."""
    data = load_training_data(sample_path)
    rng = np.random.default_rng(1)
    probability = rng.beta(1, 12, len(data.features))
    profile = build_profile(data.features, probability, 0.2)
    records = data.features.reset_index(drop=True).assign(
        request_id=[f"r{i}" for i in range(len(probability))],
        row_index=0,
        timestamp=pd.Timestamp("2026-12-01T12:00:00Z"),
        model_version="7",
        probability=probability,
        prediction=(probability >= 0.2).astype(int),
    )
    # One feature moved: income arriving in other units.
    records["MonthlyIncome"] = records["MonthlyIncome"] * 12
    outcomes = pd.DataFrame(
        {"request_id": records["request_id"][::2], "row_index": 0, "outcome": data.target.to_numpy()[::2]}
    )
    result = monitor_window(
        records,
        profile,
        model_version="7",
        since="2026-12-01",
        until="2026-12-02",
        outcomes=outcomes,
        training_roc_auc=0.86,
    )
    return MonitoredWindow(result, "7", "run-id", "1", False, 0.86, [], {"compute": 0.1})


def scrape(view: MetricsView) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(registry_for(MonitorCollector("credit-risk", lambda: view))).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_gauges_are_the_window_and_statuses_are_levels(window):
    metrics = scrape(MetricsView(window, 1_800_000_000.0, False, True, 3, 900, 0.05))
    result = window.result

    def value(name, **labels):
        return metrics[(name, frozenset({"model": "credit-risk", **labels}.items()))]

    for name in FEATURES:
        item = result.features[name]
        assert value("credit_risk_drift_psi", version="7", feature=name) == item.psi
        assert value("credit_risk_drift_ks", version="7", feature=name) == item.ks
    assert value("credit_risk_drift_status", version="7", feature="MonthlyIncome") == 2  # alert
    assert (
        result.features["age"].status == "ok"
        and value("credit_risk_drift_status", version="7", feature="age") == 0
    )
    assert value("credit_risk_window_status", version="7") == 2
    assert value("credit_risk_window_rows", version="7") == result.rows
    assert (
        value("credit_risk_window_end_timestamp_seconds", version="7")
        == pd.Timestamp("2026-12-02", tz="UTC").timestamp()
    )
    assert value("credit_risk_outcome_roc_auc", version="7") == result.outcomes.roc_auc
    assert value("credit_risk_labelled_share", version="7") == pytest.approx(0.5, abs=1e-3)
    assert value("credit_risk_training_roc_auc", version="7") == 0.86
    assert value("credit_risk_monitor_window_failures_total") == 3
    assert value("credit_risk_monitor_mlflow_up") == 1 and value("credit_risk_monitor_last_error") == 0
    assert value("credit_risk_monitor_auc_margin") == 0.05
    assert value("credit_risk_window_stale", version="7") == 0
    assert {name for name, _ in metrics} >= {name for name in METRICS if not METRICS[name].counter}


def test_before_any_window_only_the_process_is_exported():
    metrics = scrape(MetricsView(None, None, True, False, 1, 900, 0.05))
    assert {name for name, _ in metrics} == {
        "credit_risk_monitor_auc_margin",
        "credit_risk_monitor_interval_seconds",
        "credit_risk_monitor_last_error",
        "credit_risk_monitor_mlflow_up",
        "credit_risk_monitor_window_failures_total",
    }


def unreachable() -> MlflowProbe:
    probe = MlflowProbe(NOBODY_URL)  # nothing listens there
    probe.current = probe.check()
    return probe


def reachable() -> MlflowProbe:
    probe = MlflowProbe("sqlite:///a-local-store.db")  # a local store: nothing to reach
    probe.current = probe.check()
    return probe


def test_a_failed_window_is_retried_sooner_and_the_loop_stays_live():
    attempts = []

    def compute():
        attempts.append(time.time())
        raise ConnectionError("MLflow said no")

    service = MonitorService(MonitorSettings(every="1h"), compute, reachable())
    service.step()
    alive, body = service.health()
    assert alive and body["status"] == "ok"
    assert body["last_error"] == "ConnectionError: MLflow said no" and body["failures_in_a_row"] == 1
    assert service.snapshot.next_attempt_at - attempts[0] == pytest.approx(5, abs=0.5)  # not an hour
    service.step()  # not due yet
    assert len(attempts) == 1


def test_while_mlflow_is_unreachable_no_window_is_attempted():
    service = MonitorService(MonitorSettings(), lambda: pytest.fail("attempted"), unreachable())
    service.step()
    alive, body = service.health()
    assert alive and body["mlflow"]["reachable"] is False
    assert "is unreachable" in body["last_error"] and body["last_window"] is None
    assert service.metrics_view().mlflow_up is False and service.metrics_view().last_attempt_failed


def test_after_each_window_the_callables_run_and_a_failing_one_does_not_stop_the_loop(window):
    seen = []

    def heal(monitored):
        seen.append(monitored)

    def broken(monitored):
        raise RuntimeError("policy bug")

    service = MonitorService(MonitorSettings(every="1h"), lambda: window, reachable(), [broken, heal])
    service.step()
    assert seen == [window]
    _, body = service.health()
    assert body["last_error"] is None and body["last_window"]["monitoring_run_id"] == "run-id"
    assert body["after_window_error"] == "broken: RuntimeError: policy bug"
    assert service.snapshot.next_attempt_at - time.time() == pytest.approx(3600, abs=5)


def test_after_a_good_window_a_failed_attempt_marks_its_gauges_stale_until_the_next_success(window):
    outcomes = [window, ConnectionError("MLflow is down"), window]

    def compute():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    service = MonitorService(MonitorSettings(every="1h"), compute, reachable())

    def stale_gauge():
        return scrape(service.metrics_view())[
            ("credit_risk_window_stale", frozenset({"model": "credit-risk", "version": "7"}.items()))
        ]

    service.step()
    assert stale_gauge() == 0 and service.health()[1]["last_window"]["stale"] is False
    service.snapshot = replace(service.snapshot, next_attempt_at=0)  # the next attempt is due
    service.step()
    _, body = service.health()
    assert body["last_window"]["stale"] is True and body["last_error"] == "ConnectionError: MLflow is down"
    assert stale_gauge() == 1  # the last window's gauges stay, marked
    service.snapshot = replace(service.snapshot, next_attempt_at=0)
    service.step()
    assert stale_gauge() == 0 and service.health()[1]["last_window"]["stale"] is False
    # A window recorded more than three intervals ago is stale too (a loop that stopped turning).
    assert service.stale(now=service.snapshot.last_success_at + 3 * 3600 + 1) is True
    assert service.stale(now=service.snapshot.last_success_at + 3 * 3600 - 1) is False


def test_liveness_fails_only_when_the_loop_stops_turning():
    service = MonitorService(MonitorSettings(liveness_after="10m"), lambda: None, reachable())
    turned = service.snapshot.turned_at
    assert service.liveness(turned + 599)[0] is True
    alive, body = service.liveness(turned + 601)
    assert alive is False and body["status"] == "stuck"
