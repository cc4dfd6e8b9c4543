"""The sidecar's loop: read the spool, plan a flush, ship it, commit it; back off after a
failure; drain on SIGTERM. Each step also has the janitor keep the spool bounded and clean,
applies the retention when one is set and due (never while draining), and ends by publishing
a health snapshot. One sidecar per spool (``lock_spool``). ``logging_sidecar.drain_once``
runs the same steps until the spool is empty, for a volume no server writes any more.

Delivery is at least once (a flush is committed only after MLflow accepted all of it) and
exactly once as seen by a reader (a replayed flush rewrites the same artifact names; the
reader also drops duplicate ``(request_id, row_index, timestamp)`` records).

Errors talking to MLflow, and a full disk, are retried with back-off for ever and shown by
``/health/shipping``; any other error ends the process with a non-zero status, for its
supervisor (``credit-risk up``, compose, Kubernetes) to restart it.

Who does what: ``backlog`` (read positions and pending chunks), ``shipper`` (MLflow),
``state`` (SQLite), ``janitor`` (segments, locks, trimming, disk reserve), ``dead_letters``,
``ledgers`` (the server's drop counts), ``retention`` (pruning past the window), ``health`` and
``http`` (answers over the snapshot), ``metrics``, ``faults`` (the test-only hook called at
named points of a flush and of a prune).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

from mlflow.exceptions import MlflowException
from sqlalchemy.exc import OperationalError

from logging_sidecar.backlog import Backlog, byte_ranges
from logging_sidecar.dead_letters import DeadLetters
from logging_sidecar.faults import FaultHook, no_faults
from logging_sidecar.health import HealthRules, Snapshot
from logging_sidecar.http import serve_http
from logging_sidecar.janitor import DiskReserve, Janitor
from logging_sidecar.ledgers import CaptureDrops
from logging_sidecar.metrics import SidecarMetrics
from logging_sidecar.retention import RecordPruner, RetentionSchedule
from logging_sidecar.settings import SidecarSettings
from logging_sidecar.shipper import Shipper, group_by_run
from logging_sidecar.spool import list_segments
from logging_sidecar.state import Flush, State
from logging_sidecar.stop_flag import StopFlag
from serving.spool_format import live_writers

logger = logging.getLogger("credit_risk.sidecar")

SPOOL_LOCK_FILE = ".sidecar.lock"
POLL_INTERVAL_S = 0.2
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
# Local trouble worth retrying: the disk (or SQLite on it) is full or busy.
_LOCAL_RETRYABLE = (OSError, OperationalError)


def _disk_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, OperationalError) and "full" in str(error)


class Backoff:
    """When to try again after a failure: the delay doubles from ``minimum`` to ``maximum``
    and falls back to ``minimum`` after a pass without error; during a drain, at most 1 s."""

    def __init__(self, minimum: float, maximum: float):
        self.minimum, self.maximum = minimum, maximum
        self.delay = minimum
        self._retry_at = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._retry_at

    def now(self) -> None:
        self._retry_at = 0.0

    def succeeded(self) -> None:
        self.delay = self.minimum

    def failed(self, draining: bool) -> float:
        """Schedule the next try; returns the wait."""
        wait = min(self.delay, 1.0) if draining else self.delay
        self._retry_at = time.monotonic() + wait
        self.delay = min(self.delay * 2, self.maximum)
        return wait


class Sidecar:
    """The loop. Only its own thread calls its methods; other threads read ``snapshot``."""

    def __init__(
        self, settings: SidecarSettings, shipper: Shipper | None = None, faults: FaultHook = no_faults
    ):
        self.settings = settings
        self.spool = settings.spool.directory
        self.spool.mkdir(parents=True, exist_ok=True)
        self.state = State(settings.state_path)
        self.shipper = shipper or Shipper(settings.experiment, self.state)
        self.metrics = SidecarMetrics()
        self.dead_letters = DeadLetters(self.spool, self.state)
        self.janitor = Janitor(
            self.spool,
            self.state,
            max_bytes=settings.spool.max_bytes,
            max_line_bytes=settings.max_line_bytes,
            reserve=DiskReserve(settings.state_path.parent),
        )
        self.capture_drops = CaptureDrops(self.spool)
        self.backlog = Backlog(
            self.spool,
            self.state.shipped_offsets(),
            max_line_bytes=settings.max_line_bytes,
            park=self.dead_letters.park,
            on_read=self.metrics.received.inc,
        )
        self.retention = (
            RetentionSchedule(
                settings.retention_days,
                settings.prune_every_s,
                RecordPruner(settings.experiment, faults=faults),
                self.spool,
                self.metrics,
            )
            if settings.retention_days is not None
            else None
        )
        self._faults = faults
        self._inflight: tuple[Flush, list[dict]] | None = None
        self._backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        self.last_error: str | None = None
        self.error_is_permanent = False
        self.shipped_records = self.state.shipped_records()
        self.spool_bytes = 0
        self.spool_full = False
        self.pending_records = 0
        self.pending_since: float | None = None
        self.turned_at = time.monotonic()
        self.progress_at = time.time()  # last commit, or start
        self.stopping = StopFlag()  # set by the SIGTERM handler: no lock (see stop_flag)
        self.draining = False
        self.snapshot = self._publish()

    # -- one step ----------------------------------------------------------------------

    def step(self) -> None:
        """One pass: replay a planned flush, sweep the spool, read, ship what is due, publish."""
        self.turned_at = time.monotonic()
        self.snapshot = replace(self.snapshot, turned_at=self.turned_at)
        try:
            self.janitor.reserve.ensure()
            if self._inflight is None and (planned := self.state.planned()):
                self._inflight = (planned, self.backlog.replay(planned))
            segments = self._sweep()
            self.backlog.read_new(segments, room=self.settings.max_batch_records - self.backlog.rows)
        except _LOCAL_RETRYABLE as error:  # a full disk: retried, and shown by the health
            self._failed(error)
        else:
            self._ship()
            if self.retention is not None and not self.draining:
                self.retention.run_if_due()
        finally:
            self.snapshot = self._publish()

    def _sweep(self):
        # A planned flush is in flight by now (replayed above): its segments stay.
        protected = set(self._inflight[0].ranges) if self._inflight else set()
        sweep = self.janitor.sweep(protected, self.backlog.rows_by_segment())
        self.backlog.forget(sweep.removed)
        self.spool_bytes, self.spool_full = sweep.spool_bytes, sweep.over_limit
        self.capture_drops.refresh()
        return sweep.segments

    # -- shipping ----------------------------------------------------------------------

    def _oldest_pending_ns(self) -> int | None:
        stamps = [] if (oldest := self.backlog.oldest_ns()) is None else [oldest]
        if self._inflight:
            stamps += [r["timestamp_ns"] for r in self._inflight[1][:1]]
        return min(stamps) if stamps else None

    def _due(self) -> bool:
        if self.backlog.empty:
            return False
        rows = self.backlog.rows
        if rows >= self.settings.flush_records or rows == 0 or self.draining:
            return True  # rows == 0: only dead lines, whose offsets want committing
        oldest = self._oldest_pending_ns()
        return oldest is not None and time.time_ns() - oldest >= self.settings.flush_interval_s * 1e9

    def _plan(self) -> tuple[Flush, list[dict]]:
        chunks = self.backlog.next_batch(self.settings.max_batch_records)
        rows = sum(chunk.rows for chunk in chunks)
        flush = self.state.plan(byte_ranges(chunks), rows, created_ms=int(time.time() * 1000))
        self.backlog.release(chunks)  # only once the plan is stored
        self._faults("after_plan")
        return flush, [request for chunk in chunks for request in chunk.requests]

    def _ship_inflight(self) -> None:
        flush, requests = self._inflight
        started = time.perf_counter()
        shipped = self.shipper.ship(flush, requests)
        self._faults("after_upload")
        self.state.commit(flush)
        self._inflight = None
        self.progress_at = time.time()
        self.shipped_records += flush.records
        self.metrics.shipped.inc(shipped)
        self.metrics.flushes.inc()
        logger.info(f"flush {flush.id}: shipped {shipped} records in {time.perf_counter() - started:.2f} s")
        self._faults("after_commit")

    def _ship(self) -> None:
        """Ship what is due; a failure is retried later, after checking what MLflow lost."""
        if not self._backoff.ready():
            return
        try:
            if self.last_error is not None and self._inflight is not None:
                self.shipper.recover(self._inflight[0], list(group_by_run(self._inflight[1])))
            if self._inflight is None and self._due():
                self._inflight = self._plan()
            if self._inflight is not None:
                self._ship_inflight()
            self._backoff.succeeded()
            self.last_error = None
            self.error_is_permanent = False
        except Exception as error:  # MLflow down, slow or refusing: retry, never give up
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        self.metrics.failed_flushes.inc()
        self.last_error = f"{type(error).__name__}: {error}"
        self.error_is_permanent = isinstance(error, MlflowException) and error.get_http_status_code() < 500
        if _disk_full(error) and self.janitor.reserve.release():
            self._backoff.now()  # at once, into the room just freed
            return
        wait = self._backoff.failed(self.draining)
        logger.warning(f"flush failed, retrying in {wait:.0f} s: {self.last_error}")

    # -- what others see ---------------------------------------------------------------

    def _publish(self) -> Snapshot:
        """Update the gauges and take the snapshot that health answers from until the next."""
        inflight = self._inflight[0].records if self._inflight else 0
        self.pending_records = self.backlog.rows + inflight
        if self.pending_records == 0:
            self.pending_since = None
        elif self.pending_since is None:
            self.pending_since = time.time()
        oldest = self._oldest_pending_ns()
        metrics = self.metrics
        metrics.pending.set(self.pending_records)
        metrics.oldest_age.set(0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9))
        metrics.spool_bytes.set(self.spool_bytes)
        metrics.spool_full.set(int(self.spool_full))
        metrics.dropped.set(self.janitor.records_dropped)
        metrics.dead_lines.set(self.dead_letters.total)
        metrics.capture_dropped.set(self.capture_drops.total)
        return Snapshot(
            turned_at=self.turned_at,
            progress_at=self.progress_at,
            pending_since=self.pending_since,
            pending_records=self.pending_records,
            parked_batch=self._inflight is not None and self.error_is_permanent,
            retry_every_s=self._backoff.delay,
            dead_lines=self.dead_letters.total,
            dead_lines_unfiled=self.dead_letters.unfiled,
            dead_letters=str(self.dead_letters.path),
            dead_letters_since=self.dead_letters.waiting_since(),
            records_dropped=self.janitor.records_dropped,
            capture_dropped_rows=self.capture_drops.total,
            shipped_records=self.shipped_records,
            last_error=self.last_error,
            spool_bytes=self.spool_bytes,
        )

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping.is_set():
            self.step()
            self.stopping.wait(POLL_INTERVAL_S)
        self.drain()

    def drain(self) -> int:
        """After SIGTERM: wait until every writer has released the spool (an orchestrator
        signals the server and the sidecar at once, and the server still answers what is in
        flight), then ship everything, within ``drain_s``. Returns what is left unshipped,
        which stays in the spool for the next start."""
        deadline = time.monotonic() + self.settings.drain_s
        logger.info(
            f"draining: waiting for writers to release the spool, then shipping (up to {self.settings.drain_s:g} s)"
        )
        while live_writers(self.spool) and time.monotonic() < deadline:
            self.step()
            time.sleep(POLL_INTERVAL_S)
        self.draining = True
        self._backoff.now()
        while time.monotonic() < deadline:
            self.step()
            if self.backlog.caught_up and self.backlog.empty and self._inflight is None:
                break
            time.sleep(POLL_INTERVAL_S)
        left = self.unshipped_estimate()
        if left:
            self.metrics.unshipped_at_exit.inc(left)
            logger.warning(
                f"drain: {left} records not shipped within {self.settings.drain_s:g} s "
                f"(last error: {self.last_error}); they stay in {self.spool} and ship on the next start"
            )
        else:
            logger.info("drain: everything shipped")
        return left

    def emptied(self) -> bool:
        """Nothing left to ship: no planned flush, nothing read and unplanned, every segment
        read to its end and deleted (as finished) by the last sweep."""
        return (
            self._inflight is None
            and self.backlog.empty
            and self.backlog.caught_up
            and not list_segments(self.spool)
        )

    def unshipped_estimate(self) -> int:
        """Rows pending or planned, plus request lines not yet read (one row or more each)."""
        planned = self._inflight[0].records if self._inflight else 0
        return self.backlog.rows + planned + self.backlog.unread_lines(list_segments(self.spool))


class SpoolBusy(RuntimeError):
    """Another sidecar already ships this spool."""


def lock_spool(directory: Path):
    """One sidecar per spool, whatever state file each was given: two would ship the same
    bytes twice. The lock lives in the spool itself."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / SPOOL_LOCK_FILE, "w")  # noqa: SIM115 (held open: it is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpoolBusy(f"another sidecar is already shipping {directory}") from None
    return handle


def run_sidecar(settings: SidecarSettings, faults: FaultHook = no_faults) -> None:
    # Fail and retry on our own schedule rather than inside MLflow's long client retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    settings.state_path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_spool(settings.spool.directory)
    sidecar = Sidecar(settings, faults=faults)
    rules = HealthRules(liveness_after_s=settings.liveness_after_s, stall_after_s=settings.stall_after_s)
    server = serve_http(settings.host, settings.port, rules, lambda: sidecar.snapshot, sidecar.metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stopping.set())  # a StopFlag: safe in a handler
    logger.info(
        f"shipping {settings.spool.directory} to experiment '{settings.experiment}' "
        f"(flush at {settings.flush_records} records or {settings.flush_interval_s:g} s); "
        f"health and metrics on http://{settings.host}:{settings.port}"
    )
    try:
        sidecar.run()
    finally:
        server.shutdown()
        lock.close()
