"""Alembic revisions of the outbox schema, shipped in the wheel (branch label ``outbox_relay``).

A host application adopts them by adding ``outbox_relay:migrations/versions`` to its
``version_locations``; ``outbox-relay migrate`` runs them standalone.

Where the revisions read their options, first match wins:
``config.attributes["outbox_relay"]`` (set by ``outbox-relay migrate``), alembic ``-x`` arguments
(``-x outbox_schema=... -x outbox_table=... -x outbox_shards=...``), the ``OUTBOX_SCHEMA`` /
``OUTBOX_TABLE`` / ``OUTBOX_SHARDS`` environment variables, the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BRANCH_LABEL = "outbox_relay"
HEAD = "outbox_relay_0003"
SCRIPT_LOCATION = str(Path(__file__).parent)
VERSIONS_LOCATION = str(Path(__file__).parent / "versions")
#: Version table used by ``outbox-relay migrate`` (a host's own alembic keeps its own table).
STANDALONE_VERSION_TABLE = "outbox_relay_version"


@dataclass(frozen=True)
class MigrationOptions:
    schema: str
    table: str
    shards: int
    channel: str


def options() -> MigrationOptions:
    """The options of the running migration (see module docstring for their sources)."""
    from alembic import context

    from ..settings import load_settings

    given: dict[str, object] = {}
    cfg = context.config
    attrs = cfg.attributes.get("outbox_relay") if cfg is not None else None
    if isinstance(attrs, dict):
        given.update(attrs)
    else:
        x = context.get_x_argument(as_dictionary=True)
        for name in ("schema", "table", "shards"):
            if f"outbox_{name}" in x:
                given[name] = x[f"outbox_{name}"]
    settings = load_settings(
        db_schema=given.get("schema"), table=given.get("table"), shards=given.get("shards")
    )
    return MigrationOptions(settings.db_schema, settings.table, settings.shards, settings.channel)
