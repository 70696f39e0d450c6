"""The outbox tables as SQLAlchemy objects: the one source of truth for their DDL.

``outbox`` holds the messages. Three small companions sit beside it, named after it:

* ``<table>_shards``  -- one row per shard: the fencing epoch and the current owner;
* ``<table>_wakeup``  -- UNLOGGED, one row per shard: ``idle`` is true while the owning relay
  sleeps. The NOTIFY trigger fires only while some relay is idle, so a busy relay costs
  producers no NOTIFY (which serialises commits on a global lock);
* ``<table>_meta``    -- key/value facts fixed at creation: shard count, schema revision;
* ``<table>_keyseq``  -- (version 2) per-(topic, key) sequence counters;
* ``<table>_sent_stats`` -- (version 3) rows delivered per 10-second bucket, with the first and
  last delivery time: what ``status`` reports, whether sent rows are kept or deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement

from .schema_version import LATEST, SCHEMA_REVISION, SENT_STATS_BUCKET  # noqa: F401  (re-exported)

#: Storage parameters of the outbox: room for in-page updates when rows are marked sent, and
#: autovacuum tuned for a table whose rows are all short-lived.
OUTBOX_STORAGE = {
    "fillfactor": "70",
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_cost_delay": "1",
}


def shard_expression(shards: int) -> str:
    """SQL of the generated ``shard`` column: a stable hash of the key, modulo ``shards``.

    Rows without a key spread by idempotency key (they carry no order).
    ``hashtextextended`` is the hash Postgres uses for hash partitioning; it is stable across
    versions and platforms.
    """
    return f"abs(mod(hashtextextended(coalesce(key, idempotency_key), 0), {int(shards)}))"


@dataclass(frozen=True)
class OutboxTables:
    """The outbox table and its companions for one (schema, table) pair."""

    metadata: MetaData
    outbox: Table
    shards: Table
    wakeup: Table
    meta: Table
    keyseq: Table | None = None
    sent_stats: Table | None = None

    @property
    def schema(self) -> str:
        return self.outbox.schema or "public"

    @property
    def names(self) -> tuple[str, ...]:
        tables = (self.outbox, self.shards, self.wakeup, self.meta, self.keyseq, self.sent_stats)
        return tuple(t.name for t in tables if t is not None)

    @property
    def notify_function(self) -> str:
        return f"{self.outbox.name}_notify"

    @property
    def sequence_function(self) -> str:
        return f"{self.outbox.name}_assign_seq"

    def qualified(self, name: str) -> str:
        return f'"{self.schema}"."{name}"'


def build_tables(
    schema: str = "public", table: str = "outbox", shards: int = 16, version: int = LATEST
) -> OutboxTables:
    """Build fresh Table objects (own MetaData) for ``schema.table`` as of schema ``version``.

    Revisions build the version they create (revision 0001 builds version 1), so an old
    revision keeps producing the same DDL after later versions add columns.
    """
    md = MetaData(schema=schema)
    later = [Column("seq", BigInteger, nullable=True)] if version >= 2 else []
    outbox = Table(
        table,
        md,
        Column("id", BigInteger, Identity(always=False), primary_key=True),
        Column("idempotency_key", Text, nullable=False, unique=True),
        Column("topic", Text, nullable=False),
        Column("key", Text, nullable=True),
        Column("payload", LargeBinary, nullable=False),
        Column("content_type", Text, nullable=False, server_default="application/octet-stream"),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("shard", SmallInteger, Computed(shard_expression(shards), persisted=True)),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("next_attempt_at", DateTime(timezone=True), nullable=True),
        Column("last_error", Text, nullable=True),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        Column("dead_at", DateTime(timezone=True), nullable=True),
        *later,
        postgresql_with=OUTBOX_STORAGE,
    )
    Index(
        f"{table}_pending_idx",
        outbox.c.shard,
        outbox.c.id,
        postgresql_where=text("sent_at IS NULL AND dead_at IS NULL"),
    )
    Index(
        f"{table}_held_idx",
        outbox.c.shard,
        outbox.c.key,
        postgresql_where=text(
            "sent_at IS NULL AND (next_attempt_at IS NOT NULL OR dead_at IS NOT NULL)"
        ),
    )
    Index(f"{table}_dead_idx", outbox.c.id, postgresql_where=text("dead_at IS NOT NULL"))
    shard_table = Table(
        f"{table}_shards",
        md,
        Column("shard", SmallInteger, primary_key=True, autoincrement=False),
        Column("epoch", BigInteger, nullable=False, server_default=text("0")),
        Column("owner", Text, nullable=True),
        Column("acquired_at", DateTime(timezone=True), nullable=True),
    )
    wakeup = Table(
        f"{table}_wakeup",
        md,
        Column("shard", SmallInteger, primary_key=True, autoincrement=False),
        Column("idle", Boolean, nullable=False, server_default=text("false")),
        prefixes=["UNLOGGED"],
    )
    meta = Table(
        f"{table}_meta",
        md,
        Column("name", Text, primary_key=True),
        Column("value", Text, nullable=False),
    )
    keyseq = None
    if version >= 2:
        # rows waiting for their sequence: only ever the rows of in-flight transactions
        Index(f"{table}_unsequenced_idx", outbox.c.id, postgresql_where=text("seq = 0"))
        Index(
            f"{table}_seq_pending_idx",
            outbox.c.topic,
            outbox.c.key,
            outbox.c.seq,
            postgresql_where=text("sent_at IS NULL AND dead_at IS NULL AND seq > 0"),
        )
        keyseq = Table(
            f"{table}_keyseq",
            md,
            Column("topic", Text, primary_key=True),
            Column("key", Text, primary_key=True),
            Column("last_seq", BigInteger, nullable=False),
        )
    sent_stats = None
    if version >= 3:
        sent_stats = Table(
            f"{table}_sent_stats",
            md,
            Column("bucket", DateTime(timezone=True), primary_key=True),
            Column("sent", BigInteger, nullable=False),
            Column("first_at", DateTime(timezone=True), nullable=False),
            Column("last_at", DateTime(timezone=True), nullable=False),
        )
    return OutboxTables(md, outbox, shard_table, wakeup, meta, keyseq, sent_stats)


@lru_cache(maxsize=16)
def tables_for(schema: str, table: str) -> OutboxTables:
    """Cached tables for runtime use (the shard count only matters for DDL)."""
    return build_tables(schema, table)


def create_statements(
    tables: OutboxTables, channel: str, shards: int, revision: str = "0001"
) -> list[str]:
    """Every DDL statement that creates the outbox as ``tables`` describe it, in order."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]

    def compile_ddl(element: DDLElement) -> str:
        return str(element.compile(dialect=dialect)).strip()

    stmts = [f'CREATE SCHEMA IF NOT EXISTS "{tables.schema}"']
    for t in (tables.outbox, tables.shards, tables.wakeup, tables.meta):
        stmts.append(compile_ddl(CreateTable(t)))
        stmts.extend(compile_ddl(CreateIndex(ix)) for ix in sorted(t.indexes, key=_ix_name))
    fn = tables.qualified(tables.notify_function)
    wake = tables.qualified(tables.wakeup.name)
    quoted_channel = channel.replace("'", "''")
    stmts.append(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        f"BEGIN\n"
        f"  IF EXISTS (SELECT 1 FROM {wake} WHERE idle) THEN\n"
        f"    PERFORM pg_notify('{quoted_channel}', '');\n"
        f"  END IF;\n"
        f"  RETURN NULL;\n"
        f"END\n$fn$"
    )
    stmts.append(
        f'CREATE TRIGGER "{tables.notify_function}" AFTER INSERT ON '
        f"{tables.qualified(tables.outbox.name)} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()"
    )
    stmts.append(
        f"INSERT INTO {tables.qualified(tables.shards.name)} (shard) "
        f"SELECT generate_series(0, {int(shards) - 1})"
    )
    stmts.append(
        f"INSERT INTO {tables.qualified(tables.wakeup.name)} (shard) "
        f"SELECT generate_series(0, {int(shards) - 1})"
    )
    meta = tables.qualified(tables.meta.name)
    stmts.append(
        f"INSERT INTO {meta} (name, value) VALUES ('shards', '{int(shards)}'), "
        f"('revision', '{revision}'), ('channel', '{quoted_channel}')"
    )
    return stmts


