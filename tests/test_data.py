import hashlib

import numpy as np
import pytest

from model.schema import FEATURES, TARGET
from training.data import DataError, load_training_data, sha256_of_file

HEADER = "," + ",".join([TARGET, *FEATURES])


def write(tmp_path, text: str, name="data.csv", newline="\r\n"):
    path = tmp_path / name
    path.write_bytes(newline.join(text.strip("\n").split("\n")).encode() + newline.encode())
    return path


def rows(n=4, target=(0, 1, 0, 1)):
    lines = [HEADER]
    for i in range(n):
        lines.append(f"{i + 1},{target[i % len(target)]},0.5,{30 + i},0,0.3,NA,5,0,1,0,NA")
    return "\n".join(lines)


def test_fingerprint_is_sha256_of_the_bytes(tmp_path, sample_path):
    assert sha256_of_file(sample_path) == hashlib.sha256(sample_path.read_bytes()).hexdigest()
    copy = tmp_path / "copy.csv"
    copy.write_bytes(sample_path.read_bytes())
    assert load_training_data(copy).fingerprint.sha256 == sha256_of_file(sample_path)
    changed = tmp_path / "changed.csv"
    changed.write_bytes(sample_path.read_bytes().replace(b"\r\n", b"\n"))
    assert sha256_of_file(changed) != sha256_of_file(sample_path)


def test_reads_the_published_layout(tmp_path):
    data = load_training_data(write(tmp_path, rows()))
    assert list(data.features.columns) == list(FEATURES)
    assert list(data.features.index) == [1, 2, 3, 4]  # the unnamed first column is the row id
    assert data.features["MonthlyIncome"].isna().all()  # NA is missing
    assert data.target.tolist() == [0, 1, 0, 1]
    assert (data.fingerprint.rows, data.fingerprint.columns) == (4, 12)


def test_bundled_sample_has_the_real_shape(sample_path):
    data = load_training_data(sample_path)
    assert sample_path.read_bytes().count(b"\r\n") == data.fingerprint.rows + 1
    assert 0.05 < data.target.mean() < 0.085
    assert 0.15 < data.features["MonthlyIncome"].isna().mean() < 0.25
    assert 0.01 < data.features["NumberOfDependents"].isna().mean() < 0.05
    assert data.features["NumberOfTimes90DaysLate"].isin([96, 98]).any()
    assert data.features["DebtRatio"].max() > 1000


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        (HEADER, "no data rows"),
        (rows().replace(",NumberOfDependents", ""), "missing columns ['NumberOfDependents']"),
        (
            rows().replace(HEADER, HEADER + ",Extra").replace(",NA\n", ",NA,1\n"),
            "unexpected columns ['Extra']",
        ),
        (rows(target=(0, 2)), "SeriousDlqin2yrs must be 0 or 1, got 2"),
        (rows(target=("NA",)), "SeriousDlqin2yrs must be 0 or 1"),
        (
            rows().replace("4,1,0.5,33", "4,1,abc,33"),
            "RevolvingUtilizationOfUnsecuredLines: must be a number, got 'abc' at row 4",
        ),
        (
            rows().replace("3,0,0.5,32,0", "3,0,0.5,32,-1"),
            "NumberOfTime30-59DaysPastDueNotWorse: must be >= 0, got -1 at row 3",
        ),
        ('{"not": "csv"}', "missing columns"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_training_data(path)
    assert message in str(error.value)


def test_binary_and_absent_files_are_refused(tmp_path):
    binary = tmp_path / "model.parquet"
    binary.write_bytes(b"PAR1\x00\x01\x02" + bytes(range(256)))
    with pytest.raises(DataError, match="not a CSV text file"):
        load_training_data(binary)
    with pytest.raises(DataError, match="no such file"):
        load_training_data(tmp_path / "absent.csv")


def test_ragged_rows_are_refused(tmp_path):
    path = write(tmp_path, rows() + "\n5,0,1,2,3")
    with pytest.raises(DataError):
        load_training_data(path)


def test_file_without_the_row_id_column_is_accepted(tmp_path):
    text = "\n".join(line.split(",", 1)[1] for line in rows().split("\n"))
    data = load_training_data(write(tmp_path, text))
    assert data.fingerprint.columns == 11 and np.array_equal(data.target, [0, 1, 0, 1])
