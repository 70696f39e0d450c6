"""The relay against real Postgres and a real Kafka broker, as a real subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox_relay import Message, enqueue, enqueue_many
from outbox_relay.settings import conninfo
from outbox_relay.store import Store

from .conftest import Outbox, RelayProcess, consume, run_cli, wait_for


def _enqueue_numbered(engine: Engine, topic: str, n: int, keys: int, start: int = 0) -> None:
    with Session(engine) as s, s.begin():
        enqueue_many(
            s, [Message(topic, {"n": i}, key=f"k{i % keys}") for i in range(start, start + n)]
        )


def _per_key_order_ok(msgs: list) -> bool:
    last: dict[str | None, int] = {}
    for m in msgs:
        n = json.loads(m.value)["n"]
        if m.key in last and n < last[m.key]:
            return False
        last[m.key] = n
    return True


def test_delivers_committed_rows_only_with_headers(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory(OUTBOX_KEEP_SENT="true")
    with Session(engine) as s, s.begin():
        enqueue(s, topic, {"n": 1}, key="a", headers={"trace": "t-1"}, idempotency_key="ik-1")
    with Session(engine) as s, s.begin():
        enqueue(s, topic, {"n": 2}, key="a", idempotency_key="ik-rolled-back")
        s.rollback()
    with Session(engine) as s, s.begin():
        enqueue(s, topic, "plain", key=None, idempotency_key="ik-3")
    got = consume(kafka_bootstrap, topic, expected=2, timeout=30, settle=2)
    assert sorted(m.headers["idempotency-key"] for m in got) == ["ik-1", "ik-3"]
    first = next(m for m in got if m.headers["idempotency-key"] == "ik-1")
    assert first.key == "a" and json.loads(first.value) == {"n": 1}
    assert first.headers["trace"] == "t-1"
    assert first.headers["content-type"] == "application/json"
    row_id = outbox.sql("SELECT id FROM {t} WHERE idempotency_key = 'ik-1'")[0][0]
    assert first.headers["outbox-id"] == str(row_id)
    wait_for(lambda: outbox.pending() == 0, 10, "rows marked sent")
    assert relay.terminate() == 0


def _murmur2(data: bytes) -> int:
    """Kafka's Java murmur2 (the DefaultPartitioner's hash)."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def test_per_key_order_with_concurrent_writers_and_java_partitions(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay_factory()
    writers, txns, per_txn, keys_per_writer = 8, 50, 5, 5

    def writer(w: int) -> None:
        # each writer owns its keys, so its commit order defines their order
        rnd = random.Random(w)
        counters: dict[str, int] = defaultdict(int)
        for _ in range(txns):
            with Session(engine) as s, s.begin():
                for _ in range(per_txn):
                    key = f"w{w}-k{rnd.randrange(keys_per_writer)}"
                    counters[key] += 1
                    enqueue(s, topic, {"n": counters[key], "w": w}, key=key)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_writer = txns * per_txn
    total = writers * per_writer
    got = consume(kafka_bootstrap, topic, expected=total, timeout=90)
    assert len({m.headers["idempotency-key"] for m in got}) == total
    by_key: dict[str, list[int]] = defaultdict(list)
    for m in got:
        by_key[m.key].append(json.loads(m.value)["n"])
        assert m.partition == (_murmur2(m.key.encode()) & 0x7FFFFFFF) % 4, "not Java murmur2"
    for key, seq in by_key.items():
        assert seq == list(range(1, len(seq) + 1)), f"key {key} out of order or gapped"
    ids: dict[str, list[int]] = defaultdict(list)
    for m in got:
        ids[m.key].append(int(m.headers["outbox-id"]))
    assert all(v == sorted(v) for v in ids.values()), "not in outbox id order per key"


