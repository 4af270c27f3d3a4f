"""How a ``sandboxctl`` command turns the client's outcomes into exit codes and one-line errors.

Every command loads its settings with :func:`load_settings` and runs its async part through
:func:`run` (or :func:`with_leases`, :func:`with_temporal`, :func:`with_store`, which connect
first). The client raises typed errors; this module is the one place that maps them to exits
(:data:`EXIT_CODES` is the table ``sandboxctl --help`` and the README show):

- ``1`` (:data:`EXIT_BAD_SETTINGS`): the settings cannot be loaded (malformed ``SANDBOX_*`` values,
  a data dir that is a file), or connecting refuses them (credentials, no payload keys);
- ``2`` (:data:`EXIT_USAGE`): a usage error (click's own code: a bad option, a missing argument);
- ``3`` (:data:`EXIT_UNREACHABLE`): Temporal does not answer, no stack runs for the data dir, or a
  provider, agent or store is unavailable (retry later or start it);
- ``4`` (:data:`EXIT_REFUSED`): the runtime refused or failed the request (``ErrorType: message``);
- ``5`` (:data:`EXIT_NOT_FOUND`): the lease, holder, box, path, snapshot or recording does not exist;
- ``6`` (:data:`EXIT_FENCED`): the caller's epoch is stale (another holder took the lease over);
- ``7`` (:data:`EXIT_TIMEOUT`): the command ran out of time;
- ``8`` (:data:`EXIT_TRUNCATED`): the output is incomplete because a default limit cut it
  (``fs cat`` of a file over 5 MiB without ``--max-bytes``); what was printed is the file's start.

``exec`` exits with the box command's own exit code when it ran.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from temporalio.client import Client

from cli.output import fail
from client.connection import NoRunningStack, TemporalUnreachable, connect_leases, connect_temporal, open_store
from client.lease_client import LeaseClient
from client.stack import resolve_settings
from sandbox import errors
from sandbox.errors import SandboxError
from sandbox.settings import Settings
from store.database import Database

__all__ = [
    "EXIT_BAD_SETTINGS",
    "EXIT_CODES",
    "EXIT_FENCED",
    "EXIT_NOT_FOUND",
    "EXIT_REFUSED",
    "EXIT_TIMEOUT",
    "EXIT_TRUNCATED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "connected",
    "exit_code_for",
    "exit_codes_epilog",
    "load_settings",
    "refuse",
    "run",
    "with_leases",
    "with_store",
    "with_temporal",
]

T = TypeVar("T")

EXIT_BAD_SETTINGS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_NOT_FOUND = 5
EXIT_FENCED = 6
EXIT_TIMEOUT = 7
EXIT_TRUNCATED = 8

#: Every exit code ``sandboxctl`` uses and what it means (shown in ``--help`` and the README).
EXIT_CODES: dict[int, str] = {
    0: "success",
    EXIT_BAD_SETTINGS: "bad settings (malformed SANDBOX_* value, data dir not a directory, no payload keys)",
    EXIT_USAGE: "usage error (bad option or argument)",
    EXIT_UNREACHABLE: "unavailable: no running stack, Temporal unreachable, provider/agent/store unavailable",
    EXIT_REFUSED: "refused: the runtime refused or failed the request",
    EXIT_NOT_FOUND: "not found: lease, holder, box, path, snapshot or recording",
    EXIT_FENCED: "fenced: stale epoch (another holder took the lease over)",
    EXIT_TIMEOUT: "timeout: the command ran out of time",
    EXIT_TRUNCATED: "truncated: a default limit cut the output (fs cat without --max-bytes)",
}

# Most specific first: an AgentOffline is a ProviderUnavailable, a BoxNotFound a ProviderError.
_EXIT_BY_ERROR: tuple[tuple[tuple[type[SandboxError], ...], int], ...] = (
    ((errors.StaleEpoch,), EXIT_FENCED),
    ((errors.ExecTimeout,), EXIT_TIMEOUT),
    (
        (
            errors.LeaseNotFound,
            errors.HolderNotFound,
            errors.BoxNotFound,
            errors.PathNotFound,
            errors.ChannelANotFound,
            errors.ArtifactNotFound,
            errors.SnapshotNotFound,
            errors.RecordingNotFound,
        ),
        EXIT_NOT_FOUND,
    ),
    (
        (
            errors.TemporalUnreachable,
            errors.ProviderUnavailable,
            errors.ChannelAUnavailable,
            errors.ArtifactStoreUnavailable,
        ),
        EXIT_UNREACHABLE,
    ),
)


def exit_code_for(err: SandboxError) -> int:
    """The exit code a typed error ends a command with (:data:`EXIT_CODES`); other errors are refusals."""
    for classes, code in _EXIT_BY_ERROR:
        if isinstance(err, classes):
            return code
    return EXIT_REFUSED


def exit_codes_epilog() -> str:
    """The exit-code table as the root ``--help`` epilog shows it (one line per code)."""
    # "\b" keeps click from rewrapping the block into one paragraph.
    return "\b\nExit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())


def load_settings(data_dir: Path | None) -> Settings:
    """The settings of the stack for ``data_dir`` (:func:`client.stack.resolve_settings`); exit 1 if malformed."""
    try:
        return resolve_settings(data_dir)
    except SandboxError as err:
        fail(err.message, EXIT_BAD_SETTINGS)


def refuse(err: SandboxError) -> NoReturn:
    """Exit with ``ErrorType: message`` and the error's code (:func:`exit_code_for`) for a typed error."""
    fail(f"{err.error_type}: {err.message}", exit_code_for(err))


