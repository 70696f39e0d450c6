"""Fault injection against the real services: nothing lost, nothing unexpected, order per key.

Every scenario runs producers while a fault is injected, then lets a healthy relay finish and
judges the whole topic with the checker. Loops are bounded in count and time; all traffic is on
loopback.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from outbox_relay import enqueue

from ..conftest import REPO, Outbox, RelayProcess, consume, wait_for
from .checker import Report, Workload, check
from .proxy import ChaosProxy

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BATCH = 200
SHARDS = 8
#: most rows one drain round can hold (see Relay.drain_round): the duplicate window per crash
ROUND = max(BATCH // SHARDS, min(64, BATCH)) * SHARDS
SERVICES = REPO / "scripts" / "services.sh"
RELAY_ENV = {
    "OUTBOX_BATCH_SIZE": str(BATCH),
    "OUTBOX_POLL_INTERVAL": "1",
    "OUTBOX_REBALANCE_INTERVAL": "0.5",
    "OUTBOX_HEARTBEAT_INTERVAL": "2",
}


@pytest.fixture
def producer_engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url, pool_pre_ping=True, pool_size=8)
    yield eng
    eng.dispose()


def finish(
    scenario: str,
    outbox: Outbox,
    topic: str,
    bootstrap: str,
    workload_rolled: set[str],
    started: float,
    relay_factory: Callable[..., RelayProcess],
    commit_order: dict[str, int] | None = None,
    healthy: RelayProcess | None = None,
) -> Report:
    """Let a healthy relay drain everything, then judge what the consumer saw."""
    if healthy is None or not healthy.alive():
        healthy = relay_factory(**RELAY_ENV)
    # 240 s: in exactly-once mode a shard whose transaction the fault cut off is recovered only
    # once the coordinator has aborted that transaction (transaction.timeout.ms, 60 s here),
    # and on a loaded machine a recovery attempt can time out and wait for the next rebalance
    wait_for(lambda: outbox.pending() == 0, 240, f"{scenario}: every committed row sent", every=0.5)
    committed = outbox.sql(f'SELECT count(*) FROM "{outbox.schema}".committed_log')[0][0]
    received = consume(bootstrap, topic, expected=committed, timeout=120, settle=2)
    dead = outbox.sql("SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL")[0][0]
    report = check(
        scenario, outbox, received, workload_rolled, time.monotonic() - started, commit_order
    )
    report.extra["dead_letters"] = dead
    return report


@pytest.fixture(params=["at_least_once", "exactly_once"])
def delivery(request: pytest.FixtureRequest, outbox: Outbox, kafka_bootstrap: str) -> Iterator[str]:
    """A scenario runs once per delivery mode: at-least-once, and exactly-once (every relay it
    starts has OUTBOX_KAFKA_EXACTLY_ONCE=true). The checker's consumer reads read_committed."""
    mode = str(request.param)
    if mode == "exactly_once":
        outbox.env["OUTBOX_KAFKA_EXACTLY_ONCE"] = "true"
    yield mode
    if mode == "exactly_once":
        from confluent_kafka.admin import AdminClient

        from outbox_relay.settings import load_settings

        progress = load_settings(db_schema=outbox.schema, table=outbox.table).progress_topic
        AdminClient({"bootstrap.servers": kafka_bootstrap}).delete_topics([progress])


def named(scenario: str, delivery: str) -> str:
    return scenario + ("_eos" if delivery == "exactly_once" else "")


def assert_clean(report: Report, crash_events: int, delivery: str = "at_least_once") -> None:
    if delivery == "exactly_once":
        assert report.duplicates == 0, report
    assert report.committed > 0
    assert report.lost == 0, report
    assert report.unexpected == 0, report
    assert report.order_violations == 0, report
    assert report.duplicate_key_mismatches == 0, report
    assert report.duplicates <= crash_events * ROUND, report
    assert report.extra.get("dead_letters", 0) == 0, report


def run_with_fault(scenario: str, outbox: Outbox, topic: str, bootstrap: str,
                   engine: Engine, relay_factory: Callable[..., RelayProcess],
                   fault: Callable[[RelayProcess], None], seconds: float
                   ) -> tuple[Report, RelayProcess, Workload]:
    """One relay, producers for ``seconds`` while ``fault(relay)`` runs, then the checker."""
    started = time.monotonic()
    relay = relay_factory(**RELAY_ENV)
    wl = Workload(engine, topic)
    wl.run_for(seconds, lambda: fault(relay))
    report = finish(scenario, outbox, topic, bootstrap, wl.rolled_back, started, relay_factory,
                    healthy=relay)
    return report, relay, wl


