"""The reference profile of a model version: its training population, kept with the version,
so that monitoring compares traffic to it without any training data at run time.

A profile holds one ``Distribution`` per feature and one for the score (the model's
probability of default), all computed on the version's full training split, plus the decision
threshold. A ``Distribution`` is:

- **bins**: cut points ``edges`` (increasing) at the deciles of the non-missing values. The
  k-th decile is the smallest value ``v`` with at least k/10 of the non-missing rows ``<= v``
  (exact, in integer arithmetic). Bins are right-closed: bin 0 is ``(-inf, edges[0]]``,
  bin i is ``(edges[i-1], edges[i]]``, the last is ``(edges[-1], +inf)``; the outer bins are
  open so that every value, even one far outside the training range, falls in a bin. Equal
  deciles collapse into one cut, and a cut at the maximum is dropped (the bin above it would
  be empty): **count features get fewer than 10 bins**. ``NumberOfTimes90DaysLate``, zero for
  ~95 % of applicants, has the two bins "0" and "more than 0". Every bin holds at least one
  reference row. After the bins comes the **missing bin** (NaN values).
- **counts** per bin and in the missing bin; ``min`` and ``max`` of the non-missing values
  (a window's values outside them are its out-of-range share).
- **the exact empirical distribution**: every distinct non-missing value with its count, so
  that the two-sample Kolmogorov-Smirnov statistic against the training split is exact
  (``monitoring.drift.ks_statistic`` equals ``scipy.stats.ks_2samp(window, training).statistic``).

Stored as two files (``save``/``load``): ``reference.json``, readable, versioned
(``format_version``), with the bins, counts, rates, threshold, ``source`` (``"training split"``
or a reconstruction) and provenance; and ``reference_values.parquet``, the exact distributions
in long form (``column``, ``value``, ``count``; the score's column is ``probability``), a few
MB for the ~96,000-row real training split where JSON would take several times that.
Loading checks that the two agree: the bin counts and extremes recomputed from the values
must equal the JSON's.

Invariants of a ``Distribution``: ``values`` strictly increasing and finite; every count
positive; ``counts == bin_counts(values repeated by their counts)``; ``sum(counts) +
missing == rows``. The score has no missing values; the training mean probability, positive
rate at the threshold and mean entropy are derived from its values.

Versions trained before profiles existed get one from what their runs logged
(``reconstruct_profile``): the 5,000-row training sample and the held-out rows with their
probabilities, marked ``source: "reconstructed ..."``.

Training makes the profile and monitoring reads it: this module is the contract between the
two, and imports numpy, pandas and ``model`` only, so that monitoring can import it without
the rest of training.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.identity import utc_timestamp
from model.schema import FEATURES, OUTPUT_PROBABILITY

FORMAT = "credit-risk-reference-profile"
FORMAT_VERSION = 1
# Where a version's profile lives among its training run's artifacts (training writes it
# there, ``monitoring.store`` reads it back).
ARTIFACT_DIR = "monitoring"
PROFILE_FILE = "reference.json"
VALUES_FILE = "reference_values.parquet"
SCORE = OUTPUT_PROBABILITY  # the score's column name in the values table
DECILES = 10

SOURCE_TRAINING_SPLIT = "training split"
SOURCE_RECONSTRUCTED = "reconstructed from the logged training sample and held-out rows"


class ProfileError(ValueError):
    """A profile that cannot be built or read; the message says what is wrong."""


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """``-p log2 p - (1-p) log2 (1-p)`` in bits: 1 for p = 0.5 (no confidence), 0 for p in {0, 1}."""
    p = np.asarray(probability, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -p * np.log2(p) - (1 - p) * np.log2(1 - p)
    return np.where((p <= 0) | (p >= 1), 0.0, terms)


def decile_edges(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cut points at the deciles of a distribution given as distinct increasing ``values`` and
    their ``counts``: the smallest values with at least 1/10, ..., 9/10 of the rows at or
    below them, duplicates collapsed, a cut at the maximum dropped."""
    if len(values) == 0:
        return np.empty(0, dtype=np.float64)
    cumulative = np.cumsum(counts, dtype=np.int64)
    k = np.arange(1, DECILES, dtype=np.int64)
    positions = np.searchsorted(DECILES * cumulative, k * cumulative[-1], side="left")
    cuts = np.unique(values[positions])
    return cuts[cuts < values[-1]]


