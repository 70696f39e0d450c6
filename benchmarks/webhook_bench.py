"""Webhook sink throughput against a raw httpx client: the same 1 KiB bodies, the same local
receiver, the same concurrency, measured in the same run.

* receiver: a minimal asyncio HTTP/1.1 keep-alive server in its own process (answers ``200 ok``
  as fast as it can; ``GET /count`` returns how many POSTs it got), so the clients are the
  bottleneck, not the endpoint;
* raw: ``httpx.Client`` shared by ``concurrency`` threads posting the bodies (only a
  ``content-type`` header): what plain httpx does on this machine (the issue's yardstick). For
  context also ``raw_httpcore_posts_per_s``: the same with httpx's transport layer (httpcore)
  used directly, which is what the sink does;
* relay: ``outbox-relay run`` with ``OUTBOX_SINK=webhook`` and the same concurrency drains a
  pre-filled backlog (COPY, as ``drain.py``), signing every message; the clock starts when the
  relay has taken every shard and stops at the last delivery it recorded (both Postgres' clock),
  so it counts fetch, sign, POST and mark, not process start-up.

``python -m benchmarks.webhook_bench [small|full]`` prints the result as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpcore
import httpx

from .common import (
    REPO,
    BenchError,
    BenchOutbox,
    RelayProcess,
    log,
    median,
    payload_pool,
    services,
)
from .drain import fill

SCALES: dict[str, dict[str, int]] = {
    "small": {"rows": 5_000, "reps": 1},
    "full": {"rows": 30_000, "reps": 3},
}
CONCURRENCY = 16
PAYLOAD_BYTES = 1024
SHARDS = 16
TOPIC = "bench.webhook"


# --------------------------------------------------------------------------- the receiver
class _Ok(asyncio.Protocol):
    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                eol = head.find(b"\r\n", at)
                length = int(head[at + 15: eol if eol >= 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            if head.startswith(b"get /count"):
                body = str(_Ok.count).encode()
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                _Ok.count += 1
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 2\r\n\r\nok")


async def _serve() -> None:
    server = await asyncio.get_running_loop().create_server(_Ok, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


class Receiver:
    """The fast receiver as a subprocess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.webhook_bench", "--serve"], cwd=REPO,
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.proc.kill()
            raise BenchError(f"the benchmark receiver did not start: {line!r}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}/hooks/bench"

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=10) as r:
            return int(r.read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


# --------------------------------------------------------------------------- the two clients
def raw_posts(url: str, bodies: list[bytes], n: int) -> float:
    """POST ``n`` bodies with ``CONCURRENCY`` threads sharing one ``httpx.Client``; posts/s."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    errors: list[str] = []
    with httpx.Client(limits=limits, timeout=15) as client:
        for i in range(CONCURRENCY * 4):  # warm the pool
            client.post(url, content=bodies[i % len(bodies)],
                        headers={"content-type": "application/json"})
        lock = threading.Lock()
        it = iter(range(n))

        def worker() -> None:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                r = client.post(url, content=bodies[i % len(bodies)],
                                headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors.append(str(r.status_code))

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(f"raw httpx: {len(errors)} non-200 answers")
    return n / elapsed


def raw_httpcore_posts(url: str, bodies: list[bytes], n: int) -> float:
    """As :func:`raw_posts` through an ``httpcore.ConnectionPool`` (what the sink uses)."""
    target = httpcore.URL(url)
    host = target.host + (b":%d" % target.port if target.port else b"")
    errors: list[int] = []
    with httpcore.ConnectionPool(max_connections=CONCURRENCY,
                                 max_keepalive_connections=CONCURRENCY) as pool:

        def post(i: int) -> None:
            body = bodies[i % len(bodies)]
            headers = [(b"host", host), (b"content-type", b"application/json"),
                       (b"content-length", b"%d" % len(body))]
            with pool.stream("POST", target, headers=headers, content=body) as resp:
                for _ in resp.iter_stream():
                    pass
                if resp.status != 200:
                    errors.append(resp.status)

        for i in range(CONCURRENCY * 4):
            post(i)
        lock = threading.Lock()
        it = iter(range(n))

        def worker() -> None:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                post(i)

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(f"raw httpcore: {len(errors)} non-200 answers")
    return n / elapsed


def relay_deliveries(box: BenchOutbox, url: str, bodies: list[bytes], n: int, log_dir: Path
                     ) -> dict[str, float]:
    """Fill ``n`` rows, start the relay (webhook sink), wait for the drain; deliveries/s."""
    fill(box, TOPIC, n, bodies)
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    relay = RelayProcess(box, log_dir / "webhook-relay.log", env={
        "OUTBOX_SINK": "webhook",
        "OUTBOX_WEBHOOK_URL": url,
        "OUTBOX_WEBHOOK_SECRET": secret,
        "OUTBOX_WEBHOOK_ALLOW_PRIVATE": "true",
        "OUTBOX_WEBHOOK_CONCURRENCY": str(CONCURRENCY),
        "OUTBOX_LOG_LEVEL": "WARNING",
    })
    try:
        relay.wait_ready(60)
        cpu0, wall0 = _cpu_seconds(relay.pid), time.monotonic()
        box.wait_drained(relay, timeout=max(120.0, n / 100), every=0.05)
        cores = (_cpu_seconds(relay.pid) - cpu0) / (time.monotonic() - wall0)
        ready_at, last_sent, failed = box.sql(
            f'SELECT (SELECT max(acquired_at) FROM "{box.schema}"."{box.table}_shards"),'
            f" (SELECT max(last_at) FROM {box.stats}), count(*) FILTER (WHERE attempts > 0)"
            " FROM {t}"
        )[0]
    finally:
        code = relay.stop()
    if code != 0:
        raise BenchError(f"webhook relay exited with {code}; log: {relay.log_path}")
    if failed:
        raise BenchError(f"{failed} webhook deliveries failed at least once; log: {relay.log_path}")
    seconds = (last_sent - ready_at).total_seconds()
    return {"per_s": n / seconds, "seconds": seconds, "relay_cores": cores}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the benchmark
def run(scale: str) -> dict[str, Any]:
    """Deliveries/s of the webhook sink vs raw httpx posts/s, same receiver and concurrency."""
    cfg = SCALES.get(scale, SCALES["full"])
    n, reps = cfg["rows"], cfg["reps"]
    svc = services()
    bodies = payload_pool(1024, PAYLOAD_BYTES)
    receiver = Receiver()
    box = BenchOutbox.create(svc, SHARDS)
    raw: list[float] = []
    core: list[float] = []
    sink: list[float] = []
    cores: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
            for rep in range(reps):
                before = receiver.count()
                raw.append(raw_posts(receiver.url, bodies, n))
                core.append(raw_httpcore_posts(receiver.url, bodies, n))
                log(f"webhook rep {rep + 1}/{reps}: raw httpx {raw[-1]:,.0f} posts/s, "
                    f"raw httpcore {core[-1]:,.0f} posts/s")
                got = relay_deliveries(box, receiver.url, bodies, n, Path(tmp))
                sink.append(got["per_s"])
                cores.append(got["relay_cores"])
                log(f"webhook rep {rep + 1}/{reps}: relay {sink[-1]:,.0f} deliveries/s "
                    f"({got['relay_cores']:.2f} cores)")
                received = receiver.count() - before
                if received < 3 * n:
                    raise BenchError(f"the receiver got {received} POSTs, expected >= {3 * n}")
    finally:
        box.drop()
        receiver.close()
    deliveries, posts = median(sink), median(raw)
    return {
        "webhook_deliveries_per_s": round(deliveries, 1),
        "raw_http_posts_per_s": round(posts, 1),
        "webhook_ratio": round(deliveries / posts, 3),
        "raw_httpcore_posts_per_s": round(median(core), 1),
        "webhook_ratio_vs_httpcore": round(deliveries / median(core), 3),
        "webhook_relay_cores": round(median(cores), 3),
        "webhook_rows": n,
        "webhook_reps": reps,
        "webhook_concurrency": CONCURRENCY,
        "webhook_payload_bytes": PAYLOAD_BYTES,
        "webhook_runs": {"deliveries_per_s": [round(x, 1) for x in sink],
                         "raw_posts_per_s": [round(x, 1) for x in raw],
                         "raw_httpcore_posts_per_s": [round(x, 1) for x in core]},
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        asyncio.run(_serve())
    else:
        print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "small"), indent=2))
