"""The monitor service (``credit-risk monitor --every 15m``): a window every interval, its run
in MLflow, its figures as Prometheus gauges, and what runs after each window.

**The loop.** At start, then every ``every``, it computes the window of length ``window``
ending now (``monitoring.job.monitor_once``, the Production version at that moment) and logs
its run. A failed attempt (MLflow down or refusing, no Production version, no profile) is
retried sooner, after 5 s, doubling up to the interval; the first success puts it back on its
interval. While the probe says MLflow is unreachable, an attempt is not even started (each
MLflow call would wait through its own retries): the loop records why and retries later.

**After each window**, the ``after_window`` callables run in the loop's thread, in order, with
the ``MonitoredWindow``: the plug for the healing policy (issue 20). One that raises is logged
and shown on ``/health`` (``after_window_error``); the loop goes on. A callable that takes
long delays the next window, and ``/health/live`` counts that time as the loop turning only up
to ``CREDIT_RISK_MONITOR_LIVENESS_AFTER``.

**The probe.** A thread asks MLflow's ``/health`` every ``PROBE_EVERY_S`` seconds; its verdict is
on ``/health`` (``mlflow``) and in ``credit_risk_monitor_mlflow_up``.

**Health.** ``/health/live`` is 503 only when the loop has not turned for
``liveness_after`` (the one case a restart helps); an MLflow outage never fails it.
``/health`` has liveness's status code and says the rest: MLflow reachable or not, the last
window (``stale`` when the attempt after it failed or it was recorded over three intervals ago: its
gauges are then marked ``credit_risk_window_stale 1``), the last success, the last error and
how many attempts failed in a row.

Invariant (as the sidecar's): the HTTP thread reads only immutable snapshots published by the
loop and the probe; it never calls into either.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import httpx

from logging_sidecar.stop_flag import StopFlag
from model.identity import utc_timestamp
from monitoring.http import serve_http
from monitoring.job import MonitoredWindow
from monitoring.metrics import MetricsView, MonitorCollector
from monitoring.settings import MonitorSettings, format_duration

logger = logging.getLogger("credit_risk.monitor")

PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 3.0
RETRY_MIN_S = 5.0
_TICK_S = 0.5  # the loop wakes this often while it waits, so that it is seen turning

AfterWindow = Callable[[MonitoredWindow], None]


class ServiceStartError(RuntimeError):
    """The service cannot start (its port is taken); the message says why."""


@dataclass(frozen=True)
class Snapshot:
    """The loop's state, as ``/health`` and ``/metrics`` see it."""

    started_at: float  # epoch seconds
    turned_at: float  # time.monotonic() of the loop's last turn
    window: MonitoredWindow | None  # the last successful window
    last_success_at: float | None
    last_error: str | None  # of the last attempt; None after a success
    last_error_at: float | None
    failures_in_a_row: int
    failures: int  # since the process started
    next_attempt_at: float  # epoch seconds
    after_window_error: str | None  # of the last window's callables


@dataclass(frozen=True)
class Reachability:
    uri: str
    reachable: bool | None  # None before the first probe
    checked_at: float | None
    detail: str | None


