"""The pseudo-terminals an agent holds for the runtime: the ``pty_*`` ops of the control protocol.

A shell opened with ``pty_open`` runs on the machine, in its own session with the PTY as its
controlling terminal and its cwd under the agent's root (the same place an ``exec`` runs), on a
:class:`~sandbox.channel_a.pty.PtyProcess` held here. The runtime types into it (``pty_write``) and
long-polls its output (``pty_read``); unread output is bounded (the oldest bytes are dropped and
counted). Nothing is left behind on the user's machine by a runtime that went away: a PTY no op
has touched for ``idle_seconds`` is closed, at most ``max_open`` shells run at once, a request of a
newer epoch (the machine was bound again) closes the PTYs opened under older ones, and draining
the agent closes every PTY.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from daemons.agent.confinement import OpRefused, Root
from sandbox.channel_a.pty import PtyProcess, spawn_on_terminal
from sandbox.control_protocol import (
    ControlErrorCode,
    PtyCloseOp,
    PtyCloseReply,
    PtyOpenOp,
    PtyOpenReply,
    PtyReadOp,
    PtyReadReply,
    PtyResizeOp,
    PtyResizeReply,
    PtyWriteOp,
    PtyWriteReply,
)
from sandbox.errors import ChannelAError

__all__ = ["AgentTerminals", "machine_environment"]

DEFAULT_MAX_OPEN: Final = 16
DEFAULT_IDLE_SECONDS: Final = 600.0
_KEEP_EXITED: Final = 64
"""Exited PTYs kept for a late reader (the newest ones); older ones are forgotten."""


class _MachineLauncher:
    """Starts a process on the machine itself (the agent's box is the machine)."""

    async def launch(
        self, argv: Sequence[str], *, cwd: str, env: Mapping[str, str], tty_fd: int
    ) -> asyncio.subprocess.Process:
        return await spawn_on_terminal(argv, cwd=cwd, env=env, tty_fd=tty_fd)


@dataclass
class _Terminal:
    pty: PtyProcess
    touched: float
    epoch: int = 0
    scope_id: str = ""


def _unknown(pty_id: str) -> OpRefused:
    return OpRefused(ControlErrorCode.NOT_FOUND, f"no PTY {pty_id} on this machine", {"reason": "pty_not_found"})


class AgentTerminals:
    """The PTYs of one agent, keyed by id.

    Args:
        root: The agent's root; every PTY's cwd lies under it.
        environment: The environment shells start with (the op's ``env`` on top).
        max_open: Shells running at once; one more is refused.
        idle_seconds: A PTY no op touched for this long is closed (its runtime is gone).
    """

    def __init__(
        self,
        root: Root,
        environment: Mapping[str, str],
        *,
        max_open: int = DEFAULT_MAX_OPEN,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
    ) -> None:
        self.root = root
        self.environment = dict(environment)
        self.max_open = max_open
        self.idle_seconds = idle_seconds
        self._terminals: dict[str, _Terminal] = {}
        self._launcher = _MachineLauncher()
        self._newest_epoch = 0
        self._closing: set[asyncio.Task[object]] = set()
        self._reaper: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        """Shells still running."""
        return sum(1 for t in self._terminals.values() if not t.pty.exited)

    def _get(self, pty_id: str) -> PtyProcess:
        terminal = self._terminals.get(pty_id)
        if terminal is None:
            raise _unknown(pty_id)
        terminal.touched = time.monotonic()
        return terminal.pty

    async def _reap(self) -> None:
        now = time.monotonic()
        for pty_id, terminal in list(self._terminals.items()):
            if now - terminal.touched > self.idle_seconds:
                self._terminals.pop(pty_id, None)
                await terminal.pty.close()
        exited = [pty_id for pty_id, t in self._terminals.items() if t.pty.exited]
        for pty_id in exited[: max(0, len(exited) - _KEEP_EXITED)]:
            terminal = self._terminals.pop(pty_id)
            await terminal.pty.close()

    async def _reap_while_open(self) -> None:
        # Runs while PTYs exist, so an abandoned one is closed even if no op ever comes again.
        while self._terminals:
            await asyncio.sleep(min(self.idle_seconds / 2, 30.0))
            await self._reap()

    def fence(self, epoch: int) -> None:
        """A request of ``epoch`` arrived: close (in the background) the PTYs of older epochs."""
        if epoch <= self._newest_epoch:
            return
        self._newest_epoch = epoch
        for pty_id, terminal in list(self._terminals.items()):
            if terminal.epoch < epoch:
                self._terminals.pop(pty_id)
                task: asyncio.Task[object] = asyncio.get_running_loop().create_task(terminal.pty.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def open(self, op: PtyOpenOp, *, epoch: int = 0) -> PtyOpenReply:
        """Start ``op.command`` (or the login shell) on a new PTY in ``op.cwd``, owned by the binding of
        ``epoch``; a running PTY of the same non-empty scope is returned instead."""
        await self._reap()
        if op.scope_id:
            for terminal in self._terminals.values():
                if terminal.scope_id == op.scope_id and not terminal.pty.exited:
                    terminal.touched = time.monotonic()
                    return PtyOpenReply(pty_id=terminal.pty.pty_id, pid=terminal.pty.pid or 0, reused=True)
        if self.running >= self.max_open:
            raise OpRefused(
                ControlErrorCode.OS,
                f"{self.running} PTYs are open on this machine (the most it allows); close one first",
                {"reason": "pty_limit", "max_open": str(self.max_open)},
            )
        cwd = self.root.directory(op.cwd)
        argv = list(op.command) or [self.login_shell(), "-l"]
        env = {**self.environment, **op.env, "TERM": op.term}
        pty = PtyProcess(shell=argv[0], cwd=cwd, cols=op.cols or 80, rows=op.rows or 24)
        try:
            await pty.start(self._launcher, argv, env)
        except OSError as err:
            raise OpRefused(
                ControlErrorCode.OS,
                f"cannot start {argv[0]}: {err.strerror or err}",
                {"reason": "spawn_failed", "program": argv[0]},
            ) from None
        self._terminals[pty.pty_id] = _Terminal(pty, time.monotonic(), epoch, op.scope_id)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_while_open())
        return PtyOpenReply(pty_id=pty.pty_id, pid=pty.pid or 0)

    def login_shell(self) -> str:
        """The shell a PTY without a command runs: ``$SHELL`` of the agent when it exists, else ``/bin/sh``."""
        shell = self.environment.get("SHELL", "")
        return shell if shell.startswith("/") and os.access(shell, os.X_OK) else "/bin/sh"

    async def write(self, op: PtyWriteOp) -> PtyWriteReply:
        """Type ``op.data`` into the PTY."""
        pty = self._get(op.pty_id)
        try:
            await pty.write(op.data)
        except ChannelAError as err:
            reason = "pty_exited" if pty.exited else "pty_write_failed"
            raise OpRefused(ControlErrorCode.OS, err.message, {"reason": reason}) from None
        return PtyWriteReply(bytes_written=len(op.data))

    async def read(self, op: PtyReadOp, *, reply_budget: int) -> PtyReadReply:
        """Unread output (waiting up to ``op.wait_ms`` for some, at most ``reply_budget`` bytes) and,
        once all is read, the exit."""
        pty = self._get(op.pty_id)
        limit = min(op.max_bytes or reply_budget, reply_budget)
        data = await pty.read(timeout=op.wait_ms / 1000, max_bytes=limit)
        done = pty.exited and pty.output.pending == 0
        return PtyReadReply(
            data=data,
            exited=done,
            exit_code=pty.exit_code if done else None,
            reason=("killed" if pty.reason == "killed" else "exit") if done else None,
            dropped=pty.output.dropped,
        )

    async def resize(self, op: PtyResizeOp) -> PtyResizeReply:
        """Give the PTY its new size."""
        pty = self._get(op.pty_id)
        if not pty.exited:
            await pty.resize(op.cols, op.rows)
        return PtyResizeReply()

    async def close(self, op: PtyCloseOp) -> PtyCloseReply:
        """Hang up the PTY (``SIGKILL`` after the grace) and forget it."""
        terminal = self._terminals.pop(op.pty_id, None)
        if terminal is None:
            raise _unknown(op.pty_id)
        code, reason = await terminal.pty.close(grace=op.grace_ms / 1000)
        return PtyCloseReply(exit_code=code, reason="killed" if reason == "killed" else "exit")

    async def close_all(self) -> None:
        """Close every PTY (the agent is draining)."""
        if self._reaper is not None:
            self._reaper.cancel()
        terminals = list(self._terminals.values())
        self._terminals.clear()
        for terminal in terminals:
            with contextlib.suppress(Exception):
                await terminal.pty.close()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5)


def machine_environment(environb: Mapping[bytes, bytes]) -> dict[str, str]:
    """The agent's byte environment as text (undecodable bytes survive as surrogate escapes)."""
    return {os.fsdecode(k): os.fsdecode(v) for k, v in environb.items()}
