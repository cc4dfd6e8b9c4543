"""Shared test plumbing: free ports and real server processes (never mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from logging_sidecar.settings import DEFAULT_PORT as SIDECAR_PORT
from serving.settings import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, MODEL_NAME
from stack import processes, services

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REPO / "data" / "cs-training-sample.csv"
REAL_DATA = REPO.parent / "shared" / "data" / "cs-training-dev.csv"
# The stack's default ports: tests never take them, so they can run beside a live stack.
DEFAULT_PORTS = frozenset(
    {services.MLFLOW_PORT, DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT, SIDECAR_PORT}
)


def free_port() -> int:
    """A free TCP port on loopback, never one of the stack's defaults."""
    return processes.free_port(avoid=DEFAULT_PORTS)


@contextmanager
def running(service: processes.Service, state_dir: Path, timeout: float = 180):
    """Start a real process, wait until healthy, and always stop it afterwards."""
    process = processes.start(service, state_dir)
    try:
        processes.wait_healthy(service, process, state_dir, timeout)
        yield process
    finally:
        processes.terminate(process.pid)
        process.wait(timeout=30)


@contextmanager
def mlflow_tracking_server(state_dir: Path):
    port = free_port()
    with running(services.mlflow(state_dir / "mlflow", port=port), state_dir, timeout=120):
        yield services.tracking_uri(port)


