"""outbox-relay: a transactional outbox for Python services on PostgreSQL.

Write the outbox row in the same transaction as your business rows::

    from outbox_relay import enqueue

    with Session(engine) as session, session.begin():
        session.add(Order(id=42, total=99))
        enqueue(session, "orders", {"order_id": 42}, key="customer-7")

and run ``outbox-relay run`` to publish committed rows to Kafka.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    DatabaseUnavailable,
    InvalidMessage,
    OutboxError,
    OutboxTableMissing,
    PayloadTooLarge,
    WrongSessionType,
)

if TYPE_CHECKING:
    from .enqueue import (
        Enqueued,
        Message,
        enqueue,
        enqueue_async,
        enqueue_many,
        enqueue_many_async,
    )
    from .inbox import InboxMessage, SequenceGap, process_once, process_once_async
    from .schema import build_tables
    from .settings import Settings

#: Imported on first use: the relay process never loads SQLAlchemy's ORM and asyncio layers
#: (half a second of its start-up) through ``import outbox_relay``.
_LAZY = {
    "Enqueued": "enqueue",
    "Message": "enqueue",
    "enqueue": "enqueue",
    "enqueue_async": "enqueue",
    "enqueue_many": "enqueue",
    "enqueue_many_async": "enqueue",
    "InboxMessage": "inbox",
    "SequenceGap": "inbox",
    "process_once": "inbox",
    "process_once_async": "inbox",
    "build_tables": "schema",
    "Settings": "settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = import_module(f".{module}", __name__)
    # bind every name of that module at once: importing the submodule ``enqueue`` set the
    # package's attribute ``enqueue`` to the module; the function must win
    for each, where in _LAZY.items():
        if where == module:
            globals()[each] = getattr(loaded, each)
    return globals()[name]


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
    from .schema import build_tables
    from .settings import producer_settings

    s = producer_settings()
    names = {*build_tables(s.db_schema, s.table).names, "outbox_relay_version"}
    schema = parent_names.get("schema_name") if isinstance(parent_names, dict) else None
    return not (name in names and (schema is None or schema == s.db_schema))
