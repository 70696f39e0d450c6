"""Producer helper: write an outbox row in the caller's transaction.

``enqueue`` and ``enqueue_async`` share one statement builder; the async twin only awaits. The
helper never commits or flushes: the row commits or rolls back with the caller's business rows.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Connection,
    Insert,
    LargeBinary,
    Text,
    bindparam,
    cast,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from .errors import InvalidMessage, OutboxTableMissing, PayloadTooLarge, WrongSessionType
from .schema import tables_for
from .settings import producer_settings

Payload = bytes | bytearray | memoryview | str | dict[str, Any] | list[Any]

_MAX_TOPIC = 255
_MAX_KEY = 1024
_MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class Message:
    """One message for :func:`enqueue_many`."""

    topic: str
    payload: Payload
    key: str | None = None
    headers: Mapping[str, str] | None = None
    idempotency_key: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Enqueued:
    """What ``enqueue`` did: ``created`` is False when the idempotency key already existed."""

    idempotency_key: str
    created: bool
    id: int | None = field(default=None)


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7) as text."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _encode(payload: object, content_type: str | None) -> tuple[bytes, str]:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), content_type or "application/octet-stream"
    if isinstance(payload, str):
        return payload.encode(), content_type or "text/plain; charset=utf-8"
    if isinstance(payload, (dict, list)):
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidMessage(f"payload is not JSON-serialisable: {exc}") from None
        return body.encode(), content_type or "application/json"
    raise InvalidMessage(f"payload must be bytes, str, dict or list, not {type(payload).__name__}")


def _row(msg: Message, max_payload: int) -> dict[str, Any]:
    if not isinstance(msg.topic, str) or not msg.topic.strip():
        raise InvalidMessage("topic must be a non-empty string")
    if len(msg.topic) > _MAX_TOPIC:
        raise InvalidMessage(f"topic is longer than {_MAX_TOPIC} characters")
    if msg.key is not None and (not isinstance(msg.key, str) or len(msg.key) > _MAX_KEY):
        raise InvalidMessage(f"key must be a string of at most {_MAX_KEY} characters or None")
    headers = dict(msg.headers or {})
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise InvalidMessage(
                f"headers must map non-empty str to str; got {name!r}: {type(value).__name__}"
            )
    ikey = msg.idempotency_key if msg.idempotency_key is not None else uuid7()
    if not isinstance(ikey, str) or not ikey or len(ikey) > _MAX_IDEMPOTENCY_KEY:
        raise InvalidMessage(
            f"idempotency_key must be a non-empty string of at most {_MAX_IDEMPOTENCY_KEY} chars"
        )
    body, content_type = _encode(msg.payload, msg.content_type)
    if len(body) > max_payload:
        raise PayloadTooLarge(
            f"payload of {len(body)} bytes exceeds the limit of {max_payload} bytes "
            f"(OUTBOX_MAX_PAYLOAD_BYTES) for topic {msg.topic!r}"
        )
    return {
        "idempotency_key": ikey,
        "topic": msg.topic,
        "key": msg.key,
        "payload": body,
        "content_type": content_type,
        "headers": headers,
    }


def build_insert(messages: Sequence[Message]) -> tuple[Insert, list[str]]:
    """The one INSERT ... ON CONFLICT DO NOTHING RETURNING statement for ``messages``."""
    if not messages:
        raise InvalidMessage("no messages to enqueue")
    settings = producer_settings()
    rows = [_row(m, settings.max_payload_bytes) for m in messages]
    keys = [r["idempotency_key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise InvalidMessage("the same idempotency_key appears twice in one enqueue_many call")
    table = tables_for(settings.db_schema, settings.table).outbox
    # One statement with an array parameter per column, whatever the number of rows: no
    # bind-parameter limit, one parse, one round trip. Rows keep their order (and so their ids)
    # via ORDINALITY.
    arrays: dict[str, tuple[list[Any], Any]] = {
        "idempotency_key": (keys, ARRAY(Text)),
        "topic": ([r["topic"] for r in rows], ARRAY(Text)),
        "key": ([r["key"] for r in rows], ARRAY(Text)),
        "payload": ([r["payload"] for r in rows], ARRAY(LargeBinary)),
        "content_type": ([r["content_type"] for r in rows], ARRAY(Text)),
        "headers": ([json.dumps(r["headers"]) for r in rows], ARRAY(Text)),
    }
    if settings.sequence_topics:
        # seq = 0 asks the commit-time trigger for the key's next sequence number
        seqs = [
            0 if r["key"] is not None and settings.sequenced(r["topic"]) else None for r in rows
        ]
        if any(v is not None for v in seqs):
            arrays["seq"] = (seqs, ARRAY(BigInteger))
    names = list(arrays)
    src = (
        func.unnest(*(bindparam(f"p_{n}", v, type_=t) for n, (v, t) in arrays.items()))
        .table_valued(*names, with_ordinality="n")
        .render_derived()
    )
    cols = [cast(src.c.headers, JSONB) if n == "headers" else src.c[n] for n in names]
    # The transaction takes its id before the first row takes its outbox id: a relay's fetch
    # snapshot then lists it as running whenever it may hold an outbox id that the snapshot
    # cannot see yet, which is what keeps the fetch cursors from stepping over it (cursors.py).
    stmt = (
        pg_insert(table)
        .from_select(
            names,
            select(*cols)
            .where(func.pg_current_xact_id().is_not(None))
            .order_by(src.c.n),
        )
        .on_conflict_do_nothing(index_elements=[table.c.idempotency_key])
        .returning(table.c.id, table.c.idempotency_key)
    )
    return stmt, keys


def _results(keys: list[str], returned: Iterable[Any]) -> list[Enqueued]:
    written = {row[1]: row[0] for row in returned}
    return [Enqueued(k, k in written, written.get(k)) for k in keys]


def _translate(exc: DBAPIError) -> Exception:
    code = getattr(exc.orig, "sqlstate", None)
    if isinstance(exc, ProgrammingError) and code == "42P01":
        s = producer_settings()
        return OutboxTableMissing(
            f"outbox table {s.db_schema}.{s.table} does not exist: run `outbox-relay migrate`"
        )
    return exc


def _require(session: object, kinds: tuple[type, ...], name: str, twins: tuple[type, ...]) -> None:
    if not isinstance(session, kinds):
        hint = ""
        if isinstance(session, twins):
            hint = " (use enqueue)" if name == "enqueue_async" else " (use enqueue_async)"
        wanted = " or ".join(k.__name__ for k in kinds)
        raise WrongSessionType(
            f"{name} needs a sqlalchemy {wanted}, not {type(session).__name__}{hint}"
        )


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Turn a missing outbox table into OutboxTableMissing; let other errors through as they are."""
    try:
        yield
    except DBAPIError as exc:
        translated = _translate(exc)
        if translated is exc:
            raise
        raise translated from exc


