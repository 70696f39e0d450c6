"""The consumer inbox (``outbox_relay.inbox``): duplicates dropped, sequence gaps detected, webhook
signatures verified; with real Postgres, the real relay and a real Kafka consumer (redelivery after
a crash before the offset commit, and a full replay of the outbox), a real webhook receiver, and
the inbox's own alembic branch standalone and inside a host's alembic."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, pool, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from outbox_relay import (
    InboxMessage,
    Message,
    SequenceGap,
    enqueue_many,
    process_once,
    process_once_async,
)
from outbox_relay.errors import (
    ConfigError,
    InboxTableMissing,
    InvalidMessage,
    WebhookTimestampError,
    WebhookVerificationError,
    WrongSessionType,
)
from outbox_relay.inbox import include_inbox_objects
from outbox_relay.inbox_migrations import HEAD as INBOX_HEAD
from outbox_relay.migrations import HEAD as OUTBOX_HEAD
from outbox_relay.settings import conninfo, producer_settings
from outbox_relay.sinks.webhook import Signer

from .conftest import REPO, Outbox, RelayProcess, run_cli, wait_for
from .webhook_receiver import Hit, Receiver, Reply

INBOX_TABLES = {"inbox", "inbox_seq"}


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def tables(url: str, schema: str) -> set[str]:
    return {r[0] for r in sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = %s",
                              (schema,))}


def versions(url: str, schema: str) -> set[str]:
    return {r[0] for r in sql(url, f'SELECT version_num FROM "{schema}".alembic_version')}


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(overrides)
    return env


class Inbox:
    """A migrated inbox in its own schema, with a side-effect table ``effects``."""

    def __init__(self, url: str, schema: str) -> None:
        self.url, self.schema = url, schema

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.url, query.replace("{s}", f'"{self.schema}"'), params)

    def effect(self, conn: Any, msg: InboxMessage) -> None:
        """The consumer's side effect: one row per call (a second call would show)."""
        conn.execute(
            text(f'INSERT INTO "{self.schema}".effects (ikey, key, seq) VALUES (:i, :k, :s)'),
            {"i": msg.idempotency_key, "k": msg.key, "s": msg.seq},
        )

    def effects(self) -> Counter[str]:
        return Counter(r[0] for r in self.sql("SELECT ikey FROM {s}.effects"))


