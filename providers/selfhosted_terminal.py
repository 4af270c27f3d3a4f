"""A PTY on a selfhosted machine, driven over the agent protocol's ``pty_*`` ops.

:class:`RemotePty` is the runtime's side of a shell the agent runs on a pseudo-terminal it holds
(:mod:`daemons.agent.terminals`). It behaves like a local :class:`~sandbox.channel_a.pty.PtyProcess`
for Channel-A: a background poll (``pty_read``, a long poll answered as soon as output is there)
feeds the output to readers and to ``on_output``, and reports the exit once. When the agent stops
answering for this PTY (it restarted and forgot it, went offline, or the binding was fenced) the
PTY ends with reason ``lost``: the shell may still run on the machine until the agent's idle
timeout closes it, but nothing reaches it from here any more.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from typing import Final, Protocol, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from sandbox.channel_a.models import PtyExitReason
from sandbox.channel_a.pty import ExitCallback, OutputCallback, PtyOutput
from sandbox.control_protocol import (
    PTY_MAX_WAIT_MS,
    ControlOp,
    PtyCloseOp,
    PtyCloseReply,
    PtyReadOp,
    PtyReadReply,
    PtyResizeOp,
    PtyResizeReply,
    PtyWriteOp,
    PtyWriteReply,
)
from sandbox.errors import ChannelAConflict, ChannelAUnavailable, SelfhostedControlError

__all__ = ["AgentCalls", "RemotePty"]

_R = TypeVar("_R")


class AgentCalls(Protocol):
    """What a :class:`RemotePty` needs of its session (:class:`providers.selfhosted.SelfhostedSession`)."""

    @property
    def chunk_bytes(self) -> int:
        """Most bytes one write op may carry."""
        ...

    async def call(self, op: ControlOp, reply_type: type[_R], *, timeout: float | None = None) -> _R:
        """Send one op to the agent and return its typed reply."""
        ...


POLL_WAIT_SECONDS: Final = 5.0
"""How long one output poll may wait at the agent (well under the op limit of 10 s)."""
_RPC_GRACE_SECONDS: Final = 2.0
"""How much longer than its wait an output poll may take before it counts as unanswered."""
_TRANSIENT_FAILURES: Final = 3
"""Consecutive failed polls (agent reconnecting or draining) before the PTY counts as lost."""

assert POLL_WAIT_SECONDS * 1000 <= PTY_MAX_WAIT_MS


def _gone(err: SelfhostedControlError) -> bool:
    """Whether ``err`` means the PTY cannot be reached again (not a passing hiccup)."""
    return err.os_not_found or err.agent_offline or err.fenced or not err.retryable


class RemotePty:
    """One PTY on the machine (a :class:`~sandbox.channel_a.pty.Pty`).

    Args:
        session: The machine's session (its epoch fences every op).
        pty_id: The id the agent gave the PTY.
        cols: Its width.
        rows: Its height.
        on_output: Gets the decoded output as it arrives.
        on_exit: Gets the exit status once (``None`` and ``lost`` when the agent lost the PTY).
        poll_wait: Seconds one output poll may wait at the agent.
    """

    def __init__(
        self,
        session: AgentCalls,
        pty_id: str,
        *,
        cols: int,
        rows: int,
        on_output: OutputCallback,
        on_exit: ExitCallback,
        poll_wait: float = POLL_WAIT_SECONDS,
    ) -> None:
        self.session = session
        self.pty_id = pty_id
        self.cols = cols
        self.rows = rows
        self.exit_code: int | None = None
        self.reason: PtyExitReason | None = None
        self.dropped = 0
        self.output = PtyOutput()
        self._on_output = on_output
        self._on_exit = on_exit
        self._poll_wait = poll_wait
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._reported = False
        self._closing = False
        # One write at a time: concurrent requests could reach the agent out of order (keystrokes).
        self._writing = asyncio.Lock()
        self._poll: asyncio.Task[None] | None = None

    @property
    def exited(self) -> bool:
        """Whether the shell has ended (or the PTY was lost)."""
        return self.output.exited

    def start(self) -> None:
        """Start polling the agent for output (call once, after the agent opened the PTY)."""
        self._poll = asyncio.get_running_loop().create_task(self._pump())

    async def _finish(self, exit_code: int | None, reason: PtyExitReason) -> None:
        if self._reported:
            return
        self._reported = True
        self.exit_code, self.reason = exit_code, reason
        self.output.mark_exited()
        await self._on_exit(exit_code, reason)

    def _transient(self, err: BaseException) -> bool:
        return isinstance(err, SelfhostedControlError) and not self._closing and not _gone(err)

    async def _pump(self) -> None:
        op = PtyReadOp(pty_id=self.pty_id, wait_ms=int(self._poll_wait * 1000))
        # A poll that fails transiently is sent again (0.5 s, 1 s, then 2 s apart); the third
        # failure in a row, or one that says the PTY is gone, loses the shell.
        poll = AsyncRetrying(
            retry=retry_if_exception(self._transient),
            stop=stop_after_attempt(_TRANSIENT_FAILURES),
            wait=wait_exponential(multiplier=0.5, max=2.0),
            reraise=True,
        )
        while not self._reported:
            try:
                reply: PtyReadReply = await poll(
                    self.session.call, op, PtyReadReply, timeout=self._poll_wait + _RPC_GRACE_SECONDS
                )
            except SelfhostedControlError:
                if not self._closing:  # else close() reports how the shell ended
                    await self._finish(None, "lost")
                return
            self.dropped = reply.dropped
            if reply.data:
                self.output.feed(reply.data)
                if text := self._decoder.decode(reply.data):
                    await self._on_output(text)
            if reply.exited:
                await self._finish(reply.exit_code, reply.reason or "exit")
                return

    async def read(self, timeout: float = 0.0, max_bytes: int = 4 * 1024 * 1024) -> bytes:
        """Unread output, waiting up to ``timeout`` seconds for some; ``b""`` when none came."""
        return await self.output.read(timeout, max_bytes)

    async def read_until(self, needle: bytes, timeout: float) -> bytes:
        """Read until ``needle`` appears in the output read by this call, or until ``timeout``."""
        return await self.output.read_until(needle, timeout)

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the shell (in pieces that fit one message; never repeated).

        Raises:
            ChannelAConflict: the shell has exited or the PTY was lost ("pty session lost").
            ChannelAUnavailable: the agent could not take the input.
        """
        async with self._writing:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        piece = self.session.chunk_bytes
        for at in range(0, len(data), piece) if data else []:
            if self.exited:
                raise ChannelAConflict(f"pty session lost: {self.pty_id} has exited", retryable=False)
            try:
                await self.session.call(PtyWriteOp(pty_id=self.pty_id, data=data[at : at + piece]), PtyWriteReply)
            except SelfhostedControlError as err:
                if err.os_not_found or err.detail.get("reason") == "pty_exited":
                    raise ChannelAConflict(f"pty session lost: {self.pty_id}: {err.message}", retryable=False) from err
                raise ChannelAUnavailable(f"cannot type into {self.pty_id}: {err.message}") from err

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size on the machine; the foreground program gets ``SIGWINCH``.

        Raises:
            ChannelAUnavailable: the agent could not resize it.
        """
        if self.exited:
            return
        try:
            await self.session.call(PtyResizeOp(pty_id=self.pty_id, cols=cols, rows=rows), PtyResizeReply)
        except SelfhostedControlError as err:
            raise ChannelAUnavailable(f"cannot resize {self.pty_id}: {err.message}") from err
        self.cols, self.rows = cols, rows

    async def close(self, grace: float = 1.0) -> tuple[int | None, PtyExitReason]:
        """Hang up the shell on the machine (killed after ``grace``) and stop polling."""
        self._closing = True
        if not self.exited:
            op = PtyCloseOp(pty_id=self.pty_id, grace_ms=int(grace * 1000))
            try:
                reply = await self.session.call(op, PtyCloseReply, timeout=grace + _RPC_GRACE_SECONDS)
            except SelfhostedControlError:
                await self._finish(None, "lost")
            else:
                # The poll may have seen the exit first (same status); otherwise it is reported here.
                await self._finish(reply.exit_code, reply.reason)
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        return self.exit_code, self.reason or "exit"
