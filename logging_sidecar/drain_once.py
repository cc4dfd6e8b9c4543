"""``credit-risk sidecar --drain-once``: ship everything a spool holds, then exit. For a spool
no server writes any more, such as the volume a replica left behind when the autoscaler
removed it (otherwise it ships only when that ordinal comes back, which may be never).

It runs the sidecar's own steps (``service.Sidecar``), as a drain: every pending record is due
at once, and a failed flush is retried within a second. That ships sealed segments, open
segments whose writer is dead (its ``flock`` is gone: a torn last line was never answered
and is not a record), segments a killed sidecar shipped in part, and a flush planned before a
crash (replayed under the same names, so nothing is duplicated). It ends when the spool is
empty: no segment left, nothing planned.

It refuses, rather than races, a spool that is still in use: another sidecar holds its lock,
or a server holds a writer lock (checked before it starts and after every step). It gives up
when nothing could be committed for ``CREDIT_RISK_STALL_AFTER_S`` (MLflow unreachable or
refusing after the retries), or on SIGTERM / SIGINT; what is left stays in the spool, and
running it again goes on from there. It serves no HTTP and never prunes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from logging_sidecar.faults import FaultHook, no_faults
from logging_sidecar.service import POLL_INTERVAL_S, Sidecar, lock_spool
from logging_sidecar.settings import SidecarSettings
from logging_sidecar.stop_flag import StopFlag
from serving.spool_format import live_writers

logger = logging.getLogger("credit_risk.sidecar")


class SpoolInUse(RuntimeError):
    """A server still writes to the spool: its own sidecar ships it."""


@dataclass(frozen=True)
class Drained:
    shipped: int  # records committed by this drain
    left: int  # records (or request lines not yet read) still in the spool
    reason: str | None  # why it stopped with records left; None when the spool is empty


def _refuse_live_writers(spool) -> None:
    if writers := live_writers(spool):
        raise SpoolInUse(
            f"refusing to drain {spool}: writer {writers[0]} is alive (it holds "
            f"{writers[0]}.writer-lock); stop the server using this spool, or let its own sidecar ship it"
        )


def drain_once(
    settings: SidecarSettings, faults: FaultHook = no_faults, stop: StopFlag | None = None
) -> Drained:
    """Ship the spool until it is empty; raises ``SpoolBusy`` or ``SpoolInUse`` before
    shipping anything when another process uses it."""
    stop = stop or StopFlag()
    # Fail and retry on our own schedule rather than inside MLflow's long client retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    spool = settings.spool.directory
    lock = lock_spool(spool)
    try:
        _refuse_live_writers(spool)
        sidecar = Sidecar(settings, faults=faults)
        sidecar.draining = True  # every record due at once, quick retries, no pruning
        shipped_before = sidecar.shipped_records
        logger.info(f"draining {spool} once to experiment '{settings.experiment}'")
        while True:
            committed = sidecar.shipped_records
            sidecar.step()
            if sidecar.emptied():
                return Drained(sidecar.shipped_records - shipped_before, 0, None)
            reason = None
            if writers := live_writers(spool):
                reason = f"writer {writers[0]} began writing to the spool; its own sidecar ships it"
            elif stop.is_set():
                reason = "stopped by a signal"
            elif time.time() - sidecar.progress_at > settings.stall_after_s:
                reason = (
                    f"nothing could be shipped for {settings.stall_after_s:g} s "
                    f"(CREDIT_RISK_STALL_AFTER_S); last error: {sidecar.last_error}"
                )
            if reason:
                return Drained(sidecar.shipped_records - shipped_before, sidecar.unshipped_estimate(), reason)
            if sidecar.shipped_records == committed:
                stop.wait(POLL_INTERVAL_S)  # a retry waits for its back-off anyway
    finally:
        lock.close()
