"""The sidecar's loop: read the spool, plan a flush, ship it, commit it; keep the spool
bounded; expose ``/health`` and ``/metrics``.

Delivery is at least once (a flush is committed only after MLflow accepted all of it) and
exactly once as seen by a reader (a replayed flush rewrites the same artifact names; the
reader also drops duplicate ``(request_id, row_index, timestamp)`` records).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from logging_sidecar.settings import SidecarSettings
from logging_sidecar.shipper import Shipper
from logging_sidecar.spool import Chunk, Segment, list_segments, read_chunk
from logging_sidecar.state import Flush, State
from serving.capture import spool_bytes

logger = logging.getLogger("credit_risk.sidecar")

# An open segment idle this many rotation periods has no live writer: the writer rotates
# before writing to a segment older than one period.
_ABANDONED_AFTER_PERIODS = 10
_TRIM_TO = 0.9  # of the spool limit, so writers don't hit the limit again at once


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
        self.dropped = counter("records_dropped", "Records dropped because the spool was full")
        self.flushes = counter("flushes", "Batches written to MLflow")
        self.failed_flushes = counter("flush_failures", "Flush attempts that failed (retried)")
        self.pending = gauge("records_pending", "Records read or planned but not yet shipped")
        self.oldest_age = gauge("oldest_pending_age_seconds", "Age of the oldest unshipped record")
        self.spool_bytes = gauge("spool_bytes", "Bytes in the spool")
        self.spool_full = gauge("spool_full", "1 while the spool is over its size limit")


class Sidecar:
    def __init__(self, settings: SidecarSettings, shipper: Shipper | None = None):
        self.settings = settings
        self.spool = settings.spool.directory
        self.spool.mkdir(parents=True, exist_ok=True)
        self.state = State(settings.state_path)
        self.shipper = shipper or Shipper(settings.experiment, self.state)
        self.metrics = SidecarMetrics()
        self._positions = self.state.shipped_offsets()
        self._pending: list[Chunk] = []
        self._inflight: tuple[Flush, list[dict]] | None = None
        self._retry_at = 0.0
        self._backoff = settings.retry_min_s
        self.last_error: str | None = None
        self.pending_records = 0
        self.spool_bytes = 0
        self.stopping = threading.Event()

    # -- reading -----------------------------------------------------------------------

    def _pending_rows(self) -> int:
        return sum(chunk.rows for chunk in self._pending)

    def _read_new(self, segments: list[Segment]) -> None:
        room = self.settings.max_batch_records - self._pending_rows()
        for segment in segments:
            if room <= 0:
                return
            position = self._positions.get(segment.name, 0)
            if segment.size <= position:
                continue
            try:
                chunk = read_chunk(self.spool, segment.name, position, room)
            except FileNotFoundError:
                continue
            if chunk.end > position:
                self._positions[segment.name] = chunk.end
                self._pending.append(chunk)
                self.metrics.received.inc(chunk.rows)
                room -= chunk.rows

    def _oldest_pending_ns(self) -> int | None:
        stamps = [c.requests[0]["timestamp_ns"] for c in self._pending if c.requests]
        if self._inflight:
            stamps += [r["timestamp_ns"] for r in self._inflight[1][:1]]
        return min(stamps) if stamps else None

    def _due(self) -> bool:
        rows = self._pending_rows()
        if rows >= self.settings.flush_records:
            return True
        oldest = self._oldest_pending_ns()
        return (
            rows > 0
            and oldest is not None
            and (time.time_ns() - oldest >= self.settings.flush_interval_s * 1e9 or self.stopping.is_set())
        )

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
        return flush, [request for chunk in taken for request in chunk.requests]

    def _replay(self, flush: Flush) -> list[dict]:
        """The requests of a flush planned before a crash, read again from the same bytes."""
        requests = []
        for name, (start, end) in flush.ranges.items():
            try:
                requests += read_chunk(self.spool, name, start, 0, end=end).requests
            except FileNotFoundError:
                logger.error(f"segment {name} of planned flush {flush.id} is gone; its records are lost")
            self._positions[name] = max(self._positions.get(name, 0), end)
        return requests

    def _ship_inflight(self) -> None:
        flush, requests = self._inflight
        started = time.perf_counter()
        shipped = self.shipper.ship(flush, requests)
        self.state.commit(flush)
        self._inflight = None
        self.metrics.shipped.inc(shipped)
        self.metrics.flushes.inc()
        logger.info(f"flush {flush.id}: shipped {shipped} records in {time.perf_counter() - started:.2f} s")

    def step(self) -> None:
        """One pass: observe the spool, then ship what is due (or retry what failed)."""
        segments = self._observe_spool()
        if self._inflight is None and (planned := self.state.planned()):
            self._inflight = (planned, self._replay(planned))
        if time.monotonic() < self._retry_at:
            self._read_new(segments)
            return
        try:
            if self._inflight is None:
                self._read_new(segments)
                if self._due():
                    self._inflight = self._plan()
            if self._inflight is not None:
                self._ship_inflight()
            self._backoff = self.settings.retry_min_s
            self.last_error = None
        except Exception as error:  # MLflow down, slow or refusing: retry, never give up
            self.metrics.failed_flushes.inc()
            self.last_error = f"{type(error).__name__}: {error}"
            logger.warning(f"flush failed, retrying in {self._backoff:.0f} s: {self.last_error}")
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.settings.retry_max_s)
        finally:
            self._update_gauges()

    def _update_gauges(self) -> None:
        inflight = self._inflight[0].records if self._inflight else 0
        self.pending_records = self._pending_rows() + inflight
        self.metrics.pending.set(self.pending_records)
        oldest = self._oldest_pending_ns()
        self.metrics.oldest_age.set(0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9))

    # -- the spool's size and clean-up ---------------------------------------------------

    def _observe_spool(self) -> list[Segment]:
        segments = list_segments(self.spool)
        shipped = self.state.shipped_offsets()
        in_flight = set(self._inflight[0].ranges) if self._inflight else set()
        abandoned_after = _ABANDONED_AFTER_PERIODS * self.settings.spool.segment_max_age_s
        done = []
        for segment in segments:
            if segment.name in in_flight:
                continue
            offset = shipped.get(segment.name, 0)
            if segment.sealed:
                finished = segment.name in shipped and offset >= segment.size
            else:
                # Abandoned by a writer that died: finished once no complete line is left
                # (a torn last line was never answered, so it is no record).
                idle = time.time() - segment.mtime > abandoned_after
                finished = idle and self._nothing_after(segment, offset)
            if finished:
                segment.path.unlink(missing_ok=True)
                done.append(segment.name)
        if done:
            self.state.forget(done)
            for name in done:
                self._positions.pop(name, None)
        segments = [s for s in segments if s.name not in done]
        total = spool_bytes(self.spool)
        self.metrics.spool_full.set(int(total >= self.settings.spool.max_bytes))
        if total >= self.settings.spool.max_bytes:
            total = self._trim(segments, total, in_flight)
            segments = [s for s in segments if s.path.exists()]
        self.spool_bytes = total
        self.metrics.spool_bytes.set(total)
        return segments

    def _nothing_after(self, segment: Segment, offset: int) -> bool:
        try:
            return read_chunk(self.spool, segment.name, offset, 1).end == offset
        except FileNotFoundError:
            return True

    def _trim(self, segments: list[Segment], total: int, in_flight: set[str]) -> int:
        """Oldest first: drop whole sealed segments until the spool is back under 90 %."""
        target = _TRIM_TO * self.settings.spool.max_bytes
        for segment in segments:
            if total <= target:
                break
            if not segment.sealed or segment.name in in_flight:
                continue
            position = self.state.shipped_offsets().get(segment.name, 0)
            with open(segment.path, "rb") as stream:
                stream.seek(position)
                lost_requests = stream.read().count(b"\n")
            segment.path.unlink(missing_ok=True)
            self.state.forget([segment.name])
            self._positions.pop(segment.name, None)
            lost = [c for c in self._pending if c.segment == segment.name]
            self._pending = [c for c in self._pending if c.segment != segment.name]
            lost_rows = sum(c.rows for c in lost) or lost_requests
            self.metrics.dropped.inc(lost_rows)
            total -= segment.size
            logger.warning(
                f"spool full ({self.settings.spool.max_bytes} bytes): dropped the oldest unshipped "
                f"segment {segment.name} (~{lost_rows} records) to make room"
            )
        return total

    # -- running -------------------------------------------------------------------------

    def health(self) -> dict:
        return {
            "status": "ok",
            "pending_records": self.pending_records,
            "shipped_records_total": self.state.shipped_records(),
            "spool_bytes": self.spool_bytes,
            "last_error": self.last_error,
        }

    def run(self) -> None:
        while not self.stopping.is_set():
            self.step()
            self.stopping.wait(self.settings.poll_interval_s)
        self.step()  # ship what is due before leaving; the spool keeps the rest


def _serve_http(sidecar: Sidecar) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                body, kind = generate_latest(sidecar.metrics.registry), CONTENT_TYPE_LATEST
            elif self.path == "/health":
                body, kind = json.dumps(sidecar.health()).encode(), "application/json"
            else:
                self.send_error(404, "try /health or /metrics")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((sidecar.settings.host, sidecar.settings.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _lock(settings: SidecarSettings):
    """One sidecar per spool: two would ship the same bytes twice."""
    handle = open(f"{settings.state_path}.lock", "w")  # noqa: SIM115 (held open: it is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"another sidecar is already shipping {settings.spool.directory}") from None
    return handle


def run_sidecar(settings: SidecarSettings) -> None:
    # Fail and retry on our own schedule rather than inside MLflow's long client retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    settings.state_path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(settings)
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
