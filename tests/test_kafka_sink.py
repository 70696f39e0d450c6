"""The Kafka sink on its own, against the real broker: which rows it reports delivered.

The sink counts delivery reports through one callback per batch and identifies a refused
message by its topic, key and value; these tests hold it to "reported delivered exactly when
the message is in Kafka" when the broker refuses some messages of a batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from outbox_relay.settings import load_settings
from outbox_relay.sinks.base import Outcome
from outbox_relay.sinks.kafka import KafkaSink
from outbox_relay.store import OutboxRow

from .conftest import consume

#: the topic's own limit: a record batch over it is refused by the broker, not by the client
TOPIC_MAX_BYTES = 4000


@pytest.fixture
def small_topic(kafka_bootstrap: str) -> Iterator[str]:
    name = f"test.small.{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics(
        [NewTopic(name, 3, 1, config={"max.message.bytes": str(TOPIC_MAX_BYTES)})]
    )[name].result(30)
    yield name
    admin.delete_topics([name], operation_timeout=10)


def _row(n: int, topic: str, key: str | None, payload: bytes) -> OutboxRow:
    return OutboxRow(n, f"ik-{n}", topic, key, payload, "text/plain", '{"h": "v"}', 0, 0, 0.0)


def _sink(kafka_bootstrap: str) -> KafkaSink:
    # lz4 cannot shrink random bytes; the client's own limit (1 MB) lets the big ones through
    return KafkaSink(load_settings(kafka_bootstrap_servers=kafka_bootstrap, sink="kafka"))


def test_refused_messages_fail_and_the_rest_are_delivered(
    kafka_bootstrap: str, small_topic: str
) -> None:
    import os

    big = os.urandom(3 * TOPIC_MAX_BYTES)
    rows = [_row(n, small_topic, f"k{n % 7}", f"small {n}".encode()) for n in range(40)]
    rows.insert(10, _row(100, small_topic, "big-a", big))
    rows.insert(20, _row(101, small_topic, "big-b", os.urandom(3 * TOPIC_MAX_BYTES)))
    # two identical messages (same topic, key, value) under different idempotency keys
    rows.insert(30, _row(102, small_topic, "twin", big))
    rows.insert(35, _row(103, small_topic, "twin", big))
    sink = _sink(kafka_bootstrap)
    try:
        outcomes = sink.publish(rows, timeout=30)
    finally:
        sink.close(5)
    assert len(outcomes) == len(rows)
    by_ikey = {row.idempotency_key: o for row, o in zip(rows, outcomes, strict=True)}
    for ikey in ("ik-100", "ik-101", "ik-102", "ik-103"):
        assert by_ikey[ikey].failed, (ikey, by_ikey[ikey])
        assert "MSG_SIZE_TOO_LARGE" in (by_ikey[ikey].error or ""), by_ikey[ikey]
    reported = {k for k, o in by_ikey.items() if o.delivered}
    assert reported, "no message was reported delivered"
    # the broker may refuse a whole record batch with a big one in it: whatever it took is
    # exactly what the sink reported delivered
    got = consume(kafka_bootstrap, small_topic, expected=len(reported), timeout=30, settle=2)
    assert {m.headers["idempotency-key"] for m in got} == reported
    assert all(m.headers["h"] == "v" and m.headers["outbox-id"] for m in got)


def test_every_message_delivered_is_reported_delivered(kafka_bootstrap: str, topic: str) -> None:
    rows = [_row(n, topic, None if n % 5 == 0 else f"k{n % 13}", b"x" * 100) for n in range(3000)]
    sink = _sink(kafka_bootstrap)
    try:
        first = sink.publish(rows[:1500], timeout=30)
        second = sink.publish(rows[1500:], timeout=30)
    finally:
        sink.close(5)
    assert first + second == [Outcome.ok()] * 3000
    got = consume(kafka_bootstrap, topic, expected=3000, timeout=30)
    assert {m.headers["idempotency-key"] for m in got} == {r.idempotency_key for r in rows}
