"""The host application's alembic environment (worked example).

It runs the host's own revisions (``alembic/versions``) and the outbox branch shipped in the
``outbox_relay`` wheel (``version_locations`` in ``alembic.ini``). Compared with a stock
``env.py`` it adds ONE thing for the outbox: ``include_name=include_outbox_objects``, so that
autogenerate never proposes dropping the outbox tables, which are not in ``target_metadata``.

Options (``alembic -x name=value``):

* ``host_schema`` -- schema of the host's tables and of its ``alembic_version`` table
  (default ``public``); the connection's ``search_path`` is set to it;
* ``outbox_schema``, ``outbox_table``, ``outbox_shards`` -- read by the outbox revisions (or
  ``OUTBOX_SCHEMA`` / ``OUTBOX_TABLE`` / ``OUTBOX_SHARDS``).

The database URL is read from ``OUTBOX_DATABASE_URL``.
"""

from __future__ import annotations

import os
import re
import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool

# The example's models live in the repository (examples/shop), not in an installed package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples.shop.models import Base  # noqa: E402
from outbox_relay import include_outbox_objects  # noqa: E402
from outbox_relay.settings import producer_settings  # noqa: E402

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)
x_args = context.get_x_argument(as_dictionary=True)

host_schema = x_args.get("host_schema", "public")
if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", host_schema):
    raise SystemExit(f"alembic env: -x host_schema={host_schema!r} is not a plain lower-case name")
config.attributes["host_schema"] = host_schema  # read by the host's revisions

# include_outbox_objects reads OUTBOX_SCHEMA / OUTBOX_TABLE; when the outbox options are given
# as -x arguments instead, hand them on so autogenerate hides the right tables.
for option, variable in (("outbox_schema", "OUTBOX_SCHEMA"), ("outbox_table", "OUTBOX_TABLE")):
    if option in x_args:
        os.environ[variable] = x_args[option]
producer_settings.cache_clear()

url = os.environ.get("OUTBOX_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
if not url:
    raise SystemExit(
        "alembic env: set OUTBOX_DATABASE_URL (e.g. postgresql+psycopg://u:pw@host/db)"
    )

# The version table sits in the host schema through the search_path. It is deliberately NOT
# given as version_table_schema: alembic's autogenerate only ignores its version table when
# version_table_schema equals the reflected schema key, which is None for the default schema.
configure_options = {
    "target_metadata": Base.metadata,
    "include_name": include_outbox_objects,  # hide the outbox tables from autogenerate
    "compare_type": True,
}


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade heads --sql``); no database needed."""
    context.configure(url=url, literal_binds=True, **configure_options)
    with context.begin_transaction():
        if host_schema != "public":
            context.execute(f'CREATE SCHEMA IF NOT EXISTS "{host_schema}"')
        context.execute(f'SET search_path TO "{host_schema}"')
        context.run_migrations()


def run_migrations_online() -> None:
    if host_schema != "public":
        bootstrap = create_engine(url, poolclass=pool.NullPool)
        with bootstrap.connect() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{host_schema}"')
            connection.commit()
        bootstrap.dispose()
    engine = create_engine(
        url,
        poolclass=pool.NullPool,
        connect_args={"options": f"-c search_path={host_schema}"},
    )
    with engine.connect() as connection:
        context.configure(connection=connection, **configure_options)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
