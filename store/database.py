"""The store's database: an async engine, a session factory and the schema migrations.

SQLite (``sqlite+aiosqlite``) is the embedded default; PostgreSQL (``postgresql+psycopg``) is the
production choice. Both are migrated by the Alembic scripts shipped inside this package, run
programmatically on the engine's own connection so :meth:`Database.migrate` works inside a
running event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from sandbox.errors import SandboxConfigError
from sandbox.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic script location, inside the package so an installed runtime can migrate."""

SQLITE_BUSY_TIMEOUT_MS = 15_000
"""How long a SQLite writer waits for another writer's lock before failing with "database is locked"."""

# Serialises concurrent migrate() calls from several workers on one PostgreSQL database.
_PG_MIGRATION_LOCK_KEY = 0x5A4D_0001

# Alembic keeps the running migration's context in module globals, so two migrations interleaving
# in one process (even on different databases) would trample each other: one at a time per loop.
_MIGRATION_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"}
_POSTGRES_DRIVERS = {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg_async"}


def normalise_url(url: str | URL) -> URL:
    """Parse a database URL and pick the async driver this runtime uses for its dialect.

    ``sqlite://`` becomes ``sqlite+aiosqlite://`` and ``postgresql://`` becomes
    ``postgresql+psycopg://``; any other dialect or driver is a :class:`SandboxConfigError`.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise SandboxConfigError(f"SANDBOX_DATABASE_URL is not a database URL: {exc}") from None
    if parsed.drivername in _SQLITE_DRIVERS:
        return parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername in _POSTGRES_DRIVERS:
        return parsed.set(drivername="postgresql+psycopg")
    raise SandboxConfigError(
        f"unsupported database driver {parsed.drivername!r}: use sqlite+aiosqlite:///path "
        "or postgresql+psycopg://user@host/db"
    )


def store_fingerprint(url: str | URL) -> str:
    """The fingerprint of a database URL (normalised, password left out): equal for the same database."""
    rendered = normalise_url(url).render_as_string(hide_password=True)
    return hashlib.sha256(rendered.encode()).hexdigest()[:16]


def alembic_config() -> Config:
    """An Alembic configuration pointing at the packaged migrations (no ini file, no logging setup)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout comes first: switching to WAL itself needs a lock.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets readers (CLI, API) proceed while the worker writes.
        cursor.execute("PRAGMA journal_mode = WAL")
        # SQLite ignores foreign keys (and ON DELETE CASCADE) unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _upgrade_head(connection: Connection) -> None:
    # Several processes (worker, CLI) may migrate at once: take the database's write lock first so
    # the second one waits and then finds the schema already at head.
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class Database:
    """An async engine plus its session factory.

    Attributes:
        engine: The SQLAlchemy async engine.
        sessionmaker: Factory of :class:`AsyncSession` (``expire_on_commit=False``); use
            ``async with db.sessionmaker.begin() as session:`` for one transaction.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str | URL, *, echo: bool = False, pooled: bool = True) -> Database:
        """Open the database at ``url`` (lazily); SQLite connections get WAL, foreign keys, a busy timeout.

        ``pooled=False`` closes each connection after use: for an occasional user such as a client,
        whose pooled connections (aiosqlite's are threads) would otherwise outlive it or keep a process alive.
        """
        parsed = normalise_url(url)
        extra: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
        if parsed.get_backend_name() == "sqlite":
            engine = create_async_engine(parsed, echo=echo, **extra)
            event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        else:
            engine = create_async_engine(parsed, echo=echo, pool_pre_ping=True, **extra)
        return cls(engine)

    @classmethod
    def for_settings(cls, settings: Settings, *, pooled: bool = True) -> Database:
        """Open the settings' database (SQLite under the data dir by default), creating its directory."""
        parsed = normalise_url(settings.resolved_database_url())
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return cls.from_url(parsed, pooled=pooled)

    @property
    def store_id(self) -> str:
        """A short fingerprint of which database this is (its URL without the password).

        Two processes that compute the same one write and read the same rows; a client compares it
        with the lease's before it heartbeats through the store (see ``LeaseClient.heartbeat``).
        """
        return store_fingerprint(self.engine.url)

    @property
    def dialect(self) -> str:
        """The dialect name: ``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (``alembic upgrade head``); a no-op when already there."""
        lock = _MIGRATION_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock, self.engine.begin() as connection:
            await connection.run_sync(_upgrade_head)

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()
