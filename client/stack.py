"""The stack a data dir runs: where its Temporal and NATS are, and the settings that point at them.

``sandboxctl up`` publishes the addresses of the stack it runs in ``<data>/stack.json``
(:class:`StackInfo`); every client (the CLI, a scheduler, a web backend on the same host) finds the
stack from the data dir through :func:`resolve_settings`, so none of them has to be told the
ports. A value set explicitly in the environment always wins over the published one.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from sandbox.errors import NoRunningStack, SandboxConfigError
from sandbox.settings import Settings

__all__ = [
    "STACK_FILE",
    "NoRunningStack",
    "StackInfo",
    "pid_alive",
    "read_stack_info",
    "require_stack_address",
    "resolve_settings",
]

STACK_FILE = "stack.json"
"""Where, under the data dir, a running ``sandboxctl up`` publishes :class:`StackInfo`."""


class StackInfo(BaseModel):
    """What a running ``sandboxctl up`` publishes in ``<data>/stack.json``."""

    model_config = ConfigDict(frozen=True)

    pid: int
    temporal_address: str
    ui_url: str
    nats_url: str
    data_dir: Path
    started_at: datetime
    codec_url: str | None = None  # the Web UI's codec server; None when payload encryption is off


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (also one owned by another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def read_stack_info(data_dir: Path) -> StackInfo | None:
    """The stack running for ``data_dir``, or None when there is none (no file or a dead pid).

    A malformed ``stack.json`` counts as no stack: it can only be a leftover of a killed ``up``.
    """
    try:
        info = StackInfo.model_validate_json((data_dir / STACK_FILE).read_bytes())
    except (OSError, ValidationError):
        return None
    return info if pid_alive(info.pid) else None


def resolve_settings(data_dir: Path | None = None) -> Settings:
    """Settings for a client, pointed at the stack ``sandboxctl up`` runs for the data dir.

    The data dir is ``data_dir``, else ``SANDBOX_DATA_DIR``, else ``./.sandbox`` (made absolute).
    When a stack runs there, its Temporal address and NATS URL replace the defaults, but a value
    set explicitly in the environment always wins.

    Raises:
        SandboxConfigError: The environment holds malformed ``SANDBOX_*`` values, or the data dir
            exists but is not a directory.
    """
    try:
        settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    except ValidationError as exc:
        raise SandboxConfigError(f"invalid SANDBOX_* setting: {exc}") from exc
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise SandboxConfigError(
            f"the data dir {settings.data_dir} is not a directory; pass a directory with --data-dir or SANDBOX_DATA_DIR"
        )
    updates: dict[str, object] = {"data_dir": settings.data_dir.resolve()}
    info = read_stack_info(settings.data_dir)
    if info is not None:
        # model_fields_set holds what the environment set explicitly (pydantic-settings passes it as init).
        if "temporal_address" not in settings.model_fields_set:
            updates["temporal_address"] = info.temporal_address
        if "nats_url" not in settings.model_fields_set:
            updates["nats_url"] = info.nats_url
    return settings.model_copy(update=updates)


def require_stack_address(settings: Settings) -> None:
    """Refuse to connect to a Temporal address nobody chose for ``settings``.

    The address counts as chosen when the environment (or the caller) set it explicitly, or when
    :func:`resolve_settings` took it from the stack running for the data dir; the default alone
    never is, since whatever answers at ``127.0.0.1:7233`` may be another data dir's stack.

    Raises:
        NoRunningStack: Neither holds and no stack runs for ``settings.data_dir``.
    """
    if "temporal_address" in settings.model_fields_set or read_stack_info(settings.data_dir) is not None:
        return
    raise NoRunningStack(
        f"no running stack for {settings.data_dir.resolve()}; "
        "start one with `sandboxctl up` or set SANDBOX_TEMPORAL_ADDRESS",
        address=settings.temporal_address,
    )
