"""Consumer inbox: side effects exactly once on top of at-least-once delivery.

In the consumer's own transaction, :func:`process_once` records the message's idempotency key in an
inbox table (``INSERT ... ON CONFLICT DO NOTHING``) and, when the message carries ``outbox-seq``,
checks that it is the next one of its (topic, key)::

    with Session(engine) as session, session.begin():
        if process_once(session, kafka_message):
            apply_side_effects(session, ...)      # same transaction: commits with the inbox row
    consumer.commit(kafka_message)                # acknowledge only after the commit

It returns ``True`` for a new message (do the side effects now, in this transaction) and ``False``
for a duplicate (a redelivery or a replay: do nothing). A sequenced message whose ``outbox-seq`` is
beyond the next expected one raises :class:`~outbox_relay.errors.SequenceGap` before writing
anything: an earlier message of the key is missing, so neither commit nor acknowledge.

``process_once`` and ``process_once_async`` share one statement builder (:func:`_steps`); the async
twin only awaits.

Tables (``outbox-relay migrate --inbox`` or the alembic branch ``outbox_relay_inbox``):

* ``<table>`` (default ``inbox``) -- one row per processed message and consumer:
  ``(consumer, idempotency_key)`` is the primary key; ``topic``, ``key``, ``seq``, ``received_at``;
* ``<table>_seq`` -- per (consumer, topic, key) the last processed ``outbox-seq``.

Their schema and name: the ``schema``/``table`` arguments, else ``OUTBOX_INBOX_SCHEMA`` /
``OUTBOX_INBOX_TABLE``, else ``OUTBOX_SCHEMA`` / ``inbox``, else ``public``.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import SecretStr
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Executable,
    Index,
    MetaData,
    Row,
    Table,
    Text,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement

from .errors import (
    ConfigError,
    InboxTableMissing,
    InvalidMessage,
    SequenceGap,
    WebhookTimestampError,
    WebhookVerificationError,
    WrongSessionType,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONSUMER",
    "DEFAULT_TABLE",
    "DEFAULT_TOLERANCE",
    "InboxMessage",
    "InboxTables",
    "SequenceGap",
    "build_inbox_tables",
    "inbox_names",
    "include_inbox_objects",
    "process_once",
    "process_once_async",
]

DEFAULT_TABLE = "inbox"
DEFAULT_CONSUMER = "default"
#: Seconds a webhook's timestamp may differ from now (the Standard Webhooks recommendation).
DEFAULT_TOLERANCE = 300.0

HEADER_IDEMPOTENCY_KEY = "idempotency-key"
HEADER_SEQ = "outbox-seq"
HEADER_TOPIC = "outbox-topic"
HEADER_KEY = "outbox-key"
HEADER_OUTBOX_ID = "outbox-id"
HEADER_CONTENT_TYPE = "content-type"
HEADER_WEBHOOK_ID = "webhook-id"
HEADER_WEBHOOK_TIMESTAMP = "webhook-timestamp"
HEADER_WEBHOOK_SIGNATURE = "webhook-signature"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_SEQ = re.compile(r"^[0-9]{1,18}$")


# ---------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class InboxTables:
    """The inbox table and its sequence companion for one (schema, table) pair."""

    metadata: MetaData
    inbox: Table
    seq: Table

    @property
    def schema(self) -> str:
        return self.inbox.schema or "public"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.inbox.name, self.seq.name)

    def qualified(self, name: str) -> str:
        return f'"{self.schema}"."{name}"'


def build_inbox_tables(schema: str = "public", table: str = DEFAULT_TABLE) -> InboxTables:
    """Fresh Table objects (own MetaData) for the inbox ``schema.table`` and ``<table>_seq``."""
    md = MetaData(schema=schema)
    inbox = Table(
        table,
        md,
        Column("consumer", Text, primary_key=True),
        Column("idempotency_key", Text, primary_key=True),
        Column("topic", Text, nullable=True),
        Column("key", Text, nullable=True),
        Column("seq", BigInteger, nullable=True),
        Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    Index(f"{table}_received_at_idx", inbox.c.received_at)
    seq = Table(
        f"{table}_seq",
        md,
        Column("consumer", Text, primary_key=True),
        Column("topic", Text, primary_key=True),
        Column("key", Text, primary_key=True),
        Column("last_seq", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    return InboxTables(md, inbox, seq)


@lru_cache(maxsize=16)
def _tables(schema: str, table: str) -> InboxTables:
    return build_inbox_tables(schema, table)


def create_statements(tables: InboxTables) -> list[str]:
    """Every DDL statement that creates the inbox tables, in order."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]

    def compile_ddl(element: DDLElement) -> str:
        return str(element.compile(dialect=dialect)).strip()

    stmts = [f'CREATE SCHEMA IF NOT EXISTS "{tables.schema}"']
    for t in (tables.inbox, tables.seq):
        stmts.append(compile_ddl(CreateTable(t)))
        stmts.extend(
            compile_ddl(CreateIndex(ix)) for ix in sorted(t.indexes, key=lambda i: str(i.name))
        )
    return stmts


