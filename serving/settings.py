"""Serving settings: MLServer's own ``MLSERVER_*`` variables with this project's defaults, and
the few ``CREDIT_RISK_*`` ones MLServer has no equivalent for.

Defaults are applied to the environment of the serving process only where the variable is
not already set, so every one of them can be overridden the MLServer way. There is no
``settings.json``: values in that file would win over the environment.

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_REGISTRY_POLL_S`` | 5 | how often the registry is asked which version to serve |
| ``CREDIT_RISK_LOAD_RETRY_MIN_S`` / ``_MAX_S`` | 30 / 600 | back-off for a version that failed to load |
| ``CREDIT_RISK_SPOOL_DIR`` and friends | | inference capture (``serving.capture.SpoolSettings``) |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlserver.settings import Settings

from model.identity import PRODUCTION_ALIAS, PRODUCTION_MODEL_URI
from serving.spool_format import SpoolSettings

SERVING_DIR = Path(__file__).resolve().parent
MODEL_SETTINGS_PATH = SERVING_DIR / "model-settings.json"
MODEL_SETTINGS = json.loads(MODEL_SETTINGS_PATH.read_text())
MODEL_NAME: str = MODEL_SETTINGS["name"]
MODEL_URI: str = MODEL_SETTINGS["parameters"]["uri"]
# MLServer's own defaults, read from its settings rather than retyped.
DEFAULT_HTTP_PORT: int = Settings.model_fields["http_port"].default
DEFAULT_GRPC_PORT: int = Settings.model_fields["grpc_port"].default
DEFAULT_METRICS_PORT: int = Settings.model_fields["metrics_port"].default

# Registry pointers that everything this project writes keeps in step: a divergence between
# them is reported by serving, which follows the URI.
_ALIAS_IN_STEP = {PRODUCTION_MODEL_URI: PRODUCTION_ALIAS}


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class ServingSettings:
    """What the runtime reads at load, besides MLServer's own settings."""

    spool: SpoolSettings = field(default_factory=SpoolSettings)
    registry_poll_s: float = field(default_factory=lambda: _env_float("CREDIT_RISK_REGISTRY_POLL_S", 5))
    load_retry_min_s: float = field(default_factory=lambda: _env_float("CREDIT_RISK_LOAD_RETRY_MIN_S", 30))
    load_retry_max_s: float = field(default_factory=lambda: _env_float("CREDIT_RISK_LOAD_RETRY_MAX_S", 600))

    @staticmethod
    def follow_alias(uri: str) -> str | None:
        """The alias that should name the same version as ``uri``, if any."""
        return _ALIAS_IN_STEP.get(uri)


def serving_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment MLServer starts with: ``environ`` plus the defaults it does not set."""
    env = dict(os.environ if environ is None else environ)
    # Loopback unless told otherwise; containers set MLSERVER_HOST=0.0.0.0.
    env.setdefault("MLSERVER_HOST", "127.0.0.1")
    env.setdefault("MLSERVER_DEBUG", "false")
    # One process: the runtime swaps versions in place, which MLServer's worker pool cannot.
    env.setdefault("MLSERVER_PARALLEL_WORKERS", "0")
    # One OpenMP thread: with more, p99 went from ~2 ms to ~700 ms when the other core was busy.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Fail a registry call in seconds and retry on the follower's schedule, instead of inside
    # MLflow's client for minutes while readiness still shows the old reason.
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return env
