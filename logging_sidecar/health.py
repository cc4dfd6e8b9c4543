"""The sidecar's health, computed over a :class:`Snapshot` of its loop.

The loop publishes a new immutable snapshot once per step (and refreshes its ``turned_at``
when a step begins); the HTTP thread only ever reads the latest one. It never touches the
loop's own fields, the state database or the spool.

- ``/health/live``: 503 only when the loop has not turned for ``liveness_after_s``, the one
  case a restart helps. An MLflow outage never fails it.
- ``/health/shipping``: 503 ``stalled`` while records are pending and nothing shipped for
  ``stall_after_s``; 503 ``parked`` while a batch is held back by a permanent MLflow error or
  while the dead-letter file holds lines (or some could not be filed there).
- ``/health``: liveness's verdict, with the shipping summary.

The verdicts depend on the time they are asked at (``now``), never on when the snapshot was
taken, so a loop that stopped publishing is seen as stuck.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from model.identity import utc_timestamp


@dataclass(frozen=True)
class Snapshot:
    turned_at: float  # time.monotonic() when the loop last began a step
    progress_at: float  # epoch seconds of the last commit, or of the start
    pending_since: float | None  # epoch seconds since when records have been pending
    pending_records: int  # read or planned, not yet shipped
    parked_batch: bool  # a planned batch held back by a permanent MLflow error
    retry_every_s: float  # the loop's current back-off
    dead_lines: int  # over the state's life
    dead_lines_unfiled: int  # counted, but not in the dead-letter file (disk full)
    dead_letters: str  # the dead-letter file
    dead_letters_since: float | None  # its last write, while it holds lines
    records_dropped: int  # by the spool's size limit, over the state's life
    capture_dropped_rows: int  # by the server, from the drop ledgers
    shipped_records: int  # over the state's life
    last_error: str | None
    spool_bytes: int


@dataclass(frozen=True)
class HealthRules:
    liveness_after_s: float
    stall_after_s: float

    def liveness(self, snapshot: Snapshot, monotonic_now: float | None = None) -> tuple[bool, dict]:
        """Only a loop that stopped turning wants a restart; an MLflow outage does not."""
        now = time.monotonic() if monotonic_now is None else monotonic_now
        age = now - snapshot.turned_at
        alive = age <= self.liveness_after_s
        return alive, {"status": "ok" if alive else "stuck", "loop_age_s": round(age, 3)}

    def shipping(self, snapshot: Snapshot, now: float | None = None) -> tuple[bool, dict]:
        now = time.time() if now is None else now
        parked_batches = int(snapshot.parked_batch)
        waiting_since = (
            max(snapshot.progress_at, snapshot.pending_since) if snapshot.pending_since is not None else None
        )
        status, reason, since = "ok", None, None
        if parked_batches:
            status, since = "parked", waiting_since
            reason = (
                "a batch is held back by a permanent MLflow error, "
                f"retried every {snapshot.retry_every_s:.0f} s"
            )
        elif waiting_since is not None and now - waiting_since > self.stall_after_s:
            status, since = "stalled", waiting_since
            reason = (
                f"nothing shipped for {now - waiting_since:.0f} s "
                f"with {snapshot.pending_records} records pending"
            )
        elif snapshot.dead_letters_since is not None or snapshot.dead_lines_unfiled:
            status, since = "parked", snapshot.dead_letters_since
            reason = (
                f"{snapshot.dead_lines} dead lines (unshippable spool lines) parked; inspect and move "
                f"away {snapshot.dead_letters}"
            )
            if snapshot.dead_lines_unfiled:
                reason += f"; {snapshot.dead_lines_unfiled} could not be filed there"
        if reason and snapshot.last_error:
            reason += f"; last error: {snapshot.last_error}"
        return status == "ok", {
            "status": status,
            "reason": reason,
            "since": None if since is None else utc_timestamp(since),
            "pending_records": snapshot.pending_records,
            "parked_batches": parked_batches,
            "dead_lines_total": snapshot.dead_lines,
            "dead_lines_unfiled": snapshot.dead_lines_unfiled,
            "records_dropped_total": snapshot.records_dropped,
            "capture_dropped_rows_total": snapshot.capture_dropped_rows,
            "shipped_records_total": snapshot.shipped_records,
            "last_shipped_at": utc_timestamp(snapshot.progress_at),
            "last_error": snapshot.last_error,
            "spool_bytes": snapshot.spool_bytes,
        }

    def health(
        self, snapshot: Snapshot, now: float | None = None, monotonic_now: float | None = None
    ) -> tuple[bool, dict]:
        """Liveness decides the status code; the shipping summary rides along."""
        alive, live = self.liveness(snapshot, monotonic_now)
        _, shipping = self.shipping(snapshot, now)
        return alive, {**shipping, "status": live["status"], "live": live, "shipping": shipping["status"]}
