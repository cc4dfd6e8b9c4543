"""Shared test plumbing: free ports and real server processes (never mocks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from logging_sidecar.settings import DEFAULT_PORT as SIDECAR_PORT
from monitoring.settings import DEFAULT_PORT as MONITOR_PORT
from serving.settings import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, MODEL_NAME
from stack import processes, services

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REPO / "data" / "cs-training-sample.csv"
REAL_DATA = REPO.parent / "shared" / "data" / "cs-training-dev.csv"
# The stack's default ports: tests never take them, so they can run beside a live stack.
DEFAULT_PORTS = frozenset(
    {
        services.MLFLOW_PORT,
        DEFAULT_HTTP_PORT,
        DEFAULT_GRPC_PORT,
        DEFAULT_METRICS_PORT,
        SIDECAR_PORT,
        MONITOR_PORT,
    }
)


# Ports for the servers tests start. A port the kernel calls free (bind to port 0) is free only
# when asked: a server that a parallel worker starts a moment later may be handed the same
# one, and CI saw a module's MLflow server lose its port that way while its tests went on
# talking to another test's server, with auth on. So each xdist worker hands out ports from
# a block of its own, below the kernel's ephemeral range (where bind-to-0 and outgoing
# connections take theirs), one after another from a random start (two sessions on one
# machine stay apart), skipping any port bound at the moment.
_PORT_BLOCK, _FIRST_PORT = 1000, 20000


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other kernels start higher


_BLOCKS = max(1, (_ephemeral_ports_start() - _FIRST_PORT) // _PORT_BLOCK)
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
_BLOCK_START = _FIRST_PORT + (_WORKER % _BLOCKS) * _PORT_BLOCK
_next_offset = int.from_bytes(os.urandom(2)) % _PORT_BLOCK
_port_lock = threading.Lock()


def free_port() -> int:
    """A TCP port free on loopback now, from this worker's own block; never a default port."""
    global _next_offset
    with _port_lock:
        for _ in range(_PORT_BLOCK):
            port = _BLOCK_START + _next_offset
            _next_offset = (_next_offset + 1) % _PORT_BLOCK
            if port in DEFAULT_PORTS:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no free port in {_BLOCK_START}-{_BLOCK_START + _PORT_BLOCK - 1}")


# Where nobody answers: a port bound for the life of the test process and never listened on,
# so a connection to it is refused at once. A port from free_port() would not do: it is free
# only when asked, and a server that another test starts later may take it. Bound without
# SO_REUSEADDR, nothing else can bind it, with or without that option.
_REFUSING = socket.socket()
_REFUSING.bind(("127.0.0.1", 0))
REFUSED_PORT: int = _REFUSING.getsockname()[1]
NOBODY_URL = f"http://127.0.0.1:{REFUSED_PORT}"


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


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a command's stderr, after the line naming the tracking
    server when the command printed one (commands that use MLflow say which server first)."""
    lines = [line for line in err.splitlines() if line.strip()]
    if lines and lines[0].startswith("tracking server: "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


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


# Kinds of ``Failure``: ``refused`` never reached a server (connection refused), so it was never
# scored; the others may have been scored and captured before the answer was lost.
REFUSED, TRANSPORT, STATUS, BAD_ANSWER = "refused", "transport", "status", "bad answer"


@dataclass(frozen=True)
class Failure:
    """One request that got no usable answer, as the client saw it: ``kind`` is ``refused``
    (connection refused), ``transport`` (timeout, reset, connection closed), ``status`` (an
    answer other than 200) or ``bad answer`` (a 200 that is not a V2 answer); ``started`` and
    ``ended`` are ``time.monotonic()`` readings around the request."""

    request_id: str
    kind: str
    detail: str
    started: float
    ended: float

    def overlaps(self, start: float, end: float) -> bool:
        return self.started <= end and self.ended >= start


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
    """Posts V2 requests built from sample rows and records every outcome: each request ends
    as exactly one ``Answer`` or one ``Failure``, and ``send`` returns it.

    ``url`` may be changed between requests (a restarted server gets new ports). A request
    that was not answered may still have been scored and captured before its answer was lost
    (``unanswered``): its records may exist without being an answer.
    """

    def __init__(self, sample: pd.DataFrame, url: str = "", replica: str | None = None, seed: int = 0):
        self.sample = sample
        self.url = url
        self.replica = replica
        self.random = np.random.default_rng(seed)
        self.answers: list[Answer] = []
        self.failures: list[Failure] = []
        self._lock = threading.Lock()

    def rows(self, count: int) -> pd.DataFrame:
        picks = self.random.integers(0, len(self.sample), size=count)  # numpy locks its generator
        return self.sample.iloc[picks].reset_index(drop=True)

    def send(self, rows: int = 1, timeout: float = 120, hold: HeldBody | None = None) -> Answer | Failure:
        """One request; with ``hold``, its body is sent in two halves (see ``HeldBody``)."""
        # Imported here: that module imports this one.
        from tests.integration.test_serving import v2_body

        frame = self.rows(rows)
        request_id = f"req-{uuid.uuid4().hex}"
        body = json.dumps(v2_body(frame, id=request_id)).encode()
        started = time.monotonic()

        def failed(kind: str, detail: str) -> Failure:
            failure = Failure(request_id, kind, detail, started, time.monotonic())
            with self._lock:
                self.failures.append(failure)
            return failure

        try:
            # A new connection per request: a kept-alive one may be closed by a stopping
            # server between requests, which is no failure of that request.
            response = httpx.post(
                f"{self.url}/v2/models/{MODEL_NAME}/infer",
                content=body if hold is None else hold.halves(body),
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            )
        except httpx.ConnectError as error:
            return failed(REFUSED, f"{type(error).__name__}: {error}")
        except httpx.RequestError as error:  # timeouts, resets, a connection closed unanswered
            return failed(TRANSPORT, f"{type(error).__name__}: {error}")
        if response.status_code != 200:
            return failed(STATUS, f"HTTP {response.status_code} {response.text[:200]}")
        try:
            outputs = {o["name"]: np.ravel(o["data"]) for o in response.json()["outputs"]}
            probability = outputs["probability"].astype("float64")
        except (ValueError, KeyError, TypeError) as error:
            return failed(BAD_ANSWER, f"{type(error).__name__}: {error}: {response.text[:200]}")
        answer = Answer(request_id, frame, probability, self.replica)
        with self._lock:
            self.answers.append(answer)
        return answer

    @property
    def answered_rows(self) -> int:
        return sum(len(a.features) for a in self.answers)

    @property
    def unanswered(self) -> list[str]:
        """Requests that may have been scored without their answer arriving."""
        return [failure.request_id for failure in self.failures if failure.kind != REFUSED]

    def failure_counts(self) -> dict[str, int]:
        """Failures by kind, for the test's report."""
        counts: dict[str, int] = {}
        for failure in self.failures:
            counts[failure.kind] = counts.get(failure.kind, 0) + 1
        return counts


