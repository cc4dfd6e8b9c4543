"""The promotion gate: a candidate replaces Production only when it serves exactly what was
trained and is not worse than Production on rows neither of them trained on.

1. The candidate is loaded back from the registry through ``model.verified``, the path
   serving uses: its files are checked against the integrity record this run has just
   written, then it scores its logged held-out rows twice, in slices small enough for the flat
   forest (as single requests are answered) and in one batch (scikit-learn's loop). Both
   must equal, bit for bit, the ``predict_proba`` training computed; a candidate that is
   refused, cannot load or answers differently is refused (``GateRefused``) and never promoted.
2. Production is loaded the same way (checked before anything of it is unpickled) and scored
   on the candidate's held-out rows that its own split also held out (``training.split``):
   rows neither model trained on. A Production that serving would refuse (no integrity
   record, changed files, other answers) is no yardstick: not comparable, as in 3.
3. When Production has no split record (it predates the content split) or another rule, no
   such rows are known: the gate says so (``gate.comparable=false`` and why) and promotes the
   servable candidate, since there is nothing fair to hold against it and a rollback undoes it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from model import scoring, verified
from model.identity import REGISTERED_MODEL_NAME, version_uri
from model.schema import TARGET
from model.scoring import served_probability
from training import registry, split
from training.promotion_history import PromotionError

ROWS_ARTIFACT = "gate/rows.parquet"


class GateRefused(PromotionError):
    """The candidate cannot be served as it was trained; it was not promoted."""


@dataclass(frozen=True)
class HeldOut:
    """The candidate's held-out rows and the probabilities training computed for them."""

    features: pd.DataFrame
    target: pd.Series
    digests: list[bytes]
    probability: np.ndarray


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    outcome: str  # "first", "passed", "rejected", "forced", "not-comparable" or "refused"
    reason: str
    candidate_score: float | None = None
    production_score: float | None = None
    production_version: str | None = None
    comparable: bool | None = None  # None: nothing to compare with
    rows: int | None = None
    rows_fingerprint: str | None = None

    def as_tags(self, prefix: str = "gate.") -> dict[str, str]:
        tags = {
            "decision": "promoted" if self.promote else "rejected",
            "outcome": self.outcome,
            "reason": self.reason,
            "metric": "roc_auc",
        }
        optional = {
            "candidate_roc_auc": None if self.candidate_score is None else f"{self.candidate_score:.6f}",
            "production_roc_auc": None if self.production_score is None else f"{self.production_score:.6f}",
            "production_version": self.production_version,
            "comparable": None if self.comparable is None else str(self.comparable).lower(),
            "rows": None if self.rows is None else str(self.rows),
            "rows_fingerprint": self.rows_fingerprint,
        }
        tags.update({key: value for key, value in optional.items() if value is not None})
        return {prefix + key: value for key, value in tags.items()}


def decide(
    candidate_score: float,
    production_score: float | None,
    production_version: str | None = None,
    tolerance: float = 0.0,
    force: bool = False,
    not_comparable: str | None = None,
) -> GateDecision:
    """Promote when there is no Production model, when Production cannot be compared fairly
    (``not_comparable`` says why), when forced, or when the candidate's ROC AUC is at least
    Production's minus ``tolerance`` on rows neither trained on."""
    common = dict(candidate_score=candidate_score, production_version=production_version)
    if production_version is None:
        return GateDecision(True, "first", "no model in Production yet", **common)
    if not_comparable is not None:
        reason = f"not compared with Production v{production_version}: {not_comparable}"
        return GateDecision(True, "not-comparable", reason, comparable=False, **common)
    common.update(production_score=production_score, comparable=True)
    comparison = (
        f"candidate ROC AUC {candidate_score:.4f} vs Production v{production_version} "
        f"{production_score:.4f} on held-out rows neither model trained on"
    )
    if candidate_score >= production_score - tolerance:
        return GateDecision(True, "passed", f"not worse: {comparison}", **common)
    if force:
        return GateDecision(True, "forced", f"worse but forced: {comparison}", **common)
    return GateDecision(False, "rejected", f"worse: {comparison}", **common)


