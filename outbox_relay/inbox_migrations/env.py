"""Alembic environment for ``outbox-relay migrate --inbox`` (standalone use)."""

from __future__ import annotations

from outbox_relay.inbox_migrations import STANDALONE_VERSION_TABLE, options
from outbox_relay.migrations.standalone import run

run(STANDALONE_VERSION_TABLE, options().schema)
