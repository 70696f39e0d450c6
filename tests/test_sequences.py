"""Per-key sequence numbers assigned at commit, in commit order (OUTBOX_SEQUENCE_TOPICS)."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox_relay import Message, enqueue, enqueue_many
from outbox_relay.settings import producer_settings

from .conftest import Outbox, RelayProcess, consume, wait_for


@pytest.fixture
def sequenced(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[Outbox]:
    monkeypatch.setenv("OUTBOX_SEQUENCE_TOPICS", "seq.*, orders")
    producer_settings.cache_clear()
    yield outbox
    producer_settings.cache_clear()


def seqs(outbox: Outbox) -> dict[str, int | None]:
    return {r[0]: r[1] for r in outbox.sql("SELECT idempotency_key, seq FROM {t}")}


def test_sequence_follows_commit_order_not_insert_order(sequenced: Outbox, engine: Engine) -> None:
    first = Session(engine)
    first.begin()
    enqueue(first, "orders", {"n": 1}, key="k", idempotency_key="inserted-first")
    with Session(engine) as second, second.begin():
        enqueue(second, "orders", {"n": 2}, key="k", idempotency_key="committed-first")
    first.commit()
    first.close()
    got = seqs(sequenced)
    assert got == {"committed-first": 1, "inserted-first": 2}
    ids = dict(sequenced.sql("SELECT idempotency_key, id FROM {t}"))
    assert ids["inserted-first"] < ids["committed-first"], "id order is the opposite"


def test_rollback_leaves_no_gap_and_other_topics_are_unsequenced(
    sequenced: Outbox, engine: Engine
) -> None:
    with Session(engine) as s:
        s.begin()
        enqueue(s, "orders", {}, key="k", idempotency_key="gone")
        s.rollback()
    with Session(engine) as s, s.begin():
        enqueue_many(s, [Message("orders", {}, key="k", idempotency_key="a"),
                         Message("seq.audit", {}, key="k", idempotency_key="b"),
                         Message("orders", {}, key=None, idempotency_key="no-key"),
                         Message("plain", {}, key="k", idempotency_key="plain")])
    with Session(engine) as s, s.begin():
        enqueue(s, "orders", {}, key="k", idempotency_key="c")
    assert seqs(sequenced) == {"a": 1, "b": 1, "no-key": None, "plain": None, "c": 2}


def test_opposite_key_orders_do_not_deadlock_and_stay_contiguous(
    sequenced: Outbox, engine: Engine
) -> None:
    errors: list[BaseException] = []

    def writer(keys: list[str], w: int) -> None:
        try:
            for i in range(40):
                with Session(engine) as s, s.begin():
                    for k in keys:
                        enqueue(s, "orders", {}, key=k, idempotency_key=f"{w}-{i}-{k}")
                    time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    keys = [f"k{i}" for i in range(5)]
    threads = [threading.Thread(target=writer, args=(keys if w % 2 else keys[::-1], w))
               for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, seq in sequenced.sql("SELECT key, seq FROM {t}"):
        per_key[key].append(seq)
    assert all(sorted(v) == list(range(1, 161)) for v in per_key.values()), per_key


def test_relay_publishes_in_sequence_with_the_header(
    sequenced: Outbox, engine: Engine, topic: str, kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_SEQUENCE_TOPICS", topic)
    producer_settings.cache_clear()
    schema = sequenced.schema
    with engine.begin() as c:
        c.execute(text(f'CREATE TABLE "{schema}".acct (k text PRIMARY KEY)'))
        c.execute(text(f"INSERT INTO \"{schema}\".acct VALUES ('a'), ('b')"))
    # Inversions on purpose: the outbox row is written before the business lock is taken.
    holders = []
    for i in range(8):
        key = "a" if i % 2 else "b"
        s = Session(engine)
        s.begin()
        enqueue(s, topic, {"i": i}, key=key, idempotency_key=f"early-{i}")
        holders.append((s, key))
    with Session(engine) as s, s.begin():
        enqueue_many(s, [Message(topic, {"i": 100 + i}, key="a" if i % 2 else "b",
                                 idempotency_key=f"late-{i}") for i in range(20)])
    for s, _ in reversed(holders):
        s.commit()
        s.close()
    relay_factory()
    got = consume(kafka_bootstrap, topic, expected=28, timeout=60)
    seen: dict[str, list[int]] = defaultdict(list)
    for m in got:
        seen[m.key].append(int(m.headers["outbox-seq"]))
    assert seen == {"a": list(range(1, 15)), "b": list(range(1, 15))}
    wait_for(lambda: sequenced.pending() == 0, 20, "everything marked sent")
    # commit order: the bulk transaction first, then the early ones newest first
    first_a = next(json.loads(m.value)["i"] for m in got if m.key == "a")
    assert first_a >= 100