def _load_served(
    version: str, verification: verified.VerificationSettings | None = None
) -> scoring.LoadedModel:
    """``version`` as serving loads it, checked first (``model.verified``); its folder is gone
    once it is loaded (the model is in memory)."""
    with verified.verified_version(REGISTERED_MODEL_NAME, version, settings=verification) as checked:
        return checked.model


def _candidate_probability(
    version: str, held_out: HeldOut, verification: verified.VerificationSettings | None = None
) -> np.ndarray:
    """The candidate's served answers; ``GateRefused`` unless they are training's, bit for bit."""
    return _checked_candidate(version, held_out, verification)[0]


def _checked_candidate(
    version: str, held_out: HeldOut, verification: verified.VerificationSettings | None = None
) -> tuple[np.ndarray, scoring.LoadedModel]:
    """The candidate's served answers on ``held_out`` and the candidate as serving loads it
    (``model.verified``); ``GateRefused`` unless the answers are training's, bit for bit."""
    uri = version_uri(version)
    try:
        with verified.verified_version(REGISTERED_MODEL_NAME, version, settings=verification) as checked:
            # Its logged held-out rows, answered exactly as logged (or it would be refused).
            served, model = checked.answers.probability, checked.model
    except Exception as error:  # whatever stops the gate here would stop serving it
        raise GateRefused(
            f"candidate v{version} cannot be served, so it is not promoted: loading {uri} as "
            f"serving does and scoring its held-out rows failed with {type(error).__name__}: {error}"
        ) from error
    if len(served) != len(held_out.probability):
        raise GateRefused(
            f"candidate v{version} is not promoted: its run logged {len(served)} held-out rows, "
            f"not the {len(held_out.probability)} the gate was given"
        )
    if served.tobytes() != held_out.probability.tobytes():
        differ = served != held_out.probability
        worst = float(np.nanmax(np.abs(served - held_out.probability)))
        raise GateRefused(
            f"candidate v{version} is not promoted: served from {uri} it answers {int(differ.sum())} "
            f"of {len(served)} held-out rows differently from training's predict_proba "
            f"(largest difference {worst:.3g})"
        )
    return served, model


def _comparison_rows(production: ModelVersion, held_out: HeldOut) -> tuple[np.ndarray | None, str | None]:
    """The held-out rows Production's own split also held out, or None and why there are none."""
    record = split.SplitRecord.from_tags(production.tags)
    if (why := record.why_not_comparable()) is not None:
        return None, f"v{production.version} {why}"
    rows = split.held_out(held_out.digests, record.test_share)
    if rows.sum() == 0 or held_out.target[rows].nunique() < 2:
        return None, f"fewer than two classes among the {int(rows.sum())} rows both splits held out"
    return rows, None


def _log_rows(client: MlflowClient, run_id: str, held_out: HeldOut, rows, candidate, production) -> None:
    """The rows the gate scored and both models' answers, kept with the candidate's run."""
    frame = held_out.features[rows].assign(**{TARGET: held_out.target[rows]})
    frame = frame.assign(candidate_probability=candidate[rows])
    if production is not None:
        frame = frame.assign(production_probability=production)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(ROWS_ARTIFACT).name
        frame.to_parquet(path)
        client.log_artifact(run_id, str(path), str(Path(ROWS_ARTIFACT).parent))


