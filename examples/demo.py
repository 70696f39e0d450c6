"""End-to-end demo: a shop writes orders and outbox rows in one transaction; the relay publishes
them to Kafka; a consumer prints them with their per-key order and commit -> consume latency.

Run with ``make demo`` (it starts the local services first).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCHEMA = "shop"
TOPIC = "orders.placed"
ORDERS = 40


def main() -> int:
    url = os.environ["OUTBOX_DATABASE_URL"]
    bootstrap = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    os.environ["OUTBOX_SCHEMA"] = SCHEMA
    venv_bin = Path(sys.executable).parent

    print(f"1. migrate: the shop's own alembic adopts the outbox branch (schema {SCHEMA!r})")
    subprocess.run(
        [str(venv_bin / "alembic"), "-c", "alembic/alembic.ini", "-x", f"host_schema={SCHEMA}",
         "-x", f"outbox_schema={SCHEMA}", "upgrade", "heads"],
        cwd=REPO, check=True, capture_output=True,
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if TOPIC not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(TOPIC, 4, 1)])[TOPIC].result(30)

    from examples.shop.models import Customer, place_order

    print("2. start the relay: outbox-relay run (woken by NOTIFY)")
    log_path = REPO / ".dev" / "demo-relay.log"
    log = log_path.open("w")
    relay = subprocess.Popen(
        [str(venv_bin / "outbox-relay"), "run", "--http-port", "0", "--name", "demo"],
        env={**os.environ, "OUTBOX_SCHEMA": SCHEMA}, stdout=log, stderr=subprocess.STDOUT,
    )
    commits: dict[str, float] = {}
    received: list[tuple[str, dict[str, int], float]] = []
    consumer_ready = threading.Event()
    done = threading.Event()

    def consume() -> None:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-{time.time_ns()}",
                      "auto.offset.reset": "latest", "enable.auto.commit": False})
        c.subscribe([TOPIC], on_assign=lambda *_: consumer_ready.set())
        while not done.is_set():
            msg = c.poll(0.1)
            if msg is None or msg.error():
                continue
            headers = {k: v.decode() for k, v in msg.headers() or []}
            received.append((headers["idempotency-key"], json.loads(msg.value()), time.time()))
        c.close()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    if not consumer_ready.wait(30):
        print("consumer got no partition assignment within 30 s", file=sys.stderr)
        return 1
    time.sleep(1)  # the latest offsets are fixed once assignment completes

    engine = create_engine(url, connect_args={"options": f"-c search_path={SCHEMA}"})
    print(f"3. the shop places {ORDERS} orders, each with its outbox row in the same transaction;"
          " one transaction rolls back")
    rolled_back = None
    with Session(engine) as s, s.begin():
        customers = list(s.scalars(select(Customer).order_by(Customer.id)))
        for i in range(len(customers), 3):
            s.add(Customer(email=f"customer{i}@example.com", name=f"Customer {i}"))
    with Session(engine) as s:
        customers = list(s.scalars(select(Customer).order_by(Customer.id)))
    rnd = random.Random(7)
    for i in range(ORDERS):
        with Session(engine) as s, s.begin():
            customer = s.get_one(Customer, rnd.choice(customers).id)
            _, sent = place_order(s, customer, rnd.randrange(500, 50_000))
            if i == ORDERS // 2:
                rolled_back = sent.idempotency_key
                s.rollback()
                continue
            # taken as COMMIT starts (the block's end commits): the latency shown includes
            # the commit itself, and a fast consumer can never beat the timestamp
            commits[sent.idempotency_key] = time.time()
        time.sleep(0.02)

    deadline = time.time() + 30
    while time.time() < deadline and len({r[0] for r in received} & set(commits)) < len(commits):
        time.sleep(0.05)
    time.sleep(0.5)
    done.set()
    thread.join()

    print("4. consumed from Kafka:")
    latencies = []
    last: dict[int, int] = {}
    in_order = True
    for ikey, body, at in received:
        if ikey not in commits:
            continue
        ms = (at - commits[ikey]) * 1000
        latencies.append(ms)
        cust, order = body["customer_id"], body["order_id"]
        in_order &= order > last.get(cust, 0)
        last[cust] = order
        print(f"   key customer-{cust:<3} order {order:<6} {body['total_cents'] / 100:>8.2f}  "
              f"commit->consume {ms:6.1f} ms")
    delivered = {r[0] for r in received} & set(commits)
    relay.send_signal(signal.SIGTERM)
    code = relay.wait(40)
    log.close()
    print(f"5. delivered {len(delivered)}/{len(commits)} committed orders; rolled-back order "
          f"{'NEVER delivered' if rolled_back not in {r[0] for r in received} else 'DELIVERED?!'}; "
          f"per-key order {'held' if in_order else 'VIOLATED'}")
    if latencies:
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
        print(f"   commit->consume latency p50 {statistics.median(latencies):.1f} ms, "
              f"p99 {q[98]:.1f} ms")
    print(f"   relay stopped with exit code {code} (log: {log_path.relative_to(REPO)})")
    ok = len(delivered) == len(commits) and in_order and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