def bin_counts(edges: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows per right-closed bin of ``values`` (non-missing) seen ``counts`` times each."""
    bins = np.searchsorted(edges, values, side="left")
    return np.bincount(bins, weights=counts, minlength=len(edges) + 1).astype(np.int64)


def bin_labels(edges: np.ndarray) -> list[str]:
    """Readable names of the bins and of the missing bin, in order."""
    if len(edges) == 0:
        return ["all values", "missing"]
    text = [f"{edge:.4g}" for edge in edges]
    middle = [f"({low}, {high}]" for low, high in itertools.pairwise(text)]
    return [f"<= {text[0]}", *middle, f"> {text[-1]}", "missing"]


@dataclass(frozen=True, eq=False)
class Distribution:
    """One column of the reference: its decile bins and its exact empirical distribution."""

    edges: np.ndarray  # float64 cut points; len(edges) + 1 bins
    counts: np.ndarray  # int64 rows per bin
    missing: int
    values: np.ndarray  # float64 distinct non-missing values, increasing
    value_counts: np.ndarray  # int64 rows per distinct value

    @classmethod
    def of(cls, column: np.ndarray) -> Distribution:
        """The distribution of a float64 column (NaN for missing)."""
        column = np.asarray(column, dtype=np.float64)
        present = column[~np.isnan(column)]
        if np.isinf(present).any():
            raise ProfileError("values must be finite or missing (NaN), got an infinite value")
        values, value_counts = np.unique(present, return_counts=True)
        value_counts = value_counts.astype(np.int64)
        edges = decile_edges(values, value_counts)
        counts = bin_counts(edges, values, value_counts)
        return cls(edges, counts, len(column) - len(present), values, value_counts)

    @property
    def present(self) -> int:
        return int(self.counts.sum())

    @property
    def rows(self) -> int:
        return self.present + self.missing

    @property
    def minimum(self) -> float:
        return float(self.values[0]) if len(self.values) else float("nan")

    @property
    def maximum(self) -> float:
        return float(self.values[-1]) if len(self.values) else float("nan")

    @property
    def missing_rate(self) -> float:
        return self.missing / self.rows if self.rows else float("nan")

    def bin_counts(self, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Rows per bin (missing bin excluded) of non-missing ``values`` seen ``counts`` times."""
        return bin_counts(self.edges, values, counts)

    def reference_counts(self) -> np.ndarray:
        """This distribution's own rows per bin, the missing bin last."""
        return np.append(self.counts, self.missing)

    def mean(self) -> float:
        return float(self.values @ self.value_counts / self.present) if self.present else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "missing": int(self.missing),
            "rows": self.rows,
            "missing_rate": self.missing_rate,
            "min": None if not len(self.values) else self.minimum,
            "max": None if not len(self.values) else self.maximum,
            "distinct_values": len(self.values),
        }

    @classmethod
    def from_parts(cls, name: str, data: Mapping[str, Any], values: np.ndarray, value_counts: np.ndarray):
        """Rebuild from the JSON part and the exact values, refusing any disagreement."""
        try:
            edges = np.asarray(data["edges"], dtype=np.float64)
            counts = np.asarray(data["counts"], dtype=np.int64)
            missing = int(data["missing"])
        except (KeyError, TypeError, ValueError) as error:
            raise ProfileError(f"{name}: malformed bins in the profile ({error})") from error
        distribution = cls(edges, counts, missing, values, value_counts)
        distribution._check(name, data)
        return distribution

    def _check(self, name: str, data: Mapping[str, Any]) -> None:
        if len(self.values) and (
            not np.all(np.isfinite(self.values))
            or np.any(np.diff(self.values) <= 0)
            or np.any(self.value_counts <= 0)
        ):
            raise ProfileError(f"{name}: the exact values must be finite, increasing, with positive counts")
        if len(self.counts) != len(self.edges) + 1 or np.any(np.diff(self.edges) <= 0):
            raise ProfileError(f"{name}: expected increasing edges and one count more than edges")
        recount = bin_counts(self.edges, self.values, self.value_counts)
        extremes = (data.get("min"), data.get("max"))
        own = (None, None) if not len(self.values) else (self.minimum, self.maximum)
        if not np.array_equal(recount, self.counts) or extremes != own or self.missing < 0:
            raise ProfileError(
                f"{name}: the bins in {PROFILE_FILE} do not match the values in {VALUES_FILE} "
                "(files from two different profiles?)"
            )


