"""Every SQL statement the relay and the operator commands run, each one named.

The relay talks to Postgres with psycopg directly (no ORM on the hot path). Statements are
composed once per (schema, table) with properly quoted identifiers.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .errors import OutboxTableMissing, SchemaMismatch
from .schema_version import SCHEMA_REVISION, SENT_STATS_BUCKET

#: Second advisory-lock key of the shared "relay present" lock every relay holds.
PRESENCE_KEY = 1_000_000
#: Second advisory-lock key of the retention lock: one retention run at a time per outbox.
RETENTION_KEY = 1_000_001
#: Header a replay adds to the rows it re-queues (value: when and by whom).
REPLAY_HEADER = "outbox-replay"
#: Header a discard adds to the dead letter it keeps as its audit record (JSON: at, by, reason).
DISCARD_HEADER = "outbox-discarded"


class OutboxRow(NamedTuple):
    """A pending row as the relay reads it: a named tuple, made by psycopg straight from the
    result row (no Python code per row; a frozen dataclass was ~5x slower to build, and that
    counts at tens of thousands of rows a second)."""

    id: int
    idempotency_key: str
    topic: str
    key: str | None
    payload: bytes
    content_type: str
    #: the row's own headers as JSON text, None when it has none (most rows): see ``headers``
    headers_json: str | None
    shard: int
    attempts: int
    #: when the row was written, Unix seconds (a float decodes ~15x faster than a datetime)
    created_at: float
    #: per-key sequence in commit order (topics in OUTBOX_SEQUENCE_TOPICS), else None
    seq: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The row's own headers (parsed on each access: the sinks read them once)."""
        return {} if self.headers_json is None else dict(json.loads(self.headers_json))


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
        stats = ident(f"{table}_sent_stats")
        self._q: dict[str, sql.Composed] = {}

        def q(name: str, text: str, **extra: Any) -> None:
            self._q[name] = sql.SQL(text).format(
                t=t, shards=shards, wakeup=wakeup, meta=meta, stats=stats, **extra
            )

        # headers as JSON text, NULL when empty (most rows): the sinks parse only the others
        cols = (
            "o.id, o.idempotency_key, o.topic, o.key, o.payload, o.content_type,"
            " NULLIF(o.headers, '{{}}'::jsonb)::text, o.shard, o.attempts,"
            " date_part('epoch', o.created_at), o.seq"
        )
        q("meta", "SELECT name, value FROM {meta}")
        q(
            "running_xids",
            "SELECT CASE WHEN backend_xid IS NOT NULL THEN backend_xid::text::bigint"
            "  ELSE -(pid::bigint * 4294967296 + backend_xmin::text::bigint) END, pid"
            " FROM pg_stat_activity WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)"
            " AND pid <> pg_backend_pid() AND datname = current_database()"
            " UNION ALL SELECT transaction::text::bigint, 0 FROM pg_prepared_xacts",
        )
        # Rows in retry state (a failed or deferred attempt, a re-queued dead letter, or in
        # strict mode a dead letter) of the owned shards: their shards are read from the start
        # (no cursor), and `blocked` keys must wait (backoff not over, or strict and dead).
        # The inner query states exactly held_idx's predicate and nothing more (OFFSET 0 keeps
        # the outer filter out of it): with `dead_at IS NULL` in it, pending_idx would serve
        # too, and on a table without statistics (a burst not yet analyzed) the planner took
        # it and filtered every pending row (~0.2 s per 100,000 rows, each round).
        q(
            "held",
            "SELECT DISTINCT shard, key, (dead_at IS NULL AND next_attempt_at > now())"
            "   OR (%(strict)s AND dead_at IS NOT NULL) AS blocked"
            " FROM (SELECT shard, key, dead_at, next_attempt_at FROM {t}"
            "   WHERE shard = ANY(%(shards)s) AND sent_at IS NULL"
            "   AND (next_attempt_at IS NOT NULL OR dead_at IS NOT NULL) OFFSET 0) AS h"
            " WHERE dead_at IS NULL OR %(strict)s",
        )
        # One round trip, up to `limit` pending rows per owned shard, each in id order, each
        # shard from just past its cursor (`after`; 0 reads the shard from its first row).
        # The rows come shard by shard; the caller puts them in id order (sorting ~4 MB of rows
        # in the statement spilled to disk beyond work_mem).
        # The shard is bounded by row comparisons, never `p.shard = s.shard`: only pending_idx
        # (shard, id) can then give the order and the bounds. With an equality the planner may
        # walk the primary key in id order instead, filtering out the other shards' rows and
        # stepping over every deleted row (~15x slower on a drained backlog).
        # `fetch_past`: the same, leaving out the rows of a batch still being published (read
        # ahead while the sink waits for its acknowledgements; those rows are not marked yet)
        past = " AND p.id NOT IN (SELECT unnest(%(skip)s::bigint[]))"
        for name, skip in (("fetch", ""), ("fetch_past", past)):
            q(
                name,
                "SELECT " + cols + " FROM unnest(%(shards)s::smallint[], %(after)s::bigint[],"
                " %(limits)s::int[]) AS s(shard, after, lim)"
                " CROSS JOIN LATERAL (SELECT * FROM {t} p"
                "   WHERE (p.shard, p.id) > (s.shard, s.after)"
                "   AND (p.shard, p.id) < (s.shard, 9223372036854775807) AND p.sent_at IS NULL"
                "   AND p.dead_at IS NULL"
                "   AND (p.next_attempt_at IS NULL OR p.next_attempt_at <= now())"
                "   AND (p.key IS NULL OR p.key <> ALL(%(blocked)s::text[]))"
                + skip
                + "   ORDER BY p.shard, p.id LIMIT s.lim) AS o",
            )
        # The lowest pending sequence number of each given (topic, key): a key's sequenced rows
        # are published only in a contiguous run starting there.
        q(
            "lowest_pending_seq",
            "SELECT k.topic, k.key, (SELECT min(o.seq) FROM {t} o WHERE o.topic = k.topic"
            "   AND o.key = k.key AND o.sent_at IS NULL AND o.dead_at IS NULL AND o.seq > 0)"
            " FROM unnest(%(topics)s::text[], %(keys)s::text[]) AS k(topic, key)",
        )
        # Fenced: only rows of shards whose epoch is still ours. FOR SHARE waits for a concurrent
        # takeover (which updates the epoch row) and then sees the new epoch. The lease is
        # evaluated once, as one array (a MATERIALIZED CTE): as a plain join it sat on the inner
        # side of a nested loop and re-locked the shard rows for every marked row (~4x slower).
        lease = (
            "WITH ok AS MATERIALIZED (SELECT coalesce(array_agg(v.shard), '{{}}') AS shards"
            " FROM (SELECT sh.shard FROM {shards} sh"
            " JOIN unnest(%(lease_shards)s::smallint[], %(epochs)s::bigint[]) AS l(shard, epoch)"
            " ON sh.shard = l.shard AND sh.epoch = l.epoch FOR SHARE OF sh) AS v) "
        )
        # Delivered rows are deleted (or, keeping sent rows, get sent_at) and counted in the
        # current 10-second bucket of the delivery counters, in one statement.
        count_sent = (
            " INSERT INTO {stats} AS st (bucket, sent, first_at, last_at)"
            " SELECT to_timestamp(floor(extract(epoch FROM now()) / {bucket}) * {bucket}),"
            "   count(*), now(), now() FROM done HAVING count(*) > 0"
            " ON CONFLICT (bucket) DO UPDATE SET sent = st.sent + excluded.sent,"
            "   last_at = greatest(st.last_at, excluded.last_at)"
            " RETURNING (SELECT count(*) FROM done)"
        )
        # `created_max` (only for ids a sink recovered, else infinity): no row written after
        # the sink's record of what it delivered is one of those rows, whatever its id
        q(
            "mark_sent",
            lease + ", done AS (UPDATE {t} o SET sent_at = now() FROM ok"
            " WHERE o.id = ANY(%(ids)s::bigint[]) AND o.shard = ANY(ok.shards)"
            " AND o.created_at <= to_timestamp(%(created_max)s::float8)"
            " AND o.sent_at IS NULL RETURNING 1)" + count_sent,
            bucket=sql.Literal(SENT_STATS_BUCKET),
        )
        q(
            "delete_sent",
            lease + ", done AS (DELETE FROM {t} o USING ok"
            " WHERE o.id = ANY(%(ids)s::bigint[]) AND o.shard = ANY(ok.shards)"
            " AND o.created_at <= to_timestamp(%(created_max)s::float8)"
            " AND o.sent_at IS NULL RETURNING 1)" + count_sent,
            bucket=sql.Literal(SENT_STATS_BUCKET),
        )
        q(
            "mark_failed",
            lease + "UPDATE {t} o SET attempts = o.attempts + 1, last_error = f.error,"
            " next_attempt_at = now() + f.delay * interval '1 second',"
            " dead_at = CASE WHEN o.attempts + 1 >= %(max_attempts)s THEN now() END"
            " FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays)s::float8[])"
            "   AS f(id, error, delay), ok"
            " WHERE o.id = f.id AND o.shard = ANY(ok.shards) AND o.sent_at IS NULL"
            " RETURNING o.id, o.dead_at IS NOT NULL AS dead",
        )
        # Held back by the sink on purpose (e.g. webhook endpoint answered 410 Gone): wait, but
        # do not count an attempt, so the row stays pending instead of becoming a dead letter.
        q(
            "mark_deferred",
            lease + "UPDATE {t} o SET last_error = f.error,"
            " next_attempt_at = now() + f.delay * interval '1 second'"
            " FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays)s::float8[])"
            "   AS f(id, error, delay), ok"
            " WHERE o.id = f.id AND o.shard = ANY(ok.shards) AND o.sent_at IS NULL",
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
            "UPDATE {t} SET dead_at = NULL, attempts = 0, next_attempt_at = now()"
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
            " (SELECT coalesce(sum(sent), 0) FROM {stats}"
            "   WHERE bucket > now() - interval '1 minute') AS sent_last_minute,"
            " (SELECT max(last_at) FROM {stats}) AS last_sent_at,"
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

        # ------------------------------------------------------------ operations (ops)
        # Gauges of the relay: its owned shards only, so the sum over relays is the whole outbox.
        # Both walk a small partial index (pending_idx, dead_idx), never the table.
        q(
            "pending_gauge",
            "SELECT topic, count(*) AS pending,"
            " extract(epoch FROM now() - min(created_at))::float8 AS oldest_s FROM {t}"
            " WHERE shard = ANY(%(shards)s::smallint[]) AND sent_at IS NULL AND dead_at IS NULL"
            " GROUP BY topic",
        )
        q(
            "dead_gauge",
            "SELECT topic, count(*) AS dead FROM {t} WHERE dead_at IS NOT NULL AND sent_at IS NULL"
            " AND shard = ANY(%(shards)s::smallint[]) GROUP BY topic",
        )
        q(
            "dead_by_topic",
            "SELECT topic, count(*) AS dead FROM {t} WHERE dead_at IS NOT NULL AND sent_at IS NULL"
            " GROUP BY topic ORDER BY topic",
        )
        # A discarded dead letter keeps dead_at and gets sent_at (= when it was discarded): out
        # of the queue, out of the dead letters, never deleted by retention (its audit record).
        q(
            "discarded_count",
            "SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL AND sent_at IS NOT NULL",
        )
        q("db_now", "SELECT now()")
        q(
            "idle_shards",
            "SELECT count(*) FILTER (WHERE idle) AS idle, count(*) AS rows FROM {wakeup}",
        )
        # Relays present (the shared presence lock), with their connection's address, shard
        # count, and wake-up mode (a relay in notify mode has a LISTEN connection by name).
        q(
            "relays",
            "SELECT substr(a.application_name, 20) AS name, a.pid AS backend_pid,"
            " host(a.client_addr) AS client_addr, a.client_port, a.backend_start,"
            " (SELECT count(*) FROM pg_locks s WHERE s.pid = l.pid AND s.locktype = 'advisory'"
            "   AND s.classid = %(ns)s::oid AND s.objsubid = 2 AND s.granted"
            "   AND s.objid < %(presence)s::oid) AS shards,"
            " CASE WHEN EXISTS (SELECT 1 FROM pg_stat_activity x"
            "   WHERE x.datname = current_database()"
            "   AND x.application_name = 'outbox-relay listen ' || substr(a.application_name, 20))"
            "   THEN 'notify' ELSE 'poll' END AS listener"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.classid = %(ns)s::oid"
            "   AND l.objid = %(presence)s::oid AND l.objsubid = 2 AND l.granted"
            "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " ORDER BY 1, 2",
        )
        q(
            "table_stats",
            "SELECT pg_total_relation_size(c.oid) AS total_bytes,"
            " pg_relation_size(c.oid) AS heap_bytes, pg_indexes_size(c.oid) AS index_bytes,"
            " CASE WHEN c.reltoastrelid = 0 THEN 0"
            "   ELSE pg_total_relation_size(c.reltoastrelid) END AS toast_bytes,"
            " s.n_live_tup AS live_tuples, s.n_dead_tup AS dead_tuples,"
            " s.last_vacuum, s.last_autovacuum, s.autovacuum_count, s.last_autoanalyze"
            " FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.oid = to_regclass(%(rel)s)",
        )
        q(
            "index_sizes",
            "SELECT i.relname AS name, pg_relation_size(i.oid) AS bytes, x.indisvalid AS valid"
            " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " WHERE x.indrelid = to_regclass(%(rel)s) ORDER BY i.relname",
        )
        # What exists, for the drift check against schema.py (kind, name, usable).
        q(
            "schema_objects",
            "SELECT 'table' AS kind, c.relname AS name, true AS ok FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[])"
            " AND c.relkind IN ('r', 'p')"
            " UNION ALL SELECT 'column', a.attname, true FROM pg_attribute a"
            " WHERE a.attrelid = to_regclass(%(rel)s) AND a.attnum > 0 AND NOT a.attisdropped"
            " UNION ALL SELECT 'index', i.relname, x.indisvalid AND x.indisready FROM pg_index x"
            " JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = to_regclass(%(rel)s)"
            " UNION ALL SELECT 'trigger', t.tgname, t.tgenabled <> 'D' FROM pg_trigger t"
            " WHERE t.tgrelid = to_regclass(%(rel)s) AND NOT t.tgisinternal",
        )
        # -- Postgres-health guard: what holds back the xmin horizon (vacuum of the outbox)
        q(
            "horizon_age",
            "SELECT coalesce(extract(epoch FROM now() - min(xact_start)), 0)::float8"
            " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND datname = current_database()"
            " AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)",
        )
        q(
            "xact_holders",
            "SELECT pid, usename, application_name, host(client_addr) AS client_addr, state,"
            " extract(epoch FROM now() - xact_start)::float8 AS xact_age_s,"
            " age(backend_xmin) AS xmin_age FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND datname = current_database()"
            " AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)"
            " AND xact_start < now() - %(age)s * interval '1 second'"
            " ORDER BY xact_start LIMIT 10",
        )
        q(
            "prepared_holders",
            "SELECT gid, owner, extract(epoch FROM now() - prepared)::float8 AS age_s,"
            " age(transaction) AS xid_age FROM pg_prepared_xacts"
            " WHERE database = current_database()"
            " AND prepared < now() - %(age)s * interval '1 second' ORDER BY prepared LIMIT 10",
        )
        q(
            "slot_holders",
            "SELECT slot_name, slot_type, database, active, active_pid, age(xmin) AS xmin_age"
            " FROM pg_replication_slots WHERE xmin IS NOT NULL"
            " AND (NOT active OR age(xmin) > %(max_age)s) ORDER BY age(xmin) DESC LIMIT 10",
        )
        # -- retention: sent rows older than the cutoff, a window of ids at a time
        q("retention_cutoff", "SELECT now() - %(secs)s * interval '1 second'")
        q(
            "prune_sent_stats",
            "DELETE FROM {stats} WHERE bucket < now() - %(secs)s * interval '1 second'",
        )
        # when the relay last recorded deliveries (the delivery counters), for benchmarks/tests
        q("sent_span", "SELECT min(first_at), max(last_at), coalesce(sum(sent), 0) FROM {stats}")
        q(
            "retention_count",
            "SELECT count(*) AS rows, min(id) AS first_id, max(id) AS last_id FROM {t}"
            " WHERE sent_at < %(cutoff)s AND dead_at IS NULL",
        )
        # The next `limit` rows by id (any state) form the window; of those, sent rows older than
        # the cutoff are deleted. One short transaction, at most `limit` rows locked; the primary
        # key walk never rescans what earlier windows passed. Dead letters (and discarded ones,
        # which keep dead_at) are never deleted.
        q(
            "retention_window",
            "WITH win AS MATERIALIZED (SELECT id, sent_at, dead_at, created_at FROM {t}"
            "   WHERE id > %(after)s ORDER BY id LIMIT %(limit)s),"
            " gone AS (DELETE FROM {t} o USING win WHERE o.id = win.id"
            "   AND win.sent_at < %(cutoff)s AND win.dead_at IS NULL"
            "   AND o.sent_at < %(cutoff)s AND o.dead_at IS NULL RETURNING o.id)"
            " SELECT (SELECT count(*) FROM gone) AS deleted,"
            " (SELECT count(*) FROM win) AS scanned, (SELECT max(id) FROM win) AS last_id,"
            " (SELECT min(created_at) FROM win) AS first_created,"
            " (SELECT min(id) FROM gone) AS min_deleted, (SELECT max(id) FROM gone) AS max_deleted",
        )
        q(
            "retention_lock_holder",
            "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a"
            " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.classid = %(ns)s::oid"
            " AND l.objid = %(key)s::oid AND l.objsubid = 2 AND l.granted"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        # -- replay: sent rows of a topic, chosen by ids or created_at range, made pending again
        q(
            "replay_count",
            "SELECT count(*) FILTER (WHERE sent_at IS NOT NULL AND dead_at IS NULL) AS sent,"
            " count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL) AS pending,"
            " count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,"
            " min(id) FILTER (WHERE sent_at IS NOT NULL AND dead_at IS NULL) AS first_id,"
            " max(id) FILTER (WHERE sent_at IS NOT NULL AND dead_at IS NULL) AS last_id"
            " FROM {t} WHERE topic = %(topic)s"
            " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
            " AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)",
        )
        q(
            "replay_mark",
            "WITH sel AS MATERIALIZED (SELECT id FROM {t}"
            "   WHERE id > %(after)s AND id <= %(last)s AND topic = %(topic)s"
            "   AND sent_at IS NOT NULL AND dead_at IS NULL"
            "   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
            "   AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
            "   AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)"
            "   ORDER BY id LIMIT %(limit)s),"
            " upd AS (UPDATE {t} o SET sent_at = NULL, attempts = 0, next_attempt_at = now(),"
            "   last_error = NULL,"
            "   headers = o.headers || jsonb_build_object(%(header)s::text, %(marker)s::text)"
            "   FROM sel WHERE o.id = sel.id AND o.sent_at IS NOT NULL AND o.dead_at IS NULL"
            "   RETURNING o.id)"
            " SELECT (SELECT count(*) FROM upd) AS marked, (SELECT count(*) FROM sel) AS selected,"
            " (SELECT max(id) FROM sel) AS last_id",
        )
        # -- dead letters: count, discard (kept as the audit record), restore, show
        q(
            "dead_count",
            "SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL AND sent_at IS NULL"
            " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
            " AND (%(topic)s::text IS NULL OR topic = %(topic)s)",
        )
        q(
            "discard_dead",
            "WITH sel AS MATERIALIZED (SELECT id FROM {t}"
            "   WHERE id > %(after)s AND dead_at IS NOT NULL AND sent_at IS NULL"
            "   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
            "   AND (%(topic)s::text IS NULL OR topic = %(topic)s) ORDER BY id LIMIT %(limit)s),"
            " upd AS (UPDATE {t} o SET sent_at = now(), headers = o.headers || jsonb_build_object("
            "   %(header)s::text, jsonb_build_object('at', now(), 'by', %(actor)s::text,"
            "   'reason', %(reason)s::text)::text)"
            "   FROM sel WHERE o.id = sel.id AND o.dead_at IS NOT NULL AND o.sent_at IS NULL"
            "   RETURNING o.id)"
            " SELECT coalesce((SELECT array_agg(id ORDER BY id) FROM upd), '{{}}') AS ids,"
            " (SELECT count(*) FROM sel) AS selected, (SELECT max(id) FROM sel) AS last_id",
        )
        q(
            "restore_discarded",
            "UPDATE {t} SET sent_at = NULL, headers = headers - %(header)s::text"
            " WHERE dead_at IS NOT NULL AND sent_at IS NOT NULL"
            " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
            " AND (%(topic)s::text IS NULL OR topic = %(topic)s) RETURNING id",
        )
        q(
            "discarded",
            "SELECT id, idempotency_key, topic, key, attempts, last_error, created_at, dead_at,"
            " sent_at AS discarded_at, headers ->> %(header)s AS discard FROM {t}"
            " WHERE dead_at IS NOT NULL AND sent_at IS NOT NULL"
            " AND (%(topic)s::text IS NULL OR topic = %(topic)s) ORDER BY id LIMIT %(limit)s",
        )
        q(
            "show_row",
            "SELECT id, idempotency_key, topic, key, content_type, headers, shard, created_at,"
            " attempts, next_attempt_at, last_error, sent_at, dead_at,"
            " length(payload) AS payload_bytes, payload FROM {t} WHERE id = %(id)s",
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

    def tune_session(self, conn: psycopg.Connection[Any]) -> None:
        """Settings of the relay's working sessions (fetch, mark).

        * Plan prepared statements at each execution, for the table as it is then. An outbox
          swings between empty and a burst of rows. Left to itself, Postgres settles on one
          generic plan per statement after five runs; made while the table was empty (right
          after a vacuum truncated it) that plan reads the whole table, and it stays until the
          next ANALYZE. Measured on a 100,000-row burst landing on an idle relay: a fetch took
          ~0.8 s instead of ~25 ms, a mark ~2 s instead of ~20 ms.
        * No JIT compilation. The fetch's per-shard LIMIT is a parameter, so the planner
          assumes a tenth of the table and its estimated cost grows with the backlog; past
          ``jit_above_cost`` every fetch was compiled. Measured on a 1M-row backlog: ~330 ms
          of compilation for ~15 ms of execution, and the drain at a third of its rate."""
        conn.execute(
            "SELECT set_config('plan_cache_mode', 'force_custom_plan', false),"
            " set_config('jit', 'off', false)"
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
    def running_xids(self, conn: psycopg.Connection[Any]) -> dict[int, int]:
        """Transactions that may still commit outbox rows: sessions holding a transaction id
        (``backend_xid``), sessions running a statement without one yet (``backend_xmin``: a
        statement holds a snapshot, and an INSERT takes its outbox id before its transaction
        id; named by pid and xmin, as negative numbers), and prepared transactions (pid 0).
        Both columns are shown to every role, unlike ``state``. Returns each one's pid."""
        rows = self._run(conn, "running_xids", {}).fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    def held(
        self,
        conn: psycopg.Connection[Any],
        shards: Sequence[int],
        strict: bool,
        *,
        list_running: bool,
    ) -> tuple[set[int], list[str], dict[int, int]]:
        """Shards with rows in retry state (to be read from their start), the keys that must
        wait (backoff not over, or dead under strict order), and, with ``list_running`` (fetch
        cursors on), the transactions running and their pids, listed first in the same round
        trip (:meth:`running_xids`)."""
        params = {"shards": list(shards), "strict": strict}
        if not list_running:
            rows = self._run(conn, "held", params).fetchall()
            running_rows: list[Any] = []
        else:
            with conn.pipeline():
                running = self._run(conn, "running_xids", {})
                held = self._run(conn, "held", params)
            rows = held.fetchall()
            running_rows = running.fetchall()
        return (
            {int(r[0]) for r in rows},
            sorted({str(r[1]) for r in rows if r[2] and r[1]}),
            {int(r[0]): int(r[1]) for r in running_rows},
        )

    def fetch(
        self,
        conn: psycopg.Connection[Any],
        shards: Sequence[int],
        blocked: Sequence[str],
        limit: int | Sequence[int],
        after: Sequence[int] | None = None,
        skip: Sequence[int] = (),
    ) -> list[OutboxRow]:
        """Up to ``limit`` pending rows per shard (one number for all, or one per shard), in
        id order, each shard past ``after``, none of the ids in ``skip``."""
        params: dict[str, Any] = {
            "shards": list(shards),
            "after": list(after) if after is not None else [0] * len(shards),
            "blocked": list(blocked),
            "limits": [limit] * len(shards) if isinstance(limit, int) else list(limit),
        }
        if skip:
            params["skip"] = id_array(skip)
        # binary: payloads arrive as raw bytes instead of hex text (half the bytes, no decoding)
        cur = conn.cursor(binary=True, row_factory=_outbox_rows)
        cur.execute(self._q["fetch_past" if skip else "fetch"], params, prepare=True)
        rows = cur.fetchall()
        rows.sort(key=_first)  # id order across the shards
        return rows

    def lowest_pending_seq(
        self, conn: psycopg.Connection[Any], keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        params = {"topics": [k[0] for k in keys], "keys": [k[1] for k in keys]}
        rows = self._run(conn, "lowest_pending_seq", params).fetchall()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows if r[2] is not None}

    def mark_sent(
        self,
        conn: psycopg.Connection[Any],
        ids: Sequence[int],
        epochs: dict[int, int],
        *,
        keep: bool,
        created_max: float | None = None,
    ) -> int:
        """Record the delivery of ``ids`` where the shard's epoch is still ours: delete the
        rows, or with ``keep`` set their ``sent_at``; count them. Returns rows recorded.
        ``created_max``: only rows written no later than this (Unix seconds)."""
        if not ids:
            return 0
        name = "mark_sent" if keep else "delete_sent"
        # a millisecond of slack: the bound went through a float; a row left out is only
        # published again, a row wrongly marked would be lost
        bound = math.inf if created_max is None else created_max + 0.001
        params = {"ids": id_array(ids), "created_max": bound, **_lease_params(epochs)}
        row = self._run(conn, name, params).fetchone()
        return int(row[0]) if row else 0

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

    # -- operations: gauges, status, drift, health guard (all read-only)
    def _dicts(
        self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self._q[name], params or {}, prepare=True)
            return cur.fetchall()

    @property
    def relation(self) -> str:
        """The outbox table's quoted, qualified name (for ``to_regclass``)."""
        return sql.Identifier(self.schema, self.table).as_string(None)

    def read_meta(self, conn: psycopg.Connection[Any]) -> dict[str, str]:
        """Meta facts of the outbox, whatever its revision; raise if the table is missing."""
        try:
            rows = self._run(conn, "meta", {}).fetchall()
        except psycopg.errors.UndefinedTable:
            if not conn.autocommit:
                conn.rollback()
            raise OutboxTableMissing(
                f"outbox table {self.schema}.{self.table} does not exist: "
                "run `outbox-relay migrate`"
            ) from None
        return {str(r[0]): str(r[1]) for r in rows}

    def pending_gauge(
        self, conn: psycopg.Connection[Any], shards: Sequence[int]
    ) -> list[dict[str, Any]]:
        return self._dicts(conn, "pending_gauge", {"shards": list(shards)})

    def dead_gauge(
        self, conn: psycopg.Connection[Any], shards: Sequence[int]
    ) -> list[dict[str, Any]]:
        return self._dicts(conn, "dead_gauge", {"shards": list(shards)})

    def relays(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        return self._dicts(conn, "relays", {"ns": self.namespace, "presence": PRESENCE_KEY})

    def table_stats(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        rows = self._dicts(conn, "table_stats", {"rel": self.relation})
        stats = rows[0] if rows else {}
        stats["indexes"] = self._dicts(conn, "index_sizes", {"rel": self.relation})
        return stats

    def schema_objects(
        self, conn: psycopg.Connection[Any], tables: Sequence[str]
    ) -> list[tuple[str, str, bool]]:
        params = {"schema": self.schema, "tables": list(tables), "rel": self.relation}
        rows = self._run(conn, "schema_objects", params).fetchall()
        return [(str(r[0]), str(r[1]), bool(r[2])) for r in rows]

    def ops_status(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """What ``status`` shows beyond :meth:`status`: relays, sizes, dead letters by topic."""
        discarded = self._run(conn, "discarded_count", {}).fetchone()
        idle = self._dicts(conn, "idle_shards")
        now = self._run(conn, "db_now", {}).fetchone()
        return {
            "db_time": now[0] if now else None,
            "relays": self.relays(conn),
            "dead_by_topic": self._dicts(conn, "dead_by_topic"),
            "discarded": int(discarded[0]) if discarded else 0,
            "idle_shards": int(idle[0]["idle"]) if idle else 0,
            "table": self.table_stats(conn),
        }

    def horizon_age(self, conn: psycopg.Connection[Any]) -> float:
        row = self._run(conn, "horizon_age", {}).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    def xact_holders(self, conn: psycopg.Connection[Any], age: float) -> list[dict[str, Any]]:
        return self._dicts(conn, "xact_holders", {"age": age})

    def prepared_holders(self, conn: psycopg.Connection[Any], age: float) -> list[dict[str, Any]]:
        return self._dicts(conn, "prepared_holders", {"age": age})

    def slot_holders(self, conn: psycopg.Connection[Any], max_age: int) -> list[dict[str, Any]]:
        return self._dicts(conn, "slot_holders", {"max_age": max_age})

    # -- retention (autocommit: every statement is its own short transaction)
    def prune_sent_stats(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        self._run(conn, "prune_sent_stats", {"secs": seconds})

    def sent_span(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[dt.datetime | None, dt.datetime | None, int]:
        """First and last delivery recorded in the counters, and how many rows in all."""
        row = self._run(conn, "sent_span", {}).fetchone()
        assert row is not None
        return row[0], row[1], int(row[2])

    def retention_cutoff(self, conn: psycopg.Connection[Any], seconds: float) -> dt.datetime:
        row = self._run(conn, "retention_cutoff", {"secs": seconds}).fetchone()
        assert row is not None
        cutoff: dt.datetime = row[0]
        return cutoff

    def retention_count(self, conn: psycopg.Connection[Any], cutoff: dt.datetime) -> dict[str, Any]:
        return self._dicts(conn, "retention_count", {"cutoff": cutoff})[0]

    def retention_window(
        self, conn: psycopg.Connection[Any], cutoff: dt.datetime, after: int, limit: int
    ) -> dict[str, Any]:
        params = {"cutoff": cutoff, "after": after, "limit": limit}
        return self._dicts(conn, "retention_window", params)[0]

    def try_retention_lock(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (self.namespace, RETENTION_KEY)
        ).fetchone()
        return bool(row and row[0])

    def retention_unlock(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self.namespace, RETENTION_KEY))

    def retention_lock_holder(self, conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
        rows = self._dicts(
            conn, "retention_lock_holder", {"ns": self.namespace, "key": RETENTION_KEY}
        )
        return rows[0] if rows else None

    # -- replay
    def replay_count(
        self,
        conn: psycopg.Connection[Any],
        topic: str,
        ids: Sequence[int] | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
    ) -> dict[str, Any]:
        params = {"topic": topic, "ids": list(ids) if ids else None, "since": since, "until": until}
        return self._dicts(conn, "replay_count", params)[0]

    def replay_mark(
        self,
        conn: psycopg.Connection[Any],
        topic: str,
        ids: Sequence[int] | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        *,
        after: int,
        last: int,
        limit: int,
        marker: str,
    ) -> dict[str, Any]:
        """Make the next ``limit`` selected sent rows (ids in (after, last]) pending again."""
        params = {
            "topic": topic,
            "ids": list(ids) if ids else None,
            "since": since,
            "until": until,
            "after": after,
            "last": last,
            "limit": limit,
            "header": REPLAY_HEADER,
            "marker": marker,
        }
        return self._dicts(conn, "replay_mark", params)[0]

    # -- dead letters: discard / restore / show
    def dead_count(
        self, conn: psycopg.Connection[Any], ids: Sequence[int] | None, topic: str | None
    ) -> int:
        row = self._run(
            conn, "dead_count", {"ids": list(ids) if ids else None, "topic": topic}
        ).fetchone()
        return int(row[0]) if row else 0

    def discard_dead(
        self,
        conn: psycopg.Connection[Any],
        ids: Sequence[int] | None,
        topic: str | None,
        *,
        actor: str,
        reason: str | None,
        batch: int = 5000,
    ) -> list[int]:
        """Discard dead letters in batches of ``batch``; returns the discarded ids."""
        done: list[int] = []
        after = 0
        while True:
            params = {
                "ids": list(ids) if ids else None,
                "topic": topic,
                "after": after,
                "limit": batch,
                "header": DISCARD_HEADER,
                "actor": actor,
                "reason": reason,
            }
            row = self._dicts(conn, "discard_dead", params)[0]
            done.extend(int(i) for i in row["ids"])
            if row["selected"] < batch or row["last_id"] is None:
                return done
            after = int(row["last_id"])

    def restore_discarded(
        self, conn: psycopg.Connection[Any], ids: Sequence[int] | None, topic: str | None
    ) -> list[int]:
        params = {"ids": list(ids) if ids else None, "topic": topic, "header": DISCARD_HEADER}
        return [int(r[0]) for r in self._run(conn, "restore_discarded", params).fetchall()]

    def discarded(
        self, conn: psycopg.Connection[Any], topic: str | None, limit: int
    ) -> list[dict[str, Any]]:
        params = {"topic": topic, "limit": limit, "header": DISCARD_HEADER}
        return self._dicts(conn, "discarded", params)

    def show_row(self, conn: psycopg.Connection[Any], row_id: int) -> dict[str, Any] | None:
        rows = self._dicts(conn, "show_row", {"id": row_id})
        return rows[0] if rows else None


_first = operator.itemgetter(0)


def _outbox_rows(_cursor: Any) -> Any:
    """psycopg row factory: each result row of ``fetch`` as an :class:`OutboxRow`, by
    ``tuple.__new__`` itself (``OutboxRow._make`` adds a Python call per row: ~7% of the
    relay's CPU)."""
    return _make_outbox_row


_make_outbox_row = functools.partial(tuple.__new__, OutboxRow)


def id_array(ids: Sequence[int]) -> str:
    """``ids`` as one Postgres array literal, for a ``%s::bigint[]`` parameter: psycopg adapts
    a list element by element in Python (~1 µs each, per marked row), a join is ~10x cheaper."""
    return "{" + ",".join(map(str, ids)) + "}"


def _lease_params(epochs: dict[int, int]) -> dict[str, list[int]]:
    return {"lease_shards": list(epochs), "epochs": list(epochs.values())}
