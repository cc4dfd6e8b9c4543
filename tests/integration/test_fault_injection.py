"""Fault-injection suite (issue 9): capture and shipping under the faults production meets.

Real processes on free ports: one MLflow server, ``credit-risk serve`` with capture, and the
logging sidecar. Client threads keep single- and multi-row traffic flowing (plus requests of
50,000 rows, whose spool lines are over 4 MiB) while a seeded random schedule injects, per
round: SIGKILLs of the sidecar (some exactly at its ``after_plan`` and ``after_upload`` fault
points, some at random moments), SIGKILLs of MLServer's process group (checked for orphans),
SIGKILL and restart of MLflow, a 60 s MLflow outage, a deleted inference run, a corrupt and
a poison line appended to the live segment; a second test fills the spool's disk (a small
tmpfs, so root only).

The oracle is the client's own list of answered rows (request id, row index, features,
probability), compared with ``read_records``; the sidecar's counters are never trusted. Every
request's outcome is recorded: a request may fail (refused, reset, timed out, an error
answer) only while MLServer is being killed and restarted, and a load thread that died fails
the test.

Schedules are seeded. By default (CI) the test runs once per seed in ``CI_SEEDS`` plus one
random seed (``CREDIT_RISK_FAULT_SEED`` instead, to replay it), each with ``CI_ROUND``: every
fault kind at least once, so that all the seeds together cost about one ``FULL_ROUND``.
``CREDIT_RISK_FAULT_ROUNDS=N`` is the soak: one seed, ``N`` full rounds (the schedule of
issue 9, with the 60 s outage). Each run prints its seed and the command that replays it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from logging_sidecar.dead_letters import DEAD_LETTER_FILE
from logging_sidecar.reader import read_records
from logging_sidecar.settings import INFERENCE_EXPERIMENT
from logging_sidecar.shipper import RECORDS_DIR
from serving.capture import _RETRY_AFTER_FAILURE_S as RETRY_AFTER_FAILURE_S
from serving.capture import OPEN_SUFFIX
from stack import processes, services
from tests.helpers import (
    Answer,
    Background,
    Client,
    Failure,
    Load,
    answered_frame,
    check_read_back,
    credit_risk,
    free_port,
    live_group_members,
    serving_service,
    wait_for_log_line,
)
from training.data import load_training_data

pytestmark = pytest.mark.integration

# The soak: this many full rounds for one seed. Unset (CI): CI_ROUND once per seed.
SOAK_ROUNDS = int(os.environ.get("CREDIT_RISK_FAULT_ROUNDS") or 0)
# Seeds CI runs every time, besides one random seed. A seed whose schedule found a bug belongs
# here, with what it found (and may replace one below). None is recorded as having found one:
# four seeds are recorded, as passing one full round when the suite landed (2026-11-28:
# 3695307204, 4151355041, 1796768003, 3765002655), and CI runs the first two, because three
# CI rounds (with their own start and read-back each) already cost about one full round.
# Under CI_ROUND a seed draws another schedule than under the full round
# (CREDIT_RISK_FAULT_ROUNDS=1 replays that one).
CI_SEEDS = (3695307204, 4151355041)
# CREDIT_RISK_FAULT_SEED replays a printed seed; otherwise a new one each session, drawn in
# tests/conftest.py (pytest_configure) so that parallel workers collect the same seed.
EXTRA_SEED = int(os.environ.get("CREDIT_RISK_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
SEEDS = (EXTRA_SEED,) if SOAK_ROUNDS else tuple(dict.fromkeys((*CI_SEEDS, EXTRA_SEED)))
BIG_REQUEST_ROWS = 50_000  # one spool line well over 4 MiB
STALL_LIMIT_S = 10  # shipping reports 503 once nothing shipped this long with records pending
# The soak's outage is issue 9's 60 s (the sidecar's back-off reaches its 30 s cap); CI's
# is shorter but still well past the stall limit, so 'stalled' must be seen during it.
OUTAGE_S = 60 if SOAK_ROUNDS else 25
FAULT_PAUSE_S = 120  # the sidecar waits at a fault point until the test kills it
# One full round: the minimum issue 9 asks for (~7.6 min here with its read-back).
FULL_ROUND = (
    ["sidecar@after_upload"] * 7
    + ["sidecar@after_plan"] * 7
    + ["sidecar@random"] * 6
    + ["mlserver"] * 3
    + ["mlflow"] * 3
    + ["outage", "delete-run", "corrupt-line", "poison-line"]
    + ["big-request"] * 3
)
# One CI round: every fault kind at least once, and a kill between upload and commit (the
# most telling point) twice: four sidecar kills a seed.
CI_ROUND = [
    "sidecar@after_upload",
    "sidecar@after_upload",
    "sidecar@after_plan",
    "sidecar@random",
    "mlserver",
    "mlflow",
    "outage",
    "delete-run",
    "corrupt-line",
    "poison-line",
    "big-request",
]
assert set(CI_ROUND) == set(FULL_ROUND), "a CI round must hold every kind of fault"


def schedule_for(seed: int) -> tuple[list[str], random.Random]:
    """The events of ``seed``'s schedule, in order, and the generator that times them. The
    soak draws exactly as the suite always has, so that a seed printed then replays."""
    rng = random.Random(seed)
    if not SOAK_ROUNDS:
        return rng.sample(CI_ROUND, len(CI_ROUND)), rng
    schedule = []
    for _ in range(SOAK_ROUNDS):
        schedule += rng.sample(FULL_ROUND, len(FULL_ROUND))
    return schedule, rng


def replay_command(seed: int) -> str:
    """The exact command that runs ``seed``'s schedule again."""
    soak = f"CREDIT_RISK_FAULT_ROUNDS={SOAK_ROUNDS} " if SOAK_ROUNDS else ""
    return (
        f"{soak}CREDIT_RISK_FAULT_SEED={seed} .venv/bin/python -m pytest -s "
        f"tests/integration/test_fault_injection.py -k 'exactly_once and seed-{seed}'"
    )