def services(command: str, check: bool = True) -> None:
    subprocess.run(["bash", str(SERVICES), command], check=check, timeout=180,
                   capture_output=True)


def namespace(outbox: Outbox) -> int:
    from outbox_relay.settings import load_settings

    return load_settings(db_schema=outbox.schema, table=outbox.table).namespace


def _kill_relay_backends(outbox: Outbox) -> int:
    return len(
        outbox.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'outbox-relay%%'"
        )
    )


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_relay_sigkilled_repeatedly(
    outbox: Outbox,
    topic: str,
    kafka_bootstrap: str,
    producer_engine: Engine,
    relay_factory: Callable[..., RelayProcess],
    record: Callable[..., None],
    delivery: str,
) -> None:
    started = time.monotonic()
    relays = [relay_factory(**RELAY_ENV)]
    kills = 0

    def fault() -> None:
        nonlocal kills
        rnd = random.Random(1)
        for _ in range(6):
            time.sleep(rnd.uniform(0.8, 2.0))
            relays[-1].kill()
            kills += 1
            relays.append(relay_factory(**RELAY_ENV))

    wl = Workload(producer_engine, topic)
    wl.run_for(14, fault)
    report = finish(
        named("relay_sigkill", delivery),
        outbox,
        topic,
        kafka_bootstrap,
        wl.rolled_back,
        started,
        relay_factory,
        healthy=relays[-1],
    )
    record(report, kills=kills, delivery=delivery)
    assert kills >= 5
    assert_clean(report, kills, delivery)


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_relay_backends_terminated(outbox: Outbox, topic: str, kafka_bootstrap: str,
                                   producer_engine: Engine,
                                   relay_factory: Callable[..., RelayProcess],
                                   record: Callable[..., None], delivery: str) -> None:
    terminated = 0

    def fault(relay: RelayProcess) -> None:
        nonlocal terminated
        wait_for(lambda: "took shards" in relay.output(), 20, "relay up")
        rnd = random.Random(2)
        for _ in range(6):
            time.sleep(rnd.uniform(0.5, 1.5))
            terminated += _kill_relay_backends(outbox)

    report, relay, _ = run_with_fault(named("pg_terminate_backend", delivery), outbox, topic,
                                      kafka_bootstrap, producer_engine, relay_factory, fault, 12)
    record(report, backends_terminated=terminated, delivery=delivery)
    assert terminated >= 6 and relay.alive(), "the relay must survive, not exit"
    assert_clean(report, 6, delivery)


# 3 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_postgres_restarted_under_load(outbox: Outbox, topic: str, kafka_bootstrap: str,
                                       producer_engine: Engine,
                                       relay_factory: Callable[..., RelayProcess],
                                       record: Callable[..., None], delivery: str) -> None:
    def fault(_relay: RelayProcess) -> None:
        for _ in range(2):
            time.sleep(3)
            services("pg-restart")

    report, relay, wl = run_with_fault(named("postgres_restart", delivery), outbox, topic,
                                      kafka_bootstrap, producer_engine, relay_factory, fault, 12)
    record(report, restarts=2, producer_errors=wl.errors, delivery=delivery)
    assert relay.alive(), "the relay must reconnect, not exit"
    assert_clean(report, 2, delivery)


