"""The worker's HTTP endpoints, on a daemon thread: /metrics for Prometheus, /healthz and
/readyz for probes (Kubernetes, systemd, a load balancer).  The exporter serves its /metrics
with the same server.

  /metrics   the text format from `render()`
  /healthz   200 while the process's event loop turns (it stamps `alive` every second);
             503 when it has been stuck for 10 s: restart it
  /readyz    200 while the worker serves; 503 while it starts (engines loading) or drains
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("agentfleet.worker")

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Check = Callable[[], tuple[bool, str]]


def _ok() -> tuple[bool, str]:
    return True, "ok"


class MetricsServer:
    """An HTTP server answering GET /metrics with `render()`, on a daemon thread."""

    def __init__(self, render: Callable[[], bytes], port: int, addr: str = "0.0.0.0", *,
                 health: Check = _ok, readiness: Check = _ok):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path in ("/healthz", "/readyz"):
                    self._probe(health if path == "/healthz" else readiness)
                    return
                if path not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                try:
                    body = render()
                except Exception:  # a bug in a collector must not kill the server thread
                    log.exception("rendering /metrics failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", _CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _probe(self, check: Check) -> None:
                try:
                    ok, why = check()
                except Exception as exc:  # a broken check reads as unhealthy, never a crash
                    ok, why = False, f"check failed: {exc}"
                body = (why + "\n").encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # one line per scrape is noise
                return None

        self._httpd = ThreadingHTTPServer((addr, port), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name=f"metrics-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
