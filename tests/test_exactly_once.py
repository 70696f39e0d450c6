"""Exactly-once mode (``OUTBOX_KAFKA_EXACTLY_ONCE=true``) against real Postgres and real Kafka.

Consumers read with ``isolation.level=read_committed`` (``conftest.consume``); every test counts
copies by idempotency key and asserts exactly one of each.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox_relay import Message, enqueue_many
from outbox_relay.settings import conninfo, load_settings
from outbox_relay.sinks.kafka_eos import KafkaExactlyOnceSink
from outbox_relay.store import OutboxRow

from .conftest import Outbox, Received, RelayProcess, consume, received, run_cli, wait_for

EOS = {"OUTBOX_KAFKA_EXACTLY_ONCE": "true"}


def _enqueue(engine: Engine, topic: str, n: int, keys: int, start: int = 0, size: int = 0) -> None:
    pad = "x" * size
    with Session(engine) as s, s.begin():
        enqueue_many(
            s,
            [
                Message(topic, {"n": i, "pad": pad}, key=f"k{i % keys}")
                for i in range(start, start + n)
            ],
        )


def _copies(got: list[Received]) -> Counter[str]:
    return Counter(m.headers["idempotency-key"] for m in got)


def _progress_topic(outbox: Outbox) -> str:
    return load_settings(db_schema=outbox.schema, table=outbox.table).progress_topic


def _ids_in_order_per_key(got: list[Received]) -> bool:
    ids: dict[str | None, list[int]] = defaultdict(list)
    for m in got:
        ids[m.key].append(int(m.headers["outbox-id"]))
    return all(v == sorted(v) for v in ids.values())


@pytest.fixture
def admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def progress_cleanup(outbox: Outbox, admin: AdminClient) -> Iterator[str]:
    name = _progress_topic(outbox)
    yield name
    admin.delete_topics([name], operation_timeout=10)


def test_every_message_once_for_a_read_committed_consumer(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    admin: AdminClient,
    progress_cleanup: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory(**EOS, OUTBOX_BATCH_SIZE="300")
    for start in range(0, 3000, 500):
        _enqueue(engine, topic, 500, keys=40, start=start)
    got = consume(kafka_bootstrap, topic, expected=3000, timeout=90, settle=2)
    copies = _copies(got)
    assert len(copies) == 3000 and set(copies.values()) == {1}, "each message exactly once"
    assert {json.loads(m.value)["n"] for m in got} == set(range(3000))
    assert _ids_in_order_per_key(got)
    wait_for(lambda: outbox.pending() == 0, 20, "rows marked sent")
    # the progress topic: created by the relay, compacted, one partition per shard
    meta = admin.list_topics(progress_cleanup, timeout=10).topics[progress_cleanup]
    assert len(meta.partitions) == outbox.shards
    res = ConfigResource("topic", progress_cleanup)
    config = admin.describe_configs([res])[res].result(timeout=10)
    assert config["cleanup.policy"].value == "compact"
    # each shard's last progress record names ids that are all recorded as delivered (kept
    # with sent_at, or deleted), none pending
    records = _read_all(kafka_bootstrap, progress_cleanup)
    assert records, "no progress records"
    last = {r["shard"]: r for r in records}
    ids = sorted(i for r in last.values() for i in r["ids"])
    assert ids
    pending = outbox.sql("SELECT count(*) FROM {t} WHERE id = ANY(%s) AND sent_at IS NULL", (ids,))
    assert pending[0][0] == 0
    assert relay.terminate() == 0


def _read_all(bootstrap: str, topic: str, isolation: str = "read_committed") -> list[dict]:
    got = [
        json.loads(m.value) for m in _consume_raw(bootstrap, topic, isolation) if m.value
    ]
    return got


def _consume_raw(bootstrap: str, topic: str, isolation: str, seconds: float = 5) -> list[Received]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": True,
        }
    )
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    parts = len(meta.partitions)
    consumer.subscribe([topic])
    out: list[Received] = []
    eof: set[int] = set()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and len(eof) < parts:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(msg.partition())
                continue
            out.append(received(msg))
    finally:
        consumer.close()
    return out


def test_crash_after_kafka_commit_before_the_mark_publishes_nothing_twice(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    progress_cleanup: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """The at-least-once twin of this test (test_relay.py) sees every message twice."""
    _enqueue(engine, topic, 50, keys=5)
    # Hold row locks so the relay's mark (UPDATE) blocks after Kafka committed the batch.
    blocker = psycopg.connect(conninfo(outbox.url))
    blocker.execute(f'SELECT id FROM "{outbox.schema}".outbox FOR UPDATE')
    relay = relay_factory(**EOS)
    first = consume(kafka_bootstrap, topic, expected=50, timeout=30)
    assert len(first) == 50, "the transactions committed"
    relay.kill()
    outbox.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'outbox-relay%%'"
    )
    wait_for(
        lambda: not outbox.sql(
            "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay%%'"
        ),
        10,
        "the dead relay's backends to go",
    )
    blocker.rollback()
    blocker.close()
    assert outbox.pending() == 50, "nothing may be marked: the mark never committed"
    successor = relay_factory(**EOS)
    wait_for(lambda: outbox.pending() == 0, 30, "the successor to recover the marks")
    got = consume(kafka_bootstrap, topic, expected=50, timeout=30, settle=3)
    copies = _copies(got)
    assert len(copies) == 50 and set(copies.values()) == {1}, copies.most_common(3)
    assert "had already delivered were not marked sent; marked now" in successor.output()
    assert successor.terminate() == 0


def _row(i: int, shard: int, topic: str, key: str) -> OutboxRow:
    return OutboxRow(
        id=i,
        idempotency_key=f"ik-{uuid.uuid4().hex[:8]}-{i}",
        topic=topic,
        key=key,
        payload=json.dumps({"n": i}).encode(),
        content_type="application/json",
        headers_json=None,
        shard=shard,
        attempts=0,
        created_at=time.time(),
    )


def test_fenced_sink_publishes_nothing_and_gives_the_shard_up(
    topic: str, kafka_bootstrap: str, admin: AdminClient
) -> None:
    prefix = f"test-eos-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_transactional_id_prefix=prefix,
        shards=4,
        kafka_delivery_timeout=10,
    )
    old, new = KafkaExactlyOnceSink(settings), KafkaExactlyOnceSink(settings)
    try:
        assert old.recover([2])[2].ids == []
        rows = [_row(i, 2, topic, f"k{i % 3}") for i in range(1, 11)]
        assert all(o.delivered for o in old.publish(rows[:5], 20))
        # a new owner takes shard 2: its init_transactions fences the old producer, and it
        # learns the ids the old owner's last transaction carried
        found = new.recover([2])[2]
        assert found.ids == [1, 2, 3, 4, 5]
        assert found.created_max == max(r.created_at for r in rows[:5])
        outcomes = old.publish(rows[5:], 20)
        assert not any(o.delivered for o in outcomes), "a fenced producer must not publish"
        assert old.lost_shards() == {2}
        assert all(o.delivered for o in new.publish(rows[5:], 20))
        got = consume(kafka_bootstrap, topic, expected=10, timeout=20, settle=2)
        assert sorted(int(m.headers["outbox-id"]) for m in got) == list(range(1, 11))
        # the fenced attempt wrote nothing a read_committed consumer sees, and the old owner's
        # transactions after fencing are aborted, not committed
        records = _read_all(kafka_bootstrap, settings.progress_topic)
        shard2 = [r["ids"] for r in records if r["shard"] == 2]
        assert shard2 == [[1, 2, 3, 4, 5], list(range(6, 11))]
    finally:
        old.close(5)
        new.close(5)
        admin.delete_topics([settings.progress_topic], operation_timeout=10)


class _AnswerLost:
    """A producer whose commits happen on the broker but whose answers never arrive."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.commits = 0

    def commit_transaction(self, timeout: float) -> None:
        if self.commits == 0:
            self._producer.commit_transaction(timeout)
        self.commits += 1
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "answer lost", retriable=True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def test_commit_of_unknown_outcome_gives_the_shard_up_and_recovery_resolves_it(
    topic: str, kafka_bootstrap: str, admin: AdminClient
) -> None:
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_transactional_id_prefix=f"test-eos-{uuid.uuid4().hex[:8]}",
        shards=2,
        kafka_delivery_timeout=10,
    )
    sink = KafkaExactlyOnceSink(settings)
    try:
        assert {s: d.ids for s, d in sink.recover([0, 1]).items()} == {0: [], 1: []}
        state = sink._shards[1]
        flaky = _AnswerLost(state.producer)
        state.producer = flaky
        rows = [_row(i, 1, topic, f"k{i % 2}") for i in range(1, 7)]
        outcomes = sink.publish(rows, 2)
        assert flaky.commits > 1, "a retriable commit error is retried until the deadline"
        assert not any(o.delivered or o.failed for o in outcomes), "no outcome is claimed"
        assert sink.lost_shards() == {1}
        # the relay gives the lease back; the next owner's recovery learns the commit happened
        assert sink.recover([1])[1].ids == [1, 2, 3, 4, 5, 6]
        got = consume(kafka_bootstrap, topic, expected=6, timeout=20, settle=2)
        assert sorted(int(m.headers["outbox-id"]) for m in got) == [1, 2, 3, 4, 5, 6]
    finally:
        sink.close(5)
        admin.delete_topics([settings.progress_topic], operation_timeout=10)