# 4 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_kafka_broker_stopped_and_started(outbox: Outbox, topic: str, kafka_bootstrap: str,
                                          producer_engine: Engine,
                                          relay_factory: Callable[..., RelayProcess],
                                          record: Callable[..., None], delivery: str) -> None:
    def fault(_relay: RelayProcess) -> None:
        try:
            time.sleep(3)
            services("kafka-stop")
            time.sleep(10)
        finally:
            services("kafka-start")

    report, relay, _ = run_with_fault(named("kafka_broker_down", delivery), outbox, topic,
                                      kafka_bootstrap, producer_engine, relay_factory, fault, 16)
    record(report, delivery=delivery)
    assert relay.alive()
    assert_clean(report, 1, delivery)


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_three_relays_one_killed_no_overlap(
    outbox: Outbox,
    topic: str,
    kafka_bootstrap: str,
    producer_engine: Engine,
    relay_factory: Callable[..., RelayProcess],
    record: Callable[..., None],
    delivery: str,
) -> None:
    started = time.monotonic()
    relays = [relay_factory(**RELAY_ENV) for _ in range(3)]
    overlaps: list[tuple[int, int]] = []
    samples = 0
    stop = threading.Event()
    ns = namespace(outbox)
    mine = (
        f"locktype = 'advisory' AND granted AND objsubid = 2 AND objid < 1000000 "
        f"AND classid = {ns}::oid"
    )

    def sample() -> None:
        nonlocal samples
        while not stop.is_set() and samples < 2000:
            rows = outbox.sql(
                f"SELECT objid::int, count(*) FROM pg_locks WHERE {mine} "
                "GROUP BY objid HAVING count(*) > 1"
            )
            overlaps.extend((int(r[0]), int(r[1])) for r in rows)
            samples += 1
            time.sleep(0.05)

    def owner_pids() -> set[int]:
        return {int(r[0]) for r in outbox.sql(f"SELECT DISTINCT pid FROM pg_locks WHERE {mine}")}

    def owned_shards() -> int:
        return int(outbox.sql(f"SELECT count(DISTINCT objid) FROM pg_locks WHERE {mine}")[0][0])

    def fault() -> None:
        wait_for(
            lambda: len(owner_pids()) == 3 and owned_shards() == SHARDS,
            30,
            "three relays to split the shards",
        )
        time.sleep(2)
        relays[0].kill()
        wait_for(
            lambda: len(owner_pids()) == 2 and owned_shards() == SHARDS,
            15,
            "two survivors to own every shard",
        )
        time.sleep(2)
        relays.append(relay_factory(**RELAY_ENV))
        wait_for(lambda: len(owner_pids()) == 3, 30, "the new relay to get shards")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wl = Workload(producer_engine, topic)
    try:
        wl.run_for(14, fault)
    finally:
        stop.set()
        sampler.join(10)
    report = finish(
        named("three_relays_one_killed", delivery),
        outbox,
        topic,
        kafka_bootstrap,
        wl.rolled_back,
        started,
        relay_factory,
        healthy=relays[-1],
    )
    record(report, lock_samples=samples, overlaps=len(overlaps), delivery=delivery)
    assert samples > 50 and overlaps == []
    assert_clean(report, 1, delivery)


# 6 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_network_trouble_between_relay_and_services(
    outbox: Outbox,
    topic: str,
    kafka_bootstrap: str,
    producer_engine: Engine,
    relay_factory: Callable[..., RelayProcess],
    record: Callable[..., None],
) -> None:
    started = time.monotonic()
    pg_port = int(os.environ.get("OUTBOX_PG_PORT", "55432"))
    kafka_proxy = ChaosProxy(
        int(os.environ["OUTBOX_KAFKA_FAULTS_PROXY_PORT"]),
        int(os.environ["OUTBOX_KAFKA_FAULTS_PORT"]),
    )
    from ..conftest import free_port

    pg_proxy = ChaosProxy(free_port(), pg_port)
    relay_url = outbox.url.replace(f":{pg_port}/", f":{pg_proxy.listen_port}/")
    relay = relay_factory(
        **RELAY_ENV,
        OUTBOX_DATABASE_URL=relay_url,
        OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka_proxy.listen_port}",
    )
    events = 0

    def fault() -> None:
        nonlocal events
        wait_for(lambda: "took shards" in relay.output(), 20, "relay up through the proxies")
        kafka_proxy.latency = pg_proxy.latency = 0.03
        time.sleep(3)
        kafka_proxy.latency = pg_proxy.latency = 0.0
        kafka_proxy.blackhole(True)
        time.sleep(4)
        kafka_proxy.blackhole(False)
        kafka_proxy.drop_all()
        events += 2
        time.sleep(2)
        pg_proxy.blackhole(True)
        time.sleep(3)
        pg_proxy.blackhole(False)
        pg_proxy.drop_all()
        events += 2
        time.sleep(2)

    wl = Workload(producer_engine, topic)
    try:
        wl.run_for(16, fault)
        report = finish(
            "network_trouble",
            outbox,
            topic,
            kafka_bootstrap,
            wl.rolled_back,
            started,
            relay_factory,
            healthy=relay,
        )
    finally:
        kafka_proxy.close()
        pg_proxy.close()
    record(report, network_events=events)
    assert relay.alive()
    assert_clean(report, events)