def _record(client: MlflowClient, version: str, run_id: str, decision: GateDecision) -> None:
    tags = decision.as_tags()
    registry.tag_version(client, version, tags)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _evaluate(
    client,
    version: str,
    run_id: str,
    held_out: HeldOut,
    tolerance: float,
    force: bool,
    verification: verified.VerificationSettings,
):
    candidate = _candidate_probability(version, held_out, verification)
    everything = np.ones(len(candidate), dtype=bool)
    production = registry.production_version(client)
    if production is None:
        _log_rows(client, run_id, held_out, everything, candidate, None)
        return _with_rows(decide(_roc_auc(held_out, everything, candidate), None), held_out, everything)
    rows, why = _comparison_rows(production, held_out)
    production_probability = None
    if rows is not None:
        try:
            production_probability = served_probability(
                _load_served(production.version, verification), held_out.features[rows]
            )
        except Exception as error:  # a Production that cannot be served is no yardstick
            why = (
                f"v{production.version} cannot be loaded and scored as serving does "
                f"({type(error).__name__}: {error})"
            )
    if production_probability is None:
        _log_rows(client, run_id, held_out, everything, candidate, None)
        decision = decide(
            _roc_auc(held_out, everything, candidate), None, production.version, not_comparable=why
        )
        return _with_rows(decision, held_out, everything)
    _log_rows(client, run_id, held_out, rows, candidate, production_probability)
    decision = decide(
        _roc_auc(held_out, rows, candidate),
        float(roc_auc_score(held_out.target[rows], production_probability)),
        production.version,
        tolerance=tolerance,
        force=force,
    )
    return _with_rows(decision, held_out, rows)


def _roc_auc(held_out: HeldOut, rows: np.ndarray, probability: np.ndarray) -> float:
    return float(roc_auc_score(held_out.target[rows], probability[rows]))


def _with_rows(decision: GateDecision, held_out: HeldOut, rows: np.ndarray) -> GateDecision:
    """The decision with the count and fingerprint of the rows it was made on."""
    fingerprint = split.fingerprint([d for d, keep in zip(held_out.digests, rows, strict=True) if keep])
    return replace(decision, rows=int(rows.sum()), rows_fingerprint=fingerprint)


def run(
    client: MlflowClient,
    version: str,
    run_id: str,
    held_out: HeldOut,
    *,
    actor: str | None = None,
    tolerance: float = 0.0,
    force: bool = False,
    verification: verified.VerificationSettings | None = None,
) -> GateDecision:
    """Check, compare and (maybe) promote registered ``version``, recording ``actor`` (default
    user@host) as who promoted it; the decision is tagged on the version and its run. Raises ``GateRefused``,
    after tagging, when it cannot be served. ``verification`` (default: from the environment,
    as serving reads it) names the training experiment and any unverified versions allowed."""
    verification = verification or verified.VerificationSettings()
    try:
        decision = _evaluate(client, version, run_id, held_out, tolerance, force, verification)
    except GateRefused as refusal:
        _record(client, version, run_id, GateDecision(False, "refused", str(refusal)))
        raise
    _record(client, version, run_id, decision)
    if decision.promote:
        registry.promote(client, version, actor=actor, reason=f"gate: {decision.reason}", source="gate")
    return decision


# --- the out-of-time gate of a challenger (healing) -------------------------------------------
#
# A challenger (``credit-risk heal``) trained on the original file plus labelled production
# rows is held against Production on two sets of rows that neither model trained on:
#
# - the **original** held-out rows: the challenger's held-out rows that come from the original
#   file and that Production's own split also held out (as the gate above compares);
# - the **recent** rows: the out-of-time holdout, the most recent labelled production rows,
#   kept out of the challenger's training file (``healing.challenger_data``) and never seen by
#   Production (which predates them, or, if it is itself a challenger, did not train on them).
#
# The rule: the challenger passes when its ROC AUC on the original rows is at least
# Production's minus ``tolerance`` (it has not forgotten the population it replaces), and its
# ROC AUC on the recent rows is above Production's plus ``margin`` (it is better where it
# matters now; a tie is not better: a change of model is a risk that a tie does not pay for).
# When Production has no comparable split record, the original rows cannot be compared: the
# decision then rests on the recent rows alone, and says so. A challenger that cannot be
# served as it was trained is refused before any comparison (``GateRefused``).

CHALLENGE_KIND = "out-of-time"
RECENT_ROWS_ARTIFACT = "gate/recent_rows.parquet"
PASSED, REJECTED, REFUSED = "passed", "rejected", "refused"