def test_fenced_relay_does_not_publish_and_keeps_running(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    progress_cleanup: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """Relay A freezes mid-stream (SIGSTOP) and loses its leases; B takes over and fences A's
    producers. When A runs again it must not publish a thing, and must not exit."""
    env = {**EOS, "OUTBOX_BATCH_SIZE": "50", "OUTBOX_POLL_INTERVAL": "0.2"}
    a = relay_factory(**env)
    wait_for(lambda: "took shards" in a.output(), 20, "relay A up")
    for start in range(0, 1000, 100):
        _enqueue(engine, topic, 100, keys=30, start=start)
    wait_for(lambda: outbox.pending() < 1000, 20, "A to start publishing")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        # A's lease session dies (as behind a network partition): its advisory locks go
        outbox.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'outbox-relay lease relay-0'"
        )
        b = relay_factory(**env)
        wait_for(lambda: outbox.pending() == 0, 60, "B to take over and drain")
        _enqueue(engine, topic, 200, keys=30, start=1000)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    wait_for(lambda: outbox.pending() == 0, 60, "the last rows")
    time.sleep(3)  # A has run for a while after waking up
    got = consume(kafka_bootstrap, topic, expected=1200, timeout=60, settle=3)
    copies = _copies(got)
    assert len(copies) == 1200 and set(copies.values()) == {1}, copies.most_common(3)
    assert _ids_in_order_per_key(got)
    assert a.alive() and b.alive(), "losing a lease is not a reason to exit"
    assert b.terminate() == 0


