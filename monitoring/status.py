"""How a figure becomes a status, and the thresholds that decide it.

Statuses, from least to most serious: ``ok``, ``insufficient`` (too few rows to say: never a
confident ``ok`` on a handful of rows), ``warn``, ``alert``. A window's status is the worst of
its items'.

A drift item (a feature, or the score) is judged by its PSI: below ``psi_warn`` ok, from
``psi_warn`` warn, from ``psi_alert`` alert; the credit industry's conventional 0.1 and 0.25.
With fewer than ``min_rows`` rows in the window it is ``insufficient`` whatever its PSI.

Why 500 rows. PSI is Jeffreys' divergence; between two samples of one population,
``PSI / (1/n + 1/N)`` is asymptotically chi-squared with (bins - 1) degrees of freedom. With
the 11 bins of a continuous feature (10 deciles and the missing bin) and N ~ 96,000 training
rows, noise alone gives a PSI of about 10/n on average, and its 99.9th percentile is about
29.6/n: 0.06 at n = 500 (below the warn threshold), but 0.15 at n = 200 and 2.5 at n = 12.
Measured on the real data (``benchmarks/monitoring_noise.py``, 1,000 windows of held-out rows
per size, no drift): some feature reached 0.1 in 93 % of 100-row windows, 15 % of 200-row
windows and none of the 500-row windows. So below 500 rows a warning could be noise, and an
``ok`` says too little.

Outcome metrics need enough labelled rows of both classes: ``min_labelled_rows`` (500) and
``min_class_rows`` (50) of each outcome. The standard error of an AUC is driven by the
smaller class (Hanley and McNeil, 1982): at AUC 0.86 it is about ``sqrt(0.056 / defaults)``,
0.033 with 50 defaults. With fewer, a fall in AUC cannot be told from noise.

The thresholds are a settings class (``CREDIT_RISK_MONITOR_*`` variables, checked by pydantic)
so that the monitor's process settings can nest it; code passes them by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import ENV_PREFIX

OK = "ok"
INSUFFICIENT = "insufficient"
WARN = "warn"
ALERT = "alert"
_SEVERITY = {OK: 0, INSUFFICIENT: 1, WARN: 2, ALERT: 3}
# For charts: a level per status, with insufficient below ok so that it never looks like drift.
LEVEL = {INSUFFICIENT: -1, OK: 0, WARN: 1, ALERT: 2}


class Thresholds(BaseSettings):
    """When an item is ``warn``, ``alert`` or ``insufficient``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    psi_warn: float = Field(
        0.1, gt=0, validation_alias="CREDIT_RISK_MONITOR_PSI_WARN", description="PSI from which an item warns"
    )
    psi_alert: float = Field(
        0.25, gt=0, validation_alias="CREDIT_RISK_MONITOR_PSI_ALERT", description="PSI from which it alerts"
    )
    min_rows: int = Field(
        500,
        ge=1,
        validation_alias="CREDIT_RISK_MONITOR_MIN_ROWS",
        description="fewer rows in a window make every drift item insufficient",
    )
    min_labelled_rows: int = Field(
        500,
        ge=1,
        validation_alias="CREDIT_RISK_MONITOR_MIN_LABELLED_ROWS",
        description="fewer rows with a known outcome make the outcome metrics insufficient",
    )
    min_class_rows: int = Field(
        50,
        ge=1,
        validation_alias="CREDIT_RISK_MONITOR_MIN_CLASS_ROWS",
        description="... and so do fewer than this many defaults, or non-defaults",
    )

    @model_validator(mode="after")
    def _alert_above_warn(self) -> Thresholds:
        # A check of two values: its error has no location, so it names both variables itself
        # (either may be the one left at its default).
        if self.psi_alert <= self.psi_warn:
            raise ValueError(
                f"CREDIT_RISK_MONITOR_PSI_ALERT ({self.psi_alert:g}) must be above "
                f"CREDIT_RISK_MONITOR_PSI_WARN ({self.psi_warn:g})"
            )
        return self


def psi_status(psi: float, rows: int, thresholds: Thresholds) -> str:
    if rows < thresholds.min_rows:
        return INSUFFICIENT
    if psi >= thresholds.psi_alert:
        return ALERT
    return WARN if psi >= thresholds.psi_warn else OK


def worst(statuses: Iterable[str]) -> str:
    """The most serious of ``statuses`` (``ok`` for none)."""
    return max(statuses, key=_SEVERITY.__getitem__, default=OK)
