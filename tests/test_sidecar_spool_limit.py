"""The sidecar keeps the spool bounded while MLflow is unreachable: oldest segments first."""

import logging

import numpy as np

from logging_sidecar.service import Sidecar
from logging_sidecar.settings import SidecarSettings
from logging_sidecar.spool import list_segments
from logging_sidecar.state import State
from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.spool_format import SpoolSettings, encode
from tests.helpers import NOBODY_URL

IDENTITY = {
    "model_name": "credit-risk",
    "registered_model": "credit-risk-model",
    "model_version": "1",
    "dataset_hash": "abc",
}


def _one_row_line() -> bytes:
    """One captured single-row request, as the writer encodes it."""
    outputs = {"prediction": np.array([0]), "probability": np.array([0.1])}
    return encode(
        "r",
        1_700_000_000_000_000_000,
        IDENTITY,
        list(FEATURES),
        np.ones((1, len(FEATURES))),
        outputs,
        1.0,
        "r1",
    )


def test_oldest_segments_are_dropped_first_when_mlflow_is_unreachable(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    line = _one_row_line()
    writer = SpoolWriter(SpoolSettings(directory=tmp_path, segment_max_bytes=len(line) * 10))
    for _ in range(100):  # ten sealed segments of ten requests
        writer.append(line, 1)
    writer.close()
    oldest = [s.name for s in list_segments(tmp_path)]

    settings = SidecarSettings(
        spool=SpoolSettings(directory=tmp_path, max_bytes=len(line) * 50),
        flush_records=1,
        max_batch_records=5,
        flush_interval_s=1,
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NOBODY_URL)  # nobody there
    sidecar = Sidecar(settings)
    with caplog.at_level(logging.WARNING):
        sidecar.step()

    left = [s.name for s in list_segments(tmp_path)]
    assert left == oldest[len(oldest) - len(left) :], "dropped segments must be the oldest"
    assert sum(s.size for s in list_segments(tmp_path)) <= 0.9 * settings.spool.max_bytes
    metric = sidecar.metrics.registry.get_sample_value
    dropped = metric("credit_risk_sidecar_records_dropped")
    assert dropped >= 50
    assert Sidecar(settings).snapshot.records_dropped == dropped, "the count did not survive a restart"
    assert metric("credit_risk_sidecar_spool_full") == 1
    assert "dropped the oldest unshipped segment" in caplog.text
    assert metric("credit_risk_sidecar_flush_failures_total") == 1  # retried later, not lost
    assert sidecar.last_error is not None


def test_a_planned_flush_is_never_trimmed_before_its_replay(tmp_path, monkeypatch):
    """Defect 3: on main a restart with a full spool trimmed the segment of the planned
    flush first, and the replay then overwrote a delivered batch with fewer rows."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NOBODY_URL)  # nobody there
    line = _one_row_line()
    writer = SpoolWriter(SpoolSettings(directory=tmp_path, segment_max_bytes=len(line) * 10))
    for _ in range(100):
        writer.append(line, 1)
    writer.close()
    oldest = list_segments(tmp_path)[0]
    settings = SidecarSettings(
        spool=SpoolSettings(directory=tmp_path, max_bytes=len(line) * 50), flush_records=1, flush_interval_s=1
    )
    State(settings.state_path).plan({oldest.name: (0, oldest.size)}, 10, created_ms=1)  # then a crash

    Sidecar(settings).step()
    assert oldest.path.exists(), "the planned flush's segment was trimmed before its replay"
    assert sum(s.size for s in list_segments(tmp_path)) <= 0.9 * settings.spool.max_bytes + oldest.size
