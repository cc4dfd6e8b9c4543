"""Retention without servers: which UTC days a window deletes (hand-worked examples), and the
dead-letter file's rewrite (entries past the window go, everything else stays, including what
another thread appends while it runs)."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta

from mlflow.entities import Run, RunData, RunInfo, RunTag

from logging_sidecar.dead_letters import DEAD_LETTER_FILE, DeadLetters, prune_dead_letters
from logging_sidecar.retention import past_window
from logging_sidecar.spool import DeadLine
from logging_sidecar.state import State
from model.identity import utc_timestamp


def run_of_day(day: str) -> Run:
    info = RunInfo("r", "1", "u", "FINISHED", 0, 0, "active", artifact_uri="mlflow-artifacts:/1/r/artifacts")
    return Run(info, RunData(tags=[RunTag("day", day)]))


def test_a_day_is_past_the_window_once_its_last_moment_is():
    now = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    # 3 days before now is 2026-12-03 10:00: 12-02 ended at 12-03 00:00, before it; 12-03 ends after it.
    assert past_window(run_of_day("2026-12-02"), now, 3)
    assert not past_window(run_of_day("2026-12-03"), now, 3)
    assert past_window(run_of_day("2025-01-01"), now, 3)
    # One day (12-05 10:00): yesterday ends at 12-06 00:00, after it: kept; the day before goes.
    assert not past_window(run_of_day("2026-12-05"), now, 1)
    assert past_window(run_of_day("2026-12-04"), now, 1)
    # At midnight exactly, the day that ended a full window ago goes.
    assert past_window(run_of_day("2026-12-04"), datetime(2026, 12, 6, tzinfo=UTC), 1)
    # Today, a future day (a skewed clock) and a run without a readable day: never.
    assert not past_window(run_of_day("2026-12-06"), now, 1)
    assert not past_window(run_of_day("2026-12-09"), now, 1)
    assert not past_window(run_of_day("yesterday"), now, 1)
    assert not past_window(run_of_day(""), now, 1)


def entry(parked_at: str, n: int) -> bytes:
    return json.dumps(
        {"segment": "s", "offset": n, "reason": "r", "parked_at": parked_at, "line": f"x{n}"}
    ).encode()


def test_dead_letters_past_the_window_are_removed_and_the_rest_kept(tmp_path):
    now = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    old, recent = utc_timestamp(now - timedelta(days=4)), utc_timestamp(now - timedelta(days=2, hours=23))
    path = tmp_path / DEAD_LETTER_FILE
    lines = [entry(old, 1), entry(recent, 2), b"not json", entry(old, 3), entry(recent, 4)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / (DEAD_LETTER_FILE + ".pruning")).write_bytes(b"left by a prune killed mid-write")

    assert prune_dead_letters(tmp_path, now - timedelta(days=3)) == 2
    assert path.read_bytes().splitlines() == [lines[1], b"not json", lines[4]]  # undated: kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dead-letters.lock", DEAD_LETTER_FILE]

    inode = path.stat().st_ino
    assert prune_dead_letters(tmp_path, now - timedelta(days=3)) == 0
    assert path.stat().st_ino == inode  # nothing to remove: not rewritten

    assert prune_dead_letters(tmp_path, now + timedelta(days=1)) == 2
    assert path.read_bytes().splitlines() == [b"not json"]
    path.write_bytes(entry(old, 5) + b"\n")
    assert prune_dead_letters(tmp_path, now) == 1 and not path.exists()  # emptied: removed
    assert prune_dead_letters(tmp_path, now) == 0


def test_lines_parked_while_a_prune_rewrites_the_file_are_never_lost(tmp_path, monkeypatch):
    """The sidecar's loop parks lines while ``credit-risk records prune --spool-dir`` rewrites
    the file: both hold the same lock, so no parked line is lost to a rewrite. Every other
    line is parked with a time 30 days back, so that every prune removes some and renames."""
    import logging_sidecar.dead_letters as module

    clock = iter(range(10**6))
    real = module.utc_timestamp
    old = datetime.now(UTC) - timedelta(days=30)
    monkeypatch.setattr(
        module, "utc_timestamp", lambda *at: real(*at) if at else real(old if next(clock) % 2 else None)
    )
    letters = DeadLetters(tmp_path, State(tmp_path / "state.db"))
    done = threading.Event()
    removed = []

    def prune():
        while not done.is_set():
            removed.append(prune_dead_letters(tmp_path, datetime.now(UTC) - timedelta(days=1)))

    pruner = threading.Thread(target=prune)
    pruner.start()
    try:
        for n in range(400):
            letters.park(DeadLine(f"segment-{n}", n, 10, "not JSON", f"line {n}\n".encode()))
    finally:
        done.set()
        pruner.join()
    removed.append(prune_dead_letters(tmp_path, datetime.now(UTC) - timedelta(days=1)))
    kept = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()]
    assert [e["line"] for e in kept] == [f"line {n}" for n in range(0, 400, 2)]
    assert sum(removed) == 200 and sum(1 for r in removed if r) > 10  # many rewrites raced the appends
    assert letters.total == 400 and letters.unfiled == 0
    assert not os.path.exists(tmp_path / (DEAD_LETTER_FILE + ".pruning"))
