"""Alembic environment for ``outbox-relay migrate`` (standalone use).

A host application does not use this file: its own ``env.py`` runs the revisions.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from outbox_relay.migrations import STANDALONE_VERSION_TABLE, options

config = context.config
opts = options()
url = config.get_main_option("sqlalchemy.url") or "postgresql://"

if context.is_offline_mode():
    context.configure(
        url=url,
        literal_binds=True,
        version_table=STANDALONE_VERSION_TABLE,
        version_table_schema=opts.schema,
    )
    with context.begin_transaction():
        context.execute(f'CREATE SCHEMA IF NOT EXISTS "{opts.schema}"')
        context.run_migrations()
else:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{opts.schema}"')
        connection.commit()
        context.configure(
            connection=connection,
            version_table=STANDALONE_VERSION_TABLE,
            version_table_schema=opts.schema,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
