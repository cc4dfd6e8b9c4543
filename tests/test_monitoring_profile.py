"""The reference profile: decile bins checked against numpy's own quantiles, the files' round
trip, mismatched or newer files refused, reconstruction marked as such."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from model.schema import FEATURES
from training.data import load_training_data
from training.profile import (
    FORMAT_VERSION,
    PROFILE_FILE,
    SOURCE_RECONSTRUCTED,
    SOURCE_TRAINING_SPLIT,
    VALUES_FILE,
    Distribution,
    ProfileError,
    ReferenceProfile,
    binary_entropy,
    build_profile,
    reconstruct_profile,
)


@pytest.fixture(scope="module")
def sample(sample_path):
    return load_training_data(sample_path)


@pytest.fixture(scope="module")
def probability(sample):
    return np.random.default_rng(3).beta(1, 12, size=len(sample.features))


def numpy_edges(values: np.ndarray) -> np.ndarray:
    """The rule, written with numpy's inverted-CDF quantile (the smallest value with at least
    that share of rows at or below it)."""
    present = values[~np.isnan(values)]
    cuts = np.unique(np.quantile(present, np.arange(1, 10) / 10, method="inverted_cdf"))
    return cuts[cuts < present.max()]


def test_edges_are_the_deciles_of_the_non_missing_values_for_every_feature(sample, probability):
    profile = build_profile(sample.features, probability, 0.2)
    for name in FEATURES:
        column = sample.features[name].to_numpy(dtype=np.float64)
        distribution = profile.features[name]
        np.testing.assert_array_equal(distribution.edges, numpy_edges(column), err_msg=name)
        # Right-closed bins: counts as pandas' cut counts them.
        present = column[~np.isnan(column)]
        bins = pd.cut(present, [-np.inf, *distribution.edges, np.inf], right=True)
        np.testing.assert_array_equal(
            distribution.counts, pd.Series(bins).value_counts(sort=False).to_numpy()
        )
        assert distribution.missing == int(np.isnan(column).sum())
        assert (distribution.minimum, distribution.maximum) == (present.min(), present.max())
        assert np.all(distribution.counts > 0), f"{name}: every reference bin holds rows"
    np.testing.assert_array_equal(profile.score.edges, numpy_edges(probability))
    assert profile.score.missing == 0


def test_count_features_get_fewer_bins():
    # 95 zeros and 5 ones: every decile is 0, so one cut, "0" and "more than 0".
    distribution = Distribution.of(np.array([0.0] * 95 + [1.0] * 5))
    np.testing.assert_array_equal(distribution.edges, [0.0])
    np.testing.assert_array_equal(distribution.counts, [95, 5])
    # 1..20: cuts at 2, 4, ..., 18, two rows per bin.
    distribution = Distribution.of(np.arange(1.0, 21.0))
    np.testing.assert_array_equal(distribution.edges, np.arange(2.0, 19.0, 2.0))
    np.testing.assert_array_equal(distribution.counts, [2] * 10)
    # A constant column has one bin; an all-missing one only the missing bin.
    assert len(Distribution.of(np.full(10, 7.0)).edges) == 0
    empty = Distribution.of(np.full(4, np.nan))
    assert (len(empty.edges), empty.missing, empty.present) == (0, 4, 0)


def test_summary_figures_of_the_score(sample, probability):
    profile = build_profile(sample.features, probability, 0.2)
    assert profile.mean_probability == pytest.approx(probability.mean(), abs=1e-12)
    assert profile.positive_rate == pytest.approx(np.mean(probability >= 0.2), abs=1e-15)
    entropy = -(probability * np.log2(probability) + (1 - probability) * np.log2(1 - probability))
    assert profile.mean_entropy == pytest.approx(entropy.mean(), abs=1e-12)
    np.testing.assert_array_equal(binary_entropy(np.array([0.0, 0.5, 1.0])), [0.0, 1.0, 0.0])


def test_the_two_files_round_trip_exactly(sample, probability, tmp_path):
    profile = build_profile(sample.features, probability, 0.2, provenance={"dataset_hash": "abc"})
    profile.save(tmp_path)
    document = json.loads((tmp_path / PROFILE_FILE).read_text())
    assert document["source"] == SOURCE_TRAINING_SPLIT
    assert document["format_version"] == FORMAT_VERSION
    assert document["provenance"] == {"rows": len(sample.features), "dataset_hash": "abc"}
    assert document["features"]["MonthlyIncome"]["missing"] == int(
        sample.features["MonthlyIncome"].isna().sum()
    )
    back = ReferenceProfile.load(tmp_path)
    for name in FEATURES:
        for part in ("edges", "counts", "values", "value_counts"):
            np.testing.assert_array_equal(
                getattr(back.features[name], part), getattr(profile.features[name], part)
            )
    np.testing.assert_array_equal(back.score.values, np.unique(probability))
    assert (back.threshold, back.source, back.created_at) == (0.2, profile.source, profile.created_at)


def test_a_values_file_from_another_profile_is_refused(sample, probability, tmp_path):
    build_profile(sample.features, probability, 0.2).save(tmp_path / "a")
    other = sample.features.iloc[: len(sample.features) // 2]
    build_profile(other, probability[: len(other)], 0.2).save(tmp_path / "b")
    (tmp_path / "b" / VALUES_FILE).replace(tmp_path / "a" / VALUES_FILE)
    with pytest.raises(ProfileError, match="do not match the values"):
        ReferenceProfile.load(tmp_path / "a")


def test_a_newer_format_or_a_missing_file_is_refused(sample, probability, tmp_path):
    profile = build_profile(sample.features, probability, 0.2)
    profile.save(tmp_path)
    document = json.loads((tmp_path / PROFILE_FILE).read_text())
    document["format_version"] = FORMAT_VERSION + 1
    (tmp_path / PROFILE_FILE).write_text(json.dumps(document))
    with pytest.raises(ProfileError, match="format_version 2; this code reads 1"):
        ReferenceProfile.load(tmp_path)
    (tmp_path / VALUES_FILE).unlink()
    with pytest.raises(ProfileError, match=f"{VALUES_FILE} is missing"):
        ReferenceProfile.load(tmp_path)


def test_bad_inputs_are_refused(sample, probability):
    with pytest.raises(ProfileError, match=r"lack column\(s\) \['age'\]"):
        build_profile(sample.features.drop(columns="age"), probability, 0.2)
    with pytest.raises(ProfileError, match="in \\[0, 1\\]"):
        build_profile(sample.features, np.where(probability > 0.5, np.nan, probability), 0.2)
    with pytest.raises(ProfileError, match="expected 5000 probabilities"):
        build_profile(sample.features, probability[:10], 0.2)
    with pytest.raises(ProfileError, match="threshold"):
        build_profile(sample.features, probability, 1.5)


def test_a_reconstructed_profile_says_so_and_uses_both_logged_sets(sample, probability):
    held = sample.features.iloc[4000:].assign(probability=probability[4000:])
    profile = reconstruct_profile(sample.features.iloc[:4000], probability[:4000], held, 0.2)
    assert profile.source == SOURCE_RECONSTRUCTED and profile.reconstructed
    assert profile.provenance == {"rows": 5000, "training_sample_rows": 4000, "held_out_rows": 1000}
    whole = build_profile(sample.features, probability, 0.2)
    for name in FEATURES:
        np.testing.assert_array_equal(profile.features[name].counts, whole.features[name].counts)
    np.testing.assert_array_equal(profile.score.values, whole.score.values)
