"""A webhook endpoint for tests: a threaded HTTP/1.1 server on loopback that records every request
and answers what a rule says (default 200), so a test can make it fail, throttle, vanish or stall.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Hit:
    """One request as received."""

    n: int
    at: float  # time.time() when the request was read
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    attempt: int  # 1 for the first request with this webhook-id, 2 for the next, ...
    status: int = 0  # what the rule answered (0 while the rule runs)

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0  # seconds to wait before answering


Rule = Callable[[Hit], Reply]


def fail_first(times: int, status: int = 500, body: bytes = b"boom",
               headers: dict[str, str] | None = None,
               only: Callable[[Hit], bool] = lambda h: True) -> Rule:
    """Answer ``status`` to the first ``times`` requests of every message (``only`` those)."""
    def rule(hit: Hit) -> Reply:
        if only(hit) and hit.attempt <= times:
            return Reply(status, dict(headers or {}), body)
        return Reply()
    return rule


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # a client that gave up (timeout, body cap) resets the connection: not an error here
        return


class Receiver:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.hits: list[Hit] = []
        self.rule: Rule | None = None
        self._cond = threading.Condition()
        self._attempts: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                hit = receiver._record(self.path, {k.lower(): v for k, v in self.headers.items()},
                                       body)
                rule = receiver.rule
                reply = rule(hit) if rule is not None else Reply()
                if reply.delay:
                    time.sleep(reply.delay)
                with receiver._cond:
                    hit.status = reply.status
                    receiver._cond.notify_all()
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    self.close_connection = True  # the client gave up (timeout)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> Hit:
        with self._cond:
            wid = headers.get("webhook-id", "")
            self._attempts[wid] += 1
            hit = Hit(len(self.hits), time.time(), path, headers, body, self._attempts[wid])
            self.hits.append(hit)
            self._cond.notify_all()
            return hit

    # -- reading what arrived
    def snapshot(self) -> list[Hit]:
        with self._cond:
            return list(self.hits)

    def delivered(self) -> list[Hit]:
        """Requests answered 2xx, in the order they were received."""
        return [h for h in self.snapshot() if h.ok]

    def delivered_ids(self) -> list[str]:
        return [h.id for h in self.delivered()]

    def of(self, webhook_id: str) -> list[Hit]:
        return [h for h in self.snapshot() if h.id == webhook_id]

    def wait(self, predicate: Callable[[Receiver], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout}s waiting for {what}; "
                                f"{len(self.hits)} request(s) received")
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