@dataclass(frozen=True)
class RecentRows:
    """The out-of-time rows: features, outcomes and (for the record) their record keys."""

    features: pd.DataFrame
    target: pd.Series
    keys: pd.DataFrame  # request_id, row_index, timestamp of each row's inference record

    def fingerprint(self) -> str:
        return split.fingerprint(split.row_digests(self.features, self.target))


@dataclass(frozen=True)
class Comparison:
    """Both models' ROC AUC on one set of rows."""

    candidate: float
    production: float | None  # None: Production could not be compared on these rows
    rows: int
    fingerprint: str
    defaults: int

    def tags(self, prefix: str) -> dict[str, str]:
        tags = {
            f"{prefix}candidate_roc_auc": f"{self.candidate:.6f}",
            f"{prefix}rows": str(self.rows),
            f"{prefix}rows_fingerprint": self.fingerprint,
            f"{prefix}defaults": str(self.defaults),
        }
        if self.production is not None:
            tags[f"{prefix}production_roc_auc"] = f"{self.production:.6f}"
        return tags


@dataclass(frozen=True)
class ChallengeDecision:
    passed: bool
    outcome: str  # PASSED, REJECTED or REFUSED
    reason: str
    production_version: str | None = None
    original: Comparison | None = None
    recent: Comparison | None = None
    tolerance: float = 0.0
    margin: float = 0.0
    comparable: bool | None = None  # whether the original rows could be compared

    def as_tags(self, prefix: str = "gate.") -> dict[str, str]:
        tags = {
            "kind": CHALLENGE_KIND,
            "decision": self.outcome,
            "outcome": self.outcome,
            "reason": self.reason,
            "metric": "roc_auc",
            "tolerance": repr(self.tolerance),
            "margin": repr(self.margin),
        }
        if self.production_version is not None:
            tags["production_version"] = self.production_version
        if self.comparable is not None:
            tags["comparable"] = str(self.comparable).lower()
        if self.original is not None:
            tags.update(self.original.tags(""))
        if self.recent is not None:
            tags.update(self.recent.tags("recent."))
        return {prefix + key: value for key, value in tags.items()}


def decide_challenge(
    original: Comparison | None,
    recent: Comparison,
    production_version: str,
    *,
    tolerance: float = 0.0,
    margin: float = 0.0,
    not_comparable: str | None = None,
) -> ChallengeDecision:
    """The out-of-time rule (see above). ``original`` is None, or has no Production score,
    when the original rows cannot be compared (``not_comparable`` says why)."""
    common = dict(
        production_version=production_version,
        original=original,
        recent=recent,
        tolerance=tolerance,
        margin=margin,
    )
    gain = recent.candidate - recent.production
    recent_text = (
        f"recent rows ({recent.rows}, {recent.defaults} defaults): challenger ROC AUC {recent.candidate:.4f} "
        f"vs Production v{production_version} {recent.production:.4f}"
    )
    better = gain > margin
    recent_verdict = (
        f"{'better' if better else 'not better'} on the {recent_text} (needs a gain above {margin:g})"
    )
    if original is None or original.production is None:
        why = not_comparable or "no original rows to compare on"
        reason = f"{recent_verdict}; original rows not compared: {why}"
        return ChallengeDecision(better, PASSED if better else REJECTED, reason, comparable=False, **common)
    kept = original.candidate >= original.production - tolerance
    original_verdict = (
        f"{'not worse' if kept else 'worse'} on the original held-out rows ({original.rows}): "
        f"{original.candidate:.4f} vs {original.production:.4f} (tolerance {tolerance:g})"
    )
    passed = better and kept
    reason = f"{recent_verdict}; {original_verdict}"
    return ChallengeDecision(passed, PASSED if passed else REJECTED, reason, comparable=True, **common)


def _comparison(target: pd.Series, digests: list[bytes], candidate, production) -> Comparison:
    target = np.asarray(target)
    return Comparison(
        candidate=float(roc_auc_score(target, candidate)),
        production=None if production is None else float(roc_auc_score(target, production)),
        rows=len(target),
        fingerprint=split.fingerprint(digests),
        defaults=int(np.sum(target == 1)),
    )


