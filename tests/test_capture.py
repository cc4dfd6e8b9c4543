"""The capture spool on its own: encoding, rotation, the size limit, torn lines."""

import json
import logging
import os
import resource
import signal

import numpy as np
import pandas as pd
import pytest

from logging_sidecar.records import DAY_TAG, run_key, to_frame
from logging_sidecar.spool import list_segments, read_chunk
from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.spool_format import DropLedger, SpoolSettings, encode, read_drop_ledgers

IDENTITY = {
    "model_name": "credit-risk",
    "registered_model": "credit-risk-model",
    "model_version": "7",
    "dataset_hash": "abc",
}


def request_line(request_id="r1", rows=2):
    features = pd.DataFrame({name: np.arange(rows, dtype="float64") for name in FEATURES})
    features.loc[0, "MonthlyIncome"] = np.nan
    predictions = pd.DataFrame({"prediction": [0] * rows, "probability": np.linspace(0.1, 0.2, rows)})
    return (
        encode(
            request_id,
            1_700_000_000_000_000_000,
            IDENTITY,
            list(FEATURES),
            features.to_numpy(),
            {name: predictions[name].to_numpy() for name in predictions.columns},
            1.5,
            replica="replica-a",
        ),
        features,
        predictions,
    )


def settings(tmp_path, **overrides):
    return SpoolSettings(**{"directory": tmp_path, "replica": "replica-a", **overrides})


def test_a_request_round_trips_through_the_spool(tmp_path):
    line, features, predictions = request_line()
    assert json.loads(line)["features"]["MonthlyIncome"][0] is None  # JSON has no NaN
    writer = SpoolWriter(settings(tmp_path))
    assert writer.append(line, 2)
    [segment] = list_segments(tmp_path)
    chunk = read_chunk(tmp_path, segment.name, 0, 100, max_line_bytes=1 << 20)
    frame = to_frame(chunk.requests)
    assert frame["request_id"].tolist() == ["r1", "r1"] and frame["row_index"].tolist() == [0, 1]
    assert frame["model_version"].tolist() == ["7", "7"] and frame["replica"].tolist() == ["replica-a"] * 2
    pd.testing.assert_frame_equal(frame[list(FEATURES)], features, check_dtype=True)
    assert frame["probability"].tolist() == predictions["probability"].tolist()
    assert str(frame["timestamp"].dt.tz) == "UTC"
    key = run_key(chunk.requests[0])  # its fields are the run's tags; DAY_TAG selects by day
    assert key._asdict()[DAY_TAG] == frame["timestamp"][0].date().isoformat()


def test_segments_rotate_by_size_and_are_sealed(tmp_path):
    line, _, _ = request_line()
    writer = SpoolWriter(settings(tmp_path, segment_max_bytes=len(line) * 3))
    for _ in range(10):
        writer.append(line, 2)
    writer.close()
    segments = list_segments(tmp_path)
    assert len(segments) == 4 and all(s.sealed for s in segments)
    assert (
        sum(len(read_chunk(tmp_path, s.name, 0, 1000, max_line_bytes=1 << 20).requests) for s in segments)
        == 10
    )


def test_a_full_spool_drops_and_says_so(tmp_path, caplog):
    line, _, _ = request_line()
    writer = SpoolWriter(settings(tmp_path, max_bytes=len(line) * 2))
    with caplog.at_level(logging.WARNING):
        kept = [writer.append(line, 2) for _ in range(5)]
    assert kept[:2] == [True, True] and not any(kept[2:])
    assert writer.dropped == 6
    assert "is full" in caplog.text


def test_dropped_rows_are_counted_in_a_ledger_that_outlives_the_writer(tmp_path):
    line, _, _ = request_line()
    first = SpoolWriter(settings(tmp_path, max_bytes=len(line)))
    for _ in range(3):
        first.append(line, 2)
    first.close()
    again = SpoolWriter(settings(tmp_path, max_bytes=len(line)))  # a restarted server
    again.append(line, 2)
    assert (again.dropped, first.dropped) == (2, 4)
    assert read_drop_ledgers(tmp_path) == {"replica-a": 6}
    again.close()


def test_the_drop_ledger_is_updated_in_place_on_a_disk_with_no_free_block(tmp_path):
    """A full disk refuses new blocks; the ledger made at start only rewrites its own bytes.
    A file-size limit at the ledger's current size stands in for the full disk: a write
    that needed one more byte would fail."""
    ledger = DropLedger(tmp_path / "replica-a.dropped")
    size = ledger.path.stat().st_size
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        totals = [ledger.add(rows) for rows in (1, 1000, 10**9)]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert totals == [1, 1001, 10**9 + 1001]
    assert ledger.path.stat().st_size == size
    ledger.close()


def test_an_unreadable_drop_ledger_is_named_not_read_as_zero(tmp_path):
    (tmp_path / "replica-a.dropped").write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match=r"replica-a\.dropped"):
        read_drop_ledgers(tmp_path)


def test_a_torn_last_line_is_left_alone(tmp_path):
    line, _, _ = request_line()
    writer = SpoolWriter(settings(tmp_path))
    writer.append(line, 2)
    [segment] = list_segments(tmp_path)
    with open(segment.path, "ab") as stream:
        stream.write(line[: len(line) // 2])  # a write cut by a crash
    chunk = read_chunk(tmp_path, segment.name, 0, 100, max_line_bytes=1 << 20)
    assert len(chunk.requests) == 1 and chunk.end == len(line)


def test_fsync_always_makes_segment_creation_and_sealing_durable(tmp_path, monkeypatch):
    """Defect 10: on main the folder was never fsynced, so a power cut could lose a whole
    new or renamed segment although its contents had been fsynced."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    line, _, _ = request_line()
    writer = SpoolWriter(settings(tmp_path, fsync="always"))
    assert synced == [str(tmp_path / "replica-a.dropped"), str(tmp_path)]  # the drop ledger, made at start
    synced.clear()
    writer.append(line, 2)
    assert synced[0] == str(tmp_path)  # the new segment's name is durable before its first line
    synced.clear()
    writer.close()
    [sealed] = list_segments(tmp_path)
    assert synced == [str(tmp_path / f"{sealed.name}.open"), str(tmp_path)]  # contents, then the rename


def test_a_failed_write_leaves_only_whole_lines_behind(tmp_path):
    """A write that stops mid-line (the disk filled up): the partial line is cut off and the
    segment sealed. A file-size limit with SIGXFSZ ignored makes the kernel write part of
    the line and then fail, as a full disk does."""
    line, _, _ = request_line()
    writer = SpoolWriter(settings(tmp_path))
    writer.append(line, 2)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(line) + len(line) // 2, limits[1]))
    try:
        kept = writer.append(line, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert not kept and writer.dropped == 2
    [segment] = list_segments(tmp_path)
    assert segment.sealed and segment.size == len(line)
    assert len(read_chunk(tmp_path, segment.name, 0, 100, max_line_bytes=1 << 20).requests) == 1