class Health(Background):
    """Polls the sidecar's ``/health/shipping`` and ``/health/live`` in the background and
    keeps every answer with the moment it was seen."""

    def __init__(self, port: int):
        super().__init__()
        self.base = f"http://127.0.0.1:{port}"
        self.seen: list[tuple[float, str, int | None, dict]] = []

    def _run(self):
        while not self.stopping.is_set():
            for path in ("/health/shipping", "/health/live"):
                try:
                    response = httpx.get(self.base + path, timeout=5)
                    body = (
                        response.json()
                        if response.headers.get("content-type", "").startswith("application/json")
                        else {}
                    )
                    self.seen.append((time.monotonic(), path, response.status_code, body))
                except (httpx.HTTPError, ValueError):
                    self.seen.append((time.monotonic(), path, None, {}))
            self.stopping.wait(0.5)

    def between(self, path: str, start: float, end: float) -> list[tuple[int | None, dict]]:
        return [
            (status, body) for moment, p, status, body in self.seen if p == path and start <= moment <= end
        ]


class FaultStack:
    """MLflow, MLServer with capture and the sidecar as real processes that the test kills."""

    def __init__(self, root: Path, spool: Path):
        self.root, self.spool = root, spool
        mlflow_port = free_port()  # kept across restarts: clients keep their URI
        self.mlflow = services.mlflow(root / "mlflow", port=mlflow_port)
        self.tracking_uri = services.tracking_uri(mlflow_port)
        self.sidecar_port = free_port()
        self.experiment = f"{INFERENCE_EXPERIMENT}-{spool.name}"  # each test reads back only its own
        self.live: dict[str, subprocess.Popen] = {}
        self.mlserver_url = ""

    def start(self, service, timeout=180, wait=True) -> subprocess.Popen:
        process = processes.start(service, self.root)
        self.live[service.name] = process
        if wait:
            processes.wait_healthy(service, process, self.root, timeout)
        return process

    def kill(self, name: str) -> bool:
        """SIGKILL the process group; True when it was alive. Asserts no orphan is left."""
        process = self.live.pop(name, None)
        if process is None:
            return False
        alive = process.poll() is None
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=60)
        deadline = time.monotonic() + 10
        while live_group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = live_group_members(process.pid)
        assert not orphans, f"{name}: processes left in its group after SIGKILL: {orphans}"
        return alive

    def start_mlflow(self):
        self.start(self.mlflow, timeout=120)

    def start_mlserver(self, **env):
        service, ports = serving_service(
            self.tracking_uri, name="mlserver", CREDIT_RISK_SPOOL_DIR=str(self.spool), **env
        )
        self.start(service)
        self.mlserver_url = f"http://127.0.0.1:{ports['http']}"
        self.mlserver_metrics = f"http://127.0.0.1:{ports['metrics']}/metrics"

    def sidecar(self, fault_point: str | None = None) -> processes.Service:
        env = {
            "CREDIT_RISK_INFERENCE_EXPERIMENT": self.experiment,
            "CREDIT_RISK_FLUSH_RECORDS": "50",
            "CREDIT_RISK_FLUSH_INTERVAL_S": "1",
            "CREDIT_RISK_STALL_AFTER_S": str(STALL_LIMIT_S),
            "CREDIT_RISK_SIDECAR_DRAIN_S": "5",
        }
        if fault_point:
            env |= {"CREDIT_RISK_FAULT_POINTS": fault_point, "CREDIT_RISK_FAULT_PAUSE_S": str(FAULT_PAUSE_S)}
        name = f"sidecar-{fault_point or 'plain'}"
        return services.sidecar(self.tracking_uri, self.spool, self.sidecar_port, name=name, **env)

    def stop_all(self):
        for name in list(self.live):
            process = self.live.pop(name)
            processes.terminate(process.pid)


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, sample_path):
    """A trained, promoted model in an MLflow store of this module's own (the suite kills
    MLflow, so the session's shared server is not used)."""
    root = tmp_path_factory.mktemp("faults")
    stack = FaultStack(root, root / "unused-spool")
    stack.start_mlflow()
    try:
        result = credit_risk("train", "--data", str(sample_path), tracking_uri=stack.tracking_uri)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stack.stop_all()
    return root