@pytest.fixture
def inbox(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Inbox]:
    """``outbox-relay migrate --inbox`` into a fresh schema; the helper is pointed at it by
    ``OUTBOX_INBOX_SCHEMA`` (the outbox, if any, lives in another schema)."""
    schema = f"i_{uuid.uuid4().hex[:10]}"
    done = run_cli("migrate", "--inbox",
                   env=cli_env(OUTBOX_DATABASE_URL=db_url, OUTBOX_INBOX_SCHEMA=schema))
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("OUTBOX_INBOX_SCHEMA", schema)
    box = Inbox(db_url, schema)
    box.sql("CREATE TABLE {s}.effects (n bigserial PRIMARY KEY, ikey text, key text, seq bigint)")
    yield box
    sql(db_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


# ---------------------------------------------------------------------- migrations
def test_migrate_inbox_standalone_in_a_consumer_only_database(db_url: str) -> None:
    schema = f"i_{uuid.uuid4().hex[:10]}"
    env = cli_env(OUTBOX_DATABASE_URL=db_url, OUTBOX_SCHEMA=schema)
    try:
        for _ in range(2):  # idempotent
            done = run_cli("migrate", "--inbox", env=env)
            assert done.returncode == 0, done.stderr
            assert f"inbox schema {schema}.inbox is at {INBOX_HEAD}" in done.stdout
        # the inbox only: no outbox, its own version table
        assert tables(db_url, schema) == {*INBOX_TABLES, "outbox_relay_inbox_version"}
        assert sql(db_url, f'SELECT version_num FROM "{schema}".outbox_relay_inbox_version') == [
            (INBOX_HEAD,)
        ]
        # the outbox can join it later in the same schema, each with its own version table
        assert run_cli("migrate", env=env).returncode == 0
        assert {"outbox", "outbox_relay_version", *INBOX_TABLES} <= tables(db_url, schema)

        down = run_cli("migrate", "--inbox", "--downgrade", "base", env=env)
        assert down.returncode == 0, down.stderr
        left = tables(db_url, schema)
        assert not (INBOX_TABLES & left) and "outbox" in left

        named = run_cli("migrate", "--inbox", env={**env, "OUTBOX_INBOX_TABLE": "seen"})
        assert named.returncode == 0, named.stderr
        assert {"seen", "seen_seq"} <= tables(db_url, schema)

        offline = run_cli("migrate", "--inbox", "--sql",
                          env=cli_env(OUTBOX_DATABASE_URL="postgresql://x@127.0.0.1:1/x",
                                      OUTBOX_INBOX_SCHEMA="elsewhere"))
        assert offline.returncode == 0, offline.stderr
        assert "CREATE TABLE elsewhere.inbox (" in offline.stdout
        assert "CREATE TABLE elsewhere.inbox_seq (" in offline.stdout
        assert "outbox_relay_inbox_version" in offline.stdout

        bad = run_cli("migrate", "--inbox", env={**env, "OUTBOX_INBOX_TABLE": "no-pe"})
        assert bad.returncode == 2
        assert "invalid setting OUTBOX_INBOX_TABLE" in bad.stderr
    finally:
        sql(db_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_host_alembic_runs_the_inbox_branch_beside_its_own_and_the_outbox(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host example's alembic, with the inbox's version location added (a temp ini)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from outbox_relay import include_outbox_objects

    host_ini = (REPO / "alembic" / "alembic.ini").read_text()
    ini = tmp_path / "alembic.ini"
    lines = []
    for line in host_ini.splitlines():
        if line.startswith("script_location"):
            line = f"script_location = {REPO / 'alembic'}"
        elif line.startswith("version_locations"):
            line = (f"version_locations = {REPO / 'alembic' / 'versions'} "
                    "outbox_relay:migrations/versions outbox_relay:inbox_migrations/versions")
        lines.append(line)
    ini.write_text("\n".join(lines) + "\n")
    schema = f"h_{uuid.uuid4().hex[:10]}"

    def alembic(*args: str) -> str:
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "alembic"), "-c", str(ini),
             "-x", f"host_schema={schema}", "-x", f"outbox_schema={schema}", *args],
            cwd=REPO, env=cli_env(OUTBOX_DATABASE_URL=db_url), capture_output=True, text=True,
            timeout=120, check=False,
        )
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    try:
        heads = alembic("heads")
        assert f"{INBOX_HEAD} (outbox_relay_inbox) (head)" in heads
        assert f"{OUTBOX_HEAD} (outbox_relay) (head)" in heads and "host_0001 (shop)" in heads
        alembic("upgrade", "heads")
        found = tables(db_url, schema)
        assert {"customers", "orders", "outbox", "alembic_version", *INBOX_TABLES} <= found
        assert versions(db_url, schema) == {"host_0001", OUTBOX_HEAD, INBOX_HEAD}

        # the host's autogenerate ignores the inbox tables with include_inbox_objects
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from examples.shop.models import Base

        eng = create_engine(db_url, poolclass=pool.NullPool,
                            connect_args={"options": f"-c search_path={schema}"})
        monkeypatch.setenv("OUTBOX_INBOX_SCHEMA", schema)
        monkeypatch.setenv("OUTBOX_SCHEMA", schema)
        producer_settings.cache_clear()
        try:
            with eng.connect() as conn:
                def hooks(name: str | None, type_: str, parents: Any) -> bool:
                    return include_outbox_objects(name, type_, parents) and include_inbox_objects(
                        name, type_, parents)

                ctx = MigrationContext.configure(conn, opts={
                    "target_metadata": Base.metadata, "include_name": hooks})
                assert compare_metadata(ctx, Base.metadata) == []
            with Session(eng) as s, s.begin():
                assert process_once(s, InboxMessage("host-1", "t", "k", 1)) is True
        finally:
            eng.dispose()
            monkeypatch.undo()
            producer_settings.cache_clear()

        # the inbox branch alone goes down; the host and the outbox stay
        alembic("downgrade", "outbox_relay_inbox@base")
        left = tables(db_url, schema)
        assert not (INBOX_TABLES & left) and {"orders", "outbox"} <= left
        assert versions(db_url, schema) == {"host_0001", OUTBOX_HEAD}
    finally:
        sql(db_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# ---------------------------------------------------------------------- the helper
def test_duplicates_are_dropped_and_the_handler_runs_once(inbox: Inbox, engine: Engine) -> None:
    calls: list[str] = []
    msg = InboxMessage("m-1", "orders", None)
    for expected in (True, False, False):
        with Session(engine) as s, s.begin():
            assert process_once(s, msg, lambda m: calls.append(m.idempotency_key)) is expected
    assert calls == ["m-1"]
    # a rolled-back transaction records nothing: the message is new again
    with Session(engine) as s:
        s.begin()
        assert process_once(s, InboxMessage("m-2")) is True
        s.rollback()
    with engine.begin() as conn:  # a Connection works too
        assert process_once(conn, InboxMessage("m-2")) is True
        # a mapping of headers (Kafka or webhook names), names in any case
        assert process_once(conn, {"Idempotency-Key": "m-3", "outbox-topic": "t"}) is True
        assert process_once(conn, {"webhook-id": b"m-3"}) is False
        # another consumer name is another deduplication scope
        assert process_once(conn, InboxMessage("m-1"), consumer="mailer") is True
    rows = inbox.sql("SELECT consumer, idempotency_key, topic, received_at FROM {s}.inbox "
                     "ORDER BY 1, 2")
    assert [r[:3] for r in rows] == [("default", "m-1", "orders"), ("default", "m-2", None),
                                     ("default", "m-3", "t"), ("mailer", "m-1", None)]
    assert all(isinstance(r[3], dt.datetime) for r in rows)


def test_sequence_gaps_raise_and_write_nothing(
    inbox: Inbox, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    def run(ikey: str, seq: int, key: str = "k", consumer: str = "default") -> bool:
        with Session(engine) as s, s.begin():
            return process_once(s, InboxMessage(ikey, "orders", key, seq), consumer=consumer)

    assert run("s1", 1) and run("s2", 2)
    assert run("s2", 2) is False  # redelivery
    assert run("s1", 1) is False
    # the gap is raised before anything is written, so even a caller that commits anyway
    # recorded nothing
    with Session(engine) as s, s.begin(), pytest.raises(SequenceGap) as gap:
        process_once(s, InboxMessage("s4", "orders", "k", 4))
    err = gap.value
    assert (err.topic, err.key, err.expected, err.got, err.idempotency_key) == (
        "orders", "k", 3, 4, "s4")
    assert "expected outbox-seq 3, got 4" in str(err)
    assert inbox.sql("SELECT count(*) FROM {s}.inbox WHERE idempotency_key = 's4'") == [(0,)]
    assert run("s3", 3) and run("s4", 4)
    # a key starts at 1; keys, topics and consumers are independent sequences
    with pytest.raises(SequenceGap, match="expected outbox-seq 1, got 2"):
        run("o2", 2, key="other")
    assert run("o1", 1, key="other") and run("s1", 1, consumer="audit")
    assert inbox.sql("SELECT consumer, key, last_seq FROM {s}.inbox_seq ORDER BY 1, 2") == [
        ("audit", "k", 1), ("default", "k", 4), ("default", "other", 1)
    ]
    # with its inbox row pruned, a redelivery is still a duplicate by its sequence (and logged)
    inbox.sql("DELETE FROM {s}.inbox WHERE idempotency_key = 's2'")
    with caplog.at_level(logging.WARNING, logger="outbox_relay.inbox"):
        assert run("s2", 2) is False
    assert "idempotency key was never recorded" in caplog.text
    # a sequenced message needs its (topic, key); headers must be well-formed
    with Session(engine) as s, s.begin():
        with pytest.raises(InvalidMessage, match="no key"):
            process_once(s, InboxMessage("x", "orders", None, 1))
        with pytest.raises(InvalidMessage, match="invalid outbox-seq"):
            process_once(s, {"idempotency-key": "x", "outbox-seq": "-1"})
        with pytest.raises(InvalidMessage, match="no idempotency-key"):
            process_once(s, {"outbox-seq": "1"})
        with pytest.raises(InvalidMessage, match="not int"):
            process_once(s, 42)
    with pytest.raises(WrongSessionType):
        process_once(engine, InboxMessage("x"))  # type: ignore[arg-type]


def test_concurrent_copies_wait_for_the_first_transaction(inbox: Inbox, engine: Engine) -> None:
    """Two consumers get the same message at once: the second blocks on the first's uncommitted
    row and then sees a duplicate; if the first rolls back, the second processes it."""
    for outcome in ("commit", "rollback"):
        ikey = f"c-{outcome}"
        results: list[bool] = []
        first = Session(engine)
        first.begin()
        assert process_once(first, InboxMessage(ikey, "orders", "k", 1), consumer=outcome)

        def second(
            ikey: str = ikey, consumer: str = outcome, results: list[bool] = results
        ) -> None:
            with Session(engine) as s, s.begin():
                results.append(process_once(s, InboxMessage(ikey, "orders", "k", 1),
                                            consumer=consumer))

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        assert results == [], "the second copy must wait for the first transaction"
        getattr(first, outcome)()
        first.close()
        t.join(10)
        assert results == [outcome == "rollback"]


def test_async_twin(inbox: Inbox, db_url: str) -> None:
    async def scenario() -> list[Any]:
        aengine = create_async_engine(db_url)
        seen: list[str] = []

        async def handler(m: InboxMessage) -> None:
            seen.append(m.idempotency_key)

        try:
            out: list[Any] = []
            for _ in range(2):
                async with AsyncSession(aengine) as s, s.begin():
                    out.append(await process_once_async(s, InboxMessage("a1", "t", "k", 1),
                                                        handler))
            async with aengine.begin() as conn:
                out.append(await process_once_async(conn, InboxMessage("a2", "t", "k", 2),
                                                    lambda m: seen.append(m.idempotency_key)))
                with pytest.raises(SequenceGap):
                    await process_once_async(conn, InboxMessage("a9", "t", "k", 9))
            with pytest.raises(WrongSessionType):
                await process_once_async(Session(), InboxMessage("x"))  # type: ignore[arg-type]
            out.append(seen)
            return out
        finally:
            await aengine.dispose()

    assert asyncio.run(scenario()) == [True, False, True, ["a1", "a2"]]


def test_missing_inbox_table_is_a_clear_error(db_url: str, engine: Engine) -> None:
    missing = pytest.raises(InboxTableMissing, match="outbox-relay migrate --inbox")
    with Session(engine) as s, s.begin(), missing:
        process_once(s, InboxMessage("x"), schema=f"n_{uuid.uuid4().hex[:8]}")
    with engine.connect() as conn, pytest.raises(ConfigError, match="OUTBOX_INBOX_TABLE"):
        process_once(conn, InboxMessage("x"), table="bad name")


# ---------------------------------------------------------------------- webhook verification
def test_webhook_signature_verification() -> None:
    secret, other = new_secret(), new_secret()
    body = b'{"order_id": 42}'
    now = float(int(time.time()))
    ts = int(now)

    def headers(sig: str, wid: str = "msg-1", when: int = ts) -> dict[str, str]:
        # names as a framework may present them
        return {"Webhook-Id": wid, "Webhook-Timestamp": str(when), "Webhook-Signature": sig,
                "Outbox-Topic": "orders", "Outbox-Key": "c-7", "Outbox-Seq": "3",
                "Content-Type": "application/json"}

    # good: signed by the reference library, and by the relay's own signer
    reference = Webhook(secret).sign("msg-1", dt.datetime.fromtimestamp(ts, dt.UTC),
                                     body.decode())
    m = InboxMessage.from_webhook(headers(reference), body, secrets=secret, now=now)
    assert (m.idempotency_key, m.topic, m.key, m.seq, m.payload) == (
        "msg-1", "orders", "c-7", 3, body)
    ours = Signer([SecretStr(secret)]).sign("msg-1", ts, body)
    assert InboxMessage.from_webhook(headers(ours), body, secrets=[SecretStr(secret)]).seq == 3
    # rotation: the relay signs with both secrets, the receiver knows one (and vice versa)
    both = Signer([SecretStr(other), SecretStr(secret)]).sign("msg-1", ts, body)
    assert InboxMessage.from_webhook(headers(both), body, secrets=secret)
    assert InboxMessage.from_webhook(list(headers(ours).items()), body,
                                     secrets=f"{other} {secret}")

    # bad: another secret, a changed body, a changed id, a missing header, garbage
    for hdrs, data in (
        (headers(Signer([SecretStr(other)]).sign("msg-1", ts, body)), body),
        (headers(ours), b'{"order_id": 43}'),
        (headers(ours, wid="msg-2"), body),
        (headers("v1,AAAA"), body),
        (headers("v1a,whatever " + ours.replace("v1,", "v2,")), body),
    ):
        with pytest.raises(WebhookVerificationError, match="no signature matches") as err:
            InboxMessage.from_webhook(hdrs, data, secrets=secret)
        assert not isinstance(err.value, WebhookTimestampError)
        assert secret not in str(err.value)
    no_sig = {k: v for k, v in headers(ours).items() if k != "Webhook-Signature"}
    with pytest.raises(WebhookVerificationError, match=r"missing header.*webhook-signature"):
        InboxMessage.from_webhook(no_sig, body, secrets=secret)
    with pytest.raises(WebhookVerificationError, match="not a unix time"):
        InboxMessage.from_webhook({**headers(ours), "webhook-timestamp": "yesterday"}, body,
                                  secrets=secret)

    # stale (a replay of a captured request) and future timestamps, correctly signed
    for offset, words in ((-600, "600s old"), (900, "900s in the future")):
        when = ts + offset
        sig = Signer([SecretStr(secret)]).sign("msg-1", when, body)
        with pytest.raises(WebhookTimestampError, match=words):
            InboxMessage.from_webhook(headers(sig, when=when), body, secrets=secret, now=now)
        # a wider tolerance accepts it
        InboxMessage.from_webhook(headers(sig, when=when), body, secrets=secret, now=now,
                                  tolerance=1000)
    with pytest.raises(ConfigError, match="invalid webhook secret"):
        InboxMessage.from_webhook(headers(ours), body, secrets="whsec_!!!")


# ---------------------------------------------------------------------- end to end: Kafka
def kafka_consumer(bootstrap: str, topic: str, group: str) -> Any:
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    # assign (no group rebalance wait); each partition resumes from the group's committed offset
    c.assign([TopicPartition(topic, p) for p in range(4)])
    return c


def drain(consumer: Any, engine: Engine, box: Inbox, *, until: Callable[[Counter[bool]], bool],
          commit: bool, timeout: float = 60) -> Counter[bool]:
    """The consumer loop: each message in its own transaction, acknowledged after the commit."""
    results: Counter[bool] = Counter()
    deadline = time.monotonic() + timeout
    while not until(results):
        assert time.monotonic() < deadline, f"timed out; so far {results}"
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        with Session(engine) as s, s.begin():
            new = process_once(s, msg, lambda m: box.effect(s, m))
        results[new] += 1
        if commit:
            consumer.commit(message=msg, asynchronous=False)
    return results


def test_kafka_consumer_applies_each_message_once_across_redelivery_and_replay(
    outbox: Outbox, inbox: Inbox, engine: Engine, topic: str, kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_SEQUENCE_TOPICS", topic)
    producer_settings.cache_clear()
    keys = ["a", "b", "c", None]  # keyed rows carry outbox-seq; unkeyed ones only their id
    msgs = [Message(topic, {"i": i}, key=keys[i % 4], idempotency_key=f"k-{i}")
            for i in range(40)]
    for chunk in range(0, 40, 10):
        with Session(engine) as s, s.begin():
            enqueue_many(s, msgs[chunk:chunk + 10])
    n = len(msgs)
    relay_factory(OUTBOX_KEEP_SENT="true")  # step 3 makes sent rows pending again
    group = f"inbox-{uuid.uuid4().hex}"

    # 1. a consumer processes everything but "crashes" before committing any offset
    first = kafka_consumer(kafka_bootstrap, topic, group)
    try:
        got = drain(first, engine, inbox, until=lambda r: r[True] == n, commit=False)
    finally:
        first.close()
    assert got[True] == n
    assert inbox.effects() == Counter({f"k-{i}": 1 for i in range(n)})

    # 2. its successor in the group gets all of it again: nothing is applied twice
    second = kafka_consumer(kafka_bootstrap, topic, group)
    try:
        got = drain(second, engine, inbox, until=lambda r: sum(r.values()) >= n, commit=True)
        assert got == Counter({False: n})

        # 3. replay: every row back to pending, the relay publishes all of them again
        wait_for(lambda: outbox.pending() == 0, 30, "the relay to mark everything sent")
        outbox.sql("UPDATE {t} SET sent_at = NULL")
        got = drain(second, engine, inbox, until=lambda r: sum(r.values()) >= n, commit=True)
        assert got == Counter({False: n})

        # 4. and new messages after all that are applied, continuing each key's sequence
        with Session(engine) as s, s.begin():
            enqueue_many(s, [Message(topic, {}, key="a", idempotency_key="late-a"),
                             Message(topic, {}, key=None, idempotency_key="late-none")])
        got = drain(second, engine, inbox, until=lambda r: r[True] == 2, commit=True)
    finally:
        second.close()
    effects = inbox.effects()
    assert effects == Counter({**{f"k-{i}": 1 for i in range(n)}, "late-a": 1, "late-none": 1})
    assert inbox.sql("SELECT key, last_seq FROM {s}.inbox_seq ORDER BY key") == [
        ("a", 11), ("b", 10), ("c", 10)]
    # the side effects of each key ran in sequence order
    for key in "abc":
        seqs = [r[0] for r in inbox.sql("SELECT seq FROM {s}.effects WHERE key = %s ORDER BY n",
                                        (key,))]
        assert seqs == list(range(1, len(seqs) + 1))


# ---------------------------------------------------------------------- end to end: webhooks
def test_webhook_receiver_applies_each_message_once(
    outbox: Outbox, inbox: Inbox, engine: Engine,
    relay_factory: Callable[..., RelayProcess], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_SEQUENCE_TOPICS", "wh.*")
    producer_settings.cache_clear()
    secret = new_secret()
    results: list[bool | str] = []

    def endpoint(hit: Hit) -> Reply:
        """What a receiver does: verify, then process once in its own transaction."""
        try:
            msg = InboxMessage.from_webhook(hit.headers, hit.body, secrets=secret)
            with Session(engine) as s, s.begin():
                new = process_once(s, msg, lambda m: inbox.effect(s, m))
        except WebhookVerificationError:
            results.append("401")
            return Reply(401)
        except SequenceGap:
            results.append("409")
            return Reply(409)  # the relay retries it later
        results.append(new)
        return Reply(200)

    receiver = Receiver()
    receiver.rule = endpoint
    try:
        msgs = [Message("wh.orders", {"i": i}, key=("x", "y", None)[i % 3],
                        idempotency_key=f"w-{i}") for i in range(15)]
        with Session(engine) as s, s.begin():
            enqueue_many(s, msgs)
        relay_factory(OUTBOX_SINK="webhook", OUTBOX_WEBHOOK_URL=receiver.url(),
                      OUTBOX_WEBHOOK_SECRET=secret, OUTBOX_WEBHOOK_ALLOW_PRIVATE="true",
                      OUTBOX_KEEP_SENT="true")
        wait_for(lambda: results.count(True) == 15 and outbox.pending() == 0, 60, "delivery")
        outbox.sql("UPDATE {t} SET sent_at = NULL")  # the relay delivers everything again
        wait_for(lambda: len(results) >= 30 and outbox.pending() == 0, 60, "redelivery")
        # a forged request (a captured body, signed with a guessed secret) is refused
        forged = {**receiver.delivered()[0].headers}
        forged["webhook-signature"] = Signer([SecretStr(new_secret())]).sign(
            forged["webhook-id"], int(forged["webhook-timestamp"]), b"{}")
        with pytest.raises(WebhookVerificationError):
            InboxMessage.from_webhook(forged, b"{}", secrets=secret)
    finally:
        receiver.close()
    assert results.count(True) == 15 and "401" not in results
    assert inbox.effects() == Counter({f"w-{i}": 1 for i in range(15)})
    assert inbox.sql("SELECT topic, key, last_seq FROM {s}.inbox_seq ORDER BY key") == [
        ("wh.orders", "x", 5), ("wh.orders", "y", 5)]
