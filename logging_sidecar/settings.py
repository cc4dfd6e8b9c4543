"""The sidecar's settings: one pydantic-settings object per process, from the environment.

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_SPOOL_DIR`` | (required) | the spool MLServer writes (see ``serving.spool_format``) |
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
| ``CREDIT_RISK_RETENTION_DAYS`` | (unset: keep for ever) | delete shipped records and dead letters older than this many days (``logging_sidecar.retention``) |
| ``CREDIT_RISK_PRUNE_EVERY_S`` | 3600 | with a retention, prune this often (and once at start) |
| ``CREDIT_RISK_FAULT_POINTS`` | (none) | **tests only**: comma-separated ``after_plan``, ``after_upload``, ``after_commit``, ``after_mark``, ``after_prune_artifacts``; at each the process prints ``FAULT-POINT <name> pid=<pid>`` to stderr and sleeps, so a test can SIGKILL it exactly there |
| ``CREDIT_RISK_FAULT_PAUSE_S`` | 30 | **tests only**: how long it sleeps at a fault point |
| ``MLFLOW_TRACKING_URI`` | | the MLflow tracking server (read by MLflow itself) |

The spool's own variables (``CREDIT_RISK_SPOOL_*``, ``CREDIT_RISK_SEGMENT_*``, ...) are read by
the nested ``SpoolSettings``, the same class the writer uses. ``credit-risk records`` (read and
prune) reads ``RecordsSettings``, the part it shares with the sidecar: the experiment and the
test-only fault points.

Retention is off by default: deleting applicants' records cannot be undone, how long they must
be kept (for monitoring, audits, a regulator) or may be kept (data protection) is the
operator's decision, and a deployment that upgrades must not start deleting by itself.

Invariants: a bad value raises ``pydantic.ValidationError`` whose ``loc`` is the variable's
name and whose ``input`` is its value, for every rule, including the rules between two
variables (the message names the other one). The loop never reads the fault points: the CLI
turns them into a hook (``logging_sidecar.faults``) and hands that to the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from logging_sidecar.faults import FAULT_POINTS
from model.identity import ENV_PREFIX
from serving.spool_format import SpoolSettings

INFERENCE_EXPERIMENT = "credit-risk-inference"
DEFAULT_PORT = 8083
STATE_FILE = "sidecar-state.db"


class RecordsSettings(BaseSettings):
    """What every process that ships, reads or prunes the records reads: where they are, and
    the test-only fault points."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    experiment: str = Field(
        INFERENCE_EXPERIMENT,
        min_length=1,
        validation_alias="CREDIT_RISK_INFERENCE_EXPERIMENT",
        description="the MLflow experiment records go to",
    )
    # Tests only. NoDecode: the variable is a comma-separated list, not JSON.
    fault_points: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(),
        validation_alias="CREDIT_RISK_FAULT_POINTS",
        description=f"tests only: pause at these points ({', '.join(FAULT_POINTS)})",
    )
    fault_pause_s: float = Field(
        30, ge=0, validation_alias="CREDIT_RISK_FAULT_PAUSE_S", description="tests only: pause this long"
    )

    @field_validator("fault_points", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return frozenset(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("fault_points")
    @classmethod
    def _known_points(cls, value: frozenset[str]) -> frozenset[str]:
        if unknown := value - set(FAULT_POINTS):
            raise ValueError(
                f"must name only {', '.join(FAULT_POINTS)}; unknown: {', '.join(sorted(unknown))}"
            )
        return value


class SidecarSettings(RecordsSettings):
    spool: SpoolSettings = Field(
        default_factory=SpoolSettings, description="the spool, as its writer sees it (its own variables)"
    )
    state_file: Path | None = Field(
        None,
        validation_alias="CREDIT_RISK_SIDECAR_STATE",
        description=f"SQLite file of shipped offsets and counters (default: <spool>/{STATE_FILE})",
    )
    flush_records: int = Field(
        1000, ge=1, validation_alias="CREDIT_RISK_FLUSH_RECORDS", description="ship at this many records"
    )
    flush_interval_s: float = Field(
        30,
        gt=0,
        validation_alias="CREDIT_RISK_FLUSH_INTERVAL_S",
        description="... or when the oldest pending record is this old",
    )
    max_batch_records: int = Field(
        10000,
        validation_alias="CREDIT_RISK_MAX_BATCH_RECORDS",
        description="largest batch (one Parquet file)",
    )
    host: str = Field(
        "127.0.0.1", validation_alias="CREDIT_RISK_SIDECAR_HOST", description="health and metrics address"
    )
    port: int = Field(
        DEFAULT_PORT,
        ge=0,
        le=65535,
        validation_alias="CREDIT_RISK_SIDECAR_PORT",
        description="health and metrics port",
    )
    stall_after_s: float = Field(
        120,
        validation_alias="CREDIT_RISK_STALL_AFTER_S",
        description="/health/shipping is 503 when records are pending and nothing shipped for this long",
    )
    liveness_after_s: float = Field(
        600,
        gt=0,
        validation_alias="CREDIT_RISK_LIVENESS_AFTER_S",
        description="/health/live is 503 when the loop has not turned for this long",
    )
    drain_s: float = Field(
        20,
        ge=0,
        validation_alias="CREDIT_RISK_SIDECAR_DRAIN_S",
        description="on SIGTERM, wait for the writers and ship for at most this long",
    )
    max_line_bytes: int = Field(
        64 << 20,
        ge=1024,
        validation_alias="CREDIT_RISK_MAX_LINE_BYTES",
        description="longer spool lines are parked as dead lines",
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        validation_alias="CREDIT_RISK_RETENTION_DAYS",
        description="delete shipped records and dead letters older than this many days (unset: keep)",
    )
    prune_every_s: float = Field(
        3600,
        gt=0,
        validation_alias="CREDIT_RISK_PRUNE_EVERY_S",
        description="with a retention, prune this often",
    )

    @model_validator(mode="after")
    def _rules_between_variables(self) -> SidecarSettings:
        """Rules that involve two variables (or the nested spool's), reported under the
        variable that breaks them, with the other one named in the message."""
        problems = []
        if self.spool.directory is None:
            problems.append(
                ("CREDIT_RISK_SPOOL_DIR", None, "must be set: the sidecar ships that spool folder")
            )
        if self.flush_records > self.max_batch_records:
            problems.append(
                (
                    "CREDIT_RISK_FLUSH_RECORDS",
                    self.flush_records,
                    f"must be <= CREDIT_RISK_MAX_BATCH_RECORDS ({self.max_batch_records})",
                )
            )
        if self.stall_after_s <= self.flush_interval_s:
            problems.append(
                (
                    "CREDIT_RISK_STALL_AFTER_S",
                    self.stall_after_s,
                    f"must be longer than CREDIT_RISK_FLUSH_INTERVAL_S ({self.flush_interval_s:g})",
                )
            )
        if problems:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    {"type": PydanticCustomError("value_error", message), "loc": (variable,), "input": value}
                    for variable, value, message in problems
                ],
            )
        return self

    @property
    def state_path(self) -> Path:
        """``CREDIT_RISK_SIDECAR_STATE``, or ``sidecar-state.db`` in the spool."""
        return self.state_file or self.spool.directory / STATE_FILE
