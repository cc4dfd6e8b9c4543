"""The sidecar's Prometheus metrics (``/metrics``), in a registry of its own.

Counters only grow within a process. The totals that must survive restarts (records dropped
by the size limit, dead lines, rows the server could not capture) are gauges set from the
state database or the spool's drop ledgers, never counted up from zero by the process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

PREFIX = "credit_risk_sidecar_"


class SidecarMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()

        def counter(name, text):
            return Counter(PREFIX + name, text, registry=self.registry)

        def gauge(name, text):
            return Gauge(PREFIX + name, text, registry=self.registry)

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
        self.pruned_runs = counter("pruned_runs", "Inference runs deleted by retention, files first")
        self.pruned_dead_letters = counter("pruned_dead_letters", "Dead letters removed by retention")
        self.prune_failures = counter("prune_failures", "Retention passes that failed (retried)")
