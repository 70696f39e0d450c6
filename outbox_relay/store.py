"""Every SQL statement the relay and the operator commands run, each one named.

The relay talks to Postgres with psycopg directly (no ORM on the hot path). Statements are
composed once per (schema, table) with properly quoted identifiers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .errors import OutboxTableMissing, SchemaMismatch
from .schema import SCHEMA_REVISION

#: Second advisory-lock key of the shared "relay present" lock every relay holds.
PRESENCE_KEY = 1_000_000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    idempotency_key: str
    topic: str
    key: str | None
    payload: bytes
    content_type: str
    headers: dict[str, str]
    shard: int
    attempts: int
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed delivery attempt to record: ``delay`` seconds until the next attempt."""

    id: int
    error: str
    delay: float


class Store:
    """Named statements for one outbox table. Methods take the connection to run on."""

    def __init__(self, schema: str, table: str, namespace: int) -> None:
        self.schema = schema
        self.table = table
        self.namespace = namespace

        def ident(name: str) -> sql.Composed:
            return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier(name)])

        t = ident(table)
        shards = ident(f"{table}_shards")
        wakeup = ident(f"{table}_wakeup")
        meta = ident(f"{table}_meta")
        self._q: dict[str, sql.Composed] = {}

        def q(name: str, text: str, **extra: Any) -> None:
            self._q[name] = sql.SQL(text).format(
                t=t, shards=shards, wakeup=wakeup, meta=meta, **extra
            )

        cols = (
            "o.id, o.idempotency_key, o.topic, o.key, o.payload, o.content_type, o.headers, "
            "o.shard, o.attempts, o.created_at"
        )
        q("meta", "SELECT name, value FROM {meta}")
        # Keys that must wait: an earlier row of theirs is in backoff, or (strict) dead.
        q(
            "blocked_keys",
            "SELECT DISTINCT key FROM {t} WHERE shard = ANY(%(shards)s) AND sent_at IS NULL"
            " AND (next_attempt_at IS NOT NULL OR dead_at IS NOT NULL) AND key IS NOT NULL"
            " AND ((dead_at IS NULL AND next_attempt_at > now())"
            "      OR (%(strict)s AND dead_at IS NOT NULL))",
        )
        # One round trip, up to `limit` pending rows per owned shard, each in id order.
        q(
            "fetch",
            "SELECT " + cols + " FROM unnest(%(shards)s::smallint[]) AS s(shard)"
            " CROSS JOIN LATERAL (SELECT * FROM {t} p WHERE p.shard = s.shard"
            "   AND p.sent_at IS NULL AND p.dead_at IS NULL"
            "   AND (p.next_attempt_at IS NULL OR p.next_attempt_at <= now())"
            "   AND (p.key IS NULL OR p.key <> ALL(%(blocked)s::text[]))"
            "   ORDER BY p.id LIMIT %(limit)s) AS o ORDER BY o.id",
        )
        # Fenced: only rows of shards whose epoch is still ours. FOR SHARE waits for a concurrent
        # takeover (which updates the epoch row) and then sees the new epoch.
        lease = (
            "(SELECT sh.shard FROM {shards} sh"
            " JOIN unnest(%(lease_shards)s::smallint[], %(epochs)s::bigint[]) AS l(shard, epoch)"
            " ON sh.shard = l.shard AND sh.epoch = l.epoch FOR SHARE OF sh)"
        )
        q(
            "mark_sent",
            "UPDATE {t} o SET sent_at = now() FROM " + lease + " AS ok"
            " WHERE o.id = ANY(%(ids)s::bigint[]) AND o.shard = ok.shard AND o.sent_at IS NULL",
        )
        q(
            "mark_failed",
            "UPDATE {t} o SET attempts = o.attempts + 1, last_error = f.error,"
            " next_attempt_at = now() + f.delay * interval '1 second',"
            " dead_at = CASE WHEN o.attempts + 1 >= %(max_attempts)s THEN now() END"
            " FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays)s::float8[])"
            "   AS f(id, error, delay), " + lease + " AS ok"
            " WHERE o.id = f.id AND o.shard = ok.shard AND o.sent_at IS NULL"
            " RETURNING o.id, o.dead_at IS NOT NULL AS dead",
        )
        # Held back by the sink on purpose (e.g. webhook endpoint answered 410 Gone): wait, but
        # do not count an attempt, so the row stays pending instead of becoming a dead letter.
        q(
            "mark_deferred",
            "UPDATE {t} o SET last_error = f.error,"
            " next_attempt_at = now() + f.delay * interval '1 second'"
            " FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays)s::float8[])"
            "   AS f(id, error, delay), " + lease + " AS ok"
            " WHERE o.id = f.id AND o.shard = ok.shard AND o.sent_at IS NULL",
        )
        q(
            "take_epoch",
            "INSERT INTO {shards} AS sh (shard, epoch, owner, acquired_at)"
            " VALUES (%(shard)s, 1, %(owner)s, now()) ON CONFLICT (shard) DO UPDATE"
            " SET epoch = sh.epoch + 1, owner = excluded.owner, acquired_at = excluded.acquired_at"
            " RETURNING epoch",
        )
        q(
            "set_idle",
            "INSERT INTO {wakeup} AS w (shard, idle)"
            " SELECT unnest(%(shards)s::smallint[]), %(idle)s"
            " ON CONFLICT (shard) DO UPDATE SET idle = excluded.idle"
            " WHERE w.idle IS DISTINCT FROM excluded.idle",
        )
        q(
            "dead_letters",
            "SELECT id, idempotency_key, topic, key, attempts, last_error, created_at, dead_at"
            " FROM {t} WHERE dead_at IS NOT NULL AND sent_at IS NULL"
            " AND (%(topic)s::text IS NULL OR topic = %(topic)s) ORDER BY id LIMIT %(limit)s",
        )
        q(
            "retry_dead",
            "UPDATE {t} SET dead_at = NULL, attempts = 0, next_attempt_at = NULL"
            " WHERE dead_at IS NOT NULL AND sent_at IS NULL"
            " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
            " AND (%(topic)s::text IS NULL OR topic = %(topic)s) RETURNING id",
        )
        q(
            "pending_by_topic",
            "SELECT topic, count(*) AS pending, min(created_at) AS oldest FROM {t}"
            " WHERE sent_at IS NULL AND dead_at IS NULL GROUP BY topic ORDER BY topic",
        )
        q(
            "pending_by_shard",
            "SELECT shard, count(*) AS pending FROM {t}"
            " WHERE sent_at IS NULL AND dead_at IS NULL GROUP BY shard ORDER BY shard",
        )
        q(
            "counts",
            "SELECT (SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL AND sent_at IS NULL)"
            "   AS dead_letters,"
            " (SELECT count(*) FROM {t} WHERE sent_at > now() - interval '1 minute')"
            "   AS sent_last_minute,"
            " (SELECT extract(epoch FROM now() - min(created_at)) FROM {t}"
            "   WHERE sent_at IS NULL AND dead_at IS NULL) AS oldest_pending_s",
        )
        q(
            "owners",
            "SELECT sh.shard, sh.epoch, sh.owner, sh.acquired_at, l.pid, a.application_name,"
            " a.client_addr::text AS client_addr FROM {shards} sh"
            " LEFT JOIN pg_locks l ON l.locktype = 'advisory' AND l.classid = %(ns)s::oid"
            "   AND l.objid = sh.shard::oid AND l.objsubid = 2 AND l.granted"
            "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid ORDER BY sh.shard",
        )

    def _run(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Any:
        return conn.execute(self._q[name], params, prepare=True)

    # -- schema
    def check_schema(self, conn: psycopg.Connection[Any]) -> dict[str, str]:
        """Meta facts of the outbox; raise if the table is missing or at another revision."""
        try:
            rows = self._run(conn, "meta", {}).fetchall()
        except psycopg.errors.UndefinedTable:
            conn.rollback()
            raise OutboxTableMissing(
                f"outbox table {self.schema}.{self.table} does not exist: "
                "run `outbox-relay migrate`"
            ) from None
        meta = {str(r[0]): str(r[1]) for r in rows}
        if meta.get("revision") != SCHEMA_REVISION:
            raise SchemaMismatch(
                f"outbox schema is at revision {meta.get('revision')!r}, this relay expects "
                f"{SCHEMA_REVISION!r}: run `outbox-relay migrate`"
            )
        return meta

    # -- leases (run on the lease connection, autocommit)
    def try_lock(self, conn: psycopg.Connection[Any], shard: int) -> bool:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (self.namespace, shard)
        ).fetchone()
        return bool(row and row[0])

    def unlock(self, conn: psycopg.Connection[Any], shard: int) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self.namespace, shard))

    def harden_lease_session(self, conn: psycopg.Connection[Any]) -> None:
        """Have the server probe this session, so a relay that vanished (network cut, host
        crash) loses its backend -- and with it its shard locks -- in ~10 s, not hours."""
        conn.execute(
            "SELECT set_config('tcp_keepalives_idle', '5', false),"
            " set_config('tcp_keepalives_interval', '2', false),"
            " set_config('tcp_keepalives_count', '3', false),"
            " set_config('tcp_user_timeout', '10000', false)"
        )

    def join_presence(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (self.namespace, PRESENCE_KEY))

    def held_shards(self, conn: psycopg.Connection[Any]) -> set[int]:
        """Shards whose lease this connection's backend holds right now."""
        rows = conn.execute(
            "SELECT objid::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            " AND classid = %s::oid AND objsubid = 2 AND granted AND objid < %s::oid",
            (self.namespace, PRESENCE_KEY),
            prepare=True,
        ).fetchall()
        return {int(r[0]) for r in rows}

    def live_relays(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid"
            " AND objid = %s::oid AND objsubid = 2 AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (self.namespace, PRESENCE_KEY),
            prepare=True,
        ).fetchone()
        return max(1, int(row[0]) if row else 1)

    def take_epoch(self, conn: psycopg.Connection[Any], shard: int, owner: str) -> int:
        row = self._run(conn, "take_epoch", {"shard": shard, "owner": owner}).fetchone()
        assert row is not None
        return int(row[0])

    def backend_pid(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])

    # -- wake-up flag
    def set_idle(self, conn: psycopg.Connection[Any], shards: Sequence[int], idle: bool) -> None:
        if shards:
            self._run(conn, "set_idle", {"shards": list(shards), "idle": idle})

    def notify(self, conn: psycopg.Connection[Any], channel: str, payload: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    # -- drain
    def blocked_keys(
        self, conn: psycopg.Connection[Any], shards: Sequence[int], strict: bool
    ) -> list[str]:
        rows = self._run(conn, "blocked_keys", {"shards": list(shards), "strict": strict})
        return [str(r[0]) for r in rows.fetchall()]

    def fetch(
        self,
        conn: psycopg.Connection[Any],
        shards: Sequence[int],
        blocked: Sequence[str],
        limit: int,
    ) -> list[OutboxRow]:
        cur = self._run(
            conn, "fetch", {"shards": list(shards), "blocked": list(blocked), "limit": limit}
        )
        return [OutboxRow(*r) for r in cur.fetchall()]

    def mark_sent(
        self, conn: psycopg.Connection[Any], ids: Sequence[int], epochs: dict[int, int]
    ) -> int:
        """Mark ``ids`` sent where the shard's epoch is still ours; returns rows changed."""
        if not ids:
            return 0
        cur = self._run(conn, "mark_sent", {"ids": list(ids), **_lease_params(epochs)})
        return int(cur.rowcount)

    def mark_failed(
        self,
        conn: psycopg.Connection[Any],
        failures: Sequence[Failure],
        epochs: dict[int, int],
        max_attempts: int,
    ) -> list[int]:
        """Record failed attempts; returns the ids that just became dead letters."""
        if not failures:
            return []
        params = {
            "ids": [f.id for f in failures],
            "errors": [f.error[:2000] for f in failures],
            "delays": [f.delay for f in failures],
            "max_attempts": max_attempts,
            **_lease_params(epochs),
        }
        return [int(r[0]) for r in self._run(conn, "mark_failed", params).fetchall() if r[1]]

    def mark_deferred(
        self, conn: psycopg.Connection[Any], failures: Sequence[Failure], epochs: dict[int, int]
    ) -> None:
        """Push rows back by ``delay`` without counting an attempt."""
        if failures:
            params = {
                "ids": [f.id for f in failures],
                "errors": [f.error[:2000] for f in failures],
                "delays": [f.delay for f in failures],
                **_lease_params(epochs),
            }
            self._run(conn, "mark_deferred", params)

    # -- operator commands
    def dead_letters(
        self, conn: psycopg.Connection[Any], topic: str | None, limit: int
    ) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self._q["dead_letters"], {"topic": topic, "limit": limit})
            return cur.fetchall()

    def retry_dead(
        self, conn: psycopg.Connection[Any], ids: Sequence[int] | None, topic: str | None
    ) -> list[int]:
        cur = self._run(conn, "retry_dead", {"ids": list(ids) if ids else None, "topic": topic})
        return [int(r[0]) for r in cur.fetchall()]

    def status(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self._q["pending_by_topic"])
            topics = cur.fetchall()
            cur.execute(self._q["pending_by_shard"])
            shards = cur.fetchall()
            cur.execute(self._q["counts"])
            counts = cur.fetchone() or {}
            cur.execute(self._q["owners"], {"ns": self.namespace})
            owners = cur.fetchall()
        return {"topics": topics, "shards": shards, "owners": owners, **counts}


def _lease_params(epochs: dict[int, int]) -> dict[str, list[int]]:
    return {"lease_shards": list(epochs), "epochs": list(epochs.values())}
