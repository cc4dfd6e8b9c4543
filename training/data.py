"""Reading and checking the training file: the published Kaggle layout or the bundled sample.

Bad files are refused here, before anything reaches MLflow.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model.schema import FEATURES, TARGET, InvalidFeatures, validate_features

BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "cs-training-sample.csv"
_CHUNK = 1 << 20
_SNIFF_BYTES = 64 * 1024


class DataError(ValueError):
    """The training file cannot be used; the message says why."""


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    rows: int
    columns: int


@dataclass(frozen=True)
class TrainingData:
    path: Path
    features: pd.DataFrame
    target: pd.Series
    fingerprint: Fingerprint


def sha256_of_file(path: Path) -> str:
    """SHA-256 of the raw bytes, streamed: the same bytes give the same hash everywhere."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(path: Path) -> list[str]:
    with open(path, "rb") as stream:
        head = stream.read(_SNIFF_BYTES)
    if not head:
        raise DataError(f"{path}: the file is empty")
    if b"\x00" in head:
        raise DataError(f"{path}: not a CSV text file (it contains binary data)")
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        # A chunk boundary can split a multi-byte character; only the header line matters.
        text = head[: error.start].decode("utf-8-sig")
        if "\n" not in text:
            raise DataError(f"{path}: not a CSV text file (not UTF-8)") from None
    first_line = text.splitlines()[0] if text.strip() else ""
    if not first_line.strip():
        raise DataError(f"{path}: the file has no header line")
    return next(csv.reader([first_line]))


def _check_columns(path: Path, header: list[str]) -> bool:
    """Check the header; return whether the first column is the unnamed row id."""
    has_row_id = header[0].strip() == ""
    columns = header[1:] if has_row_id else header
    expected = [TARGET, *FEATURES]
    missing = [name for name in expected if name not in columns]
    extra = [name or "(unnamed)" for name in columns if name not in expected]
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    problems = []
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"unexpected columns {extra}")
    if duplicated:
        problems.append(f"duplicated columns {duplicated}")
    if problems:
        hint = "" if len(columns) > 1 else " (is it a CSV file with comma separators?)"
        raise DataError(f"{path}: {'; '.join(problems)}{hint}; expected {expected}")
    return has_row_id


def _check_field_counts(path: Path) -> None:
    """pandas silently pads short rows with NaN; a short row is a broken file, not missing data."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as stream:
        reader = csv.reader(stream)
        expected = len(next(reader, []))
        bad = [reader.line_num for row in reader if row and len(row) != expected]
    if bad:
        raise DataError(
            f"{path}: line(s) {bad[:5]}{' and more' if len(bad) > 5 else ''} do not have "
            f"{expected} fields like the header"
        )


def _check_target(path: Path, target: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(target, errors="coerce")
    bad = ~numeric.isin([0, 1])
    if bad.any():
        rows = target.index[bad][:5].tolist()
        example = target[bad].iloc[0]
        example = example.item() if hasattr(example, "item") else example
        raise DataError(f"{path}: {TARGET} must be 0 or 1, got {example!r} at row(s) {rows}")
    return numeric.astype("int64")


def load_training_data(path: str | Path) -> TrainingData:
    """Read, check and fingerprint a training file; raise ``DataError`` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    has_row_id = _check_columns(path, _read_header(path))
    _check_field_counts(path)
    try:
        frame = pd.read_csv(path, index_col=0 if has_row_id else None, na_values=["NA"])
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{path}: not a valid CSV file: {error}") from error
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no data rows")
    target = _check_target(path, frame[TARGET])
    try:
        features = validate_features(frame.drop(columns=[TARGET]))
    except InvalidFeatures as error:
        raise DataError(f"{path}: {error}") from error
    fingerprint = Fingerprint(
        sha256=sha256_of_file(path),
        rows=len(frame),
        columns=len(frame.columns) + int(has_row_id),
    )
    return TrainingData(path=path, features=features, target=target, fingerprint=fingerprint)
