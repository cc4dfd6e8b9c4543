"""The monitor service's HTTP server: ``/health``, ``/health/live`` (JSON, 200 or 503) and
Prometheus ``/metrics``, on a daemon thread.

Invariant: a request reads only the service's latest published snapshots (through
``MonitorService.health``/``liveness`` and the collector); it never calls into the loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitoring.metrics import MonitorCollector, registry_for

if TYPE_CHECKING:
    from monitoring.service import MonitorService


def serve_http(
    host: str, port: int, service: MonitorService, collector: MonitorCollector
) -> ThreadingHTTPServer:
    registry = registry_for(collector)
    routes: dict[str, Callable[[], tuple[bool, dict]]] = {
        "/health": service.health,
        "/health/live": service.liveness,
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
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
    threading.Thread(target=server.serve_forever, name="monitor-http", daemon=True).start()
    return server
