"""The host's own models, in a ``MetaData`` of their own (``Base.metadata``).

The tables carry no schema: the host's alembic environment puts them in the schema given by
``-x host_schema=...`` (default ``public``) through the connection's ``search_path``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, MetaData, Text, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from outbox_relay import Enqueued, enqueue

#: Deterministic constraint names, so migrations and autogenerate agree on them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    email: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="RESTRICT"), index=True
    )
    total_cents: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, server_default=text("'placed'"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    customer: Mapped[Customer] = relationship(back_populates="orders")


def place_order(session: Session, customer: Customer, total_cents: int) -> tuple[Order, Enqueued]:
    """Insert an order and its ``orders.placed`` message in ``session``'s transaction.

    The caller commits; the outbox row commits or rolls back with the order.
    """
    order = Order(customer=customer, total_cents=total_cents, status="placed")
    session.add(order)
    session.flush()  # assigns order.id
    sent = enqueue(
        session,
        "orders.placed",
        {"order_id": order.id, "customer_id": customer.id, "total_cents": total_cents},
        key=f"customer-{customer.id}",
        idempotency_key=f"order-placed-{order.id}",
        headers={"event-type": "orders.placed"},
    )
    return order, sent
