"""Delivery counters per 10-second bucket, so sent rows can be deleted and still be counted.

Revision ID: outbox_relay_0003
Revises: outbox_relay_0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

from outbox_relay.migrations import options
from outbox_relay.schema import build_tables, sent_stats_statements, unsent_stats_statements

revision = "outbox_relay_0003"
down_revision = "outbox_relay_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    o = options()
    for statement in sent_stats_statements(build_tables(o.schema, o.table, o.shards, version=3)):
        op.execute(statement)


def downgrade() -> None:
    o = options()
    for statement in unsent_stats_statements(build_tables(o.schema, o.table, o.shards, version=3)):
        op.execute(statement)
