"""Relay drain of a pre-filled backlog, by the real ``outbox-relay run`` subprocess.

The backlog is written with COPY (not timed), then VACUUM ANALYZE and CHECKPOINT, as a table
that has sat a while under autovacuum would be. The clock starts when the relay process is
spawned and stops at the last delivery the relay recorded in its counters (``<table>_sent_stats``,
written by the statement that deletes or marks the rows; Postgres' clock and ours are the same
machine's), so neither the harness' polling interval nor anything else is subtracted or added.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

from .common import (
    KEYS,
    BenchError,
    BenchOutbox,
    CpuSampler,
    RelayProcess,
    Services,
    log,
    msg_key,
    relay_stats,
)
from .kafka_bench import drain_ikey


def fill(box: BenchOutbox, topic: str, n: int, pool: Sequence[bytes], keys: int = KEYS) -> float:
    """TRUNCATE and write ``n`` pending rows (the raw producer's messages, over ``keys``
    keys); returns seconds."""
    t0 = time.monotonic()
    box.sql(f'TRUNCATE {box.t}, "{box.schema}".orders, {box.stats} RESTART IDENTITY')
    with box.svc.connect() as conn:
        write_rows(conn, box, topic, n, pool, keys)
        conn.execute(f"VACUUM (ANALYZE) {box.t}")
        conn.execute("CHECKPOINT")
    return time.monotonic() - t0


def write_rows(conn: psycopg.Connection[Any], box: BenchOutbox, topic: str, n: int,
               pool: Sequence[bytes], keys: int = KEYS) -> None:
    """``n`` pending rows (the raw producer's messages) by one COPY: one transaction."""
    with conn.cursor() as cur, cur.copy(
        f"COPY {box.t} (idempotency_key, topic, key, payload, content_type) FROM STDIN"
    ) as copy:
        for i in range(n):
            copy.write_row((drain_ikey(i), topic, msg_key(i, keys), pool[i % len(pool)],
                            "application/json"))


def running_drain(
    box: BenchOutbox, topic: str, partitions: int, n: int, pool: Sequence[bytes], logdir: Path,
    timeout: float,
) -> dict[str, Any]:
    """A relay already running, caught up and idle, when ``n`` rows commit at once (a batch
    job; rows written while Kafka was away and a relay restarted meanwhile): clock from that
    COMMIT (returned to this client) to the last delivery the relay recorded. The empty table
    is vacuumed before the relay starts, as autovacuum leaves an emptied outbox (no pages, no
    rows: the statistics the relay's first plans see); the rows are not vacuumed or analyzed
    after they land; the relay is woken by the NOTIFY of the commit."""
    box.sql(f'TRUNCATE {box.t}, "{box.schema}".orders, {box.stats} RESTART IDENTITY')
    box.sql(f"VACUUM {box.t}")
    relay = RelayProcess(box, logdir / f"running-{topic}.log")
    try:
        relay.wait_ready()
        time.sleep(1.0)  # its first empty rounds done: idle, woken by NOTIFY
        cpu = CpuSampler(relay.pid).start()
        with box.svc.connect() as conn:
            write_rows(conn, box, topic, n, pool)  # autocommit: committed when COPY returns
        committed = time.time()
        box.wait_drained(relay, timeout, every=0.05, sent=n)
        cores = cpu.stop()
        _first, last, sent = box.sent_span()
        pending = box.pending()
    finally:
        code = relay.stop()
    delivered = _checked(box, relay, topic, partitions, n, pending, sent, code)
    seconds = last.timestamp() - committed
    log(f"  running relay drained {n} rows in {seconds:.2f}s after their commit, cpu {cores}")
    return {"msgs_per_s": n / seconds, "seconds": seconds, "cores": cores,
            "duplicates": delivered - n}


def _checked(box: BenchOutbox, relay: RelayProcess, topic: str, partitions: int, n: int,
             pending: int, sent: int, code: int) -> int:
    """Raise unless the drain ended clean (nothing pending, ``n`` deliveries recorded, exit 0,
    ``n`` messages in the topic at least); returns the topic's message count."""
    if pending:
        raise BenchError(f"{pending} rows left pending (dead letters?); log: {relay.log_path}")
    if code != 0:
        raise BenchError(f"relay exited with {code}; log: {relay.log_path}")
    if sent != n:
        raise BenchError(f"the relay recorded {sent} deliveries of {n}; log: {relay.log_path}")
    delivered = topic_messages(box.svc, topic, partitions)
    if delivered < n:
        raise BenchError(f"only {delivered} of {n} messages reached {topic}")
    return delivered


def topic_messages(svc: Services, topic: str, partitions: int) -> int:
    consumer = Consumer({"bootstrap.servers": svc.bootstrap, "group.id": "bench-watermarks"})
    try:
        return sum(
            hi - lo
            for lo, hi in (
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in range(partitions)
            )
        )
    finally:
        consumer.close()


def relay_drain(
    box: BenchOutbox, topic: str, partitions: int, n: int, logdir: Path,
    poll_every: float, timeout: float, relay_args: Sequence[str] = (),
    wrap: Sequence[str] = (), hold_xmin: bool = False, env: dict[str, str] | None = None,
    src: str | None = None,
) -> dict[str, Any]:
    """Start the relay on a filled backlog, wait until nothing is pending, stop it.

    ``hold_xmin``: meanwhile another session keeps a transaction with an xid open (a long
    report, pg_dump, an idle-in-transaction client: common on a primary), so rows the relay
    marks sent stay visible to it and Postgres can neither prune them nor kill their index
    entries until it ends."""
    holder = None
    if hold_xmin:
        holder = psycopg.connect(box.svc.dsn)
        holder.execute("SELECT txid_current()")
    try:
        return _relay_drain(box, topic, partitions, n, logdir, poll_every, timeout,
                            relay_args, wrap, env, src)
    finally:
        if holder is not None:
            holder.close()


def _relay_drain(
    box: BenchOutbox, topic: str, partitions: int, n: int, logdir: Path,
    poll_every: float, timeout: float, relay_args: Sequence[str], wrap: Sequence[str],
    env: dict[str, str] | None, src: str | None,
) -> dict[str, Any]:
    relay = RelayProcess(box, logdir / f"drain-{topic}.log", relay_args, env=env, wrap=wrap,
                         src=src)
    cpu = CpuSampler(relay.pid).start()
    try:
        startup = relay.wait_ready()
        box.wait_drained(relay, timeout, every=poll_every, sent=n)
        cores = cpu.stop()
        first, last, sent = box.sent_span()
        pending = box.pending()
        rss = relay.vmhwm_mb()
        relay_cpu = relay.cpu_s()
        stats = relay_stats({}, relay.metrics())
    finally:
        code = relay.stop()
    delivered = _checked(box, relay, topic, partitions, n, pending, sent, code)
    total = last.timestamp() - relay.started_wall
    steady = last.timestamp() - first.timestamp()
    clock = "last delivery recorded"
    transactional = (env or {}).get("OUTBOX_KAFKA_EXACTLY_ONCE") == "true"
    log(f"  relay drained {n} rows in {total:.1f}s (start-up {startup:.2f}s), "
        f"cpu {cores}, {stats}")
    return {
        "msgs_per_s": n / total,
        "seconds": total,
        "startup_s": startup,
        "steady_msgs_per_s": n / steady if steady else None,
        "from_ready_msgs_per_s": n / (total - startup),
        "rss_mb": rss,
        "relay_cpu_s": relay_cpu,
        "relay_cpu_us_per_msg": 1e6 * relay_cpu / n,
        "cores": cores,
        "relay": stats,
        # transaction markers take offsets too: in exactly-once mode this is not a count
        "duplicates": None if transactional else delivered - n,
        "log_offsets": delivered,
        "end_clock": clock,
    }
