"""How a ``sandboxctl`` command turns the client's outcomes into exit codes and one-line errors.

Every command loads its settings with :func:`load_settings` and runs its async part through
:func:`run` (or :func:`with_leases`, :func:`with_temporal`, :func:`with_store`, which connect
first). The client raises typed errors; this module is the one place that maps them to exits:

- ``1``: the settings cannot be loaded (malformed ``SANDBOX_*`` values);
- ``2`` (:data:`EXIT_REFUSED`): the runtime refused or failed the request (``ErrorType: message``);
- ``3`` (:data:`EXIT_UNREACHABLE`): Temporal does not answer (with a hint to start the stack);
- ``4`` (:data:`EXIT_TRUNCATED`): the output is incomplete because a default limit cut it
  (``fs cat`` of a file over 5 MiB without ``--max-bytes``); what was printed is the file's start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from temporalio.client import Client

from cli.output import fail
from client.connection import TemporalUnreachable, connect_leases, connect_temporal, open_store
from client.lease_client import LeaseClient
from client.stack import resolve_settings
from sandbox.errors import SandboxError
from sandbox.settings import Settings
from store.database import Database

__all__ = [
    "EXIT_BAD_SETTINGS",
    "EXIT_REFUSED",
    "EXIT_TRUNCATED",
    "EXIT_UNREACHABLE",
    "load_settings",
    "refuse",
    "run",
    "with_leases",
    "with_store",
    "with_temporal",
]

T = TypeVar("T")

EXIT_BAD_SETTINGS = 1
EXIT_REFUSED = 2
EXIT_UNREACHABLE = 3
EXIT_TRUNCATED = 4


def load_settings(data_dir: Path | None) -> Settings:
    """The settings of the stack for ``data_dir`` (:func:`client.stack.resolve_settings`); exit 1 if malformed."""
    try:
        return resolve_settings(data_dir)
    except SandboxError as err:
        fail(err.message, EXIT_BAD_SETTINGS)


def refuse(err: SandboxError) -> NoReturn:
    """Exit :data:`EXIT_REFUSED` with ``ErrorType: message`` for a typed error the runtime raised."""
    fail(f"{err.error_type}: {err.message}", EXIT_REFUSED)


def run(settings: Settings, action: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``action()`` to completion; an unreachable Temporal or a typed error becomes a clear exit."""
    try:
        return asyncio.run(action())
    except TemporalUnreachable as err:
        fail(f"{err.message}; is `sandboxctl up` running for data dir {settings.data_dir}?", EXIT_UNREACHABLE)
    except SandboxError as err:
        refuse(err)


def with_temporal(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    """Connect to Temporal, run ``action(client)``; failures exit as :func:`run` says."""

    async def main() -> T:
        return await action(await connect_temporal(settings))

    return run(settings, main)


def with_leases(settings: Settings, action: Callable[[LeaseClient], Awaitable[T]]) -> T:
    """Connect a :class:`LeaseClient`, run ``action(leases)``; failures exit as :func:`run` says."""

    async def main() -> T:
        return await action(await connect_leases(settings))

    return run(settings, main)


def with_store(settings: Settings, action: Callable[[Database], Awaitable[T]]) -> T:
    """Open and migrate the store, run ``action(db)``, close it; failures exit as :func:`run` says."""

    async def main() -> T:
        async with open_store(settings) as db:
            return await action(db)

    return run(settings, main)
