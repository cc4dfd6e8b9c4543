"""The healing policy: when a challenger is trained, on what, how it is judged and whether it
is promoted without a person. One TOML file (``heal.toml`` in the repository is the documented
default, key for key the defaults below), read with ``tomllib`` into ``HealPolicy``.

Sections and keys (``docs/healing.md`` says why each default is what it is):

- ``[trigger.drift]``: ``window_hours`` (the drift window ends now), ``min_alert_features``
  (a PSI ``alert`` on at least this many features triggers; 0 turns it off), ``score`` (an
  ``alert`` on the score triggers).
- ``[trigger.outcomes]``: ``enabled``, ``window_days`` (labelled records of the Production version scored
  this far back), ``auc_margin`` (the outcome ROC AUC is below the version's training AUC,
  its ``test_roc_auc`` tag, by more than this), ``min_labelled_rows`` (and at least this many
  labelled rows, with monitoring's minimum of each class, or the AUC says nothing).
- ``[trigger.schedule]``: ``every_days`` (0: off; else Production promoted longer ago than
  this triggers).
- ``[attempts]``: ``cooldown_hours`` (since the last attempt that started training a
  challenger, whatever became of it), ``lease_ttl_minutes`` (an unfinished attempt older than
  this no longer holds the lease: its process is taken to be dead).
- ``[promotion]``: ``mode``, ``manual`` (a passed challenger waits for ``credit-risk
  promote``) or ``auto`` (the gate's decision promotes).
- ``[data]``: ``lookback_days`` (labelled production records scored this far back are
  training rows), ``production_weight`` (each is written this many times into the training
  file), ``min_production_rows`` (fewer labelled rows left for training: nothing is trained).
- ``[gate]``: ``recent_share`` (the out-of-time holdout: this share of the labelled production
  rows, the most recent by record time), ``min_recent_rows`` and ``min_recent_class_rows``
  (the holdout must have this many rows and this many of each outcome), ``tolerance`` (the
  challenger may be this much worse in ROC AUC on the original held-out rows), ``margin``
  (it must beat Production on the recent rows by more than this).

Invariants: every key has a default; unknown keys and sections are refused (a misspelt key
must not silently mean "the default"); values are checked strictly (TOML's types: ``"24"`` is
not a number; ``inf`` and ``nan`` are refused, and spans are at most ten years); an error
names the file, the key and the value. A policy is frozen.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPOSITORY_POLICY = Path(__file__).resolve().parent.parent / "heal.toml"
MANUAL, AUTO = "manual", "auto"
MODES = (MANUAL, AUTO)


class PolicyError(ValueError):
    """A policy file that cannot be used; one line per problem, naming the key and the value."""


# Spans are bounded to ten years: a longer one means nothing for a credit model's windows, and
# a huge one (1e308 days) would overflow datetime arithmetic at run time instead of here.
MAX_DAYS = 3650.0
MAX_HOURS = MAX_DAYS * 24


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DriftTrigger(_Section):
    window_hours: float = Field(
        24.0, gt=0, le=MAX_HOURS, description="the drift window: the last this many hours"
    )
    min_alert_features: int = Field(
        1, ge=0, description="a PSI alert on at least this many features triggers (0: off)"
    )
    score: bool = Field(True, description="a PSI alert on the score triggers")


class OutcomeTrigger(_Section):
    enabled: bool = Field(True, description="false: outcome AUC never triggers")
    window_days: float = Field(
        90.0, gt=0, le=MAX_DAYS, description="labelled records of the Production version scored this far back"
    )
    auc_margin: float = Field(
        0.05, ge=0, le=1, description="outcome AUC below the training AUC by more than this triggers"
    )
    min_labelled_rows: int = Field(1000, ge=1, description="fewer labelled rows: the AUC is not judged")


class ScheduleTrigger(_Section):
    every_days: float = Field(
        0.0, ge=0, le=MAX_DAYS, description="0: off; else Production older than this triggers"
    )


class Triggers(_Section):
    drift: DriftTrigger = Field(default_factory=DriftTrigger)
    outcomes: OutcomeTrigger = Field(default_factory=OutcomeTrigger)
    schedule: ScheduleTrigger = Field(default_factory=ScheduleTrigger)


class Attempts(_Section):
    cooldown_hours: float = Field(
        24.0, ge=0, le=MAX_HOURS, description="since the last attempt that started training"
    )
    lease_ttl_minutes: float = Field(
        120.0,
        gt=0,
        le=MAX_HOURS * 60,
        description="an unfinished attempt older than this no longer holds the lease",
    )


class Promotion(_Section):
    mode: Literal["manual", "auto"] = Field(
        MANUAL, description="manual: an operator promotes; auto: the gate"
    )


class ChallengerData(_Section):
    lookback_days: float = Field(
        365.0, gt=0, le=MAX_DAYS, description="labelled production records scored this far back"
    )
    production_weight: int = Field(
        1, ge=1, le=100, description="copies of each labelled production row in the training file"
    )
    min_production_rows: int = Field(
        500, ge=1, description="fewer labelled production rows left for training: nothing is trained"
    )


class Gate(_Section):
    recent_share: float = Field(
        0.2, gt=0, lt=1, description="the out-of-time holdout: the most recent share of labelled rows"
    )
    min_recent_rows: int = Field(300, ge=2, description="the holdout needs at least this many rows")
    min_recent_class_rows: int = Field(20, ge=1, description="... and this many of each outcome")
    tolerance: float = Field(
        0.005, ge=0, le=1, description="allowed ROC AUC loss on the original held-out rows"
    )
    margin: float = Field(0.0, ge=0, le=1, description="required ROC AUC gain on the recent rows (strict)")


class HealPolicy(_Section):
    """The whole policy; ``HealPolicy()`` is the documented default (``heal.toml``)."""

    trigger: Triggers = Field(default_factory=Triggers)
    attempts: Attempts = Field(default_factory=Attempts)
    promotion: Promotion = Field(default_factory=Promotion)
    data: ChallengerData = Field(default_factory=ChallengerData)
    gate: Gate = Field(default_factory=Gate)

    @model_validator(mode="after")
    def _something_can_trigger(self) -> HealPolicy:
        trigger = self.trigger
        if (
            trigger.drift.min_alert_features == 0
            and not trigger.drift.score
            and not trigger.outcomes.enabled
            and trigger.schedule.every_days == 0
        ):
            raise ValueError("no trigger is on: nothing would ever be retrained")
        return self

    @property
    def mode(self) -> str:
        return self.promotion.mode


def _key(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location)


def _problems(error: ValidationError) -> list[str]:
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        key = _key(problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key {key} (a misspelling? see heal.toml for the keys)")
        elif not key:
            lines.append(message)
        else:
            lines.append(f"{key} = {problem['input']!r}: {message}")
    return lines


def parse_policy(text: str, name: str = "policy") -> HealPolicy:
    """The policy in TOML ``text`` (``name`` for messages); ``PolicyError`` naming each problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{name}: not valid TOML: {error}") from None
    try:
        return HealPolicy.model_validate(document)
    except ValidationError as error:
        raise PolicyError("\n".join(f"{name}: {line}" for line in _problems(error))) from None


class LoadedPolicy(BaseModel):
    """A policy and where it came from (recorded on every attempt)."""

    model_config = ConfigDict(frozen=True)

    policy: HealPolicy
    source: str  # the file's path, or "defaults"
    sha256: str | None  # of the file's bytes, None for the defaults


def load_policy(path: Path | None) -> LoadedPolicy:
    """The policy in file ``path``, or the defaults when ``path`` is None."""
    if path is None:
        return LoadedPolicy(policy=HealPolicy(), source="defaults (as heal.toml)", sha256=None)
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy file ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    return LoadedPolicy(
        policy=parse_policy(text, str(path)), source=str(path), sha256=hashlib.sha256(data).hexdigest()
    )