def _messages(
    topic: str,
    payload: Payload,
    key: str | None,
    headers: Mapping[str, str] | None,
    idempotency_key: str | None,
    content_type: str | None,
) -> list[Message]:
    return [Message(topic, payload, key, headers, idempotency_key, content_type)]


def enqueue(
    session: Session | Connection,
    topic: str,
    payload: Payload,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    content_type: str | None = None,
) -> Enqueued:
    """Add one message to the outbox inside ``session``'s current transaction."""
    msgs = _messages(topic, payload, key, headers, idempotency_key, content_type)
    return enqueue_many(session, msgs)[0]


def enqueue_many(session: Session | Connection, messages: Iterable[Message]) -> list[Enqueued]:
    """Add many messages with one INSERT statement inside ``session``'s transaction."""
    _require(session, (Session, Connection), "enqueue", (AsyncSession, AsyncConnection))
    stmt, keys = build_insert(list(messages))
    with _translated_errors():
        if isinstance(session, Session):
            with session.no_autoflush:
                result = session.execute(stmt)
        else:
            result = session.execute(stmt)
    return _results(keys, result.all())


async def enqueue_async(
    session: AsyncSession | AsyncConnection,
    topic: str,
    payload: Payload,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    content_type: str | None = None,
) -> Enqueued:
    """Async twin of :func:`enqueue` for ``AsyncSession`` / ``AsyncConnection``."""
    msgs = _messages(topic, payload, key, headers, idempotency_key, content_type)
    return (await enqueue_many_async(session, msgs))[0]


async def enqueue_many_async(
    session: AsyncSession | AsyncConnection, messages: Iterable[Message]
) -> list[Enqueued]:
    """Async twin of :func:`enqueue_many`."""
    _require(session, (AsyncSession, AsyncConnection), "enqueue_async", (Session, Connection))
    stmt, keys = build_insert(list(messages))
    with _translated_errors():
        if isinstance(session, AsyncSession):
            with session.no_autoflush:
                result = await session.execute(stmt)
        else:
            result = await session.execute(stmt)
    return _results(keys, result.all())
