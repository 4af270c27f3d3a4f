"""Connecting a client to the runtime: its Temporal service and its store.

Every client (the CLI, a scheduler, a web backend) connects the same way: :func:`connect_temporal`
builds the Temporal client the worker uses too (credentials, encrypting converter, tracing) and
turns "nothing answers there" into :class:`TemporalUnreachable`, a typed error a caller can branch
on; :func:`open_leases` is a :class:`LeaseClient` for as long as a block runs (the way a script
should use one: see below); :func:`open_store` opens and migrates the store for as long as a block runs.

The Temporal SDK's native client must not be freed while the interpreter finalizes: its threads
then call into a dying interpreter and the process aborts after the script's work is done
("Fatal Python error: PyGILState_Release", about one short script in four here; a known SDK
issue). Such a client is freed only by the cycle collector, which last runs during finalization. So
:func:`connect_temporal` registers, once per process, an ``atexit`` hook that collects first (while
the interpreter is still whole), and :func:`open_leases` closes its client and collects when its
block ends, which also covers a client kept in a global variable.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import AsyncIterator

from temporalio.client import Client

from client.lease_client import LeaseClient
from client.stack import NoRunningStack, require_stack_address, resolve_settings
from sandbox.errors import TemporalUnreachable
from sandbox.settings import Settings
from store.database import Database

__all__ = [
    "NoRunningStack",
    "TemporalUnreachable",
    "connect_leases",
    "connect_temporal",
    "flush_traces",
    "open_leases",
    "open_store",
]

_collect_at_exit_registered = False


def _collect_at_exit() -> None:
    # atexit hooks run before finalization starts: native clients no longer referenced go now.
    global _collect_at_exit_registered
    if not _collect_at_exit_registered:
        atexit.register(gc.collect)
        _collect_at_exit_registered = True


async def connect_temporal(settings: Settings) -> Client:
    """The Temporal client for ``settings`` (the worker's own :func:`worker.connect`).

    Raises:
        NoRunningStack: No address was set and no stack runs for the data dir
            (:func:`client.stack.require_stack_address`).
        TemporalUnreachable: The address does not answer.
        SandboxConfigError: The Temporal credentials are misconfigured (a certificate without its key, ...).
    """
    from worker import configure_tracing, connect

    configure_tracing(settings)  # a client's calls start (or continue) the caller's trace
    require_stack_address(settings)
    _collect_at_exit()
    try:
        return await connect(settings)
    except RuntimeError as err:  # the SDK's "failed client connect"
        raise TemporalUnreachable(
            f"cannot reach Temporal at {settings.temporal_address} ({err})", address=settings.temporal_address
        ) from err


def flush_traces() -> None:
    """Send the spans this process still buffers (call before exiting; no-op without tracing)."""
    from worker import flush_tracing

    flush_tracing()


async def connect_leases(settings: Settings) -> LeaseClient:
    """A :class:`LeaseClient` on a fresh Temporal connection (raises as :func:`connect_temporal`)."""
    return LeaseClient(await connect_temporal(settings), settings)


@contextlib.asynccontextmanager
async def open_leases(settings: Settings | None = None) -> AsyncIterator[LeaseClient]:
    """A :class:`LeaseClient` connected for as long as the block runs; the way scripts should use one.

    ``settings`` default to :func:`client.stack.resolve_settings` (the stack of ``SANDBOX_DATA_DIR``).
    When the block ends the client is closed (:meth:`LeaseClient.close`) and collected at once, so
    the process exits cleanly however the caller keeps the object::

        async with open_leases() as leases:
            grant = await leases.acquire("ws", "g1")

    Raises:
        NoRunningStack, TemporalUnreachable, SandboxConfigError: As :func:`connect_temporal`.
    """
    leases = await connect_leases(settings if settings is not None else resolve_settings())
    try:
        yield leases
    finally:
        leases.close()
        del leases
        gc.collect()


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Database]:
    """The store of ``settings``, migrated to the current schema, disposed of when the block ends."""
    db = Database.for_settings(settings)
    try:
        await db.migrate()
        yield db
    finally:
        await db.dispose()