def drop_statements(tables: InboxTables) -> list[str]:
    """DDL that removes what :func:`create_statements` made (not the schema)."""
    return [f"DROP TABLE IF EXISTS {tables.qualified(n)}" for n in reversed(tables.names)]


def _identifier(value: str, setting: str) -> str:
    if not _IDENT.match(value):
        raise ConfigError(
            f"invalid setting {setting}: must be a plain SQL identifier "
            "(letters, digits, _; max 41 chars)"
        )
    return value


def inbox_names(schema: str | None = None, table: str | None = None) -> tuple[str, str]:
    """The inbox's (schema, table): the arguments, else ``OUTBOX_INBOX_SCHEMA`` /
    ``OUTBOX_INBOX_TABLE``, else ``OUTBOX_SCHEMA`` / ``inbox``, else ``public``."""
    env = os.environ
    if schema is None:
        schema = env.get("OUTBOX_INBOX_SCHEMA") or env.get("OUTBOX_SCHEMA") or "public"
    if table is None:
        table = env.get("OUTBOX_INBOX_TABLE") or DEFAULT_TABLE
    return _identifier(schema, "OUTBOX_INBOX_SCHEMA"), _identifier(table, "OUTBOX_INBOX_TABLE")


def include_inbox_objects(name: str | None, type_: str, parent_names: object) -> bool:
    """An alembic ``include_name`` hook that hides the inbox tables from a host's autogenerate.

    Combine it with the host's own hook (and ``include_outbox_objects``): include an object only
    when every hook returns ``True``. Honors ``OUTBOX_INBOX_SCHEMA``/``OUTBOX_INBOX_TABLE``.
    """
    if type_ != "table" or name is None:
        return True
    schema, table = inbox_names()
    names = {*build_inbox_tables(schema, table).names, "outbox_relay_inbox_version"}
    parent = parent_names.get("schema_name") if isinstance(parent_names, dict) else None
    return not (name in names and (parent is None or parent == schema))