def test_aborted_transaction_rows_stay_pending_and_are_retried(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    admin: AdminClient,
    progress_cleanup: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """The broker refuses one message (larger than its topic's max.message.bytes): the shard's
    transaction aborts, so the messages of that key that the broker had already taken are never
    seen by read_committed consumers; the refused row fails (an attempt), the others stay pending
    and go out, once each and in order, when the topic accepts the message."""
    small = f"test.{uuid.uuid4().hex[:12]}"
    new = NewTopic(small, num_partitions=1, replication_factor=1,
                   config={"max.message.bytes": "4096"})
    admin.create_topics([new])[small].result(timeout=30)
    try:
        with Session(engine) as s, s.begin():
            msgs = [Message(topic, {"n": i}, key="same") for i in range(5)]
            msgs.append(Message(small, {"n": 5, "pad": os.urandom(8000).hex()}, key="same"))
            msgs += [Message(topic, {"n": i}, key="same") for i in range(6, 10)]
            msgs += [Message(topic, {"n": i}, key=f"other{i}") for i in range(10, 30)]
            enqueue_many(s, msgs)
        relay = relay_factory(
            **EOS, OUTBOX_RETRY_BACKOFF_BASE="0.2", OUTBOX_RETRY_BACKOFF_MAX="1",
            OUTBOX_MAX_ATTEMPTS="1000", OUTBOX_KEEP_SENT="true",
        )
        wait_for(
            lambda: outbox.sql("SELECT max(attempts) FROM {t}")[0][0] >= 2,
            30,
            "the refused row to fail twice",
        )
        same_pending = outbox.sql("SELECT count(*) FROM {t} WHERE key = 'same' AND sent_at IS NULL")
        assert same_pending[0][0] == 10, "nothing of the refused row's transaction is sent"
        assert "kafka transaction aborted" in relay.output()
        # the broker took the first messages of the key, but their transaction was aborted
        uncommitted = _consume_raw(kafka_bootstrap, topic, "read_uncommitted")
        committed = _consume_raw(kafka_bootstrap, topic, "read_committed")
        aborted = {m.headers["idempotency-key"] for m in uncommitted if m.key == "same"}
        assert aborted, "the aborted transactions wrote messages to the log"
        assert not [m for m in committed if m.key == "same"], "an aborted message was seen"
        res = ConfigResource(
            "topic",
            small,
            incremental_configs=[
                ConfigEntry("max.message.bytes", "1048576",
                            incremental_operation=AlterConfigOpType.SET)
            ],
        )
        admin.incremental_alter_configs([res])[res].result(timeout=30)
        wait_for(lambda: outbox.pending() == 0, 60, "every row delivered after the fix")
        got = consume(kafka_bootstrap, topic, expected=29, timeout=30, settle=2)
        got += consume(kafka_bootstrap, small, expected=1, timeout=30, settle=1)
        copies = _copies(got)
        assert len(copies) == 30 and set(copies.values()) == {1}, copies.most_common(3)
        same = [json.loads(m.value)["n"] for m in got if m.key == "same" and m.topic == topic]
        assert same == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        # the key's later rows were not published before the refused one committed
        order = outbox.sql(
            "SELECT (SELECT sent_at FROM {t} WHERE topic = %s) <= min(sent_at) FROM {t}"
            " WHERE key = 'same' AND topic <> %s"
            " AND id > (SELECT id FROM {t} WHERE topic = %s)",
            (small, small, small),
        )
        assert order[0][0] is True
        assert outbox.sql("SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL")[0][0] == 0
        assert relay.terminate() == 0
    finally:
        admin.delete_topics([small], operation_timeout=10)


def test_deleted_progress_topic_warns_and_keeps_delivering(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    admin: AdminClient,
    progress_cleanup: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    a = relay_factory(**EOS)
    _enqueue(engine, topic, 100, keys=10)
    wait_for(lambda: outbox.pending() == 0, 30, "first rows sent")
    assert a.terminate() == 0
    admin.delete_topics([progress_cleanup], operation_timeout=30)[progress_cleanup].result(30)
    wait_for(
        lambda: progress_cleanup not in admin.list_topics(timeout=10).topics,
        30,
        "the progress topic to be gone",
    )
    _enqueue(engine, topic, 100, keys=10, start=100)
    b = relay_factory(**EOS)
    wait_for(lambda: outbox.pending() == 0, 60, "rows sent after the progress topic was lost")
    assert "did not exist (first start in exactly-once mode, or deleted)" in b.output()
    got = consume(kafka_bootstrap, topic, expected=200, timeout=30, settle=2)
    copies = _copies(got)
    assert len(copies) == 200 and set(copies.values()) == {1}
    res = ConfigResource("topic", progress_cleanup)
    config = admin.describe_configs([res])[res].result(timeout=10)
    assert config["cleanup.policy"].value == "compact"
    # deleted while the relay runs: its transactions fail, it recovers its shards (the topic
    # is created again, by the relay or by the broker's auto-creation), warns, and goes on
    warnings_before = b.output().count('"level": "warning"')
    admin.delete_topics([progress_cleanup], operation_timeout=30)[progress_cleanup].result(30)
    for start in range(200, 400, 20):
        _enqueue(engine, topic, 20, keys=10, start=start)
        time.sleep(0.2)
    wait_for(lambda: outbox.pending() == 0, 90, "rows sent after the topic went away")
    got = consume(kafka_bootstrap, topic, expected=400, timeout=30, settle=2)
    assert {json.loads(m.value)["n"] for m in got} == set(range(400)), "nothing lost"
    assert b.output().count('"level": "warning"') > warnings_before
    assert b.alive()
    assert b.terminate() == 0


def test_ids_starting_again_are_not_taken_for_delivered_ones(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    progress_cleanup: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """The progress records outlive the table's ids: after ``TRUNCATE ... RESTART IDENTITY``
    (or a table dropped and created again) new rows carry the ids the last records name. A
    relay taking the shards over must not mark those rows sent: they were never published."""
    a = relay_factory(**EOS)
    _enqueue(engine, topic, 40, keys=8)
    wait_for(lambda: outbox.pending() == 0, 30, "first rows sent")
    assert a.terminate() == 0
    outbox.sql("TRUNCATE {t} RESTART IDENTITY")
    _enqueue(engine, topic, 40, keys=8, start=40)
    assert outbox.sql("SELECT min(id) FROM {t}") == [(1,)], "the ids started again"
    b = relay_factory(**EOS)
    wait_for(lambda: outbox.pending() == 0, 30, "the new rows sent")
    got = consume(kafka_bootstrap, topic, expected=80, timeout=30, settle=2)
    assert {json.loads(m.value)["n"] for m in got} == set(range(80)), "a new row went missing"
    assert set(_copies(got).values()) == {1}
    assert "ids the sink had already delivered were not marked sent" not in b.output()
    assert b.terminate() == 0


def test_exactly_once_needs_the_kafka_sink(outbox: Outbox) -> None:
    env = {**outbox.env, **EOS, "OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": "http://x.test/"}
    done = run_cli("run", env=env, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "OUTBOX_KAFKA_EXACTLY_ONCE" in lines[0], done.stderr
    env = {**outbox.env, **EOS, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "OUTBOX_KAFKA_PROPERTIES": '{"transactional.id": "mine"}'}
    done = run_cli("run", env=env, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "transactional.id" in lines[0], done.stderr
    env = {**outbox.env, **EOS, "OUTBOX_KAFKA_PROGRESS_TOPIC": "no spaces allowed"}
    done = run_cli("run", env=env, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "OUTBOX_KAFKA_PROGRESS_TOPIC" in lines[0], done.stderr
