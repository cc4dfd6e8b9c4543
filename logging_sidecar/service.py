"""The sidecar's loop: read the spool, plan a flush, ship it, commit it; keep the spool
bounded; park lines that can never ship; drain on SIGTERM; answer ``/health/live``,
``/health/shipping``, ``/health`` and ``/metrics``.

Delivery is at least once (a flush is committed only after MLflow accepted all of it) and
exactly once as seen by a reader (a replayed flush rewrites the same artifact names; the
reader also drops duplicate ``(request_id, row_index, timestamp)`` records).

Errors talking to MLflow, and a full disk, are retried with backoff for ever and shown by
``/health/shipping``; any other error ends the process with a non-zero status, for its
supervisor (``credit-risk up``, compose, Kubernetes) to restart it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mlflow.exceptions import MlflowException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from sqlalchemy.exc import OperationalError

from logging_sidecar.settings import SidecarSettings
from logging_sidecar.shipper import Shipper, group_by_run
from logging_sidecar.spool import Chunk, DeadLine, Segment, list_segments, read_chunk
from logging_sidecar.state import Flush, State
from serving.spool_format import (
    FILE_MODE,
    WRITER_LOCK_SUFFIX,
    live_writers,
    read_drop_ledgers,
    spool_bytes,
    writer_is_alive,
)

logger = logging.getLogger("credit_risk.sidecar")

_TRIM_TO = 0.9  # of the spool limit, so writers don't hit the limit again at once
DEAD_LETTER_FILE = "dead-letters.ndjson"
SPOOL_LOCK_FILE = ".sidecar.lock"
# Local trouble worth retrying: the disk (or SQLite on it) is full or busy.
_LOCAL_RETRYABLE = (OSError, OperationalError)


class DiskReserve:
    """A few MiB held on the state's disk, given up when that disk is full so the commit
    that lets shipped segments be deleted can still be written; otherwise a spool that
    filled its disk would stall shipping for good. Taken back once there is room again."""

    SIZE = 2 << 20

    def __init__(self, directory: Path):
        self.path = directory / ".sidecar-reserve"

    def ensure(self) -> None:
        """Take it (back) only while the disk would keep as much again free."""
        if self.path.exists() and self.path.stat().st_size == self.SIZE:
            return
        disk = os.statvfs(self.path.parent)
        if disk.f_bavail * disk.f_frsize < 2 * self.SIZE:
            return
        try:
            with open(self.path, "wb") as stream:
                stream.write(bytes(self.SIZE))  # written, not sparse: tmpfs and ext4 alike
        except OSError:
            self.path.unlink(missing_ok=True)  # no room yet: try again next time

    def release(self) -> bool:
        if not self.path.exists():
            return False
        self.path.unlink()
        logger.warning(f"disk full: released the {self.SIZE >> 20} MiB reserve {self.path} to commit")
        return True


def _disk_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, OperationalError) and "full" in str(error)


class SidecarMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        prefix = "credit_risk_sidecar_"

        def counter(name, text):
            return Counter(prefix + name, text, registry=self.registry)

        def gauge(name, text):
            return Gauge(prefix + name, text, registry=self.registry)

        self.received = counter("records_received", "Records read from the spool")
        self.shipped = counter("records_shipped", "Records written to MLflow")
        self.dropped = gauge(
            "records_dropped",
            "Records dropped unshipped to keep the spool under its limit, over the state's life",
        )
        self.capture_dropped = gauge(
            "capture_dropped_rows",
            "Rows the server scored but could not capture (spool full or disk full), from the "
            "spool's drop ledgers, over the spool's life",
        )
        self.flushes = counter("flushes", "Batches written to MLflow")
        self.failed_flushes = counter("flush_failures", "Flush attempts that failed (retried)")
        self.dead_lines = gauge("dead_lines", "Spool lines parked as dead letters, over the state's life")
        self.unshipped_at_exit = counter("unshipped_at_exit", "Records left in the spool by a drain")
        self.pending = gauge("records_pending", "Records read or planned but not yet shipped")
        self.oldest_age = gauge("oldest_pending_age_seconds", "Age of the oldest unshipped record")
        self.spool_bytes = gauge("spool_bytes", "Bytes in the spool")
        self.spool_full = gauge("spool_full", "1 while the spool is over its size limit")
        self.shipping_ok = gauge("shipping_ok", "1 while /health/shipping answers 200")


def fault_point(settings: SidecarSettings, name: str) -> None:
    """Tests only: announce the point and pause, so a test can SIGKILL the sidecar here."""
    if name in settings.fault_points:
        print(f"FAULT-POINT {name} pid={os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(settings.fault_pause_s)


def _iso(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, tz=UTC).isoformat()


class Sidecar:
    def __init__(self, settings: SidecarSettings, shipper: Shipper | None = None):
        self.settings = settings
        self.spool = settings.spool.directory
        self.spool.mkdir(parents=True, exist_ok=True)
        self.state = State(settings.state_path)
        self.reserve = DiskReserve(settings.state_path.parent)
        self.shipper = shipper or Shipper(settings.experiment, self.state)
        self.metrics = SidecarMetrics()
        self._positions = self.state.shipped_offsets()
        self._pending: list[Chunk] = []
        self._inflight: tuple[Flush, list[dict]] | None = None
        self._retry_at = 0.0
        self._backoff = settings.retry_min_s
        self._caught_up = False  # every segment read up to its last complete line
        self.last_error: str | None = None
        self.error_is_permanent = False
        self.pending_records = 0
        self.spool_bytes = 0
        self.dead_lines, self.unfiled_dead_lines = self.state.dead_lines()
        self.metrics.dead_lines.set(self.dead_lines)
        self.records_dropped = self.state.trimmed_records()
        self.metrics.dropped.set(self.records_dropped)
        self.capture_dropped_rows = 0
        self.last_ledger_error: str | None = None
        self._read_drop_ledgers()
        self.turned_at = time.monotonic()
        self.progress_at = time.time()  # last commit, or start
        self.pending_since: float | None = None
        self.stopping = threading.Event()
        self.draining = False

    # -- reading -----------------------------------------------------------------------

    def _pending_rows(self) -> int:
        return sum(chunk.rows for chunk in self._pending)

    def _read_new(self, segments: list[Segment]) -> None:
        room = self.settings.max_batch_records - self._pending_rows()
        self._caught_up = False
        for segment in segments:
            if room <= 0:
                return
            position = self._positions.get(segment.name, 0)
            if segment.size <= position:
                continue
            try:
                chunk = self._read(segment.name, position, room)
            except FileNotFoundError:
                continue
            if chunk.end > position:
                self._positions[segment.name] = chunk.end
                self._pending.append(chunk)
                self.metrics.received.inc(chunk.rows)
                room -= chunk.rows
        self._caught_up = room > 0

    def _read(self, name: str, start: int, max_rows: int, end: int | None = None) -> Chunk:
        chunk = read_chunk(
            self.spool, name, start, max_rows, max_line_bytes=self.settings.max_line_bytes, end=end
        )
        for dead in chunk.dead:
            self._park(dead)
        return chunk

    def _park(self, dead: DeadLine) -> None:
        """Count a dead line once (in the state, which survives restarts), then file it in
        the dead-letter file if the disk takes it; the log says either way."""
        if not self.state.record_dead(dead.segment, dead.offset, dead.length, dead.reason):
            return  # counted before a restart: a replay reads it again
        self.dead_lines += 1
        self.unfiled_dead_lines += 1
        self.metrics.dead_lines.set(self.dead_lines)
        where = f"segment {dead.segment} at byte {dead.offset} ({dead.length} bytes)"
        entry = {
            "segment": dead.segment,
            "offset": dead.offset,
            "length": dead.length,
            "reason": dead.reason,
            "parked_at": _iso(time.time()),
            "line": None if dead.content is None else dead.content.decode(errors="replace").rstrip("\n"),
        }
        try:
            fd = os.open(self.spool / DEAD_LETTER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, json.dumps(entry).encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as error:
            logger.error(f"dead line in {where}: {dead.reason}; NOT filed in {DEAD_LETTER_FILE}: {error}")
            return
        self.state.mark_filed(dead.segment, dead.offset)
        self.unfiled_dead_lines -= 1
        logger.error(f"dead line in {where}: {dead.reason}; parked in {self.spool / DEAD_LETTER_FILE}")

    def _oldest_pending_ns(self) -> int | None:
        stamps = [c.requests[0]["timestamp_ns"] for c in self._pending if c.requests]
        if self._inflight:
            stamps += [r["timestamp_ns"] for r in self._inflight[1][:1]]
        return min(stamps) if stamps else None

    def _due(self) -> bool:
        if not self._pending:
            return False
        rows = self._pending_rows()
        if rows >= self.settings.flush_records or rows == 0 or self.draining:
            return True  # rows == 0: only dead lines, whose offsets want committing
        oldest = self._oldest_pending_ns()
        return oldest is not None and time.time_ns() - oldest >= self.settings.flush_interval_s * 1e9

    # -- shipping ----------------------------------------------------------------------

    def _plan(self) -> tuple[Flush, list[dict]]:
        taken, rows = [], 0
        for chunk in self._pending:
            if rows >= self.settings.max_batch_records:
                break
            taken.append(chunk)
            rows += chunk.rows
        ranges: dict[str, tuple[int, int]] = {}
        for chunk in taken:  # chunks of one segment are contiguous and in order
            start = ranges[chunk.segment][0] if chunk.segment in ranges else chunk.start
            ranges[chunk.segment] = (start, chunk.end)
        flush = self.state.plan(ranges, rows, created_ms=int(time.time() * 1000))
        del self._pending[: len(taken)]  # only once the plan is stored
        fault_point(self.settings, "after_plan")
        return flush, [request for chunk in taken for request in chunk.requests]

    def _replay(self, flush: Flush) -> list[dict]:
        """The requests of a flush planned before a crash, read again from the same bytes."""
        requests = []
        for name, (start, end) in flush.ranges.items():
            try:
                requests += self._read(name, start, 0, end=end).requests
            except FileNotFoundError:
                logger.error(f"segment {name} of planned flush {flush.id} is gone; its records are lost")
            self._positions[name] = max(self._positions.get(name, 0), end)
        return requests

    def _ship_inflight(self) -> None:
        flush, requests = self._inflight
        started = time.perf_counter()
        shipped = self.shipper.ship(flush, requests)
        fault_point(self.settings, "after_upload")
        self.state.commit(flush)
        self._inflight = None
        self.progress_at = time.time()
        self.metrics.shipped.inc(shipped)
        self.metrics.flushes.inc()
        logger.info(f"flush {flush.id}: shipped {shipped} records in {time.perf_counter() - started:.2f} s")
        fault_point(self.settings, "after_commit")

    def _ship(self) -> None:
        """Ship what is due; a failure is retried later, after checking what MLflow lost."""
        if time.monotonic() < self._retry_at:
            return
        try:
            if self.last_error is not None and self._inflight is not None:
                self.shipper.recover(list(group_by_run(self._inflight[1])))
            if self._inflight is None and self._due():
                self._inflight = self._plan()
            if self._inflight is not None:
                self._ship_inflight()
            self._backoff = self.settings.retry_min_s
            self.last_error = None
            self.error_is_permanent = False
        except Exception as error:  # MLflow down, slow or refusing: retry, never give up
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        self.metrics.failed_flushes.inc()
        self.last_error = f"{type(error).__name__}: {error}"
        self.error_is_permanent = isinstance(error, MlflowException) and error.get_http_status_code() < 500
        if _disk_full(error) and self.reserve.release():
            self._retry_at = 0.0  # at once, into the room just freed
            return
        backoff = min(self._backoff, 1.0) if self.draining else self._backoff
        logger.warning(f"flush failed, retrying in {backoff:.0f} s: {self.last_error}")
        self._retry_at = time.monotonic() + backoff
        self._backoff = min(self._backoff * 2, self.settings.retry_max_s)

    def step(self) -> None:
        """One pass: replay a planned flush, observe the spool, read, ship what is due."""
        self.turned_at = time.monotonic()
        try:
            self.reserve.ensure()
            if self._inflight is None and (planned := self.state.planned()):
                self._inflight = (planned, self._replay(planned))
            segments = self._observe_spool()
            self._read_new(segments)
        except _LOCAL_RETRYABLE as error:  # a full disk: retried, and shown by the health
            self._failed(error)
        else:
            self._ship()
        finally:
            self._update_gauges()

    def _update_gauges(self) -> None:
        inflight = self._inflight[0].records if self._inflight else 0
        self.pending_records = self._pending_rows() + inflight
        if self.pending_records == 0:
            self.pending_since = None
        elif self.pending_since is None:
            self.pending_since = time.time()
        self.metrics.pending.set(self.pending_records)
        oldest = self._oldest_pending_ns()
        self.metrics.oldest_age.set(0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9))

    # -- the spool's size and clean-up ---------------------------------------------------

    def _protected(self) -> set[str]:
        """Segments a planned flush covers: never trimmed or deleted before it is shipped."""
        planned = self._inflight[0] if self._inflight else self.state.planned()
        return set(planned.ranges) if planned else set()

    def _observe_spool(self) -> list[Segment]:
        segments = list_segments(self.spool)
        shipped = self.state.shipped_offsets()
        protected = self._protected()
        done = [
            segment
            for segment in segments
            if segment.name not in protected and self._finished(segment, shipped.get(segment.name, 0))
        ]
        for segment in done:
            segment.path.unlink(missing_ok=True)
        if done:
            self.state.forget([s.name for s in done])
            for segment in done:
                self._positions.pop(segment.name, None)
        segments = [s for s in segments if s not in done]
        self._remove_stale_writer_locks({s.writer for s in segments})
        total = spool_bytes(self.spool)
        self.metrics.spool_full.set(int(total >= self.settings.spool.max_bytes))
        if total >= self.settings.spool.max_bytes:
            total = self._trim(segments, total, protected)
            segments = [s for s in segments if s.path.exists()]
        self.spool_bytes = total
        self.metrics.spool_bytes.set(total)
        self._read_drop_ledgers()
        return segments

    def _read_drop_ledgers(self) -> None:
        try:
            self.capture_dropped_rows = sum(read_drop_ledgers(self.spool).values())
        except ValueError as error:  # keep the last good total; shipping goes on
            if str(error) != self.last_ledger_error:
                self.last_ledger_error = str(error)
                logger.error(str(error))
            return
        self.metrics.capture_dropped.set(self.capture_dropped_rows)

    def _finished(self, segment: Segment, offset: int) -> bool:
        """Shipped up to its last complete line, and never to be written again: sealed, or
        its writer is dead (the writer's lock says so, not a clock). A torn last line was
        never answered, so it is no record."""
        if not segment.sealed and writer_is_alive(self.spool, segment.writer):
            return False
        if offset >= segment.size:
            return True
        try:
            chunk = read_chunk(
                self.spool, segment.name, offset, 1, max_line_bytes=self.settings.max_line_bytes
            )
        except FileNotFoundError:
            return True
        return chunk.end == offset

    def _remove_stale_writer_locks(self, writers_with_segments: set[str]) -> None:
        for entry in os.scandir(self.spool):
            if not entry.name.endswith(WRITER_LOCK_SUFFIX):
                continue
            writer = entry.name[: -len(WRITER_LOCK_SUFFIX)]
            if writer not in writers_with_segments and not writer_is_alive(self.spool, writer):
                # A writer taking this file right now re-checks its inode after locking.
                Path(entry.path).unlink(missing_ok=True)

    def _trim(self, segments: list[Segment], total: int, protected: set[str]) -> int:
        """Oldest first: drop whole sealed segments until the spool is back under 90 %."""
        target = _TRIM_TO * self.settings.spool.max_bytes
        for segment in segments:
            if total <= target:
                break
            if not segment.sealed or segment.name in protected:
                continue
            position = self.state.shipped_offsets().get(segment.name, 0)
            with open(segment.path, "rb") as stream:
                stream.seek(position)
                lost_requests = stream.read().count(b"\n")
            lost = [c for c in self._pending if c.segment == segment.name]
            lost_rows = sum(c.rows for c in lost) or lost_requests
            if self.state.trim(segment.name, segment.size, lost_rows):
                self.records_dropped += lost_rows
                self.metrics.dropped.set(self.records_dropped)
            segment.path.unlink(missing_ok=True)
            self.state.forget([segment.name])
            self._positions.pop(segment.name, None)
            self._pending = [c for c in self._pending if c.segment != segment.name]
            total -= segment.size
            logger.warning(
                f"spool full ({self.settings.spool.max_bytes} bytes): dropped the oldest unshipped "
                f"segment {segment.name} (~{lost_rows} records) to make room"
            )
        return total

    # -- health ------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict]:
        """Only a loop that stopped turning wants a restart; an MLflow outage does not."""
        age = time.monotonic() - self.turned_at
        alive = age <= self.settings.liveness_after_s
        return alive, {"status": "ok" if alive else "stuck", "loop_age_s": round(age, 3)}

    def shipping(self) -> tuple[bool, dict]:
        now = time.time()
        parked_batches = int(self._inflight is not None and self.error_is_permanent)
        waiting_since = max(self.progress_at, self.pending_since) if self.pending_since else None
        dead_file = self.spool / DEAD_LETTER_FILE
        parked_lines = dead_file.exists() and dead_file.stat().st_size > 0
        status, reason, since = "ok", None, None
        if parked_batches:
            status, since = "parked", waiting_since
            reason = f"a batch is held back by a permanent MLflow error, retried every {self._backoff:.0f} s"
        elif waiting_since is not None and now - waiting_since > self.settings.stall_after_s:
            status, since = "stalled", waiting_since
            reason = (
                f"nothing shipped for {now - waiting_since:.0f} s with {self.pending_records} records pending"
            )
        elif parked_lines or self.unfiled_dead_lines:
            status, since = "parked", dead_file.stat().st_mtime if parked_lines else None
            reason = (
                f"{self.dead_lines} dead lines (unshippable spool lines) parked; inspect and move away "
                f"{dead_file}"
                + (f"; {self.unfiled_dead_lines} could not be filed there" if self.unfiled_dead_lines else "")
            )
        if reason and self.last_error:
            reason += f"; last error: {self.last_error}"
        return status == "ok", {
            "status": status,
            "reason": reason,
            "since": _iso(since),
            "pending_records": self.pending_records,
            "parked_batches": parked_batches,
            "dead_lines_total": self.dead_lines,
            "dead_lines_unfiled": self.unfiled_dead_lines,
            "records_dropped_total": self.records_dropped,
            "capture_dropped_rows_total": self.capture_dropped_rows,
            "shipped_records_total": self.state.shipped_records(),
            "last_shipped_at": _iso(self.progress_at),
            "last_error": self.last_error,
            "spool_bytes": self.spool_bytes,
        }

    def health(self) -> tuple[bool, dict]:
        """Liveness decides the status code; the shipping summary rides along."""
        alive, live = self.liveness()
        shipping_ok, shipping = self.shipping()
        self.metrics.shipping_ok.set(int(shipping_ok))
        return alive, {**shipping, "status": live["status"], "live": live, "shipping": shipping["status"]}

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping.is_set():
            self.step()
            self.stopping.wait(self.settings.poll_interval_s)
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
            time.sleep(self.settings.poll_interval_s)
        self.draining = True
        self._retry_at = 0.0
        while time.monotonic() < deadline:
            self.step()
            if self._caught_up and not self._pending and self._inflight is None:
                break
            time.sleep(self.settings.poll_interval_s)
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

    def unshipped_estimate(self) -> int:
        """Rows pending or planned, plus request lines not yet read (one row or more each)."""
        left = self._pending_rows() + (self._inflight[0].records if self._inflight else 0)
        for segment in list_segments(self.spool):
            position = self._positions.get(segment.name, 0)
            if segment.size > position:
                with open(segment.path, "rb") as stream:
                    stream.seek(position)
                    left += stream.read().count(b"\n")
        return left


def _serve_http(sidecar: Sidecar) -> ThreadingHTTPServer:
    routes = {
        "/health": sidecar.health,
        "/health/live": sidecar.liveness,
        "/health/shipping": sidecar.shipping,
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                sidecar.health()  # refreshes the shipping_ok gauge
                self._answer(200, generate_latest(sidecar.metrics.registry), CONTENT_TYPE_LATEST)
            elif answer := routes.get(self.path):
                ok, body = answer()
                self._answer(200 if ok else 503, json.dumps(body).encode(), "application/json")
            else:
                self.send_error(404, f"try {', '.join(routes)} or /metrics")

        def _answer(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((sidecar.settings.host, sidecar.settings.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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


def run_sidecar(settings: SidecarSettings) -> None:
    # Fail and retry on our own schedule rather than inside MLflow's long client retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    settings.state_path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_spool(settings.spool.directory)
    sidecar = Sidecar(settings)
    server = _serve_http(sidecar)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stopping.set())
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
