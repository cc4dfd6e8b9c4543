"""``credit-risk sidecar --drain-once`` on a spool left behind: sealed segments, an open segment
whose writer was SIGKILLed (with a torn last line), a segment a real sidecar shipped in part
before it was SIGKILLed, and a flush a real sidecar planned and uploaded but never committed.
Real MLflow, real sidecar processes, the real command.

The oracle is the test's own list of the rows it wrote.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from mlflow.tracking import MlflowClient

from logging_sidecar.reader import read_records
from logging_sidecar.service import lock_spool
from logging_sidecar.spool import list_segments
from serving.capture import SpoolWriter
from serving.spool_format import SpoolSettings, live_writers
from stack import processes, services
from tests.helpers import (
    NOBODY_URL,
    credit_risk,
    free_port,
    mlflow_tracking_server,
    one_error_line,
    wait_for_log_line,
)
from tests.integration.spool_records import REPLICA, WriterProcess, Written, assert_exactly

pytestmark = pytest.mark.integration

SMALL_BATCHES = {"CREDIT_RISK_FLUSH_RECORDS": "5", "CREDIT_RISK_MAX_BATCH_RECORDS": "5"}


def drain_once(spool, tracking_uri: str, experiment: str, **env) -> subprocess.CompletedProcess:
    return credit_risk(
        "sidecar", "--drain-once", "--spool-dir", str(spool),
        tracking_uri=tracking_uri, timeout=600, CREDIT_RISK_INFERENCE_EXPERIMENT=experiment, **env,
    )  # fmt: skip


def drain_error(done: subprocess.CompletedProcess) -> str:
    """The one error line, after the line naming the tracking server that the drain prints."""
    assert done.stderr.lstrip().startswith("tracking server: "), done.stderr
    return one_error_line(done.stderr)


def kill_at_fault_point(root, spool, tracking_uri, experiment, point: str) -> None:
    """Start a real sidecar that pauses at ``point`` and SIGKILL it there."""
    service = services.sidecar(
        tracking_uri, spool, free_port(), name=f"sidecar-{point}",
        CREDIT_RISK_INFERENCE_EXPERIMENT=experiment, CREDIT_RISK_FAULT_POINTS=point,
        CREDIT_RISK_FAULT_PAUSE_S="120", **SMALL_BATCHES,
    )  # fmt: skip
    process = processes.start(service, root)
    wait_for_log_line(service.log_path(root), f"FAULT-POINT {point} pid={process.pid}", timeout=120)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def flushes(spool) -> dict[str, int]:
    with sqlite3.connect(spool / "sidecar-state.db") as connection:
        return dict(connection.execute("select status, count(*) from flushes group by status").fetchall())


def test_drain_once_ships_a_left_behind_spool_exactly_once_and_empties_it(tmp_path):
    spool, experiment = tmp_path / "spool", f"inference-{uuid.uuid4().hex[:8]}"
    written = Written()
    now = datetime.now(UTC)
    # Sealed segments of ~6 one-row lines each (a line is ~560 bytes), spread over two days.
    sealed = SpoolWriter(SpoolSettings(directory=spool, replica=REPLICA, segment_max_bytes=3000))
    for i in range(20):
        written.append(sealed, now - timedelta(days=1, minutes=i) if i % 2 else now - timedelta(minutes=i))
    sealed.close()
    # An open segment whose writer dies, with half a line at its end.
    lines = []
    for _ in range(7):
        line, _ = written.line(now)
        written.keep()
        lines.append(line)
    torn, _ = written.line(now)  # not kept: never answered
    dead = WriterProcess(spool, lines, torn=torn[: len(torn) // 2])
    # A live writer: the drain must refuse while it holds its lock.
    alive = WriterProcess(spool, [written.line(now)[0]])
    written.keep()
    total = len(written.rows)

    with mlflow_tracking_server(tmp_path) as tracking_uri:
        client = MlflowClient(tracking_uri)
        dead.kill()
        # A real sidecar commits one flush (5 of the first segment's ~6 lines), then is killed;
        # the next plans and uploads the following flush and is killed before committing it.
        kill_at_fault_point(tmp_path, spool, tracking_uri, experiment, "after_commit")
        kill_at_fault_point(tmp_path, spool, tracking_uri, experiment, "after_upload")
        assert flushes(spool) == {"shipped": 1, "planned": 1}
        kinds = {(s.sealed, live_writers(spool).count(s.writer) > 0) for s in list_segments(spool)}
        assert kinds == {(True, False), (False, False), (False, True)}  # sealed, dead writer's, live

        # Refused: another sidecar holds the spool.
        with lock_spool(spool):
            done = drain_once(spool, tracking_uri, experiment)
        assert done.returncode == 1 and "another sidecar is already shipping" in drain_error(done)
        # Refused: a server still writes to it; nothing is shipped.
        done = drain_once(spool, tracking_uri, experiment)
        line = drain_error(done)
        assert done.returncode == 1 and "refusing to drain" in line and "is alive" in line
        assert flushes(spool) == {"shipped": 1, "planned": 1}
        alive.kill()

        # MLflow unreachable: gives up after CREDIT_RISK_STALL_AFTER_S, says what is left.
        started = time.monotonic()
        done = drain_once(
            spool, NOBODY_URL, experiment,
            CREDIT_RISK_STALL_AFTER_S="3", CREDIT_RISK_FLUSH_INTERVAL_S="1",
        )  # fmt: skip
        line = drain_error(done)
        assert done.returncode == 1, done.stdout[-2000:]
        assert (
            "records left in" in line and "nothing could be shipped for 3 s" in line and "last error" in line
        )
        assert time.monotonic() - started < 120
        assert flushes(spool) == {"shipped": 1, "planned": 1}

        done = drain_once(spool, tracking_uri, experiment, **SMALL_BATCHES)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr
        assert f"drained {spool}: shipped {total - 5} records, no segment left" in done.stdout

        records = read_records(experiment=experiment, client=client, deduplicate=False, strict=True)
        assert_exactly(records, written.frame())
        assert len(records) == total == 28
        assert list_segments(spool) == [] and live_writers(spool) == []
        assert not [p.name for p in spool.iterdir() if p.suffix in (".open", ".jsonl", ".writer-lock")]
        assert "planned" not in flushes(spool)

        # Nothing left: a second drain ships nothing and exits 0.
        done = drain_once(spool, tracking_uri, experiment)
        assert done.returncode == 0 and "shipped 0 records, no segment left" in done.stdout


def test_drain_once_on_a_missing_folder_is_a_usage_error(tmp_path):
    done = credit_risk(
        "sidecar", "--drain-once", "--spool-dir", str(tmp_path / "nowhere"), tracking_uri="http://127.0.0.1:9"
    )
    assert done.returncode == 2 and "does not exist" in drain_error(done)
    assert not (tmp_path / "nowhere").exists()