def credit_risk(*args: str, tracking_uri: str, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """Run the real ``credit-risk`` command and capture its output."""
    return subprocess.run(
        [str(BIN / "credit-risk"), *args],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def serving_service(tracking_uri: str, name: str = "serving", workers: int = 0, **env):
    """``credit-risk serve`` on three free ports. ``workers`` other than 0 is refused by the
    server (one process follows the registry); it is here so that a test can check that."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    service = services.serving(
        tracking_uri,
        ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        name=name,
        MLSERVER_PARALLEL_WORKERS=str(workers),
        **env,
    )
    return service, ports


# -- fault tests: process groups, log lines, and the client's own record of answers ----------


def live_group_members(pgid: int) -> list[int]:
    """Processes (zombies aside) still in process group ``pgid``: after the group was killed,
    anything listed is an orphan."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def wait_for_log_line(path: Path, text: str, *, after: int = 0, timeout: float = 60) -> str:
    """The first line containing ``text`` written to ``path`` past byte ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as log:
                log.seek(after)
                for line in log.read().decode(errors="replace").splitlines():
                    if text in line:
                        return line
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no line with {text!r} in {path} after {timeout:.0f} s")


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it answered: the oracle of the capture tests."""

    request_id: str
    features: pd.DataFrame
    probability: np.ndarray
    replica: str | None = None


class HeldBody:
    """A request body sent in two halves: the second only once ``release`` is called, so the
    request is certainly in flight (accepted, not finished) in between."""

    def __init__(self):
        self.first_half_sent = threading.Event()
        self._released = threading.Event()

    def halves(self, body: bytes):
        middle = len(body) // 2
        yield body[:middle]
        self.first_half_sent.set()  # httpx asks for the next part once it sent this one
        self._released.wait(timeout=300)
        yield body[middle:]

    def release(self):
        self._released.set()


class Client:
    """Posts V2 requests built from sample rows and remembers what was answered, by whom.

    ``url`` may be changed between requests (a restarted server gets new ports). A request
    that was never answered is remembered too (``unanswered``): the server may have scored it
    and captured it before it died, so its records may exist without being an answer.
    """

    def __init__(self, sample: pd.DataFrame, url: str = "", replica: str | None = None, seed: int = 0):
        self.sample = sample
        self.url = url
        self.replica = replica
        self.random = np.random.default_rng(seed)
        self.answers: list[Answer] = []
        self.unanswered: list[str] = []
        self.refused = 0  # connection refused: never accepted by a server
        self.cut_off: list[tuple[str, str]] = []  # (request id, what happened): no 200 answer
        self._lock = threading.Lock()

    def rows(self, count: int) -> pd.DataFrame:
        picks = self.random.integers(0, len(self.sample), size=count)
        return self.sample.iloc[picks].reset_index(drop=True)

    def send(self, rows: int = 1, timeout: float = 120, hold: HeldBody | None = None) -> Answer | None:
        """One request; with ``hold``, its body is sent in two halves (see ``HeldBody``)."""
        # Imported here: that module imports this one.
        from tests.integration.test_serving import v2_body

        frame = self.rows(rows)
        request_id = f"req-{uuid.uuid4().hex}"
        body = json.dumps(v2_body(frame, id=request_id)).encode()
        try:
            # A new connection per request: a kept-alive one may be closed by a stopping
            # server between requests, which is no cut-off.
            response = httpx.post(
                f"{self.url}/v2/models/{MODEL_NAME}/infer",
                content=body if hold is None else hold.halves(body),
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            )
        except httpx.ConnectError:
            with self._lock:
                self.refused += 1
            return None
        except httpx.HTTPError as error:
            with self._lock:
                self.unanswered.append(request_id)
                self.cut_off.append((request_id, f"{type(error).__name__}: {error}"))
            return None
        if response.status_code != 200:
            with self._lock:
                self.unanswered.append(request_id)
                self.cut_off.append((request_id, f"HTTP {response.status_code} {response.text[:200]}"))
            return None
        outputs = {o["name"]: np.ravel(o["data"]) for o in response.json()["outputs"]}
        answer = Answer(request_id, frame, outputs["probability"].astype("float64"), self.replica)
        with self._lock:
            self.answers.append(answer)
        return answer

    @property
    def answered_rows(self) -> int:
        return sum(len(a.features) for a in self.answers)


class Background:
    """``threads`` daemon threads running ``_run`` for the length of a ``with`` block; ``_run``
    returns once ``stopping`` is set."""

    join_timeout_s = 30.0

    def __init__(self, threads: int = 1):
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        raise NotImplementedError

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.join_timeout_s)


class Load(Background):
    """Client threads sending small requests until stopped (traffic while faults happen)."""

    join_timeout_s = 120.0

    def __init__(self, client: Client, threads: int = 2, row_choices=(1, 1, 1, 3, 20)):
        super().__init__(threads)
        self.client, self.row_choices = client, row_choices

    def _run(self):
        while not self.stopping.is_set():
            if self.client.send(int(self.client.random.choice(self.row_choices)), timeout=60) is None:
                time.sleep(0.1)  # the server is away: don't spin


def answered_frame(answers: list[Answer]) -> pd.DataFrame:
    """One row per answered row: request id, row index, features, probability, replica."""
    from model.schema import FEATURES

    frames = []
    for answer in answers:
        frame = answer.features[list(FEATURES)].astype("float64").reset_index(drop=True)
        frame.insert(0, "row_index", np.arange(len(frame), dtype="int64"))
        frame.insert(0, "request_id", answer.request_id)
        frame["probability"] = answer.probability
        frame["replica"] = answer.replica
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def check_read_back(
    answers: list[Answer],
    records: pd.DataFrame,
    *,
    unanswered: list[str] = (),
    excused: set[str] = frozenset(),
    check_replica: bool = False,
) -> pd.DataFrame:
    """Every answered row read back exactly once with the features and probability it was
    answered with. Rows of ``excused`` requests (lost to a fault the test accounts for
    elsewhere) may be missing, never duplicated; records of requests never sent fail.
    Returns the answered rows that are missing (all excused)."""
    from model.schema import FEATURES

    skipped = records.attrs.get("skipped")
    assert not skipped, f"batches read_records could not read: {skipped}"
    expected = answered_frame(answers)
    keys = ["request_id", "row_index"]
    got = records.assign(
        request_id=records["request_id"].astype(str), row_index=records["row_index"].astype("int64")
    )
    sent = set(expected["request_id"]) | set(unanswered)
    strangers = set(got["request_id"]) - sent
    assert not strangers, (
        f"{len(strangers)} requests in the records were never sent, e.g. {sorted(strangers)[:3]}"
    )
    copies = got.groupby(keys).size()
    twice = copies[copies > 1]
    assert twice.empty, f"{len(twice)} rows read back more than once, e.g. {twice.index[:3].tolist()}"
    joined = expected.merge(got, on=keys, how="left", suffixes=("", "_record"), indicator=True)
    missing = joined[joined["_merge"] == "left_only"]
    unexcused = missing[~missing["request_id"].isin(excused)]
    assert unexcused.empty, (
        f"{len(unexcused)} of {len(expected)} answered rows were never read back "
        f"({unexcused['request_id'].nunique()} requests, e.g. {unexcused['request_id'].iloc[:3].tolist()})"
    )
    found = joined[joined["_merge"] == "both"]
    for name in (*FEATURES, "probability"):
        same = np.isclose(found[name], found[f"{name}_record"], rtol=0, atol=0, equal_nan=True)
        assert same.all(), f"{(~same).sum()} rows read back with another {name} than answered"
    if check_replica:
        wrong = found[found["replica"] != found["replica_record"].astype(str)]
        assert wrong.empty, f"{len(wrong)} rows read back with the wrong replica, e.g. {wrong[keys].head(3)}"
    return missing
