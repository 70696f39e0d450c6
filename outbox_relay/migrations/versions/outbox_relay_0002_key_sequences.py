"""Per-key sequence numbers assigned at commit, in commit order (opt-in per topic).

Revision ID: outbox_relay_0002
Revises: outbox_relay_0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

from outbox_relay.migrations import options
from outbox_relay.schema import build_tables, sequence_statements, unsequence_statements

revision = "outbox_relay_0002"
down_revision = "outbox_relay_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    o = options()
    for statement in sequence_statements(build_tables(o.schema, o.table, o.shards, version=2)):
        op.execute(statement)


def downgrade() -> None:
    o = options()
    for statement in unsequence_statements(build_tables(o.schema, o.table, o.shards, version=2)):
        op.execute(statement)
