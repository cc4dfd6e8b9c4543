"""Retention against a real MLflow server, real sidecar processes and the real ``credit-risk
records prune`` command: records of UTC days past the window are deleted for good (their
files gone from the server's disk), records inside it stay exactly once, through a prune
racing with shipping, late records for a pruned day, and prunes SIGKILLed in the middle.

The oracle is the test's own list of written rows. Records are written at noon UTC of days
0, 1, 2 (kept by a 3-day window whatever the hour: a day goes once it ended 3 days ago) and
4, 6, 9 days ago (past it), never 3 days ago, so a test that runs across midnight UTC decides
the same way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.entities import ViewType
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from logging_sidecar.dead_letters import DEAD_LETTER_FILE
from logging_sidecar.reader import read_records
from logging_sidecar.shipper import PRUNING_TAG
from model.identity import utc_timestamp
from serving.capture import SpoolWriter
from serving.spool_format import SpoolSettings
from stack import processes, services
from tests.helpers import BIN, credit_risk, free_port, mlflow_tracking_server, wait_for_log_line
from tests.integration.spool_records import REPLICA, Written, assert_exactly, noon_days_ago

pytestmark = pytest.mark.integration

WINDOW = 3
KEPT_DAYS, PRUNED_DAYS = (0, 1, 2), (4, 6, 9)


def moment(days_ago: int, today: date) -> datetime:
    """A record's time: noon of that day, or a minute ago for today (noon may be ahead)."""
    return datetime.now(UTC) - timedelta(minutes=1) if days_ago == 0 else noon_days_ago(days_ago, today)


