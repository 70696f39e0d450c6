"""outbox-relay: a transactional outbox for Python services on PostgreSQL.

Write the outbox row in the same transaction as your business rows::

    from outbox_relay import enqueue

    with Session(engine) as session, session.begin():
        session.add(Order(id=42, total=99))
        enqueue(session, "orders", {"order_id": 42}, key="customer-7")

and run ``outbox-relay run`` to publish committed rows to Kafka.
"""

from .enqueue import (
    Enqueued,
    Message,
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
)
from .errors import (
    ConfigError,
    DatabaseUnavailable,
    InvalidMessage,
    OutboxError,
    OutboxTableMissing,
    PayloadTooLarge,
    WrongSessionType,
)
from .inbox import InboxMessage, SequenceGap, process_once, process_once_async
from .schema import build_tables
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "Enqueued",
    "InvalidMessage",
    "Message",
    "OutboxError",
    "OutboxTableMissing",
    "PayloadTooLarge",
    "Settings",
    "WrongSessionType",
    "__version__",
    "build_tables",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "include_outbox_objects",
]
__all__ += ["InboxMessage", "SequenceGap", "process_once", "process_once_async"]


def include_outbox_objects(name: str | None, type_: str, parent_names: object) -> bool:
    """An alembic ``include_name`` hook that hides the outbox tables from a host's autogenerate.

    Use in the host's ``env.py``: ``context.configure(..., include_name=include_outbox_objects)``.
    Honors ``OUTBOX_SCHEMA``/``OUTBOX_TABLE``.
    """
    if type_ != "table" or name is None:
        return True
    from .settings import producer_settings

    s = producer_settings()
    names = {*build_tables(s.db_schema, s.table).names, "outbox_relay_version"}
    schema = parent_names.get("schema_name") if isinstance(parent_names, dict) else None
    return not (name in names and (schema is None or schema == s.db_schema))