@dataclass(frozen=True, eq=False)
class ReferenceProfile:
    """A model version's reference: features and score as distributions, and its threshold."""

    features: Mapping[str, Distribution]  # in FEATURES order
    score: Distribution
    threshold: float
    source: str = SOURCE_TRAINING_SPLIT
    provenance: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_timestamp)

    @property
    def rows(self) -> int:
        return self.score.rows

    @property
    def mean_probability(self) -> float:
        return self.score.mean()

    @property
    def positive_rate(self) -> float:
        """Share of reference rows the model predicts 1 at its threshold (probability >= it)."""
        above = self.score.values >= self.threshold
        return float(self.score.value_counts[above].sum() / self.score.present)

    @property
    def mean_entropy(self) -> float:
        return float(binary_entropy(self.score.values) @ self.score.value_counts / self.score.present)

    @property
    def reconstructed(self) -> bool:
        return self.source != SOURCE_TRAINING_SPLIT

    # -- the two files ------------------------------------------------------------------------

    def to_json(self) -> str:
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "created_at": self.created_at,
            "provenance": dict(self.provenance),
            "bins": "right-closed, cut at the deciles of the non-missing values (duplicates "
            "collapsed, outer bins open), then a missing bin",
            "threshold": self.threshold,
            "rows": self.rows,
            "score": {
                **self.score.to_dict(),
                "mean_probability": self.mean_probability,
                "positive_rate": self.positive_rate,
                "mean_entropy": self.mean_entropy,
            },
            "features": {name: distribution.to_dict() for name, distribution in self.features.items()},
            "values_file": VALUES_FILE,
        }
        return json.dumps(document, indent=1, allow_nan=False)

    def values_table(self) -> pd.DataFrame:
        """The exact distributions in long form: ``column``, ``value``, ``count``."""
        parts = [*self.features.items(), (SCORE, self.score)]
        return pd.DataFrame(
            {
                "column": np.repeat([name for name, _ in parts], [len(d.values) for _, d in parts]),
                "value": np.concatenate([d.values for _, d in parts]),
                "count": np.concatenate([d.value_counts for _, d in parts]),
            }
        )

    @classmethod
    def from_json(cls, text: str, values: pd.DataFrame) -> ReferenceProfile:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ProfileError(f"{PROFILE_FILE} is not JSON: {error}") from error
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ProfileError(f"{PROFILE_FILE} is not a {FORMAT} document")
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise ProfileError(
                f"{PROFILE_FILE} has format_version {version!r}; this code reads {FORMAT_VERSION}"
            )
        exact = _exact_values(values)
        missing = [name for name in FEATURES if name not in document.get("features", {})]
        if missing:
            raise ProfileError(f"{PROFILE_FILE} has no bins for {missing}")

        def part(name: str, data: Mapping[str, Any]) -> Distribution:
            return Distribution.from_parts(name, data, *exact.get(name, (np.empty(0), np.empty(0, np.int64))))

        return cls(
            features={name: part(name, document["features"][name]) for name in FEATURES},
            score=part(SCORE, document["score"]),
            threshold=float(document["threshold"]),
            source=str(document["source"]),
            provenance=document.get("provenance", {}),
            created_at=str(document.get("created_at", "")),
        )

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``reference.json`` and ``reference_values.parquet`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        profile_path, values_path = directory / PROFILE_FILE, directory / VALUES_FILE
        profile_path.write_text(self.to_json())
        self.values_table().to_parquet(values_path, index=False)
        return profile_path, values_path

    @classmethod
    def load(cls, directory: Path) -> ReferenceProfile:
        profile_path, values_path = directory / PROFILE_FILE, directory / VALUES_FILE
        for path in (profile_path, values_path):
            if not path.is_file():
                raise ProfileError(f"{path} is missing")
        return cls.from_json(profile_path.read_text(), pd.read_parquet(values_path))


def _exact_values(values: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    absent = {"column", "value", "count"} - set(values.columns)
    if absent:
        raise ProfileError(f"{VALUES_FILE} lacks column(s) {sorted(absent)}")
    column = values["column"].to_numpy(dtype=object)
    value = values["value"].to_numpy(dtype=np.float64)
    count = values["count"].to_numpy(dtype=np.int64)
    return {name: (value[column == name], count[column == name]) for name in pd.unique(column)}


def _as_float_matrix(features: pd.DataFrame) -> dict[str, np.ndarray]:
    absent = [name for name in FEATURES if name not in features.columns]
    if absent:
        raise ProfileError(f"the features lack column(s) {absent}")
    return {name: features[name].to_numpy(dtype=np.float64, na_value=np.nan) for name in FEATURES}


def _checked_probability(probability: np.ndarray, rows: int) -> np.ndarray:
    probability = np.asarray(probability, dtype=np.float64)
    if probability.ndim != 1 or len(probability) != rows:
        raise ProfileError(f"expected {rows} probabilities (one per row), got shape {probability.shape}")
    if not np.all((probability >= 0) & (probability <= 1)):  # also refuses NaN
        raise ProfileError("probabilities must be numbers in [0, 1]")
    return probability


def build_profile(
    features: pd.DataFrame,
    probability: np.ndarray,
    threshold: float,
    *,
    source: str = SOURCE_TRAINING_SPLIT,
    provenance: Mapping[str, Any] | None = None,
) -> ReferenceProfile:
    """The profile of ``features`` (a frame with the ten ``FEATURES`` columns, NaN for
    missing; other columns are ignored) and the model's ``probability`` on the same rows, with
    the model's decision ``threshold``. At training: the full training split."""
    if not len(features):
        raise ProfileError("no rows to profile")
    if not (np.isfinite(threshold) and 0 <= threshold <= 1):
        raise ProfileError(f"the threshold must be in [0, 1], got {threshold!r}")
    columns = _as_float_matrix(features)
    probability = _checked_probability(probability, len(features))
    return ReferenceProfile(
        features={name: Distribution.of(column) for name, column in columns.items()},
        score=Distribution.of(probability),
        threshold=float(threshold),
        source=source,
        provenance={"rows": len(features), **(provenance or {})},
    )


def reconstruct_profile(
    training_sample: pd.DataFrame,
    sample_probability: np.ndarray,
    held_out: pd.DataFrame,
    threshold: float,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> ReferenceProfile:
    """A profile for a version trained before profiles existed, from what its run logged:
    ``reference/training_sample.parquet`` (training rows, no probabilities: the caller scores
    them with the version, ``sample_probability``) and ``evaluation/held_out.parquet`` (held-out
    rows with their ``probability`` column).

    Both sets are rows of the same file, split by a hash of their content, so both are draws
    from the training population; together (5,000 + ~24,000 rows on the real data) they give
    steadier deciles than the sample alone. The scores mix in-sample (sample) and out-of-sample
    (held-out) probabilities. Marked ``source: SOURCE_RECONSTRUCTED`` with the row counts.
    """
    if OUTPUT_PROBABILITY not in held_out.columns:
        raise ProfileError(f"the held-out rows lack their '{OUTPUT_PROBABILITY}' column")
    rows = pd.concat([training_sample[list(FEATURES)], held_out[list(FEATURES)]], ignore_index=True)
    probability = np.concatenate(
        [
            _checked_probability(sample_probability, len(training_sample)),
            held_out[OUTPUT_PROBABILITY].to_numpy(dtype=np.float64),
        ]
    )
    return build_profile(
        rows,
        probability,
        threshold,
        source=SOURCE_RECONSTRUCTED,
        provenance={
            "training_sample_rows": len(training_sample),
            "held_out_rows": len(held_out),
            **(provenance or {}),
        },
    )