def test_restart_mid_stream_loses_nothing(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    _enqueue_numbered(engine, topic, 20_000, keys=100)
    relay = relay_factory(OUTBOX_BATCH_SIZE="200")
    wait_for(lambda: outbox.pending() < 19_000, 60, "the relay to start draining")
    assert relay.terminate() == 0
    assert outbox.pending() > 0, "drained everything before the restart; test proves nothing"
    relay_factory()
    wait_for(lambda: outbox.pending() == 0, 120, "drain after restart")
    got = consume(kafka_bootstrap, topic, expected=20_000, timeout=60)
    assert {json.loads(m.value)["n"] for m in got} == set(range(20_000))
    assert _per_key_order_ok(got)


def test_sigkill_between_publish_and_mark_duplicates_only_that_batch(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    _enqueue_numbered(engine, topic, 50, keys=5)
    # Hold row locks so the relay's mark (UPDATE) blocks after Kafka confirmed the batch.
    blocker = psycopg.connect(conninfo(outbox.url))
    blocker.execute(f'SELECT id FROM "{outbox.schema}".outbox FOR UPDATE')
    relay = relay_factory()
    first = consume(kafka_bootstrap, topic, expected=50, timeout=30)
    assert len(first) == 50
    relay.kill()
    # A killed client's backend keeps waiting on the lock (and would commit the mark later);
    # end it the way a crashed host's dropped connection ends.
    outbox.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'outbox-relay%%'"
    )
    wait_for(
        lambda: (
            not outbox.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay%%'"
            )
        ),
        10,
        "the dead relay's backends to go",
    )
    blocker.rollback()
    blocker.close()
    assert outbox.pending() == 50, "nothing may be marked: the mark never committed"
    relay_factory()
    wait_for(lambda: outbox.pending() == 0, 30, "redelivery")
    got = consume(kafka_bootstrap, topic, expected=100, timeout=30, settle=2)
    keys = [m.headers["idempotency-key"] for m in got]
    assert len(keys) == 100 and len(set(keys)) == 50
    assert all(keys.count(k) == 2 for k in set(keys)), "duplicates carry the same key"


def _owners(outbox: Outbox, ns: int) -> list[tuple[int, int]]:
    return [
        (int(r[0]), int(r[1]))
        for r in outbox.sql(
            "SELECT objid::int, pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid"
            " AND objsubid = 2 AND granted AND objid < 1000000",
            (ns,),
        )
    ]


