"""A tiny host application that adopts outbox-relay: customers place orders, and every order
writes an ``orders.placed`` message to the outbox in the same transaction.

The schema is managed by the host's own alembic environment in ``alembic/`` at the repository
root, which also runs the outbox branch shipped in the ``outbox_relay`` wheel.
"""

from .models import Base, Customer, Order, place_order

__all__ = ["Base", "Customer", "Order", "place_order"]
