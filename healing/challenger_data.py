"""The challenger's training data: the original training file plus the labelled production
rows, minus an out-of-time holdout, written as a training file in the Kaggle layout.

**Labelled production rows** (``labelled_rows``): inference records joined to their outcomes
on ``(request_id, row_index)`` (``monitoring.performance.join_outcomes``), records of any
version, scored within ``[data] lookback_days`` before the attempt; the features are the ones
the model received, so a shift in units is learnt as it arrives. A key that labels two records
with different features (a client that reused a request id) cannot say which application it
names: its records are left out, and counted. Two records of one key with the same features
(a retried request) count once.

**The out-of-time holdout** (``build``): of the labelled rows, oldest first (record time, then
request id and row), the most recent ``[gate] recent_share`` are the recent rows on which the
gate compares the challenger with Production. Never in the challenger's training file; rows
Production trained on (when it is itself a challenger: its ``heal/production_rows.parquet``)
and rows whose content is in the original file (both models may have trained on them) are
not eligible, so the recent rows are rows neither model saw. A labelled row with the content
of a recent row is not trained on either.

**The training file**: the original file's rows as they were read, then each remaining
labelled production row ``[data] production_weight`` times (integer replication; why not
sample weights: ``docs/healing.md``). Columns and format as Kaggle publishes
``cs-training.csv``: an unnamed row-id column, ``SeriousDlqin2yrs``, the ten features, ``NA``
for missing; floats in Python's shortest round-trip form, so every original row reads back
bit for bit (its content digest, hence its side of the content split, is unchanged).

Invariants: the recent rows and the production training rows share no record key and no
content; ``NotEnoughRows`` is raised, before anything is written, when the holdout or the new
training rows fall below the policy's minimums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.identity import utc_timestamp
from model.schema import COUNTS, FEATURES, TARGET
from monitoring.performance import join_outcomes
from training.data import TrainingData
from training.split import fingerprint, row_digests

KEY = ["request_id", "row_index"]
RECORD_COLUMNS = ["request_id", "row_index", "timestamp", "model_version", *FEATURES]


class NotEnoughRows(ValueError):
    """Too few labelled rows to train a challenger or to judge it fairly; nothing was written."""


@dataclass(frozen=True, eq=False)
class LabelledRows:
    """Labelled production rows, oldest first: ``RECORD_COLUMNS`` and ``TARGET``."""

    frame: pd.DataFrame
    ambiguous_keys: int  # keys whose records disagree on the features: left out

    def __len__(self) -> int:
        return len(self.frame)


def labelled_rows(records: pd.DataFrame, outcomes: pd.DataFrame) -> LabelledRows:
    """The ``records`` (as ``read_records`` returns them, oldest first) whose outcome is known."""
    if not len(records) or not len(outcomes):
        return LabelledRows(pd.DataFrame(columns=[*RECORD_COLUMNS, TARGET]), 0)
    outcome = join_outcomes(records, outcomes)
    known = records.loc[~np.isnan(outcome), RECORD_COLUMNS].assign(**{TARGET: outcome[~np.isnan(outcome)]})
    known = known.assign(
        request_id=known["request_id"].astype(str),
        row_index=known["row_index"].astype("int64"),
        **{TARGET: known[TARGET].astype("int64")},
    ).reset_index(drop=True)
    digests = np.array(row_digests(known[list(FEATURES)], known[TARGET]), dtype=object)
    keyed = known.assign(_digest=digests)
    contents = keyed.groupby(KEY)["_digest"].nunique()
    ambiguous = contents[contents > 1].index
    if len(ambiguous):
        keyed = keyed[~keyed.set_index(KEY).index.isin(ambiguous)]
    keyed = keyed.drop_duplicates(KEY, keep="first").drop(columns="_digest").reset_index(drop=True)
    return LabelledRows(keyed, len(ambiguous))


@dataclass(frozen=True, eq=False)
class ChallengerData:
    """What the challenger trains on and what it is judged on."""

    original: TrainingData
    production: pd.DataFrame  # labelled rows it trains on, once each (RECORD_COLUMNS, TARGET)
    recent: pd.DataFrame  # the out-of-time holdout (RECORD_COLUMNS, TARGET), oldest first
    weight: int
    left_out: dict[str, int]  # labelled rows neither trained on nor held out, by reason

    @property
    def training(self) -> pd.DataFrame:
        """The training file's rows: ``TARGET`` then ``FEATURES``, original rows first."""
        columns = [TARGET, *FEATURES]
        original = self.original.features.assign(**{TARGET: self.original.target})[columns]
        production = self.production[columns]
        return pd.concat([original, *([production] * self.weight)], ignore_index=True)

    def lineage(self) -> dict[str, Any]:
        """Counts, time spans and fingerprints, for the runs' tags and ``heal/lineage.json``."""

        def span(frame: pd.DataFrame) -> dict[str, Any]:
            if not len(frame):
                return {"rows": 0}
            stamps = pd.DatetimeIndex(frame["timestamp"])
            return {
                "rows": len(frame),
                "defaults": int(frame[TARGET].sum()),
                "first_record_at": utc_timestamp(stamps.min()),
                "last_record_at": utc_timestamp(stamps.max()),
                "fingerprint": fingerprint(row_digests(frame[list(FEATURES)], frame[TARGET])),
                "model_versions": sorted(frame["model_version"].astype(str).unique().tolist()),
            }

        return {
            "original": {
                "path": str(self.original.path),
                "sha256": self.original.fingerprint.sha256,
                "rows": self.original.fingerprint.rows,
            },
            "production": span(self.production),
            "production_weight": self.weight,
            "recent": span(self.recent),
            "left_out": dict(self.left_out),
            "training_rows": len(self.original.target) + self.weight * len(self.production),
        }