def test_sigkill_in_a_backlog_duplicates_at_most_one_round(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """In a backlog rounds overlap (the next batch is read, and this one marked on a second
    connection, while Kafka acknowledges); still at most one round is published and unmarked
    when the relay dies."""
    total, round_rows = 30_000, 800  # 8 shards: 100 rows of each per round
    _enqueue_numbered(engine, topic, total, keys=100)
    relay = relay_factory(OUTBOX_BATCH_SIZE=str(round_rows))
    wait_for(lambda: outbox.pending() < total - 5_000, 60, "the relay to drain a while")
    relay.kill()
    assert outbox.pending() > 0, "drained everything before the kill; test proves nothing"
    relay_factory(OUTBOX_BATCH_SIZE=str(round_rows))
    wait_for(lambda: outbox.pending() == 0, 120, "drain after the kill")
    got = consume(kafka_bootstrap, topic, expected=total, timeout=60, settle=2)
    ns = [json.loads(m.value)["n"] for m in got]
    assert set(ns) == set(range(total))
    assert len(ns) - total <= round_rows, f"{len(ns) - total} duplicates, more than one round"
    first: list = []
    seen: set[int] = set()
    for m, n in zip(got, ns, strict=True):
        if n not in seen:
            seen.add(n)
            first.append(m)
    assert _per_key_order_ok(first)


def test_a_round_holds_at_most_the_batch_size_with_many_shards(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """Each shard is read at least 64 rows deep; with 8 shards and a batch size of 40 a read
    brings up to 320 rows, of which a round publishes the first 40 in id order (the batch size
    is also the most a crash can publish twice)."""
    total, batch = 1_000, 40
    _enqueue_numbered(engine, topic, total, keys=50)
    relay = relay_factory(OUTBOX_BATCH_SIZE=str(batch), OUTBOX_LOG_LEVEL="DEBUG")
    wait_for(lambda: outbox.pending() == 0, 60, "the relay to drain")
    got = consume(kafka_bootstrap, topic, expected=total, timeout=60)
    assert sorted(json.loads(m.value)["n"] for m in got) == list(range(total))
    assert _per_key_order_ok(got)
    rounds = [int(n) for n in re.findall(r"batch of (\d+) rows", relay.output())]
    assert sum(rounds) >= total, "the relay's debug lines are missing"
    assert max(rounds) == batch, rounds


def test_a_hot_keys_shard_is_read_deep_while_the_others_are_idle(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """Rows of one key all live in one shard. Once the other shards come back with less than
    they were asked, that shard is read as deep as the batch allows (minus 64 rows asked of
    each other shard), not an equal share of the batch."""
    total, batch = 6_000, 2_000
    with Session(engine) as s, s.begin():
        enqueue_many(s, [Message(topic, {"n": i}, key="hot") for i in range(total)])
    relay = relay_factory(OUTBOX_BATCH_SIZE=str(batch), OUTBOX_LOG_LEVEL="DEBUG")
    wait_for(lambda: outbox.pending() == 0, 60, "the relay to drain")
    got = consume(kafka_bootstrap, topic, expected=total, timeout=60)
    assert [json.loads(m.value)["n"] for m in got] == list(range(total))
    rounds = [int(n) for n in re.findall(r"batch of (\d+) rows", relay.output())]
    even = batch // outbox.shards
    assert rounds and rounds[0] == even, rounds  # first read: an equal share of each shard
    assert max(rounds) == batch - 64 * (outbox.shards - 1), rounds


def test_two_relays_split_shards_and_fail_over(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    store = Store(outbox.schema, "outbox", _namespace(outbox))
    a, b = relay_factory(), relay_factory()

    def split() -> bool:
        owners = _owners(outbox, store.namespace)
        shards = [s for s, _ in owners]
        return sorted(shards) == list(range(outbox.shards)) and len({p for _, p in owners}) == 2

    wait_for(split, 20, "two relays to split the shards")
    owners = _owners(outbox, store.namespace)
    assert len(owners) == len({s for s, _ in owners}), "a shard has two owners"
    epochs_before = dict(outbox.sql(f'SELECT shard, epoch FROM "{outbox.schema}".outbox_shards'))
    a.kill()
    wait_for(
        lambda: (
            len({p for _, p in _owners(outbox, store.namespace)}) == 1
            and len(_owners(outbox, store.namespace)) == outbox.shards
        ),
        15,
        "the survivor to take every shard",
    )
    epochs_after = dict(outbox.sql(f'SELECT shard, epoch FROM "{outbox.schema}".outbox_shards'))
    assert any(epochs_after[s] > epochs_before[s] for s in epochs_before), "takeover bumps epochs"
    _enqueue_numbered(engine, topic, 500, keys=50)
    got = consume(kafka_bootstrap, topic, expected=500, timeout=30)
    assert {json.loads(m.value)["n"] for m in got} == set(range(500))
    assert b.terminate() == 0


def _namespace(outbox: Outbox) -> int:
    from outbox_relay.settings import load_settings

    return load_settings(db_schema=outbox.schema, table="outbox").namespace


def test_stale_epoch_mark_changes_nothing(outbox: Outbox, engine: Engine) -> None:
    _enqueue_numbered(engine, "fence", 10, keys=1)
    store = Store(outbox.schema, "outbox", _namespace(outbox))
    with psycopg.connect(conninfo(outbox.url), autocommit=True) as conn:
        rows = store.fetch(conn, list(range(outbox.shards)), [], 100)
        shard = rows[0].shard
        old = store.take_epoch(conn, shard, "old-owner")
        new = store.take_epoch(conn, shard, "new-owner")
        assert new == old + 1
        ids = [r.id for r in rows]
        assert store.mark_sent(conn, ids, {shard: old}, keep=True) == 0
        assert store.mark_failed(conn, [], {shard: old}, 3) == []
        assert outbox.pending() == 10
        assert store.mark_sent(conn, ids, {shard: new}, keep=True) == 10
        assert outbox.pending() == 0


def test_fetch_walks_the_pending_index_and_returns_id_order(outbox: Outbox, engine: Engine) -> None:
    """With delivered rows deleted ahead of it, the fetch must walk pending_idx (shard, id),
    not the primary key in id order (which filters out every other shard's rows and steps over
    every deleted one): that plan made a fetch ~15x slower."""
    _enqueue_numbered(engine, "plan", 3000, keys=300)
    outbox.sql(f'ANALYZE "{outbox.schema}".outbox')
    store = Store(outbox.schema, "outbox", _namespace(outbox))
    shards = list(range(outbox.shards))
    with psycopg.connect(conninfo(outbox.url), autocommit=True) as conn:
        epochs = {s: store.take_epoch(conn, s, "test") for s in shards}
        for _ in range(3):
            rows = store.fetch(conn, shards, [], 50)
            assert [r.id for r in rows] == sorted(r.id for r in rows), "id order across shards"
            assert store.mark_sent(conn, [r.id for r in rows], epochs, keep=False) == len(rows)
        query = store._q["fetch"].as_string(conn)
        limits = [50] * len(shards)
        params = {"shards": shards, "after": [0] * len(shards), "blocked": [], "limits": limits}
        for mode in ("force_custom_plan", "force_generic_plan"):
            conn.execute(f"SET plan_cache_mode = {mode}")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, params))
            assert "outbox_pending_idx" in plan and "outbox_pkey" not in plan, plan


def test_round_rows_default_depends_on_the_sink() -> None:
    from outbox_relay.settings import load_settings

    assert load_settings(sink="kafka").round_rows == 4000
    assert load_settings(sink="webhook").round_rows == 1000
    assert load_settings(sink="kafka", batch_size=250).round_rows == 250


def test_listen_connection_terminated_relay_recovers(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    # A long poll interval: prompt delivery after the kill proves the NOTIFY path came back.
    relay_factory(OUTBOX_POLL_INTERVAL="60")
    _enqueue_numbered(engine, topic, 10, keys=2)
    consume(kafka_bootstrap, topic, expected=10, timeout=20)
    killed = outbox.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'outbox-relay listen%%'"
    )
    assert killed, "no LISTEN connection found"
    time.sleep(1.5)
    _enqueue_numbered(engine, topic, 10, keys=2, start=10)
    wait_for(lambda: outbox.pending() == 0, 15, "delivery after the LISTEN backend was killed")
    got = consume(kafka_bootstrap, topic, expected=20, timeout=20)
    assert {json.loads(m.value)["n"] for m in got} == set(range(20))


def test_backends_terminated_while_the_relay_starts(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """A connection lost while the relay sets up (after it reached the server) is retried like
    any later loss, not a crash: kill its backends every few ms from the moment it starts.
    Only sessions past their startup (``state`` set) are killed: a connection refused outright
    is the clear exit of ``test_bad_config_is_one_clear_line``."""
    _enqueue_numbered(engine, topic, 200, keys=5)
    relay = relay_factory()
    kills = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and relay.alive():
        kills += len(
            outbox.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'outbox-relay%%' AND state IS NOT NULL"
            )
        )
        time.sleep(0.01)
    assert relay.alive(), relay.output()[-2000:]
    assert kills >= 3, f"only {kills} backends were terminated: the test did not bite"
    wait_for(lambda: outbox.pending() == 0, 60, "drain after the kills stopped")
    got = consume(kafka_bootstrap, topic, expected=200, timeout=30)
    assert {json.loads(m.value)["n"] for m in got} == set(range(200))
    log_text = relay.output()
    assert "Traceback" not in log_text
    assert "lost while starting" in log_text or "connection lost" in log_text


def test_all_relay_backends_terminated_relay_recovers(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory()
    _enqueue_numbered(engine, topic, 2000, keys=20)
    for _ in range(3):
        time.sleep(0.5)
        outbox.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'outbox-relay%%'"
        )
    _enqueue_numbered(engine, topic, 2000, keys=20, start=2000)
    wait_for(lambda: outbox.pending() == 0, 60, "drain after repeated backend kills")
    got = consume(kafka_bootstrap, topic, expected=4000, timeout=30)
    assert {json.loads(m.value)["n"] for m in got} == set(range(4000))
    assert _per_key_order_first_seen(got)
    assert relay.alive()


def _per_key_order_first_seen(msgs: list) -> bool:
    seen: set[int] = set()
    firsts = []
    for m in msgs:
        n = json.loads(m.value)["n"]
        if n not in seen:
            seen.add(n)
            firsts.append(m)
    return _per_key_order_ok(firsts)


def test_poll_only_mode(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    name = f"poll-{outbox.schema}"  # other relays may run on the same server meanwhile
    relay = relay_factory("--poll-only", OUTBOX_POLL_INTERVAL="0.5", OUTBOX_RELAY_NAME=name)
    wait_for(
        lambda: bool(
            outbox.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
                (f"outbox-relay lease {name}",),
            )
        ),
        15,
        "relay up",
    )
    assert not outbox.sql(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
        (f"outbox-relay listen {name}",),
    ), "poll-only must not LISTEN"
    _enqueue_numbered(engine, topic, 100, keys=10)
    got = consume(kafka_bootstrap, topic, expected=100, timeout=30)
    assert len(got) == 100
    assert outbox.sql(f'SELECT count(*) FROM "{outbox.schema}".outbox_wakeup WHERE idle')[0][0] == 0
    assert relay.terminate() == 0


def test_graceful_shutdown_releases_leases(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    _enqueue_numbered(engine, topic, 5000, keys=50)
    relay = relay_factory()
    wait_for(lambda: outbox.pending() < 5000, 30, "draining")
    started = time.monotonic()
    assert relay.terminate() == 0
    assert time.monotonic() - started < 30
    assert _owners(outbox, _namespace(outbox)) == []
    assert "released shards" in relay.output()
    sent = 5000 - outbox.pending()  # delivered rows are deleted
    assert sent > 0
    got = consume(kafka_bootstrap, topic, expected=sent, timeout=30, settle=1)
    assert len({m.headers["idempotency-key"] for m in got}) >= sent, "marked but not delivered"


def test_health_endpoints(
    outbox: Outbox, topic: str, relay_factory: Callable[..., RelayProcess]
) -> None:
    relay = relay_factory()

    def ready() -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{relay.http_port}/readyz", timeout=2
            ) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(ready, 20, "/readyz 200")
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.http_port}/healthz", timeout=2) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.http_port}/metrics", timeout=2) as r:
        assert b"outbox_shards_owned" in r.read()


