"""The sidecar's HTTP server: ``/health``, ``/health/live``, ``/health/shipping`` (JSON, 200 or
503) and Prometheus ``/metrics``, on a daemon thread.

Invariant: a request reads only the latest published snapshot (``current()``, immutable) and
the metrics registry (thread-safe); it never calls into the loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from logging_sidecar.health import HealthRules, Snapshot
from logging_sidecar.metrics import SidecarMetrics


def serve_http(
    host: str, port: int, rules: HealthRules, current: Callable[[], Snapshot], metrics: SidecarMetrics
) -> ThreadingHTTPServer:
    def shipping_ok(snapshot: Snapshot) -> bool:
        ok, _ = rules.shipping(snapshot)
        metrics.shipping_ok.set(int(ok))  # the gauge says what /health/shipping says now
        return ok

    def health():
        snapshot = current()
        shipping_ok(snapshot)
        return rules.health(snapshot)

    routes: dict[str, Callable[[], tuple[bool, dict]]] = {
        "/health": health,
        "/health/live": lambda: rules.liveness(current()),
        "/health/shipping": lambda: rules.shipping(current()),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                shipping_ok(current())
                self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
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

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
