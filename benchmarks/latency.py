"""End-to-end latency at a fixed rate: producer commit → message consumed from Kafka.

One writer thread commits one outbox row per transaction every 1/rate s (the statement shape of
``enqueue``: INSERT ... ON CONFLICT DO NOTHING RETURNING id); the commit time is ``time.time()``
when ``COMMIT`` returned (the row's own payload cannot hold it: it is written before the commit).
A consumer in this process reads the topic from offset 0 and stamps each message when it
arrives; latency = arrival - commit, matched by the idempotency-key header. One machine, one
clock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import psycopg

from .common import H_IKEY, BenchError, BenchOutbox, msg_key
from .kafka_bench import TopicConsumer, header


def e2e_latency(
    box: BenchOutbox, topic: str, partitions: int, pool: Sequence[bytes], rate: float,
    seconds: float, warmup: float, tag: str,
) -> list[float]:
    """Latency samples (ms) of one repetition, the first ``warmup`` seconds left out."""
    total = int(rate * (warmup + seconds))
    skip = int(rate * warmup)
    committed = [0.0] * total
    consumed = [0.0] * total
    prefix = f"{tag}-"

    def on_message(msg: object, now: float) -> None:
        value = header(msg, H_IKEY)  # type: ignore[arg-type]
        if value is not None:
            text = value.decode()
            if text.startswith(prefix):
                consumed[int(text[len(prefix):])] = now

    insert = (
        f"INSERT INTO {box.t} (idempotency_key, topic, key, payload, content_type, headers)"
        " VALUES (%s, %s, %s, %s, 'application/json', '{}')"
        " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
    )
    consumer = TopicConsumer(box.svc, topic, partitions, on_message)
    try:
        with psycopg.connect(box.svc.dsn) as conn:
            time.sleep(0.3)
            t0 = time.time() + 0.01
            for i in range(total):
                target = t0 + i / rate
                delay = target - time.time()
                if delay > 0:
                    time.sleep(delay)
                conn.execute(insert, (f"{prefix}{i}", topic, msg_key(i), pool[i % len(pool)]),
                             prepare=True)
                conn.commit()
                committed[i] = time.time()
        consumer.wait_for(lambda: all(consumed[skip:]), 60, f"{tag} messages to be consumed")
    finally:
        consumer.close()
    samples = [(consumed[i] - committed[i]) * 1000 for i in range(skip, total)]
    if not samples:
        raise BenchError("no latency samples")
    return samples
