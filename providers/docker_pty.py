"""Pseudo-terminals in docker boxes: a ``tty`` exec on the engine, driven over its hijacked socket.

The engine allocates the PTY in the box (``exec_create(tty=True, stdin=True)``) and makes it the
exec's controlling terminal; :meth:`DockerPty.start` attaches to it (``exec_start(socket=True)``:
with a TTY the stream is the raw terminal, not multiplexed), and sets its size with
``exec_resize``, so programs in the box get ``SIGWINCH``. The shell first writes its pid (which is
its session id) to a file under ``/tmp`` and then becomes the requested program, so that
:meth:`DockerPty.close` can hang up the whole session from a second exec (``pkill -s``; the engine
has no call that signals an exec), then kill it after a grace. The exit code is the exec's
(``exec_inspect``) once the stream has ended.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import secrets
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from sandbox.channel_a.models import PtyExitReason
from sandbox.channel_a.pty import ExitCallback, OutputCallback, PtyOutput
from sandbox.errors import ChannelAConflict, ChannelAUnavailable, ProviderError

if TYPE_CHECKING:
    from providers.docker import DockerProvider

__all__ = ["DockerPty", "pty_argv"]

_READ_CHUNK: Final = 65536
_EXIT_POLLS: Final = 100
# $1 pid file: record this shell's pid (the session leader of the exec's terminal), then become "$@".
_PID_SHIM: Final = 'echo $$ > "$1" && shift && exec "$@"'
# $1 signal, $2 pid file: signal every process of the session whose leader wrote the file.
_SIGNAL_SESSION: Final = 'read -r sid < "$2" 2>/dev/null && pkill -"$1" -s "$sid"; true'


def pty_argv(argv: Sequence[str], pid_file: str) -> list[str]:
    """The exec's argv: the pid shim, then ``argv`` (the shim ``exec``s it, keeping the pid)."""
    return ["sh", "-c", _PID_SHIM, "sh", pid_file, *argv]


class DockerPty:
    """One PTY in a docker box: the engine's ``tty`` exec and the socket attached to it."""

    def __init__(
        self,
        provider: DockerProvider,
        container_id: str,
        *,
        shell: str,
        cwd: str,
        cols: int,
        rows: int,
        on_output: OutputCallback,
        on_exit: ExitCallback,
    ) -> None:
        self.pty_id = f"pty-{secrets.token_hex(8)}"
        self.shell = shell
        self.cwd = cwd
        self.cols = cols
        self.rows = rows
        self.exit_code: int | None = None
        self.reason: PtyExitReason | None = None
        self.output = PtyOutput()
        self.pid_file = f"/tmp/.sandbox-{self.pty_id}.pid"
        self._provider = provider
        self._container = container_id
        self._on_output = on_output
        self._on_exit = on_exit
        self._exec_id = ""
        self._response: Any = None
        self._sock: socket.socket | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def exited(self) -> bool:
        """Whether the process on the PTY has ended."""
        return self.output.exited

    async def start(self, argv: Sequence[str], env: Sequence[str]) -> None:
        """Create the ``tty`` exec running ``argv`` in ``cwd``, attach to it and set its size.

        Raises:
            BoxNotFound: the container is gone.
            ProviderError: the engine refused the exec (a missing program, a bad directory).
        """
        provider = self._provider
        api = provider._api_sync()
        created = await provider._call(
            api.exec_create,
            self._container,
            pty_argv(argv, self.pid_file),
            stdin=True,
            tty=True,
            environment=list(env),
            workdir=self.cwd,
        )
        self._exec_id = str(created["Id"])
        self._response = await provider._call(api.exec_start, self._exec_id, tty=True, socket=True)
        raw = getattr(self._response, "_sock", self._response)
        if not isinstance(raw, socket.socket):
            raise ProviderError(f"docker engine gave no terminal socket for exec {self._exec_id[:12]}")
        raw.setblocking(False)
        self._sock = raw
        await self.resize(self.cols, self.rows)
        # Last, with no await after it: no callback runs before the caller has the PTY.
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                chunk = await loop.sock_recv(self._sock, _READ_CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.output.feed(chunk)
            if text := self._decoder.decode(chunk):
                await self._on_output(text)
        self.output.end_of_output()
        self.exit_code = await self._exit_code()
        self.reason = "killed" if self._closing else "exit"
        self.output.mark_exited()
        await self._on_exit(self.exit_code, self.reason)

    async def _exit_code(self) -> int | None:
        api = self._provider._api_sync()
        for _ in range(_EXIT_POLLS):
            try:
                info = await self._provider._call(api.exec_inspect, self._exec_id)
            except ProviderError:
                return None  # the box went with its exec
            code = info.get("ExitCode")
            # The engine may report the exec as running for a moment after its stream ended.
            if not info.get("Running") and isinstance(code, int):
                return code
            await asyncio.sleep(0.02)
        return None

    async def read(self, timeout: float = 0.0, max_bytes: int = 4 * 1024 * 1024) -> bytes:
        """Unread output, waiting up to ``timeout`` seconds for some; ``b""`` when none came."""
        return await self.output.read(timeout, max_bytes)

    async def read_until(self, needle: bytes, timeout: float) -> bytes:
        """Read until ``needle`` appears in the output read by this call, or until ``timeout``."""
        return await self.output.read_until(needle, timeout)

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the terminal (as if typed).

        Raises:
            ChannelAConflict: the process on the terminal has exited (upstream's "pty session lost").
            ChannelAUnavailable: writing to the terminal failed.
        """
        if self.exited or self._sock is None:
            raise ChannelAConflict(f"pty session lost: {self.pty_id} has exited", retryable=False)
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)
        except OSError as err:
            raise ChannelAUnavailable(f"cannot write to {self.pty_id}: {err}") from err

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size (``exec_resize``); the foreground program gets ``SIGWINCH``."""
        api = self._provider._api_sync()
        await self._provider._call(api.exec_resize, self._exec_id, height=rows, width=cols)
        self.cols, self.rows = cols, rows

    async def close(self, grace: float = 1.0) -> tuple[int | None, PtyExitReason]:
        """End the session (hang-up, then ``SIGKILL`` after ``grace``) and release the socket."""
        if not self.exited:
            self._closing = True
            await self._signal("HUP")
            try:
                await asyncio.wait_for(asyncio.shield(self.output.wait_exited()), grace)
            except TimeoutError:
                await self._signal("KILL")
                await self._wait_exited(grace + 5)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._release()
        with contextlib.suppress(ProviderError):
            await self._provider._exec(self._container, ["rm", "-f", "--", self.pid_file], "/", [], 10.0)
        return self.exit_code, self.reason or "exit"

    async def _wait_exited(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.output.wait_exited()), timeout)
        except TimeoutError:
            # The engine kept the stream open: stop reading, the exit code is the exec's.
            if self._task is not None:
                self._task.cancel()
            self.exit_code = await self._exit_code()
            self.reason = "killed"
            self.output.mark_exited()

    async def _signal(self, name: str) -> None:
        with contextlib.suppress(ProviderError):
            await self._provider._exec(
                self._container, ["sh", "-c", _SIGNAL_SESSION, "sh", name, self.pid_file], "/", [], 10.0
            )

    def _release(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        response, self._response = self._response, None
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