def _content_in(frame: pd.DataFrame, digests: set[bytes]) -> np.ndarray:
    mine = row_digests(frame[list(FEATURES)], frame[TARGET])
    return np.fromiter((d in digests for d in mine), dtype=bool, count=len(mine))


def _keys_in(frame: pd.DataFrame, keys: pd.DataFrame | None) -> np.ndarray:
    if keys is None or not len(keys) or not len(frame):
        return np.zeros(len(frame), dtype=bool)
    known = pd.MultiIndex.from_arrays([keys["request_id"].astype(str), keys["row_index"].astype("int64")])
    return pd.MultiIndex.from_arrays([frame["request_id"], frame["row_index"]]).isin(known)


def build(
    original: TrainingData,
    labelled: LabelledRows,
    data_policy,
    gate_policy,
    production_trained: pd.DataFrame | None = None,
) -> ChallengerData:
    """Split ``labelled`` into the recent rows and the production training rows (see the
    module's docstring); ``production_trained`` holds the keys (``request_id``, ``row_index``)
    of labelled rows Production itself trained on. ``NotEnoughRows`` when either part is
    below the policy's minimums."""
    rows = labelled.frame
    original_digests = set(row_digests(original.features, original.target))
    seen_by_production = _keys_in(rows, production_trained)
    in_original = _content_in(rows, original_digests) if len(rows) else np.zeros(0, dtype=bool)
    eligible = ~seen_by_production & ~in_original
    wanted = math.ceil(gate_policy.recent_share * len(rows))
    positions = np.flatnonzero(eligible)[-wanted:] if wanted else np.empty(0, dtype=int)
    is_recent = np.zeros(len(rows), dtype=bool)
    is_recent[positions] = True
    recent = rows[is_recent].reset_index(drop=True)
    recent_digests = set(row_digests(recent[list(FEATURES)], recent[TARGET])) if len(recent) else set()
    same_as_recent = ~is_recent & (_content_in(rows, recent_digests) if len(rows) else is_recent)
    production = rows[~is_recent & ~same_as_recent].reset_index(drop=True)
    left_out = {
        "ambiguous_request_ids": labelled.ambiguous_keys,
        "same_content_as_a_recent_row": int(same_as_recent.sum()),
    }
    _check_recent(recent, len(rows), gate_policy)
    if len(production) < data_policy.min_production_rows:
        raise NotEnoughRows(
            f"{len(production)} labelled production rows left to train on after the {len(recent)} recent rows "
            f"were held out; the policy needs at least {data_policy.min_production_rows} "
            "([data] min_production_rows)"
        )
    return ChallengerData(original, production, recent, data_policy.production_weight, left_out)


def _check_recent(recent: pd.DataFrame, labelled: int, gate_policy) -> None:
    defaults = int(recent[TARGET].sum()) if len(recent) else 0
    smaller_class = min(defaults, len(recent) - defaults)
    if len(recent) < gate_policy.min_recent_rows or smaller_class < gate_policy.min_recent_class_rows:
        raise NotEnoughRows(
            f"the out-of-time holdout would have {len(recent)} rows ({defaults} defaults) of {labelled} labelled "
            f"production rows; the gate needs at least {gate_policy.min_recent_rows} rows and "
            f"{gate_policy.min_recent_class_rows} of each outcome ([gate] recent_share, min_recent_rows, "
            "min_recent_class_rows): too few to judge a challenger fairly"
        )


def write_training_file(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` (``TARGET`` and ``FEATURES``) as Kaggle's ``cs-training.csv`` lays it out."""
    out = frame[[TARGET, *FEATURES]].copy()
    for name in COUNTS:  # whole numbers by the schema: written as Kaggle writes them
        out[name] = out[name].astype("Int64")
    out.index = pd.RangeIndex(1, len(out) + 1)
    out.to_csv(path, na_rep="NA", index=True, index_label="", lineterminator="\n")
    return path
