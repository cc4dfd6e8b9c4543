"""``credit-risk records`` as users run it, against a real MLflow holding records of two model
versions over two UTC days, shipped there by a real sidecar process from a spool written by
the real ``SpoolWriter``.

The oracle is the test's own list of the rows it wrote, filtered here with plain integer
comparisons of nanosecond timestamps: never the reader under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from logging_sidecar.reader import read_records
from model.identity import REGISTERED_MODEL_NAME
from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.settings import MODEL_NAME
from serving.spool_format import SpoolSettings, encode
from stack import processes, services
from tests.helpers import credit_risk, free_port, mlflow_tracking_server

pytestmark = pytest.mark.integration


def _ns(text: str) -> int:
    """Nanoseconds since the epoch, in integers (a float timestamp loses the microseconds)."""
    moment = datetime.fromisoformat(text)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


# Per version, requests at these moments (rows each): both sides of the windows' edges.
MOMENTS = [
    ("2026-11-25T08:00:00", 1),
    ("2026-11-25T19:59:59.999999", 3),  # just before --since
    ("2026-11-25T20:00:00", 2),  # exactly --since: kept
    ("2026-11-25T23:59:59.500000", 1),
    ("2026-11-26T00:00:00", 3),  # the second day's first moment
    ("2026-11-26T05:59:59.999999", 1),  # just before --until
    ("2026-11-26T06:00:00", 2),  # exactly --until: left out
    ("2026-11-26T12:00:00", 1),
]
VERSIONS = ("1", "2")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Records of two versions over two days, shipped by a real sidecar into a real MLflow of
    their own (the default experiment, which ``credit-risk records`` reads)."""
    root = tmp_path_factory.mktemp("records-command")
    spool = root / "spool"
    rows = []
    writer = SpoolWriter(SpoolSettings(directory=spool, replica="replica-a"))
    rng = np.random.default_rng(16)
    for version in VERSIONS:
        identity = {
            "model_name": MODEL_NAME,
            "registered_model": REGISTERED_MODEL_NAME,
            "model_version": version,
            "dataset_hash": "d" * 64,
        }
        for moment, count in MOMENTS:
            request_id, stamp = f"req-{uuid.uuid4().hex}", _ns(moment)
            features = rng.random((count, len(FEATURES))) * 100
            features[0, 4] = np.nan  # a missing MonthlyIncome travels as NaN
            outputs = {"prediction": np.ones(count, dtype="int64"), "probability": rng.random(count)}
            line = encode(request_id, stamp, identity, list(FEATURES), features, outputs, 1.5, "replica-a")
            assert writer.append(line, count)
            for row in range(count):
                rows.append(
                    {
                        "request_id": request_id,
                        "row_index": row,
                        "timestamp_ns": stamp,
                        "model_version": version,
                    }
                    | dict(zip(FEATURES, features[row], strict=True))
                    | {"probability": outputs["probability"][row]}
                )
    writer.close()  # the sidecar's drain waits for live writers

    with mlflow_tracking_server(root) as tracking_uri:
        port = free_port()
        sidecar = services.sidecar(tracking_uri, spool, port, CREDIT_RISK_FLUSH_RECORDS="4")
        process = processes.start(sidecar, root)
        try:
            processes.wait_healthy(sidecar, process, root, timeout=60)
            deadline = time.monotonic() + 120
            while httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()[
                "shipped_records_total"
            ] < len(rows):
                assert time.monotonic() < deadline, sidecar.log_path(root).read_text()[-3000:]
                time.sleep(0.3)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        runs = MlflowClient(tracking_uri).search_runs(
            [MlflowClient(tracking_uri).get_experiment_by_name("credit-risk-inference").experiment_id]
        )
        # One run per version and UTC day: the windows below cross the day boundary.
        assert sorted((r.data.tags["model_version"], r.data.tags["day"]) for r in runs) == [
            (version, day) for version in VERSIONS for day in ("2026-11-25", "2026-11-26")
        ]
        yield tracking_uri, pd.DataFrame(rows), root


def expected(rows: pd.DataFrame, version: str, since: str | None = None, until: str | None = None):
    keep = rows["model_version"] == version
    if since is not None:
        keep &= rows["timestamp_ns"] >= _ns(since)
    if until is not None:
        keep &= rows["timestamp_ns"] < _ns(until)
    return rows[keep]


