"""Connecting a client to the runtime: its Temporal service and its store.

Every client (the CLI, a scheduler, a web backend) connects the same way: :func:`connect_temporal`
builds the Temporal client the worker uses too (credentials, encrypting converter, tracing) and
turns "nothing answers there" into :class:`TemporalUnreachable`, a typed error a caller can branch
on; :func:`open_store` opens and migrates the store for as long as a block runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from temporalio.client import Client

from client.lease_client import LeaseClient
from client.stack import NoRunningStack, require_stack_address
from sandbox.errors import TemporalUnreachable
from sandbox.settings import Settings
from store.database import Database

__all__ = ["NoRunningStack", "TemporalUnreachable", "connect_leases", "connect_temporal", "open_store"]


async def connect_temporal(settings: Settings) -> Client:
    """The Temporal client for ``settings`` (the worker's own :func:`worker.connect`).

    Raises:
        NoRunningStack: No address was set and no stack runs for the data dir
            (:func:`client.stack.require_stack_address`).
        TemporalUnreachable: The address does not answer.
        SandboxConfigError: The Temporal credentials are misconfigured (a certificate without its key, ...).
    """
    from worker import connect

    require_stack_address(settings)
    try:
        return await connect(settings)
    except RuntimeError as err:  # the SDK's "failed client connect"
        raise TemporalUnreachable(
            f"cannot reach Temporal at {settings.temporal_address} ({err})", address=settings.temporal_address
        ) from err


async def connect_leases(settings: Settings) -> LeaseClient:
    """A :class:`LeaseClient` on a fresh Temporal connection (raises as :func:`connect_temporal`)."""
    return LeaseClient(await connect_temporal(settings), settings)


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Database]:
    """The store of ``settings``, migrated to the current schema, disposed of when the block ends."""
    db = Database.for_settings(settings)
    try:
        await db.migrate()
        yield db
    finally:
        await db.dispose()
