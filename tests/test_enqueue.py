"""The producer helper against a real Postgres: transactions, idempotency, payloads, shards,
async, bulk inserts, isolation levels, two-phase commit, and every documented input error."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, Integer, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox_relay import (
    Enqueued,
    InvalidMessage,
    Message,
    OutboxError,
    OutboxTableMissing,
    PayloadTooLarge,
    WrongSessionType,
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
)
from outbox_relay.settings import conninfo, producer_settings

from .conftest import Outbox


def rows(outbox: Outbox, where: str = "true", params: Any = None) -> list[tuple[Any, ...]]:
    return outbox.sql(
        "SELECT id, idempotency_key, topic, key, payload, content_type, headers, shard "
        f"FROM {{t}} WHERE {where} ORDER BY id",
        params,
    )


def count(outbox: Outbox) -> int:
    return int(outbox.sql("SELECT count(*) FROM {t}")[0][0])


# ---------------------------------------------------------------------- transactions
def test_commit_makes_the_row_visible(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        sent = enqueue(session, "orders", {"order_id": 42}, key="customer-7")
        # not committed yet: another connection does not see it
        assert count(outbox) == 0
    assert isinstance(sent, Enqueued)
    assert sent.created is True
    assert isinstance(sent.id, int)
    got = rows(outbox)
    assert len(got) == 1
    rid, ikey, topic, key, payload, ctype, headers, _shard = got[0]
    assert (rid, ikey, topic, key) == (sent.id, sent.idempotency_key, "orders", "customer-7")
    assert json.loads(bytes(payload)) == {"order_id": 42}
    assert ctype == "application/json"
    assert headers == {}
    # a generated idempotency key is a version-7 UUID
    assert uuid.UUID(sent.idempotency_key).version == 7


def test_rollback_leaves_no_row(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        sent = enqueue(session, "orders", b"x")
        assert sent.created
        # visible inside the transaction ...
        inside = session.execute(
            text(f'SELECT count(*) FROM "{outbox.schema}".outbox')
        ).scalar_one()
        assert inside == 1
        session.rollback()
    # ... gone with it
    assert count(outbox) == 0


def test_helper_never_commits_or_flushes(outbox: Outbox, engine: Engine) -> None:
    """After enqueue the caller still owns the transaction: rollback leaves nothing."""
    with Session(engine) as session:
        session.begin()
        enqueue(session, "a", "one")
        enqueue_many(session, [Message("a", "two"), Message("a", "three")])
        assert session.in_transaction()
        session.rollback()
    assert count(outbox) == 0
    with engine.connect() as conn:
        enqueue(conn, "a", "one")
        assert conn.in_transaction()
        conn.rollback()
    assert count(outbox) == 0


def test_pending_orm_objects_are_not_autoflushed(outbox: Outbox, engine: Engine) -> None:
    class Base(DeclarativeBase):
        pass

    class NotThere(Base):
        # no such table: flushing this object would fail
        __tablename__ = "table_that_does_not_exist"
        __table_args__ = {"schema": outbox.schema}
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    with Session(engine) as session, session.begin():
        pending = NotThere(id=1)
        session.add(pending)
        sent = enqueue(session, "a", "no flush please")
        assert sent.created
        assert pending in session.new  # still pending: enqueue did not flush it
        session.expunge(pending)
    assert count(outbox) == 1


def test_enqueue_with_a_connection(outbox: Outbox, engine: Engine) -> None:
    with engine.begin() as conn:
        assert isinstance(conn, Connection)
        one = enqueue(conn, "payments", "paid", key="k1", idempotency_key="pay-1")
        many = enqueue_many(conn, [Message("payments", b"\x00\x01", key="k2")])
    assert one.created and one.idempotency_key == "pay-1"
    assert many[0].created
    got = rows(outbox)
    assert [(r[1], r[2], r[3]) for r in got] == [
        ("pay-1", "payments", "k1"),
        (many[0].idempotency_key, "payments", "k2"),
    ]


# ---------------------------------------------------------------------- idempotency
def test_idempotency_key_dedupes(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        first = enqueue(session, "orders", {"n": 1}, idempotency_key="order-1-placed")
    with Session(engine) as session, session.begin():
        second = enqueue(session, "orders", {"n": 2}, idempotency_key="order-1-placed")
    assert first.created is True and first.id is not None
    assert second == Enqueued("order-1-placed", created=False, id=None)
    got = rows(outbox)
    assert len(got) == 1
    assert json.loads(bytes(got[0][4])) == {"n": 1}  # the first payload is kept


def test_idempotency_key_dedupes_within_one_transaction(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        a = enqueue(session, "t", "x", idempotency_key="same")
        b = enqueue(session, "t", "y", idempotency_key="same")
    assert (a.created, b.created) == (True, False)
    assert count(outbox) == 1


# ---------------------------------------------------------------------- payloads
@pytest.mark.parametrize(
    ("payload", "content_type", "body", "expected_type"),
    [
        (b"\x00\xffraw", None, b"\x00\xffraw", "application/octet-stream"),
        (bytearray(b"ba"), None, b"ba", "application/octet-stream"),
        (memoryview(b"mv"), None, b"mv", "application/octet-stream"),
        ("héllo", None, "héllo".encode(), "text/plain; charset=utf-8"),
        ({"a": 1, "é": [True, None]}, None, '{"a":1,"é":[true,null]}'.encode(), "application/json"),
        ([1, "two", 3.5], None, b'[1,"two",3.5]', "application/json"),
        (b"<x/>", "application/xml", b"<x/>", "application/xml"),
        ({"v": 1}, "application/vnd.shop+json", b'{"v":1}', "application/vnd.shop+json"),
    ],
    ids=["bytes", "bytearray", "memoryview", "str", "dict", "list", "bytes+ctype", "dict+ctype"],
)
def test_payload_kinds(
    outbox: Outbox,
    engine: Engine,
    payload: Any,
    content_type: str | None,
    body: bytes,
    expected_type: str,
) -> None:
    with Session(engine) as session, session.begin():
        enqueue(session, "kinds", payload, content_type=content_type)
    [row] = rows(outbox)
    assert bytes(row[4]) == body
    assert row[5] == expected_type


def test_headers_are_stored(outbox: Outbox, engine: Engine) -> None:
    headers = {"event-type": "orders.placed", "trace-id": "abc", "unicode": "ü"}
    with Session(engine) as session, session.begin():
        enqueue(session, "orders", {"x": 1}, headers=headers)
        enqueue(session, "orders", {"x": 2}, headers={})
    got = rows(outbox)
    assert got[0][6] == headers
    assert got[1][6] == {}


# ---------------------------------------------------------------------- shards
def _expected_shard(outbox: Outbox, value: str) -> int:
    return int(
        outbox.sql("SELECT abs(mod(hashtextextended(%s, 0), %s))", (value, outbox.shards))[0][0]
    )


@pytest.mark.shards(8)
def test_shard_is_stable_and_in_range(outbox: Outbox, engine: Engine) -> None:
    keys = [f"customer-{i}" for i in range(200)]
    with Session(engine) as session, session.begin():
        enqueue_many(session, [Message("s", "a", key=k) for k in keys])
        enqueue_many(session, [Message("s", "b", key=k) for k in keys])
        unkeyed = enqueue(session, "s", "no key", idempotency_key="unkeyed-1")
    got = rows(outbox)
    by_key: dict[str, set[int]] = {}
    for row in got:
        assert 0 <= row[7] < 8
        if row[3] is not None:
            by_key.setdefault(row[3], set()).add(row[7])
    # the same key always lands on the same shard, and it is the documented hash
    assert all(len(s) == 1 for s in by_key.values())
    for key in keys[:20]:
        assert by_key[key] == {_expected_shard(outbox, key)}
    # keys spread over every shard
    assert {next(iter(s)) for s in by_key.values()} == set(range(8))
    # rows without a key hash their idempotency key
    [row] = [r for r in got if r[1] == unkeyed.idempotency_key]
    assert row[7] == _expected_shard(outbox, "unkeyed-1")
    # pinned values: changing the expression would move keys of existing deployments
    pinned = {k: next(iter(by_key[k])) for k in ("customer-0", "customer-1", "customer-2")}
    assert pinned == {k: _expected_shard(outbox, k) for k in pinned}


@pytest.mark.shards(3)
def test_shard_respects_the_configured_count(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        enqueue_many(session, [Message("s", "x", key=f"k{i}") for i in range(60)])
    shards = {r[7] for r in rows(outbox)}
    assert shards == {0, 1, 2}


# ---------------------------------------------------------------------- async
def test_async_session_and_connection(outbox: Outbox, db_url: str) -> None:
    async def scenario() -> tuple[Enqueued, list[Enqueued], Enqueued]:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session, session.begin():
                one = await enqueue_async(session, "async", {"a": 1}, key="k", headers={"h": "v"})
            async with AsyncSession(aengine) as session:
                await session.begin()
                await enqueue_async(session, "async", "rolled back")
                await session.rollback()
            async with aengine.begin() as conn:
                assert isinstance(conn, AsyncConnection)
                many = await enqueue_many_async(
                    conn, [Message("async", b"1"), Message("async", b"2", idempotency_key="dup")]
                )
            async with aengine.connect() as conn:
                dup = await enqueue_async(conn, "async", b"again", idempotency_key="dup")
                await conn.commit()
            return one, many, dup
        finally:
            await aengine.dispose()

    one, many, dup = asyncio.run(scenario())
    assert one.created and all(m.created for m in many)
    assert dup.created is False
    got = rows(outbox)
    assert [bytes(r[4]) for r in got] == [b'{"a":1}', b"1", b"2"]
    assert got[0][3] == "k" and got[0][6] == {"h": "v"}
    assert [r[0] for r in got] == [one.id, many[0].id, many[1].id]


def test_async_rejects_sync_session(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session:
        coro = enqueue_async(session, "t", "x")  # type: ignore[arg-type]
        with pytest.raises(WrongSessionType, match=r"AsyncSession.*not Session.*use enqueue\)"):
            asyncio.run(coro)


# ---------------------------------------------------------------------- bulk
def test_enqueue_many_is_one_statement(outbox: Outbox, engine: Engine) -> None:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    messages = [Message("bulk", {"i": i}, key=f"k{i % 7}") for i in range(250)]
    with Session(engine) as session, session.begin():
        session.execute(text("SELECT 1"))  # start the transaction before counting
        event.listen(engine, "before_cursor_execute", record)
        try:
            result = enqueue_many(session, messages)
        finally:
            event.remove(engine, "before_cursor_execute", record)
    assert len(statements) == 1
    assert statements[0].lstrip().upper().startswith("INSERT INTO")
    assert len(result) == 250
    assert all(r.created for r in result)
    ids = [r.id for r in result]
    assert len(set(ids)) == 250 and None not in ids
    got = rows(outbox)
    assert len(got) == 250
    # results come back in input order, matched to their rows
    by_id = {r[0]: r for r in got}
    for i, r in enumerate(result):
        assert json.loads(bytes(by_id[r.id][4])) == {"i": i}
        assert by_id[r.id][1] == r.idempotency_key


def test_enqueue_many_dedupes_against_existing_keys(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        enqueue(session, "bulk", "old-b", idempotency_key="b")
        enqueue(session, "bulk", "old-d", idempotency_key="d")
    with Session(engine) as session, session.begin():
        result = enqueue_many(
            session, [Message("bulk", f"new-{k}", idempotency_key=k) for k in "abcde"]
        )
    assert [(r.idempotency_key, r.created) for r in result] == [
        ("a", True),
        ("b", False),
        ("c", True),
        ("d", False),
        ("e", True),
    ]
    assert [r.id is None for r in result] == [False, True, False, True, False]
    stored = {r[1]: bytes(r[4]) for r in rows(outbox)}
    assert stored == {"a": b"new-a", "b": b"old-b", "c": b"new-c", "d": b"old-d", "e": b"new-e"}


def test_enqueue_many_rejects_duplicate_keys_in_one_call(outbox: Outbox, engine: Engine) -> None:
    with (
        Session(engine) as session,
        session.begin(),
        pytest.raises(InvalidMessage, match="same idempotency_key appears twice"),
    ):
        enqueue_many(
            session,
            [Message("t", "1", idempotency_key="x"), Message("t", "2", idempotency_key="x")],
        )
    assert count(outbox) == 0


def test_enqueue_many_accepts_a_generator_and_rejects_empty(outbox: Outbox, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        result = enqueue_many(session, (Message("gen", str(i)) for i in range(5)))
        assert len(result) == 5
        with pytest.raises(InvalidMessage, match="no messages"):
            enqueue_many(session, [])
    assert count(outbox) == 5


# ---------------------------------------------------------------------- isolation
def test_serializable_conflict_rolls_back_the_losers_outbox_row(
    outbox: Outbox, engine: Engine
) -> None:
    """Write skew under SERIALIZABLE: both read the on-call doctors, each takes itself off.
    One transaction must fail with a serialization failure; its outbox row must not exist."""
    doctors = f'"{outbox.schema}".doctors'
    outbox.sql(f"CREATE TABLE {doctors} (name text PRIMARY KEY, on_call boolean NOT NULL)")
    outbox.sql(f"INSERT INTO {doctors} VALUES ('alice', true), ('bob', true)")

    with engine.connect() as c1, engine.connect() as c2:
        c1 = c1.execution_options(isolation_level="SERIALIZABLE")
        c2 = c2.execution_options(isolation_level="SERIALIZABLE")
        c1.begin()
        c2.begin()
        # both read before either writes
        assert c1.execute(text(f"SELECT count(*) FROM {doctors} WHERE on_call")).scalar_one() == 2
        assert c2.execute(text(f"SELECT count(*) FROM {doctors} WHERE on_call")).scalar_one() == 2
        c1.execute(text(f"UPDATE {doctors} SET on_call = false WHERE name = 'alice'"))
        enqueue(c1, "doctors", {"off": "alice"}, idempotency_key="off-alice")
        failure: DBAPIError | None = None
        try:
            c2.execute(text(f"UPDATE {doctors} SET on_call = false WHERE name = 'bob'"))
            enqueue(c2, "doctors", {"off": "bob"}, idempotency_key="off-bob")
            c1.commit()
            c2.commit()
        except DBAPIError as exc:
            failure = exc
            c2.rollback()
        if c1.in_transaction():
            c1.commit()
    assert failure is not None, "one SERIALIZABLE transaction must fail"
    assert isinstance(failure.orig, psycopg.errors.SerializationFailure), failure
    assert [r[1] for r in rows(outbox)] == ["off-alice"]
    on_call = outbox.sql(f"SELECT name FROM {doctors} WHERE on_call ORDER BY name")
    assert on_call == [("bob",)]
    # the helper itself still works at SERIALIZABLE (the retry of the loser succeeds)
    with engine.connect() as c:
        c = c.execution_options(isolation_level="SERIALIZABLE")
        with c.begin():
            still_on = c.execute(text(f"SELECT count(*) FROM {doctors} WHERE on_call")).scalar_one()
            assert still_on == 1
            enqueue(c, "doctors", {"retry": "bob"}, idempotency_key="retry-bob")
    assert [r[1] for r in rows(outbox)] == ["off-alice", "retry-bob"]


PREPARED_IN_SCHEMA = """
SELECT DISTINCT p.gid FROM pg_prepared_xacts p
JOIN pg_locks x ON x.locktype = 'transactionid' AND x.transactionid = p.transaction
JOIN pg_locks l ON l.virtualtransaction = x.virtualtransaction AND l.pid IS NULL
JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE x.pid IS NULL AND n.nspname = %s
"""


@pytest.fixture
def gid(outbox: Outbox) -> Iterator[str]:
    """A unique two-phase transaction id. At teardown, prepared transactions left behind on
    this test's schema are rolled back: they would hold locks on the outbox and block dropping
    the schema (and every later test) forever."""
    yield f"outbox-test-{uuid.uuid4().hex}"
    for (left,) in outbox.sql(PREPARED_IN_SCHEMA, (outbox.schema,)):
        outbox.sql(f"ROLLBACK PREPARED '{left}'")


def test_prepared_transaction(outbox: Outbox, engine: Engine, gid: str) -> None:
    with engine.connect() as conn:
        tx = conn.begin_twophase(gid)
        sent = enqueue(conn, "2pc", {"step": "prepared"}, idempotency_key=gid)
        assert sent.created
        tx.prepare()
        # PREPARE TRANSACTION: durable but not visible to anyone else yet
        assert count(outbox) == 0
        prepared = outbox.sql("SELECT gid FROM pg_prepared_xacts WHERE gid = %s", (gid,))
        assert prepared == [(gid,)]
        tx.commit()  # COMMIT PREPARED
    assert [r[1] for r in rows(outbox)] == [gid]
    assert outbox.sql("SELECT gid FROM pg_prepared_xacts WHERE gid = %s", (gid,)) == []


def test_prepared_transaction_finished_by_another_session(outbox: Outbox, gid: str) -> None:
    """Raw psycopg two-phase: the preparing session goes away, a transaction manager finishes
    the branch from another session (rollback first, then a commit)."""
    for outcome in ("rollback", "commit"):
        raw = psycopg.connect(conninfo(outbox.url))
        try:
            xid = raw.xid(1, gid, outcome)
            raw.tpc_begin(xid)
            raw.execute(
                f'INSERT INTO "{outbox.schema}".outbox (idempotency_key, topic, payload) '
                "VALUES (%s, 't', 'x')",
                (f"raw-{outcome}",),
            )
            raw.tpc_prepare()
        finally:
            raw.close()  # the prepared transaction survives its session
        assert count(outbox) == 0
        with psycopg.connect(conninfo(outbox.url), autocommit=True) as other:
            [recovered] = [x for x in other.tpc_recover() if (x.gtrid, x.bqual) == (gid, outcome)]
            if outcome == "rollback":
                other.tpc_rollback(recovered)
            else:
                other.tpc_commit(recovered)
    assert [r[1] for r in rows(outbox)] == ["raw-commit"]


def test_prepared_transaction_with_a_session(outbox: Outbox, engine: Engine, gid: str) -> None:
    with Session(engine, twophase=True) as session:
        session.begin()
        enqueue(session, "2pc", "via session", idempotency_key="session-2pc")
        session.connection()  # bind the transaction to a connection
        session.get_transaction().prepare()  # type: ignore[union-attr]
        assert count(outbox) == 0
        assert (
            outbox.sql(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            )[0][0]
            >= 1
        )
        session.commit()
    assert [r[1] for r in rows(outbox)] == ["session-2pc"]


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("topic", ["", "   ", None, 42])
def test_empty_or_non_string_topic(outbox: Outbox, engine: Engine, topic: Any) -> None:
    with (
        Session(engine) as session,
        session.begin(),
        pytest.raises(InvalidMessage, match="topic must be a non-empty string"),
    ):
        enqueue(session, topic, "x")
    assert count(outbox) == 0


def test_topic_too_long(outbox: Outbox, engine: Engine) -> None:
    with (
        Session(engine) as session,
        session.begin(),
        pytest.raises(InvalidMessage, match="longer than 255"),
    ):
        enqueue(session, "t" * 256, "x")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"tags": {"a", "b"}}, r"not JSON-serialisable: Object of type set"),
        ([object()], r"not JSON-serialisable: Object of type object"),
        ({"x": float("nan")}, r"not JSON-serialisable: Out of range float"),
        (object(), r"payload must be bytes, str, dict or list, not object"),
        (42, r"payload must be bytes, str, dict or list, not int"),
        (None, r"payload must be bytes, str, dict or list, not NoneType"),
    ],
    ids=["set-in-dict", "object-in-list", "nan", "object", "int", "none"],
)
def test_unserialisable_payload(outbox: Outbox, engine: Engine, payload: Any, message: str) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidMessage, match=message) as info:
            enqueue(session, "t", payload)
        assert info.value.__cause__ is None  # a clear message, not a json traceback
        # the transaction is untouched and still usable
        enqueue(session, "t", "fine")
    assert count(outbox) == 1


def test_payload_over_the_limit(
    outbox: Outbox, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "100")
    producer_settings.cache_clear()
    try:
        with Session(engine) as session, session.begin():
            assert enqueue(session, "big", b"x" * 100).created  # exactly the limit is fine
            with pytest.raises(
                PayloadTooLarge,
                match=(
                    r"payload of 101 bytes exceeds the limit of 100 bytes "
                    r"\(OUTBOX_MAX_PAYLOAD_BYTES\) for topic 'big'"
                ),
            ):
                enqueue(session, "big", b"x" * 101)
            # the limit applies to the encoded body (2-byte characters)
            with pytest.raises(PayloadTooLarge, match="payload of 102 bytes"):
                enqueue(session, "big", "é" * 51)
            with pytest.raises(PayloadTooLarge):
                enqueue_many(session, [Message("big", "ok"), Message("big", {"k": "v" * 200})])
    finally:
        producer_settings.cache_clear()
    assert count(outbox) == 1
    assert issubclass(PayloadTooLarge, InvalidMessage)


@pytest.mark.parametrize(
    "headers",
    [{"n": 1}, {1: "x"}, {"": "empty name"}, {"b": b"bytes"}, {"none": None}],
    ids=["int-value", "int-name", "empty-name", "bytes-value", "none-value"],
)
def test_headers_must_be_str_to_str(outbox: Outbox, engine: Engine, headers: Any) -> None:
    with (
        Session(engine) as session,
        session.begin(),
        pytest.raises(InvalidMessage, match="headers must map non-empty str to str"),
    ):
        enqueue(session, "t", "x", headers=headers)
    assert count(outbox) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": 7}, "key must be a string"),
        ({"key": "k" * 1025}, "key must be a string of at most 1024"),
        ({"idempotency_key": ""}, "idempotency_key must be a non-empty string"),
        ({"idempotency_key": "i" * 256}, "idempotency_key must be a non-empty string"),
    ],
    ids=["int-key", "long-key", "empty-ikey", "long-ikey"],
)
def test_bad_keys(outbox: Outbox, engine: Engine, kwargs: dict[str, Any], message: str) -> None:
    with Session(engine) as session, session.begin(), pytest.raises(InvalidMessage, match=message):
        enqueue(session, "t", "x", **kwargs)


def test_wrong_session_types(outbox: Outbox, engine: Engine, db_url: str) -> None:
    with (
        psycopg.connect(conninfo(db_url)) as raw,
        pytest.raises(
            WrongSessionType, match=r"needs a sqlalchemy Session or Connection, not Connection$"
        ),
    ):
        enqueue(raw, "t", "x")  # type: ignore[arg-type]
    with pytest.raises(WrongSessionType, match="not Engine"):
        enqueue(engine, "t", "x")  # type: ignore[arg-type]
    with pytest.raises(WrongSessionType, match="not NoneType"):
        enqueue_many(None, [Message("t", "x")])  # type: ignore[arg-type]

    async def with_async_session() -> None:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session:
                with pytest.raises(
                    WrongSessionType, match=r"not AsyncSession \(use enqueue_async\)"
                ):
                    enqueue(session, "t", "x")  # type: ignore[arg-type]
            async with aengine.connect() as conn:
                with pytest.raises(
                    WrongSessionType, match=r"not AsyncConnection \(use enqueue_async\)"
                ):
                    enqueue(conn, "t", "x")  # type: ignore[arg-type]
        finally:
            await aengine.dispose()

    asyncio.run(with_async_session())
    assert issubclass(WrongSessionType, OutboxError) and issubclass(WrongSessionType, TypeError)
    assert count(outbox) == 0


@pytest.fixture
def empty_schema(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """OUTBOX_SCHEMA pointed at a schema that exists but holds no outbox."""
    name = f"e_{uuid.uuid4().hex[:10]}"
    outbox.sql(f'CREATE SCHEMA "{name}"')
    monkeypatch.setenv("OUTBOX_SCHEMA", name)
    producer_settings.cache_clear()
    yield name
    producer_settings.cache_clear()
    outbox.sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_outbox_table_missing(empty_schema: str, engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        with pytest.raises(OutboxTableMissing) as info:
            enqueue(session, "t", "x")
        session.rollback()
    message = str(info.value)
    assert f"{empty_schema}.outbox does not exist" in message
    assert "outbox-relay migrate" in message
    assert isinstance(info.value.__cause__, DBAPIError)  # chained, not swallowed


def test_outbox_table_missing_async(empty_schema: str, db_url: str) -> None:
    async def scenario() -> None:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session:
                await session.begin()
                with pytest.raises(OutboxTableMissing, match="outbox-relay migrate"):
                    await enqueue_async(session, "t", "x")
                await session.rollback()
        finally:
            await aengine.dispose()

    asyncio.run(scenario())


def test_outbox_schema_missing(
    outbox: Outbox, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_SCHEMA", f"nope_{uuid.uuid4().hex[:8]}")
    producer_settings.cache_clear()
    try:
        with (
            Session(engine) as session,
            pytest.raises(OutboxTableMissing, match="run `outbox-relay migrate`"),
        ):
            enqueue(session, "t", "x")
    finally:
        producer_settings.cache_clear()


def test_package_names_resolve_on_first_use_and_the_relay_never_loads_the_orm() -> None:
    """``outbox_relay`` imports its producer helpers on first use: a relay process starts
    without SQLAlchemy (half a second of its start-up), and ``enqueue`` is the function even
    when another name of its module was imported first."""
    import subprocess
    import sys

    code = (
        "import sys, outbox_relay.cli, outbox_relay.relay, outbox_relay.sinks.router,"
        " outbox_relay.sinks.kafka;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy')[:3]);"
        "from outbox_relay import Message;"
        "from outbox_relay import enqueue;"
        "print(callable(enqueue) and enqueue.__module__ == 'outbox_relay.enqueue')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["[]", "True"]
    import outbox_relay

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        outbox_relay.nope  # noqa: B018
