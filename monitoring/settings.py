"""Monitoring's names and the monitor's settings: one pydantic-settings class per process.

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_MONITORING_EXPERIMENT`` | ``credit-risk-monitoring`` | where monitoring runs go |
| ``CREDIT_RISK_OUTCOMES_EXPERIMENT`` | ``credit-risk-outcomes`` | where ``credit-risk outcomes add`` stores outcomes |
| ``CREDIT_RISK_INFERENCE_EXPERIMENT`` | ``credit-risk-inference`` | where the sidecar ships the records (its variable) |
| ``CREDIT_RISK_MONITOR_WINDOW`` | ``24h`` | a window's length: the default of ``credit-risk monitor``, and each window of the service |
| ``CREDIT_RISK_MONITOR_EVERY`` | ``15m`` | the service's interval (``credit-risk monitor --every`` without a value) |
| ``CREDIT_RISK_MONITOR_HOST`` / ``_PORT`` | 127.0.0.1 / 8084 | the service's ``/health`` and ``/metrics`` |
| ``CREDIT_RISK_MONITOR_LIVENESS_AFTER`` | ``1h`` | ``/health/live`` is 503 when the loop has not turned for this long |
| ``CREDIT_RISK_MONITOR_AUC_MARGIN`` | 0.05 | exported as ``credit_risk_monitor_auc_margin``: the alert fires when the outcome AUC is this far below the training AUC |
| ``CREDIT_RISK_MONITOR_PSI_WARN``, ``_PSI_ALERT``, ``_MIN_ROWS``, ``_MIN_LABELLED_ROWS``, ``_MIN_CLASS_ROWS`` | 0.1, 0.25, 500, 500, 50 | the statuses (``monitoring.status.Thresholds``) |

Durations are a whole number with a unit, ``s``, ``m``, ``h`` or ``d`` (``90s``, ``15m``,
``24h``, ``7d``), or a number of seconds. ``stack.auth_policy`` reads the experiment names from
here; a deployment that renames one sets the same variable for every process (the monitor,
``outcomes add``, the healing loop, ``credit-risk auth provision``).

Invariants: a bad value raises ``pydantic.ValidationError`` naming the variable (its ``loc``)
and the value (``input``); the defaults above do not change without a note in the README.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, Field, PlainSerializer
from pydantic_settings import BaseSettings, SettingsConfigDict

from logging_sidecar.settings import INFERENCE_EXPERIMENT
from model.identity import ENV_PREFIX
from monitoring.status import Thresholds

MONITORING_EXPERIMENT = "credit-risk-monitoring"
OUTCOMES_EXPERIMENT = "credit-risk-outcomes"
DEFAULT_PORT = 8084

_DURATION = re.compile(r"(?P<amount>[0-9]+)(?P<unit>[smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """``15m``, ``24h``, ``7d``, ``90s``, or seconds as a number; positive. ``ValueError``
    (``must be ...``) otherwise."""
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        duration = timedelta(seconds=value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        duration = timedelta(seconds=int(match["amount"]) * _UNIT_SECONDS[match["unit"]])
    else:
        try:
            duration = timedelta(seconds=float(str(value)))
        except ValueError:
            raise ValueError(
                "must be a duration such as 90s, 15m, 24h or 7d (or a number of seconds)"
            ) from None
    if duration <= timedelta(0):
        raise ValueError("must be a positive duration")
    return duration


def format_duration(duration: timedelta) -> str:
    """An exact short form: ``90s``, ``15m``, ``24h``, ``7d``."""
    seconds = duration.total_seconds()
    if seconds >= 2 * _UNIT_SECONDS["d"] and seconds % _UNIT_SECONDS["d"] == 0:
        return f"{int(seconds // _UNIT_SECONDS['d'])}d"
    for unit in ("h", "m", "s"):
        if seconds % _UNIT_SECONDS[unit] == 0:
            return f"{int(seconds // _UNIT_SECONDS[unit])}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration)]


class Experiments(BaseSettings):
    """Where monitoring reads and writes in MLflow."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    monitoring: str = Field(
        MONITORING_EXPERIMENT,
        min_length=1,
        validation_alias="CREDIT_RISK_MONITORING_EXPERIMENT",
        description="the experiment monitoring runs go to",
    )
    outcomes: str = Field(
        OUTCOMES_EXPERIMENT,
        min_length=1,
        validation_alias="CREDIT_RISK_OUTCOMES_EXPERIMENT",
        description="the experiment outcomes are stored in",
    )
    inference: str = Field(
        INFERENCE_EXPERIMENT,
        min_length=1,
        validation_alias="CREDIT_RISK_INFERENCE_EXPERIMENT",
        description="the experiment the sidecar ships records to (the sidecar's variable)",
    )


class MonitorSettings(BaseSettings):
    """``credit-risk monitor``: one window, or the service (``--every``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    experiments: Experiments = Field(default_factory=Experiments, description="their own variables")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="their own variables")
    window: Duration = Field(
        timedelta(hours=24),
        validation_alias="CREDIT_RISK_MONITOR_WINDOW",
        description="a window's length, ending now unless --until says otherwise",
    )
    every: Duration = Field(
        timedelta(minutes=15),
        validation_alias="CREDIT_RISK_MONITOR_EVERY",
        description="the service computes a window this often (--every without a value)",
    )
    host: str = Field(
        "127.0.0.1", validation_alias="CREDIT_RISK_MONITOR_HOST", description="the service's address"
    )
    port: int = Field(
        DEFAULT_PORT,
        ge=0,
        le=65535,
        validation_alias="CREDIT_RISK_MONITOR_PORT",
        description="the service's /health and /metrics port",
    )
    liveness_after: Duration = Field(
        timedelta(hours=1),
        validation_alias="CREDIT_RISK_MONITOR_LIVENESS_AFTER",
        description="/health/live is 503 when the loop has not turned for this long (a window, "
        "and what runs after it, may take minutes)",
    )
    auc_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        validation_alias="CREDIT_RISK_MONITOR_AUC_MARGIN",
        description="outcome AUC this far below the training AUC alerts (exported for Prometheus)",
    )