def test_oversized_message_dead_letters_and_cli_retry(
    outbox: Outbox,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from outbox_relay.settings import producer_settings

    big_topic = f"test.big.{os.urandom(4).hex()}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(big_topic, 1, 1, config={"max.message.bytes": "4000000"})])[
        big_topic
    ].result(30)
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", str(3_000_000))
    producer_settings.cache_clear()
    with Session(engine) as s, s.begin():
        enqueue(s, big_topic, b"x" * 2_000_000, key="big", idempotency_key="too-big")
        enqueue(s, big_topic, b"after", key="big", idempotency_key="after-big")
        enqueue(s, big_topic, b"other", key="other", idempotency_key="other-key")
    relay = relay_factory(
        OUTBOX_MAX_ATTEMPTS="2", OUTBOX_RETRY_BACKOFF_BASE="0.05", OUTBOX_KEEP_SENT="true"
    )
    wait_for(
        lambda: outbox.sql("SELECT dead_at IS NOT NULL FROM {t} WHERE idempotency_key = 'too-big'")[
            0
        ][0],
        30,
        "dead letter",
    )
    got = consume(kafka_bootstrap, big_topic, expected=2, timeout=30, settle=1)
    assert sorted(m.headers["idempotency-key"] for m in got) == ["after-big", "other-key"]
    # the key waited for its failing head: sent only once that was dead-lettered
    order = outbox.sql(
        "SELECT (SELECT sent_at FROM {t} WHERE idempotency_key = 'after-big')"
        " >= (SELECT dead_at FROM {t} WHERE idempotency_key = 'too-big')"
    )
    assert order[0][0] is True
    row = outbox.sql("SELECT attempts, last_error FROM {t} WHERE idempotency_key = 'too-big'")[0]
    assert row[0] == 2 and "MSG_SIZE_TOO_LARGE" in row[1]
    relay.terminate()
    listed = run_cli("dead-letters", "list", "--json", env=outbox.env)
    assert listed.returncode == 0 and "too-big" in listed.stdout
    retried = run_cli("dead-letters", "retry", "--topic", big_topic, env=outbox.env)
    assert retried.returncode == 0 and "re-queued 1" in retried.stdout
    relay_factory("-X", "message.max.bytes=4000000")
    more = consume(kafka_bootstrap, big_topic, expected=3, timeout=30)
    assert more[-1].headers["idempotency-key"] == "too-big"
    wait_for(lambda: outbox.pending() == 0, 10, "retried dead letter sent")


