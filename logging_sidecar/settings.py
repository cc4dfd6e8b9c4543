"""Sidecar settings, from the environment (one object per process).

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_SPOOL_DIR`` | (required) | the spool MLServer writes (see ``serving.capture``) |
| ``CREDIT_RISK_SPOOL_MAX_BYTES`` | 1 GiB | above it, the oldest unshipped segments are dropped |
| ``CREDIT_RISK_SIDECAR_STATE`` | ``<spool>/sidecar-state.db`` | SQLite file of shipped offsets |
| ``CREDIT_RISK_FLUSH_RECORDS`` | 1000 | ship when this many records are pending ... |
| ``CREDIT_RISK_FLUSH_INTERVAL_S`` | 30 | ... or when the oldest pending record is this old |
| ``CREDIT_RISK_MAX_BATCH_RECORDS`` | 10000 | largest batch (one Parquet file) |
| ``CREDIT_RISK_SIDECAR_HOST`` / ``_PORT`` | 127.0.0.1 / 8083 | ``/health`` and ``/metrics`` |
| ``CREDIT_RISK_INFERENCE_EXPERIMENT`` | ``credit-risk-inference`` | where records go |
| ``MLFLOW_TRACKING_URI`` | | the MLflow tracking server |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.capture import SpoolSettings

INFERENCE_EXPERIMENT = "credit-risk-inference"
DEFAULT_PORT = 8083


def _env(name: str, default, cast=str):
    return cast(os.environ.get(name, default))


@dataclass(frozen=True)
class SidecarSettings:
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    state_path: Path | None = field(
        default_factory=lambda: (
            Path(os.environ["CREDIT_RISK_SIDECAR_STATE"])
            if os.environ.get("CREDIT_RISK_SIDECAR_STATE")
            else None
        )
    )
    flush_records: int = field(default_factory=lambda: _env("CREDIT_RISK_FLUSH_RECORDS", 1000, int))
    flush_interval_s: float = field(default_factory=lambda: _env("CREDIT_RISK_FLUSH_INTERVAL_S", 30, float))
    max_batch_records: int = field(default_factory=lambda: _env("CREDIT_RISK_MAX_BATCH_RECORDS", 10000, int))
    host: str = field(default_factory=lambda: _env("CREDIT_RISK_SIDECAR_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _env("CREDIT_RISK_SIDECAR_PORT", DEFAULT_PORT, int))
    experiment: str = field(
        default_factory=lambda: _env("CREDIT_RISK_INFERENCE_EXPERIMENT", INFERENCE_EXPERIMENT)
    )
    poll_interval_s: float = 0.2
    retry_min_s: float = 1.0
    retry_max_s: float = 30.0

    def __post_init__(self):
        if self.spool.directory is None:
            raise ValueError("CREDIT_RISK_SPOOL_DIR is not set: the sidecar needs the spool folder")
        if self.flush_records < 1 or self.max_batch_records < self.flush_records:
            raise ValueError("CREDIT_RISK_FLUSH_RECORDS must be >= 1 and <= CREDIT_RISK_MAX_BATCH_RECORDS")
        if self.flush_interval_s <= 0:
            raise ValueError("CREDIT_RISK_FLUSH_INTERVAL_S must be > 0")
        if self.state_path is None:
            object.__setattr__(self, "state_path", self.spool.directory / "sidecar-state.db")
