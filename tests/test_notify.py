"""The idle-only NOTIFY trigger: producers signal a sleeping relay once per committed
transaction, and cost nothing while every relay is busy."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox_relay import Message, enqueue, enqueue_many
from outbox_relay.settings import conninfo

from .conftest import Outbox

SETTLE = 0.5  # quiet time after which no further notification is expected


@pytest.fixture
def listener(outbox: Outbox) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection LISTENing on the outbox's channel, drained of stale events."""
    conn = psycopg.connect(conninfo(outbox.url), autocommit=True)
    conn.execute(f'LISTEN "outbox_relay.{outbox.schema}.{outbox.table}"')
    drain(conn, settle=0.1, first_wait=0.1)
    yield conn
    conn.close()


def drain(
    conn: psycopg.Connection[tuple[object, ...]], settle: float = SETTLE, first_wait: float = 5.0
) -> list[psycopg.Notify]:
    """Collect notifications: wait up to ``first_wait`` for the first one, then keep collecting
    until ``settle`` seconds pass without another."""
    got: list[psycopg.Notify] = []
    wait = first_wait
    while True:
        batch = list(conn.notifies(timeout=wait, stop_after=1))
        if not batch:
            return got
        got.extend(batch)
        wait = settle


def expect_none(conn: psycopg.Connection[tuple[object, ...]]) -> list[psycopg.Notify]:
    return drain(conn, first_wait=1.5)


def set_idle(outbox: Outbox, idle: bool, shard: int | None = None) -> None:
    where = "" if shard is None else f" WHERE shard = {int(shard)}"
    outbox.sql(f'UPDATE "{outbox.schema}".{outbox.table}_wakeup SET idle = %s{where}', (idle,))


def enqueue_100(engine: Engine, commit: bool, tag: str) -> None:
    """100 rows in several INSERT statements inside one transaction."""
    with Session(engine) as session:
        session.begin()
        enqueue_many(session, [Message("n", f"{tag}-{i}", key=f"k{i}") for i in range(50)])
        enqueue_many(session, [Message("n", f"{tag}-{i}", key=f"k{i}") for i in range(50, 100)])
        if commit:
            session.commit()
        else:
            session.rollback()


def test_idle_relay_gets_exactly_one_notification_per_transaction(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    set_idle(outbox, True)
    with Session(engine) as session:
        session.begin()
        enqueue_many(session, [Message("n", str(i), key=f"k{i}") for i in range(50)])
        enqueue_many(session, [Message("n", str(i), key=f"k{i}") for i in range(50, 100)])
        # nothing is delivered before COMMIT
        assert expect_none(listener) == []
        session.commit()
    got = drain(listener)
    assert len(got) == 1, got
    assert got[0].channel == f"outbox_relay.{outbox.schema}.outbox"
    assert got[0].payload == ""
    assert outbox.pending() == 100


def test_many_single_enqueues_still_one_notification(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    set_idle(outbox, True)
    with Session(engine) as session, session.begin():
        for i in range(20):
            enqueue(session, "n", str(i))
    assert len(drain(listener)) == 1


def test_each_committed_transaction_notifies(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    set_idle(outbox, True)
    enqueue_100(engine, commit=True, tag="a")
    enqueue_100(engine, commit=True, tag="b")
    assert len(drain(listener)) == 2


def test_one_idle_shard_is_enough(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    set_idle(outbox, False)
    set_idle(outbox, True, shard=outbox.shards - 1)
    enqueue_100(engine, commit=True, tag="x")
    assert len(drain(listener)) == 1


def test_rolled_back_transaction_does_not_notify(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    set_idle(outbox, True)
    enqueue_100(engine, commit=False, tag="r")
    assert expect_none(listener) == []
    assert outbox.pending() == 0
    # the listener is alive: a committed transaction right after is heard
    enqueue_100(engine, commit=True, tag="c")
    assert len(drain(listener)) == 1


def test_busy_relays_cost_no_notification(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    set_idle(outbox, False)
    enqueue_100(engine, commit=True, tag="busy")
    assert expect_none(listener) == []
    assert outbox.pending() == 100
    # and the same listener does hear a commit once a relay goes idle
    set_idle(outbox, True, shard=0)
    enqueue_100(engine, commit=True, tag="idle")
    assert len(drain(listener)) == 1


def test_notification_is_only_on_this_outboxs_channel(
    outbox: Outbox, engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    other = psycopg.connect(conninfo(outbox.url), autocommit=True)
    try:
        other.execute('LISTEN "outbox_relay.public.outbox"')
        set_idle(outbox, True)
        started = time.monotonic()
        enqueue_100(engine, commit=True, tag="ch")
        assert len(drain(listener)) == 1
        assert time.monotonic() - started < 5
        assert list(other.notifies(timeout=0.3)) == []
    finally:
        other.close()
