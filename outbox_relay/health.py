"""HTTP endpoints for probes and scraping: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY


@dataclass
class RelayState:
    """What the loop reports about itself; read by the probes (plain attribute reads)."""

    stuck_after: float = 60.0
    last_tick: float = field(default_factory=time.monotonic)
    database: bool = False
    schema: bool = False
    sink: bool = False
    fatal: str | None = None
    listener: str = "notify"
    owned: tuple[int, ...] = ()
    #: the sink's own view (e.g. per webhook endpoint: open circuit, disabled by 410)
    sink_detail: Callable[[], object] | None = None
    #: why ``schema`` is False (revision behind or ahead, drift of indexes/trigger/columns)
    schema_detail: str | None = None
    #: the Postgres-health guard's current problems (reported; they do not fail readiness)
    warnings: list[dict[str, object]] = field(default_factory=list)
    #: maintenance facts: gauges refresh, last retention run
    maintenance: dict[str, object] = field(default_factory=dict)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def alive(self) -> bool:
        return self.fatal is None and time.monotonic() - self.last_tick < self.stuck_after

    def ready(self) -> bool:
        return self.alive() and self.database and self.schema and self.sink

    def not_ready(self) -> list[str]:
        """Why ``ready()`` is False, one phrase per reason (empty when ready)."""
        reasons = []
        if self.fatal is not None:
            reasons.append(f"fatal: {self.fatal}")
        elif not self.alive():
            reasons.append("drain loop stuck")
        if not self.database:
            reasons.append("database unreachable")
        if not self.schema:
            reasons.append(f"schema: {self.schema_detail or 'not checked yet'}")
        if not self.sink:
            reasons.append("sink unavailable")
        return reasons

    def as_dict(self) -> dict[str, object]:
        return {
            "alive": self.alive(),
            "ready": self.ready(),
            "database": self.database,
            "schema": self.schema,
            "sink": self.sink,
            "fatal": self.fatal,
            "listener": self.listener,
            "shards": list(self.owned),
            "seconds_since_tick": round(time.monotonic() - self.last_tick, 3),
            "sink_detail": self.sink_detail() if self.sink_detail is not None else None,
            "not_ready": self.not_ready(),
            "schema_detail": self.schema_detail,
            "warnings": list(self.warnings),
            "maintenance": dict(self.maintenance),
        }


def serve(state: RelayState, host: str, port: int) -> ThreadingHTTPServer:
    """Start the probe server in a daemon thread and return it (``.shutdown()`` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok = state.alive() if path == "/healthz" else state.ready()
                body = json.dumps(state.as_dict()).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="outbox-http", daemon=True).start()
    return server
