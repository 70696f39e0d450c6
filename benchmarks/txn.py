"""Producer-side cost, with pgbench: 8 concurrent writers, each transaction a business insert
into a small ``orders`` table, without / with an outbox row (the SQL ``enqueue`` sends, a ~1 KB
payload, a time-ordered UUIDv7 idempotency key), with the NOTIFY trigger dropped, and with a
per-key sequence number assigned at commit (``OUTBOX_SEQUENCE_TOPICS``).

The same outbox script run flat out, with a consumer in this process, gives the relay's
sustained lag: each row carries ``clock_timestamp()`` taken just before COMMIT in a header (which
the relay copies to Kafka); lag = arrival at the consumer - that time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from .common import PGBENCH, BenchError, BenchOutbox, CpuSampler, RelayProcess, relay_stats
from .kafka_bench import TopicConsumer, header

#: RFC 9562 UUIDv7 in SQL: 48-bit ms timestamp over a random UUID, version and variant bits.
UUID7 = (
    "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing"
    " substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)"
    " FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid::text"
)

ORDER_INSERT = (
    "INSERT INTO {orders} (customer, amount, status) VALUES (:c, 19.99, 'created');"
)


def _note(nbytes: int) -> str:
    words = [
        "order", "shipped", "express", "warehouse", "lisbon", "quantity", "discount", "coupon",
        "priority",
    ]
    out: list[str] = []
    i = 0
    while sum(len(w) + 1 for w in out) < nbytes:
        out.append(words[i % len(words)] + str(i % 97))
        i += 1
    return " ".join(out)[:nbytes]


def scripts(box: BenchOutbox, topic: str, payload_bytes: int) -> dict[str, str]:
    """pgbench scripts by variant. JSON with ': ' (pgbench would read ':x' as a variable)."""
    orders = f'"{box.schema}".orders'
    head = json.dumps({"type": "order.created", "customer": 0}, separators=(",", ": "))
    # payload = '{"type": "order.created", "customer": ' || :c || ', "note": "..."}'
    prefix = head[: head.rindex("0")]
    tail = ', "note": "' + _note(payload_bytes - len(head) - 14) + '"}'
    payload = f"convert_to('{prefix}' || :c || '{tail}', 'UTF8')"
    outbox = (
        f"INSERT INTO {box.t} (idempotency_key, topic, key, payload, content_type, headers)"
        f" VALUES ({UUID7}, '{topic}', 'key-' || :k, {payload}, 'application/json',"
        " jsonb_build_object('bench-ts', extract(epoch FROM clock_timestamp())::text))"
        " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id;"
    )
    sets = "\\set c random(1, 1000000)\n\\set k random(0, 999)\n"
    plain = f"{sets}BEGIN;\n{ORDER_INSERT.format(orders=orders)}\nCOMMIT;\n"
    with_outbox = f"{sets}BEGIN;\n{ORDER_INSERT.format(orders=orders)}\n{outbox}\nCOMMIT;\n"
    # per-key sequences (OUTBOX_SEQUENCE_TOPICS): enqueue writes seq = 0 and the deferred
    # trigger numbers the row at COMMIT from the key's counter row
    sequenced = with_outbox.replace(
        "content_type, headers)", "content_type, headers, seq)"
    ).replace("::text)) ON CONFLICT", "::text), 0) ON CONFLICT")
    assert sequenced != with_outbox
    return {"plain": plain, "outbox": with_outbox, "sequenced": sequenced}


def pgbench(box: BenchOutbox, script: str, clients: int, threads: int, seconds: float
            ) -> dict[str, float]:
    """Run pgbench with ``script``; returns tps and transactions."""
    params = conninfo_to_dict(box.svc.dsn)
    env = {**os.environ}
    if params.get("password"):
        env["PGPASSWORD"] = str(params["password"])
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
        fh.write(script)
        path = fh.name
    try:
        cmd = [
            str(PGBENCH), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads),
            "-T", str(max(1, round(seconds))), "-f", path,
            "-h", str(params.get("host", "127.0.0.1")), "-p", str(params.get("port", 5432)),
            "-U", str(params.get("user", "postgres")), str(params.get("dbname", "outbox")),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=seconds + 120, check=False)
    finally:
        Path(path).unlink(missing_ok=True)
    if done.returncode != 0:
        raise BenchError(f"pgbench failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
    count = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if not tps or not count:
        raise BenchError(f"cannot parse pgbench output:\n{done.stdout[-800:]}")
    if failed and int(failed.group(1)):
        raise BenchError(f"pgbench: {failed.group(1)} failed transactions")
    return {"tps": float(tps.group(1)), "transactions": int(count.group(1))}


def txn_round(
    box: BenchOutbox, relay: RelayProcess, variant: str, script: str, clients: int,
    threads: int, seconds: float,
) -> dict[str, Any]:
    """One pgbench run of ``variant`` (plain / outbox / no_trigger), relay running and idle at
    the start, the table emptied and a checkpoint taken first so every run starts alike."""
    box.wait_drained(relay, 300)
    box.truncate()
    if variant == "no_trigger":
        box.drop_trigger()
    try:
        box.checkpoint()
        time.sleep(0.2)  # the relay has flagged itself idle by now
        before = relay.metrics()
        cpu = CpuSampler(relay.pid).start()
        result = pgbench(box, script, clients, threads, seconds)
        result["cores"] = cpu.stop()
        result["relay"] = relay_stats(before, relay.metrics())
    finally:
        if variant == "no_trigger":
            box.create_trigger()
    return result


def sustained(
    box: BenchOutbox, relay: RelayProcess, topic: str, partitions: int, script: str,
    clients: int, threads: int, seconds: float,
) -> dict[str, Any]:
    """pgbench flat out with the outbox script while the relay delivers; lag per message."""
    box.wait_drained(relay, 300)
    box.truncate()
    box.checkpoint()
    lags: list[float] = []
    arrivals: list[float] = []

    def on_message(msg: object, now: float) -> None:
        ts = header(msg, "bench-ts")  # type: ignore[arg-type]
        if ts is not None:
            lags.append((now - float(ts)) * 1000)
            arrivals.append(now)

    consumer = TopicConsumer(box.svc, topic, partitions, on_message)
    try:
        time.sleep(0.3)
        hwm0 = relay.cpu_s()
        before = relay.metrics()
        cpu = CpuSampler(relay.pid).start()
        t0 = time.time()
        result = pgbench(box, script, clients, threads, seconds)
        t1 = time.time()
        result["cores"] = cpu.stop()
        result["relay"] = relay_stats(before, relay.metrics())
        relay_cpu = relay.cpu_s() - hwm0
        backlog = box.pending()
        drain_after = box.wait_drained(relay, 600, every=0.05)
        n = result["transactions"]
        consumer.wait_for(lambda: len(lags) >= n, 120, "sustained messages to be consumed")
    finally:
        consumer.close()
    # delivered while producers ran = received by the consumer by then (whatever the relay does
    # with a sent row: mark it or delete it)
    sent_in_window = sum(1 for a in arrivals if a <= t1)
    if not sent_in_window:
        raise BenchError("the relay delivered nothing while the producers ran")
    result.update({
        "lags_ms": lags,
        "backlog_at_end": backlog,
        "relay_msgs_per_s_in_window": sent_in_window / (t1 - t0),
        "drain_after_s": drain_after,
        "relay_cpu_us_per_msg": 1e6 * relay_cpu / max(1, sent_in_window),
        "rss_mb": relay.vmhwm_mb(),
    })
    return result
