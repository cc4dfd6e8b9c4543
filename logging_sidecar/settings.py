"""Sidecar settings, from the environment (one object per process).

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_SPOOL_DIR`` | (required) | the spool MLServer writes (see ``serving.capture``) |
| ``CREDIT_RISK_SPOOL_MAX_BYTES`` | 1 GiB | above it, the oldest unshipped segments are dropped |
| ``CREDIT_RISK_SIDECAR_STATE`` | ``<spool>/sidecar-state.db`` | SQLite file of shipped offsets and the dead-line counter |
| ``CREDIT_RISK_FLUSH_RECORDS`` | 1000 | ship when this many records are pending ... |
| ``CREDIT_RISK_FLUSH_INTERVAL_S`` | 30 | ... or when the oldest pending record is this old |
| ``CREDIT_RISK_MAX_BATCH_RECORDS`` | 10000 | largest batch (one Parquet file) |
| ``CREDIT_RISK_SIDECAR_HOST`` / ``_PORT`` | 127.0.0.1 / 8083 | ``/health`` and ``/metrics`` |
| ``CREDIT_RISK_INFERENCE_EXPERIMENT`` | ``credit-risk-inference`` | where records go |
| ``CREDIT_RISK_STALL_AFTER_S`` | 120 | ``/health/shipping`` is 503 when records are pending and nothing shipped for this long |
| ``CREDIT_RISK_LIVENESS_AFTER_S`` | 600 | ``/health/live`` is 503 when the loop has not turned for this long (one step may wait on several 30 s MLflow timeouts) |
| ``CREDIT_RISK_SIDECAR_DRAIN_S`` | 20 | on SIGTERM: wait for the writers to release the spool, then ship what is pending, for at most this long |
| ``CREDIT_RISK_MAX_LINE_BYTES`` | 64 MiB | longer request lines (~300,000 rows) are parked as dead lines |
| ``CREDIT_RISK_FAULT_POINTS`` | (none) | **tests only**: comma-separated ``after_plan``, ``after_upload``, ``after_commit``; at each the sidecar prints ``FAULT-POINT <name> pid=<pid>`` to stderr and sleeps, so a test can SIGKILL it exactly there |
| ``CREDIT_RISK_FAULT_PAUSE_S`` | 30 | **tests only**: how long it sleeps at a fault point |
| ``MLFLOW_TRACKING_URI`` | | the MLflow tracking server |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.spool_format import SpoolSettings

INFERENCE_EXPERIMENT = "credit-risk-inference"
DEFAULT_PORT = 8083
FAULT_POINTS = ("after_plan", "after_upload", "after_commit")


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
    stall_after_s: float = field(default_factory=lambda: _env("CREDIT_RISK_STALL_AFTER_S", 120, float))
    liveness_after_s: float = field(default_factory=lambda: _env("CREDIT_RISK_LIVENESS_AFTER_S", 600, float))
    drain_s: float = field(default_factory=lambda: _env("CREDIT_RISK_SIDECAR_DRAIN_S", 20, float))
    max_line_bytes: int = field(default_factory=lambda: _env("CREDIT_RISK_MAX_LINE_BYTES", 64 << 20, int))
    fault_points: frozenset[str] = field(
        default_factory=lambda: frozenset(
            name.strip() for name in _env("CREDIT_RISK_FAULT_POINTS", "").split(",") if name.strip()
        )
    )
    fault_pause_s: float = field(default_factory=lambda: _env("CREDIT_RISK_FAULT_PAUSE_S", 30, float))
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
        if self.stall_after_s <= self.flush_interval_s:
            raise ValueError("CREDIT_RISK_STALL_AFTER_S must be longer than CREDIT_RISK_FLUSH_INTERVAL_S")
        if self.drain_s < 0 or self.max_line_bytes < 1024:
            raise ValueError(
                "CREDIT_RISK_SIDECAR_DRAIN_S must be >= 0 and CREDIT_RISK_MAX_LINE_BYTES >= 1024"
            )
        if unknown := self.fault_points - set(FAULT_POINTS):
            raise ValueError(
                f"CREDIT_RISK_FAULT_POINTS: unknown {sorted(unknown)}; known: {', '.join(FAULT_POINTS)}"
            )
        if self.state_path is None:
            object.__setattr__(self, "state_path", self.spool.directory / "sidecar-state.db")
