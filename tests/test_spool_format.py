"""The spool's format and the reader's defences, without servers: record versions, poison
and over-long lines, the writer's liveness lock, file modes, names and order."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from logging_sidecar.service import SpoolBusy, lock_spool
from logging_sidecar.spool import list_segments, read_chunk
from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.spool_format import FORMAT_VERSION, PoisonLine, SpoolSettings, decode, encode, writer_is_alive

IDENTITY = {
    "model_name": "credit-risk",
    "registered_model": "credit-risk-model",
    "model_version": "3",
    "dataset_hash": "h",
}
MIB = 1 << 20


def line_of(rows=1, request_id="r", replica="replica-a") -> bytes:
    features = np.arange(rows * len(FEATURES), dtype="float64").reshape(rows, len(FEATURES))
    outputs = {"prediction": np.zeros(rows, dtype="int64"), "probability": np.full(rows, 0.25)}
    return encode(
        request_id, 1_700_000_000_000_000_000, IDENTITY, list(FEATURES), features, outputs, 1.0, replica
    )


def write_segment(directory, *lines, name="host-1-1700000000000000000-000001@1700000000000000001.jsonl"):
    path = directory / name
    path.write_bytes(b"".join(lines))
    return path


def test_version_2_carries_the_replica_and_version_1_still_reads():
    record = decode(line_of(replica="pod-7"), default_replica="unused")
    assert record["v"] == FORMAT_VERSION == 2 and record["replica"] == "pod-7"
    old = json.loads(line_of())
    old["v"] = 1
    del old["replica"]
    upgraded = decode(json.dumps(old).encode(), default_replica="old-host")
    assert upgraded["replica"] == "old-host" and upgraded["registered_model"] == "credit-risk-model"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r.update(v=FORMAT_VERSION + 1), "version 3 is not one this reader knows"),
        (lambda r: r.pop("model_version"), "'model_version' is missing"),
        (lambda r: r["features"].pop("age"), "column 'age' is missing"),
        (
            lambda r: r["outputs"]["probability"].append(0.5),
            "column .prediction. is missing or does not have 3 values",
        ),
        (
            lambda r: r["features"]["age"].__setitem__(0, "old"),
            "feature 'age' holds a value that is not a number",
        ),
    ],
)
def test_a_poison_line_is_refused_with_its_reason(change, reason):
    record = json.loads(line_of(rows=2))
    change(record)
    with pytest.raises(PoisonLine, match=reason):
        decode(json.dumps(record).encode(), default_replica="x")


def test_bad_lines_are_set_aside_and_the_lines_after_them_still_read(tmp_path):
    poison = json.loads(line_of())
    poison["v"] = 99
    good = line_of(request_id="after")
    write_segment(
        tmp_path, line_of(request_id="before"), b"{not json\n", json.dumps(poison).encode() + b"\n", good
    )
    [segment] = list_segments(tmp_path)
    chunk = read_chunk(tmp_path, segment.name, 0, 100, max_line_bytes=MIB)
    assert [r["request_id"] for r in chunk.requests] == ["before", "after"]
    assert [d.reason.split(":")[0] for d in chunk.dead] == [
        "not JSON",
        "record version 99 is not one this reader knows (1..2)",
    ]
    assert chunk.end == segment.size and chunk.dead[0].content == b"{not json\n"


def test_a_request_over_4_mib_ships_and_does_not_block_the_next(tmp_path):
    big = line_of(rows=50_000, request_id="big")
    assert len(big) > 4 * MIB
    write_segment(tmp_path, big, line_of(request_id="next"))
    [segment] = list_segments(tmp_path)
    chunk = read_chunk(tmp_path, segment.name, 0, 10, max_line_bytes=64 * MIB)
    assert [r["request_id"] for r in chunk.requests] == ["big"] and chunk.rows == 50_000
    rest = read_chunk(tmp_path, segment.name, chunk.end, 10, max_line_bytes=64 * MIB)
    assert [r["request_id"] for r in rest.requests] == ["next"]


def test_a_line_over_the_limit_is_a_dead_line_and_the_rest_reads(tmp_path):
    big = line_of(rows=5_000)
    write_segment(tmp_path, big, line_of(request_id="next"))
    [segment] = list_segments(tmp_path)
    chunk = read_chunk(tmp_path, segment.name, 0, 10, max_line_bytes=64 * 1024)
    assert [r["request_id"] for r in chunk.requests] == ["next"]
    [dead] = chunk.dead
    assert dead.length == len(big) and dead.content is None and "is over 65536" in dead.reason


def test_an_unfinished_long_line_waits(tmp_path):
    big = line_of(rows=5_000)
    write_segment(tmp_path, big[:-1])  # no newline yet: a write in progress
    [segment] = list_segments(tmp_path)
    chunk = read_chunk(tmp_path, segment.name, 0, 10, max_line_bytes=64 * 1024)
    assert chunk.end == 0 and not chunk.requests and not chunk.dead


def test_spool_files_are_not_world_readable(tmp_path):
    writer = SpoolWriter(SpoolSettings(directory=tmp_path))
    writer.append(line_of(), 1)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, path
    writer.close()
    [segment] = list_segments(tmp_path)
    assert stat.S_IMODE(segment.path.stat().st_mode) == 0o640


_WRITER = """
import sys, time
from pathlib import Path
from serving.capture import SpoolWriter
from serving.spool_format import SpoolSettings
writer = SpoolWriter(SpoolSettings(directory=Path(sys.argv[1])))
writer.append(sys.stdin.buffer.readline(), 1)
print("written", flush=True)
time.sleep(600)
"""


def test_a_writer_is_alive_while_its_process_lives_whatever_the_clocks_say(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        process.stdin.write(line_of())
        process.stdin.flush()
        assert process.stdout.readline() == b"written\n"
        [segment] = list_segments(tmp_path)
        assert not segment.sealed
        os.utime(segment.path, (0, 0))  # an mtime from 1970 says nothing about the writer
        assert writer_is_alive(tmp_path, segment.writer)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert not writer_is_alive(tmp_path, segment.writer)  # the kernel released its lock


def test_a_writer_releases_the_spool_on_close(tmp_path):
    writer = SpoolWriter(SpoolSettings(directory=tmp_path))
    writer.append(line_of(), 1)
    [segment] = list_segments(tmp_path)
    assert writer_is_alive(tmp_path, segment.writer)
    writer.close()
    assert not writer_is_alive(tmp_path, segment.writer)


def test_oldest_first_is_oldest_across_writer_processes(tmp_path):
    first = SpoolWriter(SpoolSettings(directory=tmp_path, segment_max_age_s=0))
    second = SpoolWriter(SpoolSettings(directory=tmp_path, segment_max_age_s=0))
    first.append(line_of(request_id="1"), 1)
    time.sleep(0.01)
    second.append(line_of(request_id="2"), 1)
    time.sleep(0.01)
    first.append(line_of(request_id="3"), 1)  # rotates: a new segment, newer than second's
    order = [
        read_chunk(tmp_path, s.name, 0, 1, max_line_bytes=MIB).requests[0]["request_id"]
        for s in list_segments(tmp_path)
    ]
    assert order == ["1", "2", "3"]


def test_a_file_with_a_foreign_name_is_skipped(tmp_path, caplog):
    (tmp_path / "notes.jsonl").write_text("{}\n")
    write_segment(tmp_path, line_of())
    assert [s.path.name for s in list_segments(tmp_path)] == [
        "host-1-1700000000000000000-000001@1700000000000000001.jsonl"
    ]
    assert "notes.jsonl: not a spool segment name" in caplog.text


def test_one_sidecar_per_spool_whatever_its_state_file(tmp_path):
    held = lock_spool(tmp_path)
    try:
        with pytest.raises(SpoolBusy, match="already shipping"):
            lock_spool(tmp_path)
    finally:
        held.close()
    lock_spool(tmp_path).close()
