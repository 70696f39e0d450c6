"""The outbox tables as SQLAlchemy objects: the one source of truth for their DDL.

``outbox`` holds the messages. Three small companions sit beside it, named after it:

* ``<table>_shards``  -- one row per shard: the fencing epoch and the current owner;
* ``<table>_wakeup``  -- UNLOGGED, one row per shard: ``idle`` is true while the owning relay
  sleeps. The NOTIFY trigger fires only while some relay is idle, so a busy relay costs
  producers no NOTIFY (which serialises commits on a global lock);
* ``<table>_meta``    -- key/value facts fixed at creation: shard count, schema revision.
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

#: Revision identifier the migrations write into ``<table>_meta`` at head.
SCHEMA_REVISION = "0001"

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

    @property
    def schema(self) -> str:
        return self.outbox.schema or "public"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in (self.outbox, self.shards, self.wakeup, self.meta))

    @property
    def notify_function(self) -> str:
        return f"{self.outbox.name}_notify"

    def qualified(self, name: str) -> str:
        return f'"{self.schema}"."{name}"'


def build_tables(schema: str = "public", table: str = "outbox", shards: int = 16) -> OutboxTables:
    """Build fresh Table objects (own MetaData) for ``schema.table``."""
    md = MetaData(schema=schema)
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
    return OutboxTables(md, outbox, shard_table, wakeup, meta)


@lru_cache(maxsize=16)
def tables_for(schema: str, table: str) -> OutboxTables:
    """Cached tables for runtime use (the shard count only matters for DDL)."""
    return build_tables(schema, table)


def create_statements(tables: OutboxTables, channel: str, shards: int) -> list[str]:
    """Every DDL statement that creates the outbox at ``SCHEMA_REVISION``, in order."""
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
        f"('revision', '{SCHEMA_REVISION}'), ('channel', '{quoted_channel}')"
    )
    return stmts


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
