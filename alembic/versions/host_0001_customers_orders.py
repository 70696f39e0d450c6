"""The shop's tables: customers and orders.

Revision ID: host_0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "host_0001"
down_revision = None
branch_labels = ("shop",)
depends_on = None


def _schema() -> str:
    """Schema of the host's tables, set by env.py from ``-x host_schema=...``."""
    return str(context.config.attributes.get("host_schema", "public"))


def upgrade() -> None:
    schema = _schema()
    op.create_table(
        "customers",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_customers"),
        sa.UniqueConstraint("email", name="uq_customers_email"),
        schema=schema,
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("total_cents", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'placed'"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            [f"{schema}.customers.id"],
            name="fk_orders_customer_id_customers",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_orders"),
        schema=schema,
    )
    op.create_index("ix_orders_customer_id", "orders", ["customer_id"], schema=schema)


def downgrade() -> None:
    schema = _schema()
    op.drop_index("ix_orders_customer_id", table_name="orders", schema=schema)
    op.drop_table("orders", schema=schema)
    op.drop_table("customers", schema=schema)