def records_command(tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    return credit_risk("records", *args, tracking_uri=tracking_uri, timeout=300)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Exactly the wanted rows, once each, with their timestamps, features and probabilities."""
    keys = ["request_id", "row_index"]
    got = got.assign(request_id=got["request_id"].astype(str), row_index=got["row_index"].astype("int64"))
    assert not got.duplicated(keys).any()
    assert sorted(map(tuple, got[keys].to_numpy().tolist())) == sorted(
        map(tuple, want[keys].to_numpy().tolist())
    )
    joined = want.merge(got, on=keys, suffixes=("", "_got"))
    assert len(joined) == len(want)
    stamps = pd.to_datetime(joined["timestamp"], utc=True).dt.as_unit("ns").astype("int64")
    assert (stamps.to_numpy() == joined["timestamp_ns"].to_numpy()).all()
    for name in (*FEATURES, "probability"):
        assert np.allclose(joined[f"{name}_got"], joined[name], rtol=1e-15, atol=0, equal_nan=True), name
    assert (joined["model_version_got"].astype(str) == joined["model_version"]).all()


def test_version_since_and_until_keep_exactly_the_rows_in_the_window(shipped, tmp_path):
    tracking_uri, rows, _ = shipped
    output = tmp_path / "window.parquet"
    # --until names another zone: 07:00 at +01:00 is 06:00 UTC.
    done = records_command(
        tracking_uri,
        "--model-version", "2",
        "--since", "2026-11-25T20:00:00",
        "--until", "2026-11-26T07:00:00+01:00",
        "--output", str(output),
    )  # fmt: skip
    want = expected(rows, "2", since="2026-11-25T20:00:00", until="2026-11-26T06:00:00")
    assert done.returncode == 0, done.stderr
    assert len(want) == 7  # 2 + 1 + 3 + 1 rows, over both days
    assert f"{len(want)} records" in done.stderr.splitlines()
    got = pd.read_parquet(output)
    assert str(got["timestamp"].dt.tz) == "UTC"
    assert_same_rows(got, want)


def test_version_and_since_alone_read_to_the_end(shipped, tmp_path):
    tracking_uri, rows, _ = shipped
    output = tmp_path / "since.csv"
    done = records_command(
        tracking_uri, "--model-version", "1", "--since", "2026-11-26", "--output", str(output)
    )
    want = expected(rows, "1", since="2026-11-26T00:00:00")
    assert done.returncode == 0, done.stderr
    assert len(want) == 7  # 3 + 1 + 2 + 1 rows of the second day
    assert f"{len(want)} records" in done.stderr.splitlines()
    assert_same_rows(pd.read_csv(output), want)


def test_until_alone_and_printed_to_the_terminal(shipped):
    tracking_uri, rows, _ = shipped
    done = records_command(tracking_uri, "--model-version", "1", "--until", "2026-11-25T20:00:00Z")
    want = expected(rows, "1", until="2026-11-25T20:00:00")
    assert done.returncode == 0, done.stderr
    assert len(want) == 4  # 1 + 3 rows before 20:00 on the first day
    assert f"{len(want)} records" in done.stderr.splitlines()
    for request_id in want["request_id"].unique():
        assert request_id in done.stdout
    outside = set(rows["request_id"]) - set(want["request_id"])
    assert not any(request_id in done.stdout for request_id in outside)


def test_a_bad_time_or_an_empty_window_is_refused_with_exit_2(shipped):
    tracking_uri, _, _ = shipped
    done = records_command(tracking_uri, "--since", "last tuesday")
    assert done.returncode == 2 and "--since" in done.stderr and "last tuesday" in done.stderr
    done = records_command(tracking_uri, "--since", "2026-11-26", "--until", "2026-11-26")
    assert done.returncode == 2 and "--until" in done.stderr and "must be after --since" in done.stderr


def test_columns_read_only_those_in_that_order(shipped):
    tracking_uri, rows, _ = shipped
    client = MlflowClient(tracking_uri)
    columns = ["probability", "MonthlyIncome", "model_version"]
    narrow = read_records(
        "2", since="2026-11-25T20:00:00", until="2026-11-26T06:00:00", columns=columns, client=client
    )
    full = read_records("2", since="2026-11-25T20:00:00", until="2026-11-26T06:00:00", client=client)
    assert list(narrow.columns) == columns
    pd.testing.assert_frame_equal(narrow, full[columns])
    want = expected(rows, "2", since="2026-11-25T20:00:00", until="2026-11-26T06:00:00")
    assert sorted(narrow["probability"]) == sorted(want["probability"])
    with pytest.raises(ValueError, match="no record column"):
        read_records(columns=["probability", "income"], client=client)