def test_a_key_failing_in_a_backlog_holds_its_rows_already_read_ahead(
    outbox: Outbox,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a backlog the relay reads the next batch while the current one is acknowledged. A
    row of that batch failing (here refused as too large) must void the batch read ahead: it
    holds later rows of the failing key, which must wait until the head is dead-lettered."""
    from outbox_relay.settings import producer_settings

    topic = f"test.ahead.{os.urandom(4).hex()}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(30)
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", str(3_000_000))
    producer_settings.cache_clear()
    later = 300  # the key's rows after its head: several rounds of 64 rows of its shard
    with Session(engine) as s, s.begin():
        enqueue(s, topic, b"x" * 2_000_000, key="hot", idempotency_key="head")
        for i in range(later):
            enqueue(s, topic, {"n": i}, key="hot", idempotency_key=f"hot-{i}")
            enqueue(s, topic, {"n": i}, key=f"other-{i % 7}", idempotency_key=f"other-{i}")
    relay = relay_factory(
        OUTBOX_BATCH_SIZE="64",
        OUTBOX_MAX_ATTEMPTS="3",
        OUTBOX_RETRY_BACKOFF_BASE="0.3",
        OUTBOX_KEEP_SENT="true",
        OUTBOX_LOG_LEVEL="DEBUG",
    )
    wait_for(lambda: outbox.pending() == 1, 60, "the backlog drained, the head dead-lettered")
    relay.terminate()
    early = outbox.sql(
        "SELECT count(*) FROM {t} WHERE key = 'hot' AND idempotency_key <> 'head'"
        " AND sent_at < (SELECT dead_at FROM {t} WHERE idempotency_key = 'head')"
    )[0][0]
    assert early == 0, f"{early} rows of the failing key went out before its head was through"
    got = consume(kafka_bootstrap, topic, expected=2 * later, timeout=60, settle=1)
    hot = [json.loads(m.value)["n"] for m in got if m.key == "hot"]
    assert hot == list(range(later)), "the key's later rows, each once, in order"
    assert "read ahead" in relay.output(), "the backlog was drained with batches read ahead"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, "cannot reach Kafka"),
        ({"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "not a host list"}, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"),
        (
            {"OUTBOX_DATABASE_URL": "postgresql://outbox:outbox@127.0.0.1:1/outbox"},
            "cannot connect",
        ),
        ({"OUTBOX_BATCH_SIZE": "zero"}, "OUTBOX_BATCH_SIZE"),
        ({"OUTBOX_SINK": "carrier-pigeon"}, "OUTBOX_SINK"),
    ],
)
def test_bad_config_is_one_clear_line(
    outbox: Outbox, kafka_bootstrap: str, env: dict[str, str], needle: str
) -> None:
    full = {
        **outbox.env,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "OUTBOX_HTTP_PORT": "0",
        "OUTBOX_KAFKA_PROPERTIES": '{"socket.timeout.ms": 3000}',
        **env,
    }
    done = run_cli("run", env=full, timeout=60)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("outbox-relay: error:")]
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_during_idle_exits_promptly(
    outbox: Outbox, relay_factory: Callable[..., RelayProcess]
) -> None:
    relay = relay_factory(OUTBOX_POLL_INTERVAL="30")
    wait_for(lambda: "took shards" in relay.output(), 20, "relay up")
    started = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(10) == 0
    assert time.monotonic() - started < 5


def _sent_counters(outbox: Outbox) -> int:
    stats = f'"{outbox.schema}".outbox_sent_stats'
    return int(outbox.sql(f"SELECT coalesce(sum(sent), 0) FROM {stats}")[0][0])


@contextlib.contextmanager
def _streaming(engine: Engine, topic: str, per_transaction: int, pause: float) -> Iterator[None]:
    """Numbered rows over 5 keys from a writer thread, a transaction every ``pause`` s, for as
    long as the block runs."""
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            _enqueue_numbered(engine, topic, per_transaction, keys=5, start=i)
            i += per_transaction
            time.sleep(pause)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep"])
def test_delivered_rows_are_deleted_or_kept_and_always_counted(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
    keep: bool,
) -> None:
    _enqueue_numbered(engine, topic, 300, keys=7)
    relay = relay_factory(OUTBOX_KEEP_SENT=str(keep).lower())
    got = consume(kafka_bootstrap, topic, expected=300, timeout=30, settle=1)
    assert len({m.headers["idempotency-key"] for m in got}) == 300
    wait_for(lambda: outbox.pending() == 0, 10, "every row recorded as delivered")
    left, kept = outbox.sql("SELECT count(*), count(sent_at) FROM {t}")[0]
    assert (left, kept) == ((300, 300) if keep else (0, 0))
    assert _sent_counters(outbox) == 300
    status = json.loads(run_cli("status", "--json", env=outbox.env).stdout)
    assert status["sent_last_minute"] == 300 and status["last_sent_at"]
    assert relay.terminate() == 0


@pytest.mark.shards(1)
def test_a_late_commit_below_the_cursor_is_found_while_the_stream_goes_on(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """A row whose transaction commits after rows with higher ids were published sits below
    the shard cursors; the relay remembered the transaction as running and reads from below
    its rows when it ends, although the cursors never run dry and no full scan is due."""
    relay = relay_factory(OUTBOX_RESCAN_INTERVAL="3600")
    late = Session(engine)
    late.begin()
    enqueue(late, topic, {"n": -1}, key="late", idempotency_key="late")
    late.flush()
    try:
        with _streaming(engine, topic, per_transaction=20, pause=0.01):
            wait_for(lambda: _sent_counters(outbox) >= 200, 30, "the stream to flow past the id")
            late.commit()
            committed_at = _sent_counters(outbox)
            wait_for(
                lambda: not outbox.sql("SELECT 1 FROM {t} WHERE idempotency_key = 'late'"),
                10,
                "the late row delivered",
            )
            # the stream was still flowing after it (the cursors never ran dry)
            wait_for(lambda: _sent_counters(outbox) > committed_at + 100, 10, "more of the stream")
    finally:
        late.close()
    wait_for(lambda: outbox.pending() == 0, 20, "everything delivered")
    total = _sent_counters(outbox)
    got = consume(kafka_bootstrap, topic, expected=total, timeout=30, settle=1)
    ids = [m.headers["idempotency-key"] for m in got]
    assert "late" in ids and len(set(ids)) == total
    # (found while the stream flowed: it was delivered above before the writer stopped; the
    # consumer's order across partitions says nothing about when it was published)
    assert _per_key_order_ok([m for m in got if m.key != "late"])
    assert relay.terminate() == 0


@pytest.mark.shards(1)
def test_hand_written_insert_as_first_write_is_not_stepped_over(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """Plain SQL, the outbox row its transaction's first write: the id is taken before the
    transaction id. A BEFORE trigger holds the statement right there for 2 s while a stream of
    later ids is published past it; once it commits the row must go out at once, not at the
    next full scan (an hour away here): the relay lists statements still in flight too."""
    table = f'"{outbox.schema}".outbox'
    outbox.sql(
        f'CREATE FUNCTION "{outbox.schema}".hold_slow() RETURNS trigger LANGUAGE plpgsql AS $$'
        " BEGIN IF NEW.idempotency_key = 'slow' THEN PERFORM pg_sleep(2); END IF;"
        " RETURN NEW; END $$"
    )
    outbox.sql(
        f"CREATE TRIGGER hold_slow BEFORE INSERT ON {table} FOR EACH ROW"
        f' EXECUTE FUNCTION "{outbox.schema}".hold_slow()'
    )
    relay_factory(OUTBOX_RESCAN_INTERVAL="3600")
    written: list[int] = []

    def hand_written() -> None:
        with psycopg.connect(conninfo(outbox.url)) as conn:  # a transaction, committed on exit
            row = conn.execute(
                f"INSERT INTO {table} (idempotency_key, topic, key, payload)"
                " VALUES ('slow', %s, 'slow', '\\x7b7d') RETURNING id",
                (topic,),
            ).fetchone()
            assert row is not None
            written.append(row[0])

    with _streaming(engine, topic, per_transaction=10, pause=0.02):
        wait_for(lambda: _sent_counters(outbox) >= 50, 30, "the stream to flow")
        writer = threading.Thread(target=hand_written)
        before = _sent_counters(outbox)
        writer.start()
        writer.join(30)
        assert written, "the hand-written row was not committed"
        # while the statement was held, the stream's later ids went out past it
        assert _sent_counters(outbox) >= before + 100, "the stream did not pass the held id"
        wait_for(
            lambda: not outbox.sql("SELECT 1 FROM {t} WHERE idempotency_key = 'slow'"),
            10,
            "the hand-written row delivered (the cursor stepped over it?)",
        )