# 8 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_rollbacks_serialization_failures_and_late_prepared_commits(
    outbox: Outbox,
    topic: str,
    kafka_bootstrap: str,
    producer_engine: Engine,
    relay_factory: Callable[..., RelayProcess],
    record: Callable[..., None],
) -> None:
    started = time.monotonic()
    relay = relay_factory(**RELAY_ENV)
    schema = outbox.schema
    with producer_engine.begin() as c:
        c.execute(text(f'CREATE TABLE "{schema}".stock (item int PRIMARY KEY, qty int)'))
        c.execute(text(f'INSERT INTO "{schema}".stock SELECT g, 1000 FROM generate_series(1, 3) g'))
    serialization_failures = 0
    rolled_back: set[str] = set()
    serializable = producer_engine.execution_options(isolation_level="SERIALIZABLE")

    def serializable_writer(w: int) -> None:
        nonlocal serialization_failures
        for i in range(60):
            try:
                with Session(serializable) as s, s.begin():
                    total = s.execute(text(f'SELECT sum(qty) FROM "{schema}".stock')).scalar()
                    sent = enqueue(
                        s,
                        topic,
                        {"mid": f"ser-{w}-{i}", "total": total},
                        key=f"ser-{w}",
                        idempotency_key=f"ser-{w}-{i}",
                    )
                    assert sent.created
                    s.execute(
                        text(f'UPDATE "{schema}".stock SET qty = qty - 1 WHERE item = :i'),
                        {"i": 1 + (w + i) % 3},
                    )
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", "") != "40001":
                    raise
                serialization_failures += 1
                rolled_back.add(f"ser-{w}-{i}")

    prepared = []
    for i in range(6):
        conn = producer_engine.connect()
        tx = conn.begin_twophase()
        enqueue(conn, topic, {"mid": f"late-{i}"}, key=f"late-{i}", idempotency_key=f"late-{i}")
        tx.prepare()
        prepared.append((conn, tx, i))

    def fault() -> None:
        threads = [threading.Thread(target=serializable_writer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(4)  # the relay publishes later ids meanwhile
        for conn, tx, i in prepared:
            if i % 3 == 2:
                tx.rollback()
                rolled_back.add(f"late-{i}")
            else:
                tx.commit()
            conn.close()
        for t in threads:
            t.join(60)

    wl = Workload(producer_engine, topic, rollback_ratio=0.3)
    wl.run_for(8, fault)
    # a serialization failure that hit an already-enqueued row leaves no row: the table decides
    report = finish(
        "rollbacks_serialization_2pc",
        outbox,
        topic,
        kafka_bootstrap,
        wl.rolled_back | rolled_back,
        started,
        relay_factory,
        healthy=relay,
    )
    record(report, serialization_failures=serialization_failures)
    assert serialization_failures > 0, "the scenario must provoke serialization failures"
    assert not outbox.sql(
        f'SELECT 1 FROM "{outbox.schema}".committed_log WHERE idempotency_key = ANY(%s)',
        (sorted(rolled_back),),
    )
    assert_clean(report, 0)


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
@pytest.mark.parametrize("mode", ["default", "sequenced"])
def test_commit_order_inversion(
    outbox: Outbox,
    topic: str,
    kafka_bootstrap: str,
    producer_engine: Engine,
    relay_factory: Callable[..., RelayProcess],
    record: Callable[..., None],
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writer A enqueues, then waits for the business lock B holds; B enqueues and commits first.
    Id order (A < B) differs from commit order (B, A). The default mode publishes in id order
    among committed rows, so the consumer can see A after... or before B: reported, not asserted,
    until the per-key sequence mode exists."""
    from outbox_relay.settings import producer_settings

    if mode == "sequenced":
        monkeypatch.setenv("OUTBOX_SEQUENCE_TOPICS", topic)
        producer_settings.cache_clear()
    started = time.monotonic()
    schema = outbox.schema
    with producer_engine.begin() as c:
        c.execute(text(f'CREATE TABLE "{schema}".account (k text PRIMARY KEY, n int)'))
        c.execute(
            text(
                f"INSERT INTO \"{schema}\".account SELECT 'acct-' || g, 0 "
                "FROM generate_series(0, 9) g"
            )
        )
    commit_rank: dict[str, int] = {}
    rank_lock = threading.Lock()
    counter = [0]
    relay = relay_factory(**{**RELAY_ENV, "OUTBOX_POLL_INTERVAL": "0.3"})
    deadline = time.monotonic() + 10

    def writer(w: int, outbox_first: bool) -> None:
        rnd = random.Random(w)
        i = 0
        while time.monotonic() < deadline and i < 2000:
            key = f"acct-{rnd.randrange(10)}"
            mid = f"inv-{w}-{i}"
            i += 1
            with Session(producer_engine) as s, s.begin():
                if outbox_first:
                    enqueue(s, topic, {"mid": mid}, key=key, idempotency_key=mid)
                s.execute(
                    text(f'SELECT n FROM "{schema}".account WHERE k = :k FOR UPDATE'), {"k": key}
                )
                if not outbox_first:
                    enqueue(s, topic, {"mid": mid}, key=key, idempotency_key=mid)
                s.execute(text(f'UPDATE "{schema}".account SET n = n + 1 WHERE k = :k'), {"k": key})
                time.sleep(rnd.uniform(0, 0.004))
                with rank_lock:  # under the row lock: the order of these == commit order per key
                    counter[0] += 1
                    commit_rank[mid] = counter[0]

    threads = [threading.Thread(target=writer, args=(w, w % 2 == 0)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    name = "commit_order_inversion" + ("" if mode == "default" else "_sequenced")
    report = finish(name, outbox, topic, kafka_bootstrap, set(), started, relay_factory,
                    commit_order=commit_rank, healthy=relay)
    record(report, mode=mode, violations_allowed=mode == "default")
    if mode == "sequenced":
        assert report.order_violations == 0, report
        # every committed message of a key took one number: the counters equal the counts
        # (what the consumer saw is judged against the commit order above)
        gaps = outbox.sql(
            f'SELECT c.key, c.n, k.last_seq FROM (SELECT key, count(*) AS n'
            f' FROM "{outbox.schema}".committed_log GROUP BY key) c'
            f' LEFT JOIN "{outbox.schema}".outbox_keyseq k ON k.key = c.key'
            " WHERE k.last_seq IS DISTINCT FROM c.n"
        )
        assert gaps == [], "sequences must be contiguous per key"
    assert report.lost == 0 and report.unexpected == 0, report


# 7 -------------------------------------------------------------------------------------------
@pytest.mark.shards(SHARDS)
def test_webhook_endpoint_failing_for_a_while(outbox: Outbox, producer_engine: Engine,
                                             relay_factory: Callable[..., RelayProcess],
                                             record: Callable[..., None]) -> None:
    from ..conftest import Received
    from ..webhook_receiver import Hit, Receiver, Reply

    started = time.monotonic()
    receiver = Receiver()
    trouble_until = time.time() + 8
    rnd = random.Random(7)
    answered: dict[str, int] = {"500": 0, "429": 0, "slow": 0}

    def rule(hit: Hit) -> Reply:
        if time.time() >= trouble_until:
            return Reply()
        roll = rnd.random()
        if roll < 0.3:
            answered["500"] += 1
            return Reply(500, body=b"internal error")
        if roll < 0.4:
            answered["429"] += 1
            return Reply(429, {"Retry-After": "1"}, b"slow down")
        if roll < 0.45:
            answered["slow"] += 1
            return Reply(200, delay=2.5)  # the relay times out first: it will send it again
        return Reply()

    receiver.rule = rule
    secret = "whsec_" + __import__("base64").b64encode(os.urandom(24)).decode()
    relay = relay_factory(**{
        **RELAY_ENV, "OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": receiver.url(),
        "OUTBOX_WEBHOOK_SECRET": secret, "OUTBOX_WEBHOOK_ALLOW_PRIVATE": "true",
        "OUTBOX_WEBHOOK_TIMEOUT": "1", "OUTBOX_WEBHOOK_BREAKER_COOLDOWN": "1",
        "OUTBOX_RETRY_BACKOFF_BASE": "0.2", "OUTBOX_RETRY_BACKOFF_MAX": "2",
        "OUTBOX_MAX_ATTEMPTS": "100"})
    try:
        wl = Workload(producer_engine, "hooks", producers=3, pause=0.01)
        wl.run_for(10)
        wait_for(lambda: outbox.pending() == 0, 120, "webhook: every committed row sent",
                 every=0.5)
        time.sleep(1)
        hits = receiver.delivered()
    finally:
        relay.terminate()
        receiver.close()
    received = [Received("hooks", 0, h.n, h.headers.get("outbox-key"), h.body,
                         {"idempotency-key": h.id}) for h in hits]
    report = check("webhook_endpoint_failing", outbox, received, wl.rolled_back,
                   time.monotonic() - started)
    report.extra["dead_letters"] = outbox.sql(
        "SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL")[0][0]
    record(report, **{f"answered_{k}": v for k, v in answered.items()})
    assert answered["500"] > 0 and answered["429"] > 0
    assert report.lost == 0 and report.unexpected == 0 and report.order_violations == 0, report
    assert report.duplicate_key_mismatches == 0
    # a request the relay gave up on but the endpoint processed is the webhook duplicate window
    assert report.duplicates <= answered["slow"], report
    assert report.extra["dead_letters"] == 0
