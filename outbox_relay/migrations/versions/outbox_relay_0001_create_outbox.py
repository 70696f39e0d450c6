"""Create the outbox table, its shard/wakeup/meta companions and the idle-only NOTIFY trigger.

Revision ID: outbox_relay_0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

from outbox_relay.migrations import options
from outbox_relay.schema import build_tables, create_statements, drop_statements

revision = "outbox_relay_0001"
down_revision = None
branch_labels = ("outbox_relay",)
depends_on = None


def upgrade() -> None:
    o = options()
    tables = build_tables(o.schema, o.table, o.shards, version=1)
    for statement in create_statements(tables, o.channel, o.shards):
        op.execute(statement)


def downgrade() -> None:
    o = options()
    for statement in drop_statements(build_tables(o.schema, o.table, o.shards, version=1)):
        op.execute(statement)
