"""The alembic environment both shipped branches use when run by ``outbox-relay migrate``.

A host application does not use this: its own ``env.py`` runs the revisions.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool


def run(version_table: str, schema: str) -> None:
    """Run the migrations online or offline, with the branch's own version table in ``schema``."""
    url = context.config.get_main_option("sqlalchemy.url") or "postgresql://"
    create = f'CREATE SCHEMA IF NOT EXISTS "{schema}"'
    if context.is_offline_mode():
        context.configure(
            url=url,
            literal_binds=True,
            version_table=version_table,
            version_table_schema=schema,
        )
        with context.begin_transaction():
            context.execute(create)
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.exec_driver_sql(create)
        connection.commit()
        context.configure(
            connection=connection, version_table=version_table, version_table_schema=schema
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