def sequence_statements(tables: OutboxTables) -> list[str]:
    """DDL of version 2: per-key sequence numbers assigned at commit, in commit order.

    ``enqueue`` writes ``seq = 0`` for topics that opted in. A deferred constraint trigger fires
    at commit; its first firing in a transaction numbers *all* of that transaction's ``seq = 0``
    rows, sorted by (topic, key, id), from one counter row per (topic, key). Counters are thus
    locked in a fixed order and only at the very end of the transaction, after every business
    lock it took: no deadlock with those locks, and a second transaction on the same key waits
    for the first to commit, so sequence order is commit order. The later firings find their row
    numbered and return.
    """
    assert tables.keyseq is not None
    q = tables.qualified
    t, ks, fn = q(tables.outbox.name), q(tables.keyseq.name), q(tables.sequence_function)
    return [
        f"ALTER TABLE {t} ADD COLUMN seq BIGINT",
        f'CREATE INDEX "{tables.outbox.name}_unsequenced_idx" ON {t} (id) WHERE seq = 0',
        f'CREATE INDEX "{tables.outbox.name}_seq_pending_idx" ON {t} (topic, key, seq)'
        " WHERE sent_at IS NULL AND dead_at IS NULL AND seq > 0",
        f"CREATE TABLE {ks} (topic TEXT NOT NULL, key TEXT NOT NULL, last_seq BIGINT NOT NULL,"
        f' CONSTRAINT "{tables.keyseq.name}_pkey" PRIMARY KEY (topic, key))',
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        f"DECLARE r record; n bigint;\n"
        f"BEGIN\n"
        f"  IF NOT EXISTS (SELECT 1 FROM {t} WHERE id = NEW.id AND seq = 0) THEN\n"
        f"    RETURN NULL;\n"
        f"  END IF;\n"
        f"  FOR r IN SELECT id, topic, key FROM {t} WHERE seq = 0\n"
        f"           ORDER BY topic, key, id LOOP\n"
        f"    INSERT INTO {ks} AS c (topic, key, last_seq) VALUES (r.topic, r.key, 1)\n"
        f"      ON CONFLICT (topic, key) DO UPDATE SET last_seq = c.last_seq + 1\n"
        f"      RETURNING last_seq INTO n;\n"
        f"    UPDATE {t} SET seq = n WHERE id = r.id;\n"
        f"  END LOOP;\n"
        f"  RETURN NULL;\n"
        f"END\n$fn$",
        f'CREATE CONSTRAINT TRIGGER "{tables.sequence_function}" AFTER INSERT ON {t}'
        f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.seq = 0)"
        f" EXECUTE FUNCTION {fn}()",
        f"UPDATE {q(tables.meta.name)} SET value = '0002' WHERE name = 'revision'",
    ]


