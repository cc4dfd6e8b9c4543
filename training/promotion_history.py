"""The promotion history of the registered model, worked out from its versions' tags: who is
in Production, how they got there, where a rollback goes, and what changed outside
credit-risk. Pure: it reads versions given to it (anything with ``version``,
``current_stage`` and ``tags``, as MLflow's ``ModelVersion`` has) and plans the records a
promotion or rollback writes; ``training.registry`` reads and writes the registry.

The history lives in the registry, as tags on the versions, so every machine sees the same.
Each promotion (by the gate, ``credit-risk promote`` or ``rollback``) writes on the version it
moves into Production ``promotion.seq`` (one counter for the whole model: the highest recorded
plus one), ``promotion.at`` (``model.identity.utc_timestamp``), ``promotion.by``,
``promotion.reason``, ``promotion.source`` and ``promotion.previous``; a rollback marks the
promotion it undoes with ``promotion.rolled_back_seq`` and ``promotion.rolled_back_at``.

Invariants:

- A version carries only its latest promotion. The versions whose latest promotion was not
  rolled back, in ``promotion.seq`` order, form a stack whose top is the Production version.
- A rollback pops the stack: Production goes to the version that held it before the current
  holder got it, skipping holders that were themselves rolled back. Consecutive rollbacks walk
  back through distinct versions and never flip between two.
- A Production version that is not the top of the stack was put there outside credit-risk
  (by hand in the MLflow UI, or before promotions were recorded): it counts as the newest
  holder, and the next promotion or rollback records it first, with source ``outside``.
- Stage ``Production`` is what serving follows (``PRODUCTION_MODEL_URI``); the alias
  ``production`` should name the same version. A divergence is reported, never repaired here.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Protocol

from model.identity import PRODUCTION_ALIAS, PRODUCTION_MODEL_URI, PRODUCTION_STAGE, REGISTERED_MODEL_NAME

# Who promotes, when the default (user@host) is not the right name, e.g. in CI or a container.
# Read by the settings of the processes that promote (training's gate, the operator's commands).
ACTOR_VARIABLE = "CREDIT_RISK_ACTOR"

PREFIX = "promotion."
SEQ_TAG = f"{PREFIX}seq"
AT_TAG = f"{PREFIX}at"
BY_TAG = f"{PREFIX}by"
REASON_TAG = f"{PREFIX}reason"
SOURCE_TAG = f"{PREFIX}source"
PREVIOUS_TAG = f"{PREFIX}previous"
ROLLED_BACK_SEQ_TAG = f"{PREFIX}rolled_back_seq"
ROLLED_BACK_AT_TAG = f"{PREFIX}rolled_back_at"
_NO_VERSION = "none"


class PromotionError(Exception):
    """A promotion or rollback was refused; nothing in the registry changed."""


class Version(Protocol):
    """What the history reads of a registered version (MLflow's ``ModelVersion`` is one)."""

    version: str | int
    current_stage: str
    tags: Mapping[str, str]


def default_actor() -> str:
    """``user@host``, the name a promotion is recorded under unless one is given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Promotion:
    """The latest promotion of one version, as recorded in its ``promotion.*`` tags."""

    version: str
    seq: int
    at: str
    by: str
    reason: str
    source: str  # "gate", "cli", "rollback", "outside" (found without a record) or "api"
    previous: str | None  # the version that held Production just before
    rolled_back_at: str | None = None  # set when a rollback undid this promotion

    @property
    def rolled_back(self) -> bool:
        return self.rolled_back_at is not None

    @classmethod
    def from_version(cls, version: Version) -> Promotion | None:
        tags = version.tags
        try:
            seq = int(tags[SEQ_TAG])
        except (KeyError, ValueError):
            return None
        previous = tags.get(PREVIOUS_TAG, _NO_VERSION)
        undone = tags.get(ROLLED_BACK_SEQ_TAG) == str(seq)
        return cls(
            version=str(version.version),
            seq=seq,
            at=tags.get(AT_TAG, ""),
            by=tags.get(BY_TAG, ""),
            reason=tags.get(REASON_TAG, ""),
            source=tags.get(SOURCE_TAG, ""),
            previous=None if previous == _NO_VERSION else previous,
            rolled_back_at=tags.get(ROLLED_BACK_AT_TAG, "") if undone else None,
        )

    def tags(self) -> dict[str, str]:
        """The tags that record this promotion on its version."""
        return {
            SEQ_TAG: str(self.seq),
            AT_TAG: self.at,
            BY_TAG: self.by,
            REASON_TAG: self.reason,
            SOURCE_TAG: self.source,
            PREVIOUS_TAG: self.previous or _NO_VERSION,
        }

    def rolled_back_tags(self) -> dict[str, str]:
        """The tags that mark this promotion as undone (``rolled_back_at`` must be set)."""
        if self.rolled_back_at is None:
            raise ValueError(f"promotion #{self.seq} of v{self.version} was not rolled back")
        return {ROLLED_BACK_SEQ_TAG: str(self.seq), ROLLED_BACK_AT_TAG: self.rolled_back_at}

    def as_dict(self) -> dict:
        return {**asdict(self), "rolled_back": self.rolled_back}


def _by_number(versions: Iterable) -> list[str]:
    return sorted((str(v) for v in versions), key=int)


@dataclass(frozen=True)
class RegistryState:
    """Production as the registry shows it at one moment: stage, alias and recorded history.

    ``versions`` maps each version number (a string) to its version."""

    versions: Mapping[str, Version]
    alias_version: str | None

    @property
    def stage_versions(self) -> list[str]:
        return _by_number(v for v, mv in self.versions.items() if mv.current_stage == PRODUCTION_STAGE)

    @property
    def holder(self) -> str | None:
        """The version ``models:/credit-risk-model/Production`` resolves to (MLflow takes the
        highest version in the stage), which is what serving follows."""
        stage = self.stage_versions
        return stage[-1] if stage else None

    @property
    def history(self) -> list[Promotion]:
        """Every version's latest promotion, newest first."""
        records = (Promotion.from_version(v) for v in self.versions.values())
        return sorted((r for r in records if r is not None), key=lambda r: r.seq, reverse=True)

    @property
    def recorded_holder(self) -> Promotion | None:
        """The newest promotion that was not rolled back: who should be in Production."""
        return next((r for r in self.history if not r.rolled_back), None)

    @property
    def unrecorded_holder(self) -> bool:
        """True when Production holds a version no promotion here put there."""
        recorded = self.recorded_holder
        return self.holder is not None and (recorded is None or recorded.version != self.holder)

    @property
    def holders(self) -> list[str]:
        """The rollback stack, oldest first; its top is the Production version."""
        stack = [r.version for r in reversed(self.history) if not r.rolled_back]
        if self.unrecorded_holder:
            stack = [v for v in stack if v != self.holder] + [self.holder]
        return stack

    def next_seq(self) -> int:
        return max((r.seq for r in self.history), default=0) + 1

    def divergences(self) -> list[str]:
        """Ways in which stage ``Production`` and alias ``production`` disagree."""
        found = []
        stage = self.stage_versions
        if len(stage) > 1:
            listed = ", ".join(f"v{v}" for v in stage)
            found.append(
                f"{listed} are all in stage {PRODUCTION_STAGE} ({PRODUCTION_MODEL_URI} resolves to v{stage[-1]})"
            )
        if self.alias_version != self.holder:
            stage_text = (
                f"stage {PRODUCTION_STAGE} is v{self.holder}"
                if self.holder
                else f"no version is in stage {PRODUCTION_STAGE}"
            )
            alias_text = (
                f"alias {PRODUCTION_ALIAS} points at v{self.alias_version}"
                if self.alias_version
                else f"alias {PRODUCTION_ALIAS} is not set"
            )
            found.append(f"{stage_text} but {alias_text}")
        return found

    def outside_changes(self) -> list[str]:
        """Production changes that no promotion here recorded (the MLflow UI, most likely)."""
        recorded = self.recorded_holder
        if self.unrecorded_holder:
            if Promotion.from_version(self.versions[self.holder]) is None:
                what = f"v{self.holder} in {PRODUCTION_STAGE} without a promotion record"
            else:
                what = (
                    f"v{self.holder} in {PRODUCTION_STAGE}, but the latest recorded promotion is "
                    f"v{recorded.version}'s (#{recorded.seq})"
                    if recorded
                    else f"v{self.holder} in {PRODUCTION_STAGE}, but its promotion was rolled back"
                )
            return [f"{what}: changed outside credit-risk (MLflow UI?)"]
        if self.holder is None and recorded is not None:
            return [
                f"no version in {PRODUCTION_STAGE}, but the latest recorded promotion put "
                f"v{recorded.version} there (#{recorded.seq}): changed outside credit-risk (MLflow UI?)"
            ]
        return []

    def rollback_target(self) -> str:
        """The version a rollback would put in Production; raises ``PromotionError`` if none."""
        if self.holder is None:
            raise PromotionError(
                f"no version is in {PRODUCTION_STAGE}, so there is nothing to roll back; "
                "choose one with: credit-risk promote --version N --reason TEXT"
            )
        stack = self.holders
        if len(stack) < 2:
            undone = any(record.rolled_back for record in self.history)
            raise PromotionError(
                f"nothing to roll back to: no version is recorded in {PRODUCTION_STAGE} before "
                f"v{self.holder}" + (" other than ones already rolled back" if undone else "")
            )
        return stack[-2]

    def version(self, number: str) -> Version:
        """The registered version ``number``; raises ``PromotionError`` if there is none."""
        if number not in self.versions:
            known = ", ".join(_by_number(self.versions)) or "none"
            raise PromotionError(f"{REGISTERED_MODEL_NAME} has no version {number} (versions: {known})")
        return self.versions[number]

    def outside_record(self, actor: str, at: str) -> Promotion | None:
        """The record no one wrote for a holder put in Production outside credit-risk, which
        the next promotion or rollback writes first (None when there is no such holder)."""
        if not self.unrecorded_holder:
            return None
        return Promotion(
            version=self.holder,
            seq=self.next_seq(),
            at=at,
            by="unknown",
            reason=f"noticed by {actor}: in {PRODUCTION_STAGE} without a promotion record, "
            "changed outside credit-risk (MLflow UI?)",
            source="outside",
            previous=None,
        )


@dataclass(frozen=True)
class PromotionPlan:
    """The records one promotion writes, in this order: ``outside`` (if any) on the holder
    found without a record, then ``new`` on the version moved into Production."""

    outside: Promotion | None
    new: Promotion


@dataclass(frozen=True)
class RollbackPlan:
    """The records one rollback writes, in this order: ``outside`` (if any), the mark on
    ``undone`` (the promotion rolled back, on the version leaving Production), then ``new``."""

    outside: Promotion | None
    undone: Promotion
    new: Promotion


def plan_promotion(
    state: RegistryState, version: str, *, reason: str, source: str, actor: str, at: str
) -> PromotionPlan:
    """What promoting ``version`` at ``at`` records (the caller checked that it exists)."""
    outside = state.outside_record(actor, at)
    seq = outside.seq + 1 if outside else state.next_seq()
    new = Promotion(version, seq, at, actor, reason, source, previous=state.holder)
    return PromotionPlan(outside, new)


def plan_rollback(
    state: RegistryState, *, reason: str, actor: str, at: str, expected: str | None = None
) -> RollbackPlan:
    """What a rollback at ``at`` records; ``PromotionError`` when there is nothing to roll back
    to, or when the target is not ``expected`` (the one the caller checked)."""
    target = state.rollback_target()
    if expected is not None and target != expected:
        raise PromotionError(
            f"the registry changed meanwhile: a rollback would now go to v{target}, not v{expected}; "
            "run it again"
        )
    current = state.holder
    outside = state.outside_record(actor, at)
    undone = outside or Promotion.from_version(state.versions[current])
    seq = outside.seq + 1 if outside else state.next_seq()
    new = Promotion(
        target, seq, at, actor, reason or f"rollback from v{current}", "rollback", previous=current
    )
    return RollbackPlan(outside, replace(undone, rolled_back_at=at), new)