@pytest.fixture
def sample(sample_path) -> pd.DataFrame:
    return load_training_data(sample_path).features.reset_index(drop=True)


def _append_line(spool: Path, line: bytes) -> str:
    """Append one line to the live (open) segment, the way a writer would: one write."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        segments = sorted(spool.glob(f"*{OPEN_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        if segments:
            fd = os.open(segments[-1], os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            return segments[-1].name
        time.sleep(0.2)
    raise AssertionError(f"no open segment in {spool} to append to")


def _records_of_run(client: MlflowClient, run_id: str) -> set[str]:
    """Request ids in a run's batch files, read straight from its artifacts (the run is
    deleted, so ``read_records`` no longer lists it).

    The sidecar may still be at work on the run: a flush whose upload landed in it just before
    the delete fails, and its retry deletes that file from the run and ships the batch into a
    new one (``logging_sidecar.shipper``). A file gone between the listing and the download is
    such a batch; its rows are not excused, so the read-back must find them in the new run."""
    ids = set()
    with tempfile.TemporaryDirectory() as directory:
        for artifact in client.list_artifacts(run_id, RECORDS_DIR):
            try:
                local = client.download_artifacts(run_id, artifact.path, directory)
            except MlflowException:
                if artifact.path in {entry.path for entry in client.list_artifacts(run_id, RECORDS_DIR)}:
                    raise  # still there: not the sidecar's clean-up, a real failure to read
                print(f"{artifact.path} left the deleted run while it was read: moved by the sidecar")
                continue
            ids |= set(pd.read_parquet(local, columns=["request_id"])["request_id"].astype(str))
    return ids


def _read_all(stack: FaultStack, answers: list[Answer], excused: set[str], timeout: float) -> pd.DataFrame:
    """Wait on what a reader sees (never the sidecar's counters): until every answered row
    outside ``excused`` is there, or ``timeout``; the caller's check says what is missing."""
    expected = answered_frame([answer for answer in answers if answer.request_id not in excused])
    wanted = set(zip(expected["request_id"], expected["row_index"], strict=True))
    client = MlflowClient(stack.tracking_uri)
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(client=client, experiment=stack.experiment, deduplicate=False)
        seen = set(zip(records["request_id"].astype(str), records["row_index"].astype("int64"), strict=True))
        if wanted <= seen or time.monotonic() > deadline:
            return records
        time.sleep(3)


def _dead_letters(spool: Path) -> list[str]:
    """The spool lines parked in the dead-letter file, as text."""
    path = spool / DEAD_LETTER_FILE
    if not path.exists():
        return []
    return [json.loads(entry)["line"] for entry in path.read_text().splitlines() if entry.strip()]


def _metric(text: str, fragment: str) -> float:
    """Sum of the samples whose line contains ``fragment`` in a Prometheus text page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if fragment in line and not line.startswith("#") and not line.split("{")[0].endswith("_created")
    )


class Faults:
    """Carries out the schedule and counts the faults that really happened."""

    def __init__(self, stack: FaultStack, client: Client, health: Health, rng: random.Random):
        self.stack, self.client, self.health, self.rng = stack, client, health, rng
        self.happened: Counter[str] = Counter()
        self.mlserver_away: list[tuple[float, float]] = []  # from its kill until clients use the new one
        self.deleted_runs: list[str] = []
        self.outages: list[tuple[float, float]] = []
        self.appended: dict[str, bytes] = {}
        self.first_append_at: float | None = None

    def run(self, event: str) -> None:
        if not event.startswith("sidecar@after_"):  # those start a sidecar of their own
            self.ensure_sidecar()
        getattr(self, event.split("@")[0].replace("-", "_"))(*event.split("@")[1:])
        time.sleep(self.rng.uniform(0, 1))  # traffic flows between faults

    def ensure_sidecar(self):
        if "sidecar-plain" not in self.stack.live:
            self.stack.start(self.stack.sidecar(), timeout=60)

    def sidecar(self, when: str):
        if when == "random":
            time.sleep(self.rng.uniform(0, 3))
        self.happened["sidecar SIGKILL at a random moment"] += self.stack.kill("sidecar-plain")
        if when == "random":
            return
        service = self.stack.sidecar(fault_point=when)
        log = service.log_path(self.stack.root)
        offset = log.stat().st_size if log.exists() else 0
        process = self.stack.start(service, wait=False)
        line = wait_for_log_line(log, f"FAULT-POINT {when} pid=", after=offset, timeout=90)
        assert f"pid={process.pid}" in line, f"fault point reached by another process: {line}"
        assert self.stack.kill(service.name), f"the sidecar paused at {when} was gone before the kill"
        self.happened[f"sidecar SIGKILL at {when}"] += 1

    def mlserver(self):
        time.sleep(self.rng.uniform(0, 2))
        killed_at = time.monotonic()
        self.happened["MLServer process-group SIGKILL"] += self.stack.kill("mlserver")
        self.stack.start_mlserver()
        self.client.url = self.stack.mlserver_url
        self.mlserver_away.append((killed_at, time.monotonic()))

    def failed_while_mlserver_was_up(self) -> list[Failure]:
        """Failed requests whose whole life fell outside every MLServer kill and restart: no
        other fault here (sidecar, MLflow, bad lines) may fail an inference."""
        return [
            failure
            for failure in self.client.failures
            if not any(failure.overlaps(start, end) for start, end in self.mlserver_away)
        ]

    def mlflow(self):
        self.happened["MLflow SIGKILL and restart"] += self.stack.kill("mlflow")
        self.stack.start_mlflow()

    def outage(self):
        started = time.monotonic()
        self.happened[f"MLflow outage of {OUTAGE_S} s"] += self.stack.kill("mlflow")
        time.sleep(OUTAGE_S)
        self.outages.append((started, time.monotonic()))
        self.stack.start_mlflow()

    def delete_run(self):
        client = MlflowClient(self.stack.tracking_uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            experiment = client.get_experiment_by_name(self.stack.experiment)
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs:
                break
            time.sleep(1)
        assert runs, "no inference run to delete after 120 s"
        run = runs[0]
        client.delete_run(run.info.run_id)
        self.deleted_runs.append(run.info.run_id)
        self.happened["inference run deleted"] += 1

    def _append(self, kind: str, line: bytes) -> None:
        segment = _append_line(self.stack.spool, line)
        self.appended[f"{kind} line in {segment}"] = line
        self.first_append_at = self.first_append_at or time.monotonic()
        self.happened[f"{kind} line appended"] += 1

    def corrupt_line(self):
        line = b'{"v": 1, "request_id": "corrupt-' + uuid.uuid4().hex.encode() + b'", "timesta\n'
        self._append("corrupt", line)

    def poison_line(self):
        # Valid JSON without the outputs and features: it must be parked, not block the rest.
        line = f'{{"v": 1, "request_id": "poison-{uuid.uuid4().hex}", "timestamp_ns": {time.time_ns()}}}\n'.encode()
        self._append("poison", line)

    def big_request(self):
        outcome = self.client.send(BIG_REQUEST_ROWS, timeout=300)
        assert isinstance(outcome, Answer), f"a {BIG_REQUEST_ROWS}-row request was not answered: {outcome}"
        self.happened[f"{BIG_REQUEST_ROWS}-row request answered"] += 1


@pytest.mark.timeout(900 + 900 * SOAK_ROUNDS)  # a soak round takes ~8 min here
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{seed}" for seed in SEEDS])
def test_every_answered_row_is_read_back_exactly_once_through_the_faults(
    trained_root, sample, seed, record_property
):
    replay = replay_command(seed)
    record_property("replay", replay)  # tests/conftest.py lists it at the end of the run
    print(f"\nfault-injection seed {seed}; replay: {replay}")
    try:
        _run_the_schedule(trained_root, sample, seed)
    except BaseException as error:
        error.add_note(f"fault-injection seed {seed}; replay: {replay}")
        raise


def _run_the_schedule(trained_root: Path, sample: pd.DataFrame, seed: int) -> None:
    schedule, rng = schedule_for(seed)
    print(f"schedule ({len(schedule)} events): {' '.join(schedule)}")
    stack = FaultStack(trained_root, trained_root / f"spool-{uuid.uuid4().hex[:6]}")
    client = Client(sample, seed=seed)
    took: Counter[str] = Counter()  # seconds per phase and per kind of event, for sizing CI
    try:
        started = time.monotonic()
        stack.start_mlflow()
        stack.start_mlserver()
        client.url = stack.mlserver_url
        stack.start(stack.sidecar(), timeout=60)
        took["start"] = time.monotonic() - started
        with Health(stack.sidecar_port) as health:
            faults = Faults(stack, client, health, rng)
            with Load(client, threads=2):
                for event in schedule:
                    started = time.monotonic()
                    faults.run(event)
                    took[event] += time.monotonic() - started
                faults.ensure_sidecar()
            started = time.monotonic()
            rows = client.answered_rows
            deleted = set()
            for run_id in faults.deleted_runs:
                deleted |= _records_of_run(MlflowClient(stack.tracking_uri), run_id)
            records = _read_all(stack, client.answers, deleted, timeout=300)
            final_metrics = httpx.get(f"http://127.0.0.1:{stack.sidecar_port}/metrics", timeout=10).text
            took["read back"] = time.monotonic() - started
    finally:
        stack.stop_all()

    faults_took = sum(seconds for phase, seconds in took.items() if phase not in ("start", "read back"))
    print(f"faults that happened ({len(schedule)} events in {faults_took:.0f} s):", dict(faults.happened))
    print("seconds taken:", ", ".join(f"{phase} {seconds:.0f}" for phase, seconds in took.items()))
    print(
        f"answered: {len(client.answers)} requests, {rows} rows; failed: {len(client.failures)} requests "
        f"{client.failure_counts()}; read back: {len(records)} records; "
        f"{len(deleted)} requests were in the deleted run"
    )
    planned = Counter(schedule)
    for fault, event in (
        ("sidecar SIGKILL at after_upload", "sidecar@after_upload"),
        ("sidecar SIGKILL at after_plan", "sidecar@after_plan"),
        ("MLServer process-group SIGKILL", "mlserver"),
        ("MLflow SIGKILL and restart", "mlflow"),
        (f"MLflow outage of {OUTAGE_S} s", "outage"),
    ):
        assert faults.happened[fault] >= planned[event], f"{fault}: {faults.happened[fault]} happened"
    sidecar_kills = sum(n for fault, n in faults.happened.items() if fault.startswith("sidecar SIGKILL"))
    planned_kills = sum(n for event, n in planned.items() if event.startswith("sidecar@"))
    assert sidecar_kills >= planned_kills, f"{sidecar_kills} of {planned_kills} sidecar kills happened"

    # Requests fail only while MLServer itself is away: counted above, and none outside.
    outside = faults.failed_while_mlserver_was_up()
    assert not outside, f"{len(outside)} requests failed while MLServer was up, e.g. {outside[:3]}"

    # The oracle: every answered row exactly once, with its features and probability. Rows the
    # operator deleted with the run may be missing (never duplicated); nothing else may be.
    missing = check_read_back(client.answers, records, unanswered=client.unanswered, excused=deleted)
    print(f"{len(missing)} answered rows missing, all of them in the deleted run")

    # Every stuck state was visible while it lasted; liveness never failed for an outage.
    for started, ended in faults.outages:
        shipping = health.between("/health/shipping", started + STALL_LIMIT_S + 5, ended)
        stalled = [body for status, body in shipping if status == 503 and body.get("status") == "stalled"]
        assert stalled, f"/health/shipping never said 'stalled' during the MLflow outage: {shipping[:5]}"
        assert all(body["reason"] and body["since"] and body["pending_records"] > 0 for body in stalled), (
            stalled[:3]
        )
        live = [status for status, _ in health.between("/health/live", started, ended)]
        assert live and all(status == 200 for status in live if status is not None), live

    # The corrupt and the poison line were parked in the dead-letter file, shown as parked by
    # /health/shipping from then on, and counted in a counter that survived the sidecar
    # restarts that followed them.
    dead_letters = _dead_letters(stack.spool)
    for where, line in faults.appended.items():
        assert line.decode().rstrip("\n") in dead_letters, f"{where} is not in the dead-letter file: {line!r}"
    parked = [
        body
        for status, body in health.between("/health/shipping", faults.first_append_at, time.monotonic())
        if status == 503 and body.get("status") == "parked"
    ]
    assert parked and "dead lines" in parked[-1]["reason"], "/health/shipping never showed the parked lines"
    assert _metric(final_metrics, "credit_risk_sidecar_dead_lines") == len(faults.appended), (
        "the dead-line counter lost (or double-counted) the parked lines across restarts:\n"
        + "\n".join(line for line in final_metrics.splitlines() if "dead" in line)
    )


def _require_root_for_tmpfs():
    if os.geteuid() != 0:  # a failure under CI, which runs as root (tests/conftest.py)
        pytest.skip("the full-disk fault mounts a small tmpfs, which needs root")


class FullDisk(Background):
    """Keeps a disk full: whatever space is freed (the sidecar deleting shipped segments, its
    reserve given up) is taken again at once, as a runaway log on the same disk would."""

    def __init__(self, disk: Path):
        super().__init__()
        self.filler = disk / "filler"  # outside the spool folder

    def _run(self):
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self.stopping.is_set():
                for block in (1 << 20, 4096, 512):
                    try:
                        while True:
                            os.write(fd, b"\0" * block)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC, error
                self.stopping.wait(0.05)
        finally:
            os.close(fd)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.filler.unlink()


def test_a_full_spool_disk_fails_no_inference_and_loses_only_what_it_counts(trained_root, sample, tmp_path):
    _require_root_for_tmpfs()
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    stack = FaultStack(trained_root, disk / "spool")
    client = Client(sample, seed=EXTRA_SEED)
    try:
        stack.start_mlflow()
        stack.start_mlserver()
        client.url = stack.mlserver_url
        stack.start(stack.sidecar(), timeout=60)
        with Health(stack.sidecar_port) as health, Load(client, threads=2):
            time.sleep(3)
            first_full = len(client.answers)
            with FullDisk(disk):
                full_since = time.monotonic()
                time.sleep(STALL_LIMIT_S + 10)
                # What a reader has of the rows answered before the disk filled: any still
                # missing now waited through the whole full-disk window, a stuck state.
                before = read_records(client=MlflowClient(stack.tracking_uri), experiment=stack.experiment)
                full_until = time.monotonic()
            # The writer waits this long after a failed write before it tries again.
            time.sleep(RETRY_AFTER_FAILURE_S + 1)
            last_full = len(client.answers)
            time.sleep(5)
        sidecar = stack.live["sidecar-plain"]
        if sidecar.poll() is not None:  # a supervisor restarts it; it must have said so
            assert sidecar.returncode != 0, "the sidecar exited 0 on a full disk"
            stack.live.pop("sidecar-plain")
            stack.start(stack.sidecar(), timeout=60)
        during = {answer.request_id for answer in client.answers[first_full:last_full]}
        records = _read_all(stack, client.answers, during, timeout=180)
        capture_dropped = _metric(
            httpx.get(stack.mlserver_metrics, timeout=10).text, "capture_dropped_rows_total"
        )
        # The count must outlive both processes: SIGKILL them, start them again, ask the sidecar.
        stack.kill("mlserver")
        stack.kill("sidecar-plain")
        stack.start_mlserver()
        stack.start(stack.sidecar(), timeout=60)
        sidecar_url = f"http://127.0.0.1:{stack.sidecar_port}"
        durable_dropped = _metric(
            httpx.get(f"{sidecar_url}/metrics", timeout=10).text, "credit_risk_sidecar_capture_dropped_rows"
        )
        health_dropped = httpx.get(f"{sidecar_url}/health", timeout=10).json()["capture_dropped_rows_total"]
    finally:
        stack.stop_all()
        subprocess.run(["umount", "-l", str(disk)], check=False)

    assert not client.failures, (  # transport errors included: nothing is killed here
        f"{len(client.failures)} requests failed around the full spool disk {client.failure_counts()}: "
        f"{client.failures[:3]}"
    )
    missing = check_read_back(client.answers, records, unanswered=client.unanswered, excused=during)
    print(
        f"full disk for {full_until - full_since:.0f} s: {last_full - first_full} requests answered meanwhile, "
        f"{len(missing)} of their rows not captured, capture counted {capture_dropped:.0f} dropped"
    )
    assert len(missing) == capture_dropped, (
        "rows lost to the full disk differ from the rows counted as dropped"
    )
    assert durable_dropped == health_dropped == capture_dropped, (
        f"after restarts the sidecar reports {durable_dropped:.0f} (metrics) and {health_dropped} (/health) "
        f"dropped rows, where the server had counted {capture_dropped:.0f}"
    )
    captured_before = {answer.request_id for answer in client.answers[:first_full]}
    stuck = captured_before - set(before["request_id"].astype(str))
    shipping = health.between("/health/shipping", full_since + STALL_LIMIT_S + 2, full_until)
    print(f"{len(stuck)} requests captured before the disk filled were not shipped while it was full")
    if stuck:  # shipping could not progress for longer than the stall limit: it must say so
        assert any(status == 503 for status, _ in shipping), (
            f"/health/shipping never said it was stuck: {shipping[:5]}"
        )