def _log_frame(client: MlflowClient, run_id: str, frame: pd.DataFrame, artifact: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(artifact).name
        frame.to_parquet(path)
        client.log_artifact(run_id, str(path), str(Path(artifact).parent))


def _original_comparison(
    production: ModelVersion,
    production_model: scoring.LoadedModel,
    held_out: HeldOut,
    original_digests: frozenset[bytes],
    candidate: np.ndarray,
) -> tuple[Comparison | None, pd.DataFrame | None, str | None]:
    """Both models on the candidate's held-out rows from the original file that Production's
    split also held out; or None and why not."""
    from_original = np.fromiter(
        (d in original_digests for d in held_out.digests), bool, len(held_out.digests)
    )
    rows, why = _comparison_rows(production, held_out)
    if rows is None:
        return None, None, why
    rows = rows & from_original
    target = held_out.target[rows]
    if target.nunique() < 2:
        return (
            None,
            None,
            f"fewer than two classes among the {int(rows.sum())} original rows both splits held out",
        )
    produced = served_probability(production_model, held_out.features[rows])
    digests = [d for d, keep in zip(held_out.digests, rows, strict=True) if keep]
    frame = held_out.features[rows].assign(
        **{TARGET: target}, candidate_probability=candidate[rows], production_probability=produced
    )
    return _comparison(target, digests, candidate[rows], produced), frame, None


def challenge(
    client: MlflowClient,
    version: str,
    run_id: str,
    held_out: HeldOut,
    original_digests: frozenset[bytes],
    recent: RecentRows,
    *,
    production: ModelVersion,
    tolerance: float = 0.0,
    margin: float = 0.0,
    verification: verified.VerificationSettings | None = None,
) -> ChallengeDecision:
    """Check the challenger ``version`` (trained in ``run_id``) as the gate does, then compare
    it with ``production`` on the original and the recent rows (both models scored as serving
    scores them). The decision, with both models' scores on both sets of rows, is tagged on
    the version and the run, and the rows compared are the run's ``gate/rows.parquet`` and
    ``gate/recent_rows.parquet``. Nothing is promoted here. ``GateRefused``, after tagging,
    when the challenger cannot be served as it was trained: both models load through
    ``model.verified``, as serving loads them (``verification``: default, the environment's)."""
    verification = verification or verified.VerificationSettings()
    try:
        candidate, loaded = _checked_candidate(version, held_out, verification)
        try:
            candidate_recent = served_probability(loaded, recent.features)
        except Exception as error:
            raise GateRefused(
                f"candidate v{version} cannot score the recent rows as serving would: {type(error).__name__}: {error}"
            ) from error
    except GateRefused as refusal:
        _record(client, version, run_id, ChallengeDecision(False, REFUSED, str(refusal)))
        raise
    # Production is the yardstick: one that cannot be loaded fails the attempt (nothing moves).
    production_model = _load_served(production.version, verification)
    production_recent = served_probability(production_model, recent.features)
    recent_digests = split.row_digests(recent.features, recent.target)
    recent_comparison = _comparison(recent.target, recent_digests, candidate_recent, production_recent)
    original, original_rows, why = _original_comparison(
        production, production_model, held_out, original_digests, candidate
    )
    decision = decide_challenge(
        original,
        recent_comparison,
        production.version,
        tolerance=tolerance,
        margin=margin,
        not_comparable=why,
    )
    if original_rows is not None:
        _log_frame(client, run_id, original_rows, ROWS_ARTIFACT)
    recent_frame = pd.concat(
        [recent.keys.reset_index(drop=True), recent.features.reset_index(drop=True)], axis=1
    ).assign(
        **{TARGET: np.asarray(recent.target)},
        candidate_probability=candidate_recent,
        production_probability=production_recent,
    )
    _log_frame(client, run_id, recent_frame, RECENT_ROWS_ARTIFACT)
    _record(client, version, run_id, decision)
    return decision
