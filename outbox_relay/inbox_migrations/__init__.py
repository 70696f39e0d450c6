"""Alembic revisions of the consumer inbox (``outbox_relay.inbox``), shipped in the wheel.

Their own branch (label ``outbox_relay_inbox``) in their own version location, so a consumer-only
service adopts the inbox without the outbox: a host application adds
``outbox_relay:inbox_migrations/versions`` to its ``version_locations``; ``outbox-relay migrate
--inbox`` runs them standalone (version table ``outbox_relay_inbox_version``).

Where the revisions read their options, first match wins:
``config.attributes["outbox_relay_inbox"]`` (set by ``outbox-relay migrate --inbox``), alembic
``-x`` arguments (``-x inbox_schema=... -x inbox_table=...``; ``-x outbox_schema=...`` is the
schema's fallback), the ``OUTBOX_INBOX_SCHEMA`` / ``OUTBOX_INBOX_TABLE`` environment variables,
``OUTBOX_SCHEMA``, the defaults (``public``, ``inbox``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BRANCH_LABEL = "outbox_relay_inbox"
HEAD = "outbox_relay_inbox_0001"
SCRIPT_LOCATION = str(Path(__file__).parent)
VERSIONS_LOCATION = str(Path(__file__).parent / "versions")
#: Version table used by ``outbox-relay migrate --inbox`` (a host's own alembic keeps its own).
STANDALONE_VERSION_TABLE = "outbox_relay_inbox_version"


@dataclass(frozen=True)
class InboxMigrationOptions:
    schema: str
    table: str


def options() -> InboxMigrationOptions:
    """The options of the running migration (see module docstring for their sources)."""
    from alembic import context

    from ..inbox import inbox_names

    given: dict[str, str] = {}
    cfg = context.config
    attrs = cfg.attributes.get("outbox_relay_inbox") if cfg is not None else None
    if isinstance(attrs, dict):
        given.update({k: str(v) for k, v in attrs.items() if v is not None})
    else:
        x = context.get_x_argument(as_dictionary=True)
        schema = x.get("inbox_schema") or x.get("outbox_schema")
        if schema:
            given["schema"] = schema
        if x.get("inbox_table"):
            given["table"] = x["inbox_table"]
    schema, table = inbox_names(given.get("schema"), given.get("table"))
    return InboxMigrationOptions(schema, table)
