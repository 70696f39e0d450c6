"""The ceilings: a raw confluent-kafka producer with exactly the relay's producer settings.

* throughput: produce N messages (the same keys, payloads and headers the relay sends), then
  flush; time from the first ``produce`` to the end of ``flush`` (all acknowledged), with the
  producer connected beforehand -- or, cold, as a program of its own timed from its spawn
  (``raw_cold.py``), the way the relay's drain of a backlog is timed;
* latency: one message every 1/rate s; produce → delivery report (ack), and produce → consumed
  by a consumer in this process (the same consumer the relay's end-to-end figures use).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from .common import (
    H_CTYPE,
    H_ID,
    H_IKEY,
    KEY_FORMAT,
    KEYS,
    BenchError,
    Services,
    msg_key,
    unique,
)

CONTENT_TYPE = "application/json"
#: The idempotency key of the drain's message ``i``: ``IKEY_FORMAT.format(i)``.
IKEY_FORMAT = "bench-{:010d}"


def headers_for(ikey: str, outbox_id: int) -> list[tuple[str, bytes]]:
    """The headers the relay puts on a row without user headers (sinks/kafka.py)."""
    return [(H_IKEY, ikey.encode()), (H_ID, str(outbox_id).encode()),
            (H_CTYPE, CONTENT_TYPE.encode())]


def drain_ikey(i: int) -> str:
    return IKEY_FORMAT.format(i)


def warm_up(producer: Producer, topic: str) -> None:
    """Metadata and the idempotent producer id (InitProducerId) before the clock starts: the
    first message of a fresh idempotent producer waits ~100-200 ms for them."""
    producer.produce(topic, b"warm-up", None)
    if producer.flush(30):
        raise BenchError(f"cannot produce to {topic}")


def raw_throughput(svc: Services, topic: str, n: int, pool: Sequence[bytes]) -> dict[str, Any]:
    """Produce the drain's ``n`` messages with the relay's settings, then flush."""
    producer = Producer(svc.producer_config())
    warm_up(producer, topic)
    msgs = [(msg_key(i), pool[i % len(pool)], headers_for(drain_ikey(i), i + 1)) for i in range(n)]
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err.str())

    produce = producer.produce
    poll = producer.poll
    t0 = time.perf_counter()
    for key, value, headers in msgs:
        while True:
            try:
                produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.005)
    left = producer.flush(300)
    elapsed = time.perf_counter() - t0
    if left or errors:
        raise BenchError(f"raw producer: {left} undelivered, {len(errors)} errors {errors[:3]}")
    return {"msgs_per_s": n / elapsed, "seconds": elapsed}


def raw_cold_throughput(svc: Services, topic: str, n: int, pool: Sequence[bytes],
                        workdir: Path) -> dict[str, Any]:
    """The same ``n`` messages from a producer program of its own (``raw_cold.py``), timed
    from its spawn to the end of its flush: what :func:`raw_throughput` leaves out (a process
    starting, connecting, getting its producer id) counted as the relay's start-up is."""
    if any(b"\n" in p for p in pool):
        raise BenchError("raw_cold.py reads payloads one per line: a payload holds a newline")
    pool_path, spec_path = workdir / "raw-cold-pool.txt", workdir / "raw-cold-spec.json"
    pool_path.write_bytes(b"\n".join(pool))
    spec_path.write_text(json.dumps({
        "config": svc.producer_config(), "topic": topic, "rows": n, "keys": KEYS,
        "key_format": KEY_FORMAT, "pool": str(pool_path), "headers": [H_IKEY, H_ID, H_CTYPE],
        "ikey_format": IKEY_FORMAT, "content_type": CONTENT_TYPE,
    }))
    spawned = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("raw_cold.py")),
                           str(spec_path)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"raw_cold.py exited {proc.returncode}: "
                         f"{(proc.stdout + proc.stderr).strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    elapsed = out["done"] - spawned
    return {"msgs_per_s": n / elapsed, "seconds": elapsed}


class TopicConsumer:
    """Reads every partition of ``topic`` from the beginning in a background thread and calls
    ``on_message(msg, received_at)`` (``time.time()`` right after the batch arrived)."""

    def __init__(
        self, svc: Services, topic: str, partitions: int,
        on_message: Callable[[Message, float], None],
    ) -> None:
        self._consumer = Consumer({
            "bootstrap.servers": svc.bootstrap,
            "group.id": unique("bench-consumer"),
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 100,
            "fetch.min.bytes": 1,
            # what exactly-once consumers must use; the same for non-transactional messages
            "isolation.level": "read_committed",
        })
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                               for p in range(partitions)])
        self._on_message = on_message
        self._stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # consume(n, timeout) waits for n messages or the whole timeout: it would add up to
        # `timeout` of latency. poll() returns with the first message; consume(n, 0) then takes
        # whatever else is already queued, without waiting.
        poll = self._consumer.poll
        consume = self._consumer.consume
        try:
            while not self._stop.is_set():
                first = poll(0.05)
                if first is None:
                    continue
                now = time.time()
                for msg in (first, *consume(num_messages=1000, timeout=0)):
                    if msg.error() is None:
                        self.count += 1
                        self._on_message(msg, now)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_for / close
            self.error = exc

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.error is not None:
                raise BenchError(f"consumer failed: {self.error}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def header(msg: Message, name: str) -> bytes | None:
    for k, v in msg.headers() or ():
        if k == name:
            return v  # type: ignore[no-any-return]
    return None


def raw_latency(
    svc: Services, topic: str, partitions: int, pool: Sequence[bytes], rate: float,
    seconds: float, warmup: float, **override: Any,
) -> dict[str, list[float]]:
    """Produce at a fixed ``rate``; returns ms samples ``ack`` (produce → delivery report) and
    ``consumed`` (produce → received by a consumer), without the first ``warmup`` seconds."""
    producer = Producer(svc.producer_config(**override))
    warm_up(producer, topic)
    total = int(rate * (warmup + seconds))
    skip = int(rate * warmup)
    sent = [0.0] * total
    acked = [0.0] * total
    consumed = [0.0] * total

    def on_delivery(i: int, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            acked[i] = time.time()

    def on_message(msg: Message, now: float) -> None:
        value = header(msg, H_ID)
        if value is not None:
            consumed[int(value)] = now

    consumer = TopicConsumer(svc, topic, partitions, on_message)
    try:
        time.sleep(0.3)  # the consumer fetches from offset 0 before we start
        poll = producer.poll
        t0 = time.time() + 0.01
        for i in range(total):
            target = t0 + i / rate
            while True:
                now = time.time()
                if now >= target:
                    break
                poll(target - now)
            ikey = f"lat-{i}"
            sent[i] = time.time()
            producer.produce(topic, pool[i % len(pool)], msg_key(i),
                             headers=headers_for(ikey, i),
                             on_delivery=functools.partial(on_delivery, i))
            poll(0)
        if producer.flush(30):
            raise BenchError("raw latency: messages not acknowledged within 30s")
        consumer.wait_for(lambda: all(consumed[skip:]), 30, "raw messages to be consumed")
    finally:
        consumer.close()
    if not all(acked):
        raise BenchError("raw latency: some deliveries failed")
    return {
        "ack": [(acked[i] - sent[i]) * 1000 for i in range(skip, total)],
        "consumed": [(consumed[i] - sent[i]) * 1000 for i in range(skip, total)],
    }