# ---------------------------------------------------------------------------------- messages
def _text(value: str | bytes | bytearray | memoryview | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", errors="replace")


def _lower(headers: Any) -> dict[str, str]:
    """Header pairs (a mapping, anything with ``items()``, or an iterable of pairs) -> a dict with
    lower-case names; a name given twice keeps its last value."""
    pairs: Iterable[tuple[Any, Any]] = headers.items() if hasattr(headers, "items") else headers
    out: dict[str, str] = {}
    for name, value in pairs:
        out[_text(name).lower()] = _text(value)
    return out


def _seq(value: str | None, ikey: str) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not _SEQ.match(text) or int(text) < 1:
        raise InvalidMessage(f"message {ikey!r}: invalid outbox-seq header {value!r}")
    return int(text)


def _outbox_id(value: str | None) -> int | None:
    text = (value or "").strip()
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class InboxMessage:
    """What the inbox needs of a message, whatever carried it (Kafka, a webhook, a test).

    ``seq`` is the ``outbox-seq`` header: set only for topics the producer sequences, and then
    ``topic`` and ``key`` name the sequence.
    """

    idempotency_key: str
    topic: str | None = None
    key: str | None = None
    seq: int | None = None
    payload: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    outbox_id: int | None = None

    @classmethod
    def from_headers(
        cls,
        headers: Any,
        payload: bytes = b"",
        *,
        topic: str | None = None,
        key: str | None = None,
    ) -> InboxMessage:
        """From the headers of a message published by the relay (Kafka or webhook names).

        The idempotency key is ``idempotency-key`` (or ``webhook-id``); ``outbox-topic`` /
        ``outbox-key`` give the topic and key unless passed. This does NOT verify a webhook's
        signature: use :meth:`from_webhook` for requests from the network.
        """
        h = _lower(headers)
        ikey = h.get(HEADER_IDEMPOTENCY_KEY) or h.get(HEADER_WEBHOOK_ID)
        if not ikey:
            raise InvalidMessage(
                "the message has no idempotency-key header (was it published by outbox-relay?)"
            )
        return cls(
            idempotency_key=ikey,
            topic=topic if topic is not None else h.get(HEADER_TOPIC),
            key=key if key is not None else h.get(HEADER_KEY),
            seq=_seq(h.get(HEADER_SEQ), ikey),
            payload=bytes(payload),
            headers=h,
            outbox_id=_outbox_id(h.get(HEADER_OUTBOX_ID)),
        )

    @classmethod
    def from_kafka(cls, message: Any) -> InboxMessage:
        """From a confluent-kafka ``Message`` the relay published (topic and key are the Kafka
        message's own; ``idempotency-key``, ``outbox-id``, ``outbox-seq`` its headers)."""
        error = message.error()
        if error is not None:
            raise InvalidMessage(f"the Kafka message is an error event, not a message: {error}")
        raw_key = message.key()
        return cls.from_headers(
            message.headers() or [],
            message.value() or b"",
            topic=message.topic(),
            key=_text(raw_key) if raw_key is not None else None,
        )

    @classmethod
    def from_webhook(
        cls,
        headers: Any,
        body: bytes | str,
        *,
        secrets: str | SecretStr | Iterable[str | SecretStr],
        tolerance: float = DEFAULT_TOLERANCE,
        now: float | None = None,
    ) -> InboxMessage:
        """Verify a Standard Webhooks request and return its message.

        ``headers``: the request's headers (any mapping, or pairs; names in any case); ``body``:
        the raw request body, exactly as received; ``secrets``: ``whsec_...`` secret(s), several
        during a rotation (a string may hold several, separated by spaces or commas).

        Raises :class:`~outbox_relay.errors.WebhookVerificationError` if a header is missing or no
        ``v1`` signature matches any secret, and its subclass
        :class:`~outbox_relay.errors.WebhookTimestampError` if the (authentic) request's
        ``webhook-timestamp`` is more than ``tolerance`` seconds from ``now``.
        """
        from .sinks.webhook import Signer, split_secrets

        h = _lower(headers)
        data = body.encode() if isinstance(body, str) else bytes(body)
        missing = [
            n
            for n in (HEADER_WEBHOOK_ID, HEADER_WEBHOOK_TIMESTAMP, HEADER_WEBHOOK_SIGNATURE)
            if not h.get(n)
        ]
        if missing:
            raise WebhookVerificationError(
                f"not a Standard Webhooks request: missing header(s) {', '.join(missing)}"
            )
        wid, ts_text, given = (
            h[HEADER_WEBHOOK_ID],
            h[HEADER_WEBHOOK_TIMESTAMP].strip(),
            h[HEADER_WEBHOOK_SIGNATURE],
        )
        if not ts_text.isdigit() or len(ts_text) > 12:
            raise WebhookVerificationError(
                f"webhook {wid!r}: webhook-timestamp {ts_text[:20]!r} is not a unix time"
            )
        ts = int(ts_text)
        items = [secrets] if isinstance(secrets, (str, SecretStr)) else list(secrets)
        keys: list[SecretStr] = []
        for item in items:
            text = item.get_secret_value() if isinstance(item, SecretStr) else item
            keys.extend(SecretStr(s) for s in split_secrets(text))
        try:
            signer = Signer(keys)
        except ValueError as exc:
            raise ConfigError(f"invalid webhook secret: {exc}") from None
        expected = [s.encode() for s in signer.sign(wid, ts, data).split()]
        offered = [s.encode() for s in given.split() if s.startswith("v1,")]
        if not any(hmac.compare_digest(e, o) for e in expected for o in offered):
            raise WebhookVerificationError(
                f"webhook {wid!r}: no signature matches (wrong secret, or the body or "
                "webhook-id/webhook-timestamp was changed on the way)"
            )
        age = (time.time() if now is None else now) - ts
        if abs(age) > tolerance:
            when = f"{age:.0f}s old" if age > 0 else f"{-age:.0f}s in the future"
            raise WebhookTimestampError(
                f"webhook {wid!r}: webhook-timestamp {ts} is {when}, outside the tolerance of "
                f"{tolerance:g}s (a replayed or delayed request, or clock skew)"
            )
        return cls.from_headers(h, data)


def as_inbox_message(message: Any) -> InboxMessage:
    """An :class:`InboxMessage`, a mapping of headers, or a confluent-kafka ``Message``."""
    if isinstance(message, InboxMessage):
        return message
    if isinstance(message, Mapping):
        return InboxMessage.from_headers(message)
    if all(callable(getattr(message, a, None)) for a in ("headers", "topic", "key", "error")):
        return InboxMessage.from_kafka(message)
    raise InvalidMessage(
        "process_once needs an InboxMessage, a mapping of headers or a confluent-kafka Message, "
        f"not {type(message).__name__}"
    )


# ---------------------------------------------------------------------------------- statements
#: One step of the shared plan: the plan yields a statement and receives its first row.
Step = Generator[Executable, "Row[Any] | None", bool]


def _steps(msg: InboxMessage, tables: InboxTables, consumer: str) -> Step:
    """The statements of :func:`process_once`, for a sync or an async driver.

    With ``outbox-seq``: advance the (consumer, topic, key) counter from ``seq - 1`` to ``seq``;
    if it is not at ``seq - 1``, lock it and read it: ``seq`` at or below it is a duplicate, above
    ``last + 1`` a gap (raised before anything is written). Then record the idempotency key; a key
    already there is a duplicate.
    """
    ib, sq = tables.inbox, tables.seq
    if msg.seq is not None:
        if msg.topic is None or msg.key is None:
            raise InvalidMessage(
                f"message {msg.idempotency_key!r} has outbox-seq but no "
                f"{'topic' if msg.topic is None else 'key'}: the sequence is per (topic, key)"
            )
        where = (sq.c.consumer == consumer, sq.c.topic == msg.topic, sq.c.key == msg.key)
        advance: Executable
        if msg.seq == 1:
            advance = (
                pg_insert(sq)
                .values(consumer=consumer, topic=msg.topic, key=msg.key, last_seq=1)
                .on_conflict_do_nothing(index_elements=[sq.c.consumer, sq.c.topic, sq.c.key])
                .returning(sq.c.last_seq)
            )
        else:
            advance = (
                update(sq)
                .where(*where, sq.c.last_seq == msg.seq - 1)
                .values(last_seq=msg.seq, updated_at=func.now())
                .returning(sq.c.last_seq)
            )
        advanced = yield advance
        if advanced is None:
            row = yield select(sq.c.last_seq).where(*where).with_for_update()
            last = int(row[0]) if row is not None else 0
            if msg.seq <= last:
                known = yield select(literal(1)).where(
                    ib.c.consumer == consumer, ib.c.idempotency_key == msg.idempotency_key
                )
                if known is None:
                    log.warning(
                        "inbox: message %r has outbox-seq %d of %r/%r, at or below the last "
                        "processed (%d), but its idempotency key was never recorded: treated as "
                        "a duplicate (inbox rows pruned, or the producer's sequence was reset?)",
                        msg.idempotency_key,
                        msg.seq,
                        msg.topic,
                        msg.key,
                        last,
                    )
                return False
            if msg.seq > last + 1:
                raise SequenceGap(
                    f"sequence gap on topic {msg.topic!r} key {msg.key!r} (consumer "
                    f"{consumer!r}): expected outbox-seq {last + 1}, got {msg.seq} (message "
                    f"{msg.idempotency_key!r}); an earlier message is missing: roll back and do "
                    "not acknowledge this one",
                    topic=msg.topic,
                    key=msg.key,
                    expected=last + 1,
                    got=msg.seq,
                    idempotency_key=msg.idempotency_key,
                )
            # seq == last + 1: another transaction advanced the counter while we looked; now we
            # hold its lock
            yield (
                update(sq)
                .where(*where)
                .values(last_seq=msg.seq, updated_at=func.now())
                .returning(sq.c.last_seq)
            )
    inserted = yield (
        pg_insert(ib)
        .values(
            consumer=consumer,
            idempotency_key=msg.idempotency_key,
            topic=msg.topic,
            key=msg.key,
            seq=msg.seq,
        )
        .on_conflict_do_nothing(index_elements=[ib.c.consumer, ib.c.idempotency_key])
        .returning(ib.c.consumer)
    )
    return inserted is not None


def _prepare(
    message: Any, consumer: str, schema: str | None, table: str | None
) -> tuple[InboxMessage, Step]:
    msg = as_inbox_message(message)
    if not isinstance(consumer, str) or not consumer:
        raise InvalidMessage("consumer must be a non-empty string")
    tables = _tables(*inbox_names(schema, table))
    return msg, _steps(msg, tables, consumer)


def _translate(exc: DBAPIError, schema: str | None, table: str | None) -> Exception:
    if isinstance(exc, ProgrammingError) and getattr(exc.orig, "sqlstate", None) == "42P01":
        s, t = inbox_names(schema, table)
        return InboxTableMissing(
            f"inbox table {s}.{t} does not exist: run `outbox-relay migrate --inbox` (or add "
            "outbox_relay:inbox_migrations/versions to your alembic version_locations)"
        )
    return exc


def _require(session: object, kinds: tuple[type, ...], name: str) -> None:
    if not isinstance(session, kinds):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise WrongSessionType(f"{name} needs a sqlalchemy {wanted}, not {type(session).__name__}")


class _Translated:
    """A missing inbox table becomes :class:`~outbox_relay.errors.InboxTableMissing` (one
    line); other database errors pass through as they are. Shared by the sync and async twin."""

    def __init__(self, schema: str | None, table: str | None) -> None:
        self._schema = schema
        self._table = table

    def __enter__(self) -> None:
        return None

    def __exit__(self, _typ: object, exc: BaseException | None, _tb: object) -> None:
        if isinstance(exc, DBAPIError):
            translated = _translate(exc, self._schema, self._table)
            if translated is not exc:
                raise translated from exc


def process_once(
    session: Session | Connection,
    message: Any,
    handler: Callable[[InboxMessage], object] | None = None,
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str | None = None,
    table: str | None = None,
) -> bool:
    """Record ``message`` in the inbox inside ``session``'s current transaction.

    ``message``: a confluent-kafka ``Message``, a mapping of headers or an :class:`InboxMessage`.
    Returns ``True`` when the message is new -- then ``handler(message)`` (if given) has run, and
    the caller's side effects belong in the same transaction -- and ``False`` for a duplicate.
    Raises :class:`~outbox_relay.errors.SequenceGap` if ``outbox-seq`` skips ahead. ``consumer``
    names an independent deduplication scope (two handlers of the same messages use two names).
    Never commits.
    """
    _require(session, (Session, Connection), "process_once")
    msg, steps = _prepare(message, consumer, schema, table)
    try:
        with _Translated(schema, table):
            stmt = next(steps)
            while True:
                if isinstance(session, Session):
                    with session.no_autoflush:
                        row = session.execute(stmt).first()
                else:
                    row = session.execute(stmt).first()
                stmt = steps.send(row)
    except StopIteration as done:
        new = bool(done.value)
    if new and handler is not None:
        handler(msg)
    return new


async def process_once_async(
    session: AsyncSession | AsyncConnection,
    message: Any,
    handler: Callable[[InboxMessage], Awaitable[object] | object] | None = None,
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str | None = None,
    table: str | None = None,
) -> bool:
    """Async twin of :func:`process_once`; ``handler`` may be a coroutine function."""
    _require(session, (AsyncSession, AsyncConnection), "process_once_async")
    msg, steps = _prepare(message, consumer, schema, table)
    try:
        with _Translated(schema, table):
            stmt = next(steps)
            while True:
                if isinstance(session, AsyncSession):
                    with session.no_autoflush:
                        row = (await session.execute(stmt)).first()
                else:
                    row = (await session.execute(stmt)).first()
                stmt = steps.send(row)
    except StopIteration as done:
        new = bool(done.value)
    if new and handler is not None:
        result = handler(msg)
        if inspect.isawaitable(result):
            await result
    return new