class MlflowProbe:
    """Asks MLflow's ``/health`` on a daemon thread; ``current`` is the last verdict."""

    def __init__(self, uri: str, every_s: float = PROBE_EVERY_S):
        self.uri = uri.rstrip("/")
        self.every_s = every_s
        self.current = Reachability(self.uri, None, None, None)
        self._stop = threading.Event()

    def check(self) -> Reachability:
        if not self.uri.startswith(("http://", "https://")):  # a local store: nothing to reach
            return Reachability(self.uri, True, time.time(), None)
        try:
            answer = httpx.get(f"{self.uri}/health", timeout=PROBE_TIMEOUT_S)
            ok, detail = answer.status_code == 200, f"/health answered {answer.status_code}"
        except httpx.HTTPError as error:
            ok, detail = False, f"{type(error).__name__}: {error}"
        return Reachability(self.uri, ok, time.time(), None if ok else detail)

    def start(self) -> None:
        def run():
            while not self._stop.is_set():
                self.current = self.check()
                self._stop.wait(self.every_s)

        self.current = self.check()
        threading.Thread(target=run, name="mlflow-probe", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


class MonitorService:
    """The loop. Only its own thread calls ``step``; other threads read ``snapshot``."""

    def __init__(
        self,
        settings: MonitorSettings,
        compute: Callable[[], MonitoredWindow],
        probe: MlflowProbe,
        after_window: Sequence[AfterWindow] = (),
    ):
        self.settings = settings
        self._compute = compute
        self.probe = probe
        self._after_window = list(after_window)
        self.stopping = StopFlag()  # set by the SIGTERM handler: no lock (see stop_flag)
        now = time.time()
        self.snapshot = Snapshot(
            started_at=now,
            turned_at=time.monotonic(),
            window=None,
            last_success_at=None,
            last_error=None,
            last_error_at=None,
            failures_in_a_row=0,
            failures=0,
            next_attempt_at=now,
            after_window_error=None,
        )

    @property
    def interval_s(self) -> float:
        return self.settings.every.total_seconds()

    def _retry_in(self, failures_in_a_row: int) -> float:
        return min(RETRY_MIN_S * 2 ** (failures_in_a_row - 1), self.interval_s)

    def step(self) -> None:
        """Turn once: attempt a window if one is due."""
        self.snapshot = replace(self.snapshot, turned_at=time.monotonic())
        if time.time() < self.snapshot.next_attempt_at:
            return
        reachable = self.probe.current
        if reachable.reachable is False:
            self._failed(f"MLflow at {reachable.uri} is unreachable ({reachable.detail}); not attempting")
            return
        started = time.time()
        try:
            window = self._compute()
        except Exception as error:  # MLflow down or refusing, no version, no profile: retry
            self._failed(f"{type(error).__name__}: {error}")
            return
        self.snapshot = replace(
            self.snapshot,
            window=window,
            last_success_at=window.finished_at,
            last_error=None,
            last_error_at=None,
            failures_in_a_row=0,
            next_attempt_at=started + self.interval_s,
        )
        result = window.result
        logger.info(
            f"window {result.to_dict()['window']['since']} to {result.to_dict()['window']['until']}: "
            f"version {window.version}, {result.rows} rows, status {result.status}, run {window.run_id} "
            f"({', '.join(f'{k} {v:.1f} s' for k, v in window.seconds.items())})"
        )
        self._run_after_window(window)

    def _failed(self, message: str) -> None:
        failures_in_a_row = self.snapshot.failures_in_a_row + 1
        wait = self._retry_in(failures_in_a_row)
        self.snapshot = replace(
            self.snapshot,
            last_error=message,
            last_error_at=time.time(),
            failures_in_a_row=failures_in_a_row,
            failures=self.snapshot.failures + 1,
            next_attempt_at=time.time() + wait,
        )
        logger.warning(f"window failed ({failures_in_a_row} in a row), retrying in {wait:.0f} s: {message}")

    def _run_after_window(self, window: MonitoredWindow) -> None:
        error = None
        for callable_ in self._after_window:
            self.snapshot = replace(self.snapshot, turned_at=time.monotonic())
            try:
                callable_(window)
            except Exception as exception:  # the policy's failure is not the monitor's
                name = getattr(callable_, "__name__", repr(callable_))
                error = f"{name}: {type(exception).__name__}: {exception}"
                logger.exception(f"after-window callable {name} failed")
        self.snapshot = replace(self.snapshot, turned_at=time.monotonic(), after_window_error=error)

    def run(self) -> None:
        """Step until ``stopping`` is set."""
        while not self.stopping.is_set():
            self.step()
            self.stopping.wait(_TICK_S)

    # -- what others see ---------------------------------------------------------------

    def stale(self, now: float | None = None) -> bool:
        """The last window is not current: the attempt after it failed, or it was recorded more
        than three intervals ago (a slow or stuck loop; the ``CreditRiskMonitorStale`` alert's
        rule). False before any window: there is nothing to mark."""
        snapshot, now = self.snapshot, time.time() if now is None else now
        if snapshot.window is None:
            return False
        return snapshot.last_error is not None or now - snapshot.last_success_at > 3 * self.interval_s

    def metrics_view(self) -> MetricsView:
        snapshot = self.snapshot
        return MetricsView(
            window=snapshot.window,
            last_success_at=snapshot.last_success_at,
            last_attempt_failed=snapshot.last_error is not None,
            mlflow_up=self.probe.current.reachable,
            failures=snapshot.failures,
            interval_s=self.interval_s,
            auc_margin=self.settings.auc_margin,
            window_stale=self.stale(),
        )

    def liveness(self, monotonic_now: float | None = None) -> tuple[bool, dict]:
        now = time.monotonic() if monotonic_now is None else monotonic_now
        age = now - self.snapshot.turned_at
        alive = age <= self.settings.liveness_after.total_seconds()
        return alive, {"status": "ok" if alive else "stuck", "loop_age_s": round(age, 3)}

    def health(self) -> tuple[bool, dict]:
        """Liveness decides the status code; the body says the rest."""
        snapshot, reachable = self.snapshot, self.probe.current
        alive, live = self.liveness()
        window = snapshot.window

        def stamp(moment: float | None) -> str | None:
            return None if moment is None else utc_timestamp(moment)

        return alive, {
            "status": live["status"],
            "live": live,
            "mlflow": {
                "uri": reachable.uri,
                "reachable": reachable.reachable,
                "checked_at": stamp(reachable.checked_at),
                "detail": reachable.detail,
            },
            "every": format_duration(self.settings.every),
            "window_length": format_duration(self.settings.window),
            "last_window": None if window is None else {**_window_summary(window), "stale": self.stale()},
            "last_success_at": stamp(snapshot.last_success_at),
            "last_error": snapshot.last_error,
            "last_error_at": stamp(snapshot.last_error_at),
            "failures_in_a_row": snapshot.failures_in_a_row,
            "next_attempt_at": stamp(snapshot.next_attempt_at),
            "after_window_error": snapshot.after_window_error,
            "started_at": stamp(snapshot.started_at),
        }


def _window_summary(window: MonitoredWindow) -> dict:
    result = window.result.to_dict()
    outcomes = result["outcomes"]
    return {
        "model_version": window.version,
        "window": result["window"],
        "rows": result["rows"],
        "status": result["status"],
        "outcomes_roc_auc": None if outcomes is None else outcomes["roc_auc"],
        "monitoring_run_id": window.run_id,
        "profile_source": result["profile_source"],
        "finished_at": utc_timestamp(window.finished_at),
    }


def run_service(service: MonitorService, model: str) -> None:
    """Run ``service`` in this thread until SIGTERM or SIGINT, with the probe and the HTTP
    server (``/health``, ``/health/live``, ``/metrics`` labelled ``model``) beside it."""
    host, port = service.settings.host, service.settings.port
    try:
        server = serve_http(host, port, service, MonitorCollector(model, service.metrics_view))
    except OSError as error:
        raise ServiceStartError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    service.probe.start()

    received: list[int] = []

    def stop(signum, _frame):  # no logging here: a handler may run in the middle of a log write
        received.append(signum)
        service.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    logger.info(
        f"monitor: a {format_duration(service.settings.window)} window every "
        f"{format_duration(service.settings.every)}, MLflow {service.probe.uri}, "
        f"health and metrics on http://{host}:{port}"
    )
    try:
        service.run()
        if received:
            logger.info(f"signal {signal.Signals(received[0]).name}: stopped after the step in progress")
    finally:
        service.probe.stop()
        server.shutdown()
        server.server_close()