def run(settings: Settings, action: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``action()`` to completion; an unreachable Temporal or a typed error becomes a clear exit."""
    try:
        return asyncio.run(action())
    except NoRunningStack as err:
        fail(f"{err.error_type}: {err.message}", EXIT_UNREACHABLE)
    except TemporalUnreachable as err:
        fail(f"{err.message}; is `sandboxctl up` running for data dir {settings.data_dir}?", EXIT_UNREACHABLE)
    except SandboxError as err:
        refuse(err)


async def connected(connect: Awaitable[T]) -> T:
    """``connect`` awaited; a settings error while connecting (credentials, payload keys) exits 1."""
    try:
        return await connect
    except errors.SandboxConfigError as err:
        fail(f"{err.error_type}: {err.message}", EXIT_BAD_SETTINGS)


def with_temporal(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    """Connect to Temporal, run ``action(client)``; failures exit as :func:`run` says (bad settings: 1)."""

    async def main() -> T:
        return await action(await connected(connect_temporal(settings)))

    return run(settings, main)


def with_leases(settings: Settings, action: Callable[[LeaseClient], Awaitable[T]]) -> T:
    """Connect a :class:`LeaseClient`, run ``action(leases)``; failures exit as :func:`run` says (bad settings: 1)."""

    async def main() -> T:
        return await action(await connected(connect_leases(settings)))

    return run(settings, main)


def with_store(settings: Settings, action: Callable[[Database], Awaitable[T]], *, read_only: bool = False) -> T:
    """Open and migrate the store, run ``action(db)``, close it; failures exit as :func:`run` says.

    ``read_only`` commands never create a missing data dir (the default SQLite store lives there):
    they exit :data:`EXIT_UNREACHABLE` saying no stack ever ran there.
    """
    if read_only and settings.database_url is None and not settings.data_dir.is_dir():
        fail(
            f"{NoRunningStack.error_type}: no data dir at {settings.data_dir.resolve()} (no stack ever ran there); "
            "start one with `sandboxctl up`, or pass the data dir it uses with --data-dir or SANDBOX_DATA_DIR",
            EXIT_UNREACHABLE,
        )

    async def main() -> T:
        async with open_store(settings) as db:
            return await action(db)

    return run(settings, main)
