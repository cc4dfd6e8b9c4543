"""Which rows a model trains on and which it is evaluated on, decided by each row's content.

A row's side depends only on its bytes (the ten features and the label as float64, NaN and
-0.0 made canonical), never on the file, the row order or the seed: the same row falls on the
same side in every file any model is trained on. So the evaluation rows of one model are rows
no other model split with the same rule trained on, and the gate can compare two models on
rows neither of them saw, even when they were trained on different files.

Each row's BLAKE2b digest, read as a number in [0, 1), puts it in evaluation when it is below
the test share. Models split with a smaller share evaluate on a subset of the rows a larger
share holds out, so the rows held out by both are those below the smaller share.

The rule is recorded (``split.*`` tags on the run and the registered version) with the
evaluation set's fingerprint, so a version whose record is missing or names another rule is
known not to be comparable rather than guessed to be.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from model.schema import FEATURES

# Change the name whenever the rule changes: versions split by another rule are not comparable.
RULE = "row-content-blake2b-v1"
_DIGEST_BYTES = 16
_BUCKET_SCALE = 2**64  # the digest's first 8 bytes, as an unsigned integer, over this

RULE_TAG = "split.rule"
TEST_SHARE_TAG = "split.test_share"
EVALUATION_ROWS_TAG = "split.evaluation_rows"
EVALUATION_FINGERPRINT_TAG = "split.evaluation_fingerprint"


def row_digests(features: pd.DataFrame, target: pd.Series) -> list[bytes]:
    """One digest per row of its ten features (in ``FEATURES`` order) and label."""
    values = np.column_stack(
        [features.loc[:, list(FEATURES)].to_numpy(dtype=np.float64), target.to_numpy(dtype=np.float64)]
    )
    values[np.isnan(values)] = np.nan  # one bit pattern for every NaN
    values += 0.0  # -0.0 becomes 0.0
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=_DIGEST_BYTES).digest() for row in raw]


def held_out(digests: list[bytes], test_share: float) -> np.ndarray:
    """True for the rows this rule holds out for evaluation at ``test_share``."""
    if not 0 < test_share < 1:
        raise ValueError(f"test share must be between 0 and 1, got {test_share}")
    limit = int(test_share * _BUCKET_SCALE)
    return np.fromiter(
        (int.from_bytes(d[:8], "big") < limit for d in digests), dtype=bool, count=len(digests)
    )


def fingerprint(digests: list[bytes]) -> str:
    """SHA-256 of a set of rows' digests, sorted: the same rows give it in any order or file."""
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


@dataclass(frozen=True)
class ContentSplit:
    test_share: float
    digests: list[bytes]  # every row's, in the file's order
    evaluation: np.ndarray  # boolean mask of the held-out rows

    @classmethod
    def of(cls, features: pd.DataFrame, target: pd.Series, test_share: float) -> ContentSplit:
        digests = row_digests(features, target)
        evaluation = held_out(digests, test_share)
        if evaluation.all() or not evaluation.any():
            raise ValueError(
                f"a {test_share:.0%} content split of {len(digests)} rows leaves "
                f"{'no training' if evaluation.all() else 'no evaluation'} rows; use more rows"
            )
        return cls(test_share, digests, evaluation)

    @property
    def evaluation_digests(self) -> list[bytes]:
        return [d for d, held in zip(self.digests, self.evaluation, strict=True) if held]

    def tags(self) -> dict[str, str]:
        """The split record kept on the run and the registered version."""
        return {
            RULE_TAG: RULE,
            TEST_SHARE_TAG: repr(self.test_share),
            EVALUATION_ROWS_TAG: str(int(self.evaluation.sum())),
            EVALUATION_FINGERPRINT_TAG: fingerprint(self.evaluation_digests),
        }


@dataclass(frozen=True)
class SplitRecord:
    """What a registered version says about its split, read back from its tags."""

    rule: str | None
    test_share: float | None

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> SplitRecord:
        try:
            share = float(tags[TEST_SHARE_TAG])
        except (KeyError, ValueError):
            share = None
        return cls(tags.get(RULE_TAG), share)

    def why_not_comparable(self) -> str | None:
        """None when rows held out by this rule are known to be outside its training rows."""
        if self.rule is None:
            return (
                "it predates the content split (no split record), so it may have trained on any of these rows"
            )
        if self.rule != RULE:
            return f"it was split by rule {self.rule!r}, not {RULE!r}, so it may have trained on these rows"
        if self.test_share is None or not 0 < self.test_share < 1:
            return f"its split record has no valid {TEST_SHARE_TAG}"
        return None