class Background:
    """``threads`` daemon threads running ``_run`` for the length of a ``with`` block; ``_run``
    returns once ``stopping`` is set.

    No thread ends unnoticed: an exception that escapes ``_run`` is recorded with its
    traceback, and leaving the block fails (``AssertionError``) when a thread died or did not
    stop within ``join_timeout_s``. When the block itself raised, that error is kept and the
    dead threads' tracebacks are printed beside it.
    """

    join_timeout_s = 30.0

    def __init__(self, threads: int = 1):
        self.stopping = threading.Event()
        self.died: list[str] = []
        name = type(self).__name__
        self.threads = [
            threading.Thread(target=self._guarded, name=f"{name}-{n}", daemon=True) for n in range(threads)
        ]

    def _run(self):
        raise NotImplementedError

    def _guarded(self):
        try:
            self._run()
        except BaseException:
            self.died.append(f"{threading.current_thread().name} died:\n{traceback.format_exc()}")

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.join_timeout_s)
        stuck = [thread.name for thread in self.threads if thread.is_alive()]
        problems = self.died + [
            f"{name} still running {self.join_timeout_s:.0f} s after stop" for name in stuck
        ]
        if problems and exc_type is None:
            raise AssertionError("background threads failed:\n" + "\n".join(problems))
        if problems:
            print("background threads failed as well:\n" + "\n".join(problems))
        return False


class Load(Background):
    """Client threads sending small requests until stopped (traffic while faults happen).
    Every outcome lands in the client's ``answers`` or ``failures``."""

    join_timeout_s = 120.0  # longer than a request's own timeout

    def __init__(self, client: Client, threads: int = 2, row_choices=(1, 1, 1, 3, 20)):
        super().__init__(threads)
        self.client, self.row_choices = client, row_choices

    def _run(self):
        while not self.stopping.is_set():
            rows = int(self.client.random.choice(self.row_choices))
            if isinstance(self.client.send(rows, timeout=60), Failure):
                self.stopping.wait(0.1)  # the server is away: don't spin


class InFlight(Background):
    """One request sent on a thread of its own, so that the test can act while it is in
    flight (with ``HeldBody``); its outcome is ``outcome`` once the block has ended."""

    join_timeout_s = 150.0  # longer than the request's own timeout

    def __init__(self, client: Client, rows: int, hold: HeldBody | None = None):
        super().__init__(1)
        self.client, self.rows, self.hold = client, rows, hold
        self.outcome: Answer | Failure | None = None

    def _run(self):
        self.outcome = self.client.send(self.rows, hold=self.hold)


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