class Server:
    def __init__(self, root: Path, tracking_uri: str):
        self.root, self.tracking_uri = root, tracking_uri
        self.artifacts = root / "mlflow" / "artifacts"
        self.client = MlflowClient(tracking_uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    with mlflow_tracking_server(root) as tracking_uri:
        yield Server(root, tracking_uri)


class Case:
    """One experiment of the module's server, a spool, its rows and its sidecar."""

    def __init__(self, server: Server, root: Path):
        self.server, self.root = server, root
        self.experiment = f"inference-{uuid.uuid4().hex[:8]}"
        self.spool = root / "spool"
        self.writer = SpoolWriter(
            SpoolSettings(directory=self.spool, replica=REPLICA, segment_max_bytes=20000)
        )
        self.written = Written()
        # Days ago count from the day the case began, and each row keeps the count it was
        # written with: a test that runs across midnight UTC writes and checks the same days.
        self.today = datetime.now(UTC).date()
        self.days_ago: list[int] = []  # of each row of self.written
        self.port = free_port()
        self.sidecar = None

    def write(self, days_ago: int, count: int = 1) -> None:
        for _ in range(count):
            self.written.append(self.writer, self.moment(days_ago))
            self.days_ago += [days_ago] * (len(self.written.rows) - len(self.days_ago))

    def moment(self, days_ago: int) -> datetime:
        return moment(days_ago, self.today)

    def start_sidecar(self, **env) -> None:
        env = {
            "CREDIT_RISK_INFERENCE_EXPERIMENT": self.experiment,
            "CREDIT_RISK_FLUSH_RECORDS": "5",
            "CREDIT_RISK_FLUSH_INTERVAL_S": "1",
            **env,
        }
        self.service = services.sidecar(self.server.tracking_uri, self.spool, self.port, **env)
        self.sidecar = processes.start(self.service, self.root)
        processes.wait_healthy(self.service, self.sidecar, self.root, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json()

    def wait_shipped(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.health()["shipped_records_total"] < len(self.written.rows):
            assert time.monotonic() < deadline, f"not all shipped: {self.health()}"
            time.sleep(0.5)

    def stop_sidecar(self) -> None:
        self.writer.close()
        os.killpg(self.sidecar.pid, signal.SIGTERM)
        assert self.sidecar.wait(timeout=120) == 0

    def prune(self, days: int = WINDOW, *args: str, **env) -> subprocess.CompletedProcess:
        done = credit_risk(
            "records", "prune", "--older-than", str(days), *args,
            tracking_uri=self.server.tracking_uri, timeout=600, CREDIT_RISK_INFERENCE_EXPERIMENT=self.experiment, **env,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        return done

    def records(self) -> pd.DataFrame:
        records = read_records(
            experiment=self.experiment, client=self.server.client, deduplicate=False, strict=True
        )
        assert records.attrs["skipped"] == []
        return records

    def rows(self, days) -> pd.DataFrame:
        """The rows written for those days ago. Not re-derived from their timestamps: after
        midnight UTC, a row written as today's is yesterday's (CI once failed that way)."""
        rows = self.written.frame()
        return rows[pd.Series(self.days_ago, index=rows.index).isin(days)]

    def runs(self, view=ViewType.ALL) -> list:
        experiment = self.server.client.get_experiment_by_name(self.experiment).experiment_id
        return self.server.client.search_runs([experiment], run_view_type=view, max_results=5000)

    def files_on_disk(self) -> dict[str, list[Path]]:
        """Every record file the server holds for this experiment, by run id."""
        experiment = self.server.client.get_experiment_by_name(self.experiment).experiment_id
        found: dict[str, list[Path]] = {}
        for path in (self.server.artifacts / experiment).rglob("*.parquet"):
            found.setdefault(path.relative_to(self.server.artifacts / experiment).parts[0], []).append(path)
        return found

    def assert_gone_for_good(self, pruned_days) -> None:
        """No file on the server's disk holds a record of those days, and every file left
        belongs to an active run that no prune has marked."""
        pruned_ids = set(self.rows(pruned_days)["request_id"])
        runs = {run.info.run_id: run for run in self.runs()}
        for run_id, paths in self.files_on_disk().items():
            run = runs[run_id]
            assert run.info.lifecycle_stage == "active" and PRUNING_TAG not in run.data.tags, (run_id, paths)
            for path in paths:
                on_disk = set(pq.read_table(path, columns=["request_id"]).column(0).to_pylist())
                assert not on_disk & pruned_ids, f"{path} still holds records of a pruned day"


@pytest.fixture
def case(server, tmp_path):
    case = Case(server, tmp_path)
    try:
        yield case
    finally:
        if case.sidecar is not None and case.sidecar.poll() is None:
            os.killpg(case.sidecar.pid, signal.SIGKILL)
        case.writer.close()


def test_a_prune_racing_with_shipping_keeps_the_window_exactly_and_deletes_the_rest(case):
    """A real sidecar ships records of six days (and prunes on its own schedule, every 2 s)
    while ``credit-risk records prune`` runs again and again and ``read_records`` reads."""
    case.start_sidecar(
        CREDIT_RISK_RETENTION_DAYS=str(WINDOW),
        CREDIT_RISK_PRUNE_EVERY_S="2",
        CREDIT_RISK_FLUSH_RECORDS="20",
        CREDIT_RISK_MAX_BATCH_RECORDS="20",
    )
    days = random.Random(3).choices(KEPT_DAYS + PRUNED_DAYS, k=400)

    def write():
        for days_ago in days:
            case.write(days_ago)
            time.sleep(0.1)

    writing = threading.Thread(target=write)
    writing.start()
    prunes_while_shipping = reads = 0
    deadline = time.monotonic() + 900
    while writing.is_alive() or case.health()["shipped_records_total"] < len(days):
        assert time.monotonic() < deadline, f"not shipped: {case.health()}"
        case.prune()
        prunes_while_shipping += 1
        case.records()  # strict: a read racing a prune never meets a half-deleted run
        reads += 1
    writing.join()
    deleted_during_race = case.runs(ViewType.DELETED_ONLY)
    case.wait_shipped()
    case.prune()  # records of pruned days shipped late are pruned next time
    case.stop_sidecar()

    assert prunes_while_shipping >= 2 and reads >= 2
    assert deleted_during_race, "no run was pruned while records were shipping"
    assert_exactly(case.records(), case.rows(KEPT_DAYS))
    case.assert_gone_for_good(PRUNED_DAYS)
    assert len(case.rows(KEPT_DAYS)) + len(case.rows(PRUNED_DAYS)) == 400
    log = case.service.log_path(case.root).read_text()
    assert "retention (3 days):" in log  # the sidecar's own schedule pruned too
    print(
        f"{prunes_while_shipping} prunes and {reads} reads during shipping, "
        f"{len(deleted_during_race)} runs deleted meanwhile, "
        f"{log.count('moving batch')} batches moved out of a run being pruned"
    )


def test_a_late_record_for_a_pruned_day_ships_to_a_new_run_and_goes_next_time_if_past_the_window(case):
    case.write(6, 5)
    case.write(1, 5)
    case.start_sidecar()
    case.wait_shipped()
    [old_run] = [
        r.info.run_id for r in case.runs() if r.data.tags["day"] == case.moment(6).date().isoformat()
    ]
    assert "1 runs (1 record files)" in case.prune().stdout
    assert case.server.client.get_run(old_run).info.lifecycle_stage == "deleted"

    # A backlog ships late: the sidecar still knows the deleted run for that day.
    case.write(6, 5)
    case.write(2, 5)
    case.wait_shipped()
    assert "is being pruned: moving batch" in case.service.log_path(case.root).read_text()
    late = case.rows((6,)).iloc[5:]
    assert_exactly(case.records(), pd.concat([case.rows((1, 2)), late]))
    assert old_run not in case.files_on_disk()  # the upload into the deleted run was deleted

    # Inside a longer window, the late records stay; past the window, the next prune takes them.
    assert "0 runs" in case.prune(10).stdout
    assert_exactly(case.records(), pd.concat([case.rows((1, 2)), late]))
    assert "1 runs" in case.prune().stdout
    assert_exactly(case.records(), case.rows((1, 2)))
    case.stop_sidecar()
    case.assert_gone_for_good((6,))


def start_prune_until(case: Case, point: str) -> None:
    """``credit-risk records prune`` paused at a fault point, then SIGKILLed there."""
    log = case.root / f"prune-{point}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(BIN / "credit-risk"), "records", "prune", "--older-than", str(WINDOW)],
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": case.server.tracking_uri,
                "CREDIT_RISK_INFERENCE_EXPERIMENT": case.experiment,
                "CREDIT_RISK_FAULT_POINTS": point,
                "CREDIT_RISK_FAULT_PAUSE_S": "120",
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_log_line(log, f"FAULT-POINT {point} pid={process.pid}", timeout=180)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_a_prune_killed_in_the_middle_is_finished_by_the_next_and_reads_work_between(case):
    for days_ago in (0, 1, 4, 5, 6):
        case.write(days_ago, 4)
    case.writer.close()
    drained = credit_risk(
        "sidecar", "--drain-once", "--spool-dir", str(case.spool),
        tracking_uri=case.server.tracking_uri, CREDIT_RISK_INFERENCE_EXPERIMENT=case.experiment,
        CREDIT_RISK_FLUSH_RECORDS="2", CREDIT_RISK_MAX_BATCH_RECORDS="2",  # two files per run
    )  # fmt: skip
    assert drained.returncode == 0, drained.stdout[-3000:] + drained.stderr
    old_days = {case.moment(d).date().isoformat() for d in (4, 5, 6)}
    old_runs = {r.info.run_id for r in case.runs() if r.data.tags["day"] in old_days}
    assert len(old_runs) == 3 and len(case.runs()) == 5
    kept = case.rows((0, 1))

    start_prune_until(case, "after_mark")  # killed with the three runs marked, nothing deleted
    runs = {r.info.run_id: r for r in case.runs()}
    assert {run_id for run_id, r in runs.items() if PRUNING_TAG in r.data.tags} == old_runs
    assert all(r.info.lifecycle_stage == "active" for r in runs.values())
    assert old_runs <= set(case.files_on_disk())
    assert_exactly(case.records(), kept)

    start_prune_until(case, "after_prune_artifacts")  # killed after one run's files went
    on_disk = case.files_on_disk()
    emptied = old_runs - set(on_disk)
    assert len(emptied) == 1
    assert all(r.info.lifecycle_stage == "active" for r in case.runs())
    # And a run half-deleted (as by a server killed in the middle of deleting a folder).
    half = sorted(old_runs - emptied)[0]
    run = case.server.client.get_run(half)
    repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=case.server.tracking_uri)
    repository.delete_artifacts(f"records/{on_disk[half][0].name}")
    assert_exactly(case.records(), kept)
    shown = credit_risk(
        "records", tracking_uri=case.server.tracking_uri, CREDIT_RISK_INFERENCE_EXPERIMENT=case.experiment
    )
    assert shown.returncode == 0 and f"{len(kept)} records" in shown.stderr.splitlines(), shown.stderr

    finished = case.prune()
    assert "3 runs" in finished.stdout and "3 of them left marked by an earlier prune" in finished.stdout
    assert {r.info.run_id for r in case.runs(ViewType.DELETED_ONLY)} == old_runs
    assert not old_runs & set(case.files_on_disk())
    assert_exactly(case.records(), kept)
    case.assert_gone_for_good((4, 5, 6))


def dead_letter(parked_at: datetime, n: int) -> bytes:
    entry = {
        "segment": "s",
        "offset": n,
        "length": 1,
        "reason": "by hand",
        "parked_at": utc_timestamp(parked_at),
    }
    return json.dumps({**entry, "line": f"hand-{n}"}).encode() + b"\n"


def test_dead_letters_past_the_window_go_and_none_parked_meanwhile_is_lost(case):
    """Old dead letters are removed while a real sidecar parks new ones: first by ``credit-risk
    records prune --spool-dir`` beside it, then by the sidecar's own schedule."""
    now = datetime.now(UTC)
    old = [dead_letter(now - timedelta(days=10), n) for n in range(60)]
    recent = [dead_letter(now - timedelta(days=1), n) for n in range(60, 80)]
    letters = case.spool / DEAD_LETTER_FILE
    letters.write_bytes(b"".join(old[:15] + recent[:10] + old[15:30]))
    poison: list[str] = []

    def park_while(running: threading.Event):
        while running.is_set():
            poison.append(json.dumps({"v": 99, "n": len(poison)}))  # a newer format: a dead line
            assert case.writer.append(poison[-1].encode() + b"\n", 1)
            case.write(0)
            time.sleep(0.05)

    def parking(**env):
        running = threading.Event()
        running.set()
        case.start_sidecar(**env)
        thread = threading.Thread(target=park_while, args=(running,))
        thread.start()
        return running, thread

    running, thread = parking()
    removed = int(case.prune(WINDOW, "--spool-dir", str(case.spool)).stdout.rsplit("; ", 1)[1].split()[0])
    running.clear()
    thread.join()
    assert removed == 30
    case.wait_shipped()
    os.killpg(case.sidecar.pid, signal.SIGKILL)  # everything is committed; a drain would wait for the writer
    case.sidecar.wait(timeout=60)
    with open(letters, "ab") as stream:  # no sidecar runs: the file is nobody's now
        stream.write(b"".join(old[30:] + recent[10:]))

    running, thread = parking(CREDIT_RISK_RETENTION_DAYS=str(WINDOW), CREDIT_RISK_PRUNE_EVERY_S="0.5")
    deadline = time.monotonic() + 120
    while any(b"hand-59" in line for line in letters.read_bytes().splitlines()):  # the last old one
        assert time.monotonic() < deadline, "the sidecar did not prune its dead letters"
        time.sleep(0.5)
    time.sleep(3)  # parking goes on across a few more passes
    running.clear()
    thread.join()
    case.wait_shipped()
    deadline = time.monotonic() + 60
    while case.health()["dead_lines_total"] < len(poison):
        assert time.monotonic() < deadline, case.health()
        time.sleep(0.5)
    case.stop_sidecar()

    lines = [json.loads(line)["line"] for line in letters.read_bytes().splitlines()]
    assert sorted(lines) == sorted([json.loads(r)["line"] for r in recent] + poison)
    assert len(poison) > 100 and len(lines) == len(set(lines))
    assert_exactly(case.records(), case.rows((0,)))
