"""Create the consumer inbox: processed idempotency keys and per-key last sequence numbers.

Revision ID: outbox_relay_inbox_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

from outbox_relay.inbox import build_inbox_tables, create_statements, drop_statements
from outbox_relay.inbox_migrations import options

revision = "outbox_relay_inbox_0001"
down_revision = None
branch_labels = ("outbox_relay_inbox",)
depends_on = None


def upgrade() -> None:
    o = options()
    for statement in create_statements(build_inbox_tables(o.schema, o.table)):
        op.execute(statement)


def downgrade() -> None:
    o = options()
    for statement in drop_statements(build_inbox_tables(o.schema, o.table)):
        op.execute(statement)
