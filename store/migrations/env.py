"""Alembic environment of the store.

Two ways in: :meth:`store.database.Database.migrate` hands over an open connection through
``config.attributes["connection"]`` (no event loop is started here, so it works inside a running
one); the ``alembic`` command line builds its own engine from ``-x url=...``, ``sqlalchemy.url``
or the runtime settings (``SANDBOX_DATABASE_URL`` or SQLite in the data dir).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_with_connection(connection: Connection) -> None:
    """Run the migrations on a connection the caller owns (and commits)."""
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def _cli_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from sandbox.settings import Settings

    return Settings().resolved_database_url()


async def _run_cli() -> None:
    from store.database import normalise_url

    engine = create_async_engine(normalise_url(_cli_url()), poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_with_connection)
    finally:
        await engine.dispose()


def _run_offline() -> None:
    from store.database import normalise_url

    context.configure(
        url=normalise_url(_cli_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


_given = config.attributes.get("connection")
if _given is not None:
    run_with_connection(_given)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        _run_offline()
    else:
        asyncio.run(_run_cli())
