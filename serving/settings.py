"""Serving settings: MLServer's own ``MLSERVER_*`` variables with this project's defaults, and
``ServingSettings``, the ``CREDIT_RISK_*`` ones MLServer has no equivalent for.

Both are pydantic-settings classes read from the environment (MLServer's ``Settings`` and
``ModelSettings`` by MLServer, ``ServingSettings`` here). ``credit-risk serve`` builds
``ServingSettings`` before MLServer starts, so a bad value stops it with a
``pydantic.ValidationError`` naming the variable and the value; the runtime reads the same
environment again when it loads. MLServer's defaults are applied to the serving process's
environment only where a variable is not already set (``serving_environment``), so each can be
overridden the MLServer way. There is no ``settings.json``: values in that file would win over
the environment.

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_REGISTRY_POLL_S`` | 5 | how often the registry is asked which version to serve |
| ``CREDIT_RISK_LOAD_RETRY_MIN_S`` / ``_MAX_S`` | 30 / 600 | back-off for a version that failed to load |
| ``CREDIT_RISK_SPOOL_DIR`` and friends | | inference capture (``serving.spool_format.SpoolSettings``) |
| ``CREDIT_RISK_MAX_BODY_BYTES`` | 8 MiB | largest REST body, counted after decompression; also the gRPC message limit |
| ``CREDIT_RISK_MAX_ROWS`` | 100,000 | most rows one request may score (``serving.limits.RequestLimits``) |
| ``OMP_NUM_THREADS`` | 1 | OpenMP threads for scoring: with more, p99 went from ~2 ms to ~700 ms when the other core was busy |
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlserver.settings import Settings
from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import ENV_PREFIX, PRODUCTION_ALIAS, PRODUCTION_MODEL_URI
from serving.limits import DEFAULT_MAX_BODY_BYTES, RequestLimits
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


class ServingSettings(BaseSettings):
    """What the runtime reads at load, besides MLServer's own settings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    registry_poll_s: float = Field(
        5,
        gt=0,
        allow_inf_nan=False,
        validation_alias="CREDIT_RISK_REGISTRY_POLL_S",
        description="seconds between two looks at which version the registry names",
    )
    load_retry_min_s: float = Field(
        30,
        gt=0,
        allow_inf_nan=False,
        validation_alias="CREDIT_RISK_LOAD_RETRY_MIN_S",
        description="seconds before the first retry of a version that failed to load (then doubled)",
    )
    load_retry_max_s: float = Field(
        600,
        gt=0,
        allow_inf_nan=False,
        validation_alias="CREDIT_RISK_LOAD_RETRY_MAX_S",
        description="the longest wait between two retries of a version that failed to load",
    )

    openmp_threads: int = Field(
        1,
        ge=1,
        le=256,
        validation_alias="OMP_NUM_THREADS",
        description="OpenMP threads for scoring (OpenMP's own variable; serving_environment sets 1)",
    )

    @field_validator("load_retry_max_s")
    @classmethod
    def _not_below_min(cls, value: float, info: ValidationInfo) -> float:
        minimum = info.data.get("load_retry_min_s")  # absent when it was itself invalid
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= CREDIT_RISK_LOAD_RETRY_MIN_S ({minimum:g})")
        return value

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
    # MLServer's default is a pool of one worker process, which the launcher refuses
    # (serving.server says why).
    env.setdefault("MLSERVER_PARALLEL_WORKERS", "0")
    # One OpenMP thread: with more, p99 went from ~2 ms to ~700 ms when the other core was busy.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Fail a registry call in seconds and retry on the follower's schedule, instead of inside
    # MLflow's client for minutes while readiness still shows the old reason.
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # gRPC's own message limit (4 MiB to receive by default) set to the REST body limit, so that
    # one request may cost the same on both (a 100,000-row request is ~7.6 MiB either way).
    # An invalid CREDIT_RISK_MAX_BODY_BYTES is refused by ServingSettings, naming it.
    env.setdefault(
        "MLSERVER_GRPC_MAX_MESSAGE_LENGTH", env.get("CREDIT_RISK_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))
    )
    return env