def unsequence_statements(tables: OutboxTables) -> list[str]:
    """Undo :func:`sequence_statements`."""
    assert tables.keyseq is not None
    q = tables.qualified
    return [
        f'DROP TRIGGER IF EXISTS "{tables.sequence_function}" ON {q(tables.outbox.name)}',
        f"DROP FUNCTION IF EXISTS {q(tables.sequence_function)}()",
        f"DROP TABLE IF EXISTS {q(tables.keyseq.name)}",
        f"DROP INDEX IF EXISTS {q(tables.outbox.name + '_unsequenced_idx')}",
        f"ALTER TABLE {q(tables.outbox.name)} DROP COLUMN IF EXISTS seq",
        f"UPDATE {q(tables.meta.name)} SET value = '0001' WHERE name = 'revision'",
    ]


def sent_stats_statements(tables: OutboxTables) -> list[str]:
    """DDL of version 3: the delivery counters, one row per 10-second bucket."""
    assert tables.sent_stats is not None
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    create = str(CreateTable(tables.sent_stats).compile(dialect=dialect)).strip()
    return [
        create,
        f"UPDATE {tables.qualified(tables.meta.name)} SET value = '0003' WHERE name = 'revision'",
    ]


def unsent_stats_statements(tables: OutboxTables) -> list[str]:
    """Undo :func:`sent_stats_statements`."""
    assert tables.sent_stats is not None
    q = tables.qualified
    return [
        f"DROP TABLE IF EXISTS {q(tables.sent_stats.name)}",
        f"UPDATE {q(tables.meta.name)} SET value = '0002' WHERE name = 'revision'",
    ]


def drop_statements(tables: OutboxTables) -> list[str]:
    """DDL that removes everything ``create_statements`` made (not the schema itself)."""
    q = tables.qualified
    return [
        f'DROP TRIGGER IF EXISTS "{tables.notify_function}" ON {q(tables.outbox.name)}',
        f"DROP FUNCTION IF EXISTS {q(tables.notify_function)}()",
        *(f"DROP TABLE IF EXISTS {q(name)}" for name in reversed(tables.names)),
    ]


def _ix_name(ix: Index) -> str:
    return str(ix.name)
