"""The content split: a row's side depends on its content only, never on file, order or seed."""

import numpy as np
import pandas as pd
import pytest

from model.schema import FEATURES
from training import split
from training.data import load_training_data


@pytest.fixture(scope="module")
def sample(sample_path):
    return load_training_data(sample_path)


def test_a_row_falls_on_the_same_side_in_any_file_and_order(sample):
    whole = split.ContentSplit.of(sample.features, sample.target, 0.2)
    order = np.random.default_rng(7).permutation(len(sample.target))[:3000]
    other = split.ContentSplit.of(
        sample.features.iloc[order].reset_index(drop=True),
        sample.target.iloc[order].reset_index(drop=True),
        0.2,
    )
    assert other.evaluation.tolist() == whole.evaluation[order].tolist()
    assert 0.15 < whole.evaluation.mean() < 0.25


def test_missing_values_and_negative_zero_hash_as_one_value():
    features = pd.DataFrame([[np.nan] * len(FEATURES), [0.0] * len(FEATURES)], columns=list(FEATURES))
    other_nan = features.copy()
    other_nan.iloc[0, 0] = np.float64(np.frombuffer(b"\x01\x00\x00\x00\x00\x00\xf8\x7f", dtype=np.float64)[0])
    other_nan.iloc[1, 3] = -0.0
    target = pd.Series([0, 1])
    assert split.row_digests(features, target) == split.row_digests(other_nan, target)
    assert split.row_digests(features, target) != split.row_digests(features, pd.Series([1, 1]))


def test_a_smaller_share_holds_out_a_subset_and_the_fingerprint_ignores_order(sample):
    digests = split.row_digests(sample.features, sample.target)
    small, large = split.held_out(digests, 0.1), split.held_out(digests, 0.3)
    assert small.any() and not (small & ~large).any()
    assert split.fingerprint(digests) == split.fingerprint(list(reversed(digests)))
    assert split.fingerprint(digests) != split.fingerprint(digests[1:])


def test_the_split_record_says_when_rows_are_not_comparable():
    assert "predates the content split" in split.SplitRecord.from_tags({}).why_not_comparable()
    other_rule = split.SplitRecord.from_tags({split.RULE_TAG: "other", split.TEST_SHARE_TAG: "0.2"})
    assert "'other'" in other_rule.why_not_comparable()
    broken = split.SplitRecord.from_tags({split.RULE_TAG: split.RULE, split.TEST_SHARE_TAG: "x"})
    assert split.TEST_SHARE_TAG in broken.why_not_comparable()
    good = split.SplitRecord.from_tags({split.RULE_TAG: split.RULE, split.TEST_SHARE_TAG: "0.2"})
    assert good.why_not_comparable() is None and good.test_share == 0.2


def test_a_split_with_nothing_on_one_side_is_refused(sample):
    with pytest.raises(ValueError, match="no evaluation rows"):
        split.ContentSplit.of(sample.features.head(1), sample.target.head(1), 0.01)
