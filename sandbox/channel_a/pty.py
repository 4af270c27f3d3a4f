"""Real pseudo-terminals for Channel-A: a shell in the box attached to a PTY.

Channel-A talks to any :class:`Pty` (write, read, resize, close, exit status) that a
:class:`PtyHost` opens. Two kinds exist:

- :class:`PtyProcess`: the PTY pair is opened here, the master kept, and the slave given to a
  process started in the box as its controlling terminal; resizing is ``TIOCSWINSZ`` on the master,
  so programs in the box get ``SIGWINCH`` and ``stty size`` sees the new size. How the process
  enters the box is the job of a :class:`PtyLauncher`: the ``local`` provider's
  :class:`providers.local.LocalBoxSession` is one, so a PTY shell runs exactly where an exec runs
  (bubblewrap isolation: the box's own user and PID namespaces and mounts) and ``terminate`` of the
  box ends it. The selfhosted agent uses the same class on its machine.
- A session that is itself a :class:`PtyHost` (the selfhosted session: the PTY lives on the user's
  machine and is driven over the agent protocol's ``pty_*`` ops).

:class:`PtyOutput` is the unread-output buffer both share.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import os
import signal
import struct
import termios
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from sandbox.channel_a.models import PtyExitReason
from sandbox.errors import ChannelAConflict, ChannelAUnavailable, ChannelAUnsupported

if TYPE_CHECKING:
    from sandbox.box import BoxSession

__all__ = [
    "LauncherPtyHost",
    "Pty",
    "PtyHost",
    "PtyLauncher",
    "PtyOutput",
    "PtyProcess",
    "default_pty_host",
    "spawn_on_terminal",
]

_READ_CHUNK: Final = 65536
_MAX_UNREAD: Final = 4 * 1024 * 1024
_EXIT_DRAIN_SECONDS: Final = 0.05


@runtime_checkable
class PtyLauncher(Protocol):
    """Starts a process inside one box with a given terminal as its controlling terminal."""

    async def launch(
        self, argv: Sequence[str], *, cwd: str, env: Mapping[str, str], tty_fd: int
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in the box, in directory ``cwd`` (as the box sees it), on ``tty_fd``.

        The returned process must lead its own session with ``tty_fd`` as controlling terminal,
        so that killing its process group and hanging up the terminal end the shell.
        """
        ...


@runtime_checkable
class Pty(Protocol):
    """One open pseudo-terminal as Channel-A drives it."""

    pty_id: str
    exit_code: int | None
    reason: PtyExitReason | None

    @property
    def exited(self) -> bool:
        """Whether the process on the PTY has ended."""
        ...

    async def read(self, timeout: float = 0.0, max_bytes: int = ...) -> bytes:
        """Unread output, waiting up to ``timeout`` seconds for some; ``b""`` when none came."""
        ...

    async def read_until(self, needle: bytes, timeout: float) -> bytes:
        """Read until ``needle`` appears in the output read by this call, or until ``timeout``."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the terminal; ``ChannelAConflict`` once the process has exited."""
        ...

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the foreground program gets ``SIGWINCH``."""
        ...

    async def close(self, grace: float = 1.0) -> tuple[int | None, PtyExitReason]:
        """End the process (hang-up, then ``SIGKILL`` after ``grace``) and release the PTY."""
        ...


OutputCallback = Callable[[str], Awaitable[None]]
ExitCallback = Callable[[int | None, PtyExitReason], Awaitable[None]]


@runtime_checkable
class PtyHost(Protocol):
    """Opens PTYs whose process runs in one box."""

    async def open_pty(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        cols: int,
        rows: int,
        on_output: OutputCallback,
        on_exit: ExitCallback,
    ) -> Pty:
        """Start ``argv`` in the box on a new ``cols`` x ``rows`` PTY in ``cwd`` (as the box sees it).

        ``on_output`` gets the decoded output as it arrives, ``on_exit`` the exit status once;
        neither is called before this returns.
        """
        ...


class LauncherPtyHost:
    """A :class:`PtyHost` that opens the PTY here and starts the process through a :class:`PtyLauncher`."""

    def __init__(self, launcher: PtyLauncher) -> None:
        self.launcher = launcher

    async def open_pty(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        cols: int,
        rows: int,
        on_output: OutputCallback,
        on_exit: ExitCallback,
    ) -> Pty:
        """Open a :class:`PtyProcess` running ``argv`` (see :meth:`PtyHost.open_pty`)."""
        pty = PtyProcess(shell=argv[0], cwd=cwd, cols=cols, rows=rows, on_output=on_output, on_exit=on_exit)
        await pty.start(self.launcher, argv, env)
        return pty


def default_pty_host(source: BoxSession | PtyHost | PtyLauncher) -> PtyHost | None:
    """How PTYs reach a box: ``source`` itself when it is a :class:`PtyHost` (a selfhosted session),
    a :class:`LauncherPtyHost` when it is a :class:`PtyLauncher` (a local box), else ``None`` (no PTY
    support)."""
    if isinstance(source, PtyHost):
        return source
    if isinstance(source, PtyLauncher):
        return LauncherPtyHost(source)
    return None


def _take_terminal() -> None:
    # Runs in the child between fork and exec: a new session, then fd 0 (the PTY) becomes its
    # controlling terminal, so job control works and a hang-up reaches the whole session.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def spawn_on_terminal(
    argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str], tty_fd: int, pass_fds: Sequence[int] = ()
) -> asyncio.subprocess.Process:
    """Start ``argv`` leading a new session with ``tty_fd`` as stdin, stdout, stderr and controlling terminal."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=tty_fd,
        stdout=tty_fd,
        stderr=tty_fd,
        cwd=cwd,
        env=dict(env),
        pass_fds=tuple(pass_fds),
        preexec_fn=_take_terminal,
    )


# --------------------------------------------------------------------------- the PTY itself


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _session_members(sid: int) -> set[int]:
    members: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
            if int(raw[raw.rfind(b")") + 2 :].split()[3]) == sid:
                members.add(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return members


class PtyOutput:
    """The unread output of one PTY, the end of that output, and the exit of its process.

    At most ``limit`` bytes are kept unread (the oldest are dropped beyond that, and counted in
    :attr:`dropped`). :meth:`read` waits for output, or, once the output has ended, for the exit.
    """

    def __init__(self, limit: int = _MAX_UNREAD) -> None:
        self.limit = limit
        self.dropped = 0
        self._unread = bytearray()
        self._data = asyncio.Event()
        self._eof = False
        self._exited = asyncio.Event()

    @property
    def exited(self) -> bool:
        """Whether the process has ended (set by :meth:`mark_exited`)."""
        return self._exited.is_set()

    @property
    def pending(self) -> int:
        """Bytes not read yet."""
        return len(self._unread)

    def feed(self, chunk: bytes) -> None:
        """Keep ``chunk`` for readers and wake them."""
        self._unread += chunk
        if len(self._unread) > self.limit:
            excess = len(self._unread) - self.limit
            del self._unread[:excess]
            self.dropped += excess
        self._data.set()

    def end_of_output(self) -> None:
        """No more output will come (every slave end is closed)."""
        self._eof = True
        self._data.set()

    def mark_exited(self) -> None:
        """The process has ended: readers stop waiting."""
        self._exited.set()
        self._data.set()

    async def wait_exited(self) -> None:
        """Return once the process has ended."""
        await self._exited.wait()

    async def read(self, timeout: float = 0.0, max_bytes: int = _MAX_UNREAD) -> bytes:
        """Unread output, waiting up to ``timeout`` seconds for some; ``b""`` when none came."""
        if not self._unread and timeout > 0 and not self.exited:
            # After end of output, wait for the exit instead: returning at once would let a
            # caller polling read() starve the task that notices the exit.
            self._data.clear()
            waited = self._exited if self._eof else self._data
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waited.wait(), timeout)
        out = bytes(self._unread[:max_bytes])
        del self._unread[:max_bytes]
        return out

    async def read_until(self, needle: bytes, timeout: float) -> bytes:
        """Read until ``needle`` appears in the output read by this call, or until ``timeout``."""
        deadline = time.monotonic() + timeout
        out = b""
        while needle not in out:
            left = deadline - time.monotonic()
            if left <= 0 or (self.exited and not self._unread):
                break
            out += await self.read(timeout=left)
        return out


async def _ignore_output(_text: str) -> None:
    return None


async def _ignore_exit(_code: int | None, _reason: PtyExitReason) -> None:
    return None


class PtyProcess:
    """One open PTY held here: the master end, the process on the slave end and its unread output.

    Output is read as it arrives and handed to ``on_output`` (for events) and kept for
    :meth:`read` (at most 4 MiB unread; the oldest bytes are dropped beyond that).
    """

    def __init__(
        self,
        *,
        shell: str,
        cwd: str,
        cols: int,
        rows: int,
        on_output: OutputCallback = _ignore_output,
        on_exit: ExitCallback = _ignore_exit,
    ) -> None:
        self.pty_id = f"pty-{uuid.uuid4().hex[:16]}"
        self.shell = shell
        self.cwd = cwd
        self.cols = cols
        self.rows = rows
        self.exit_code: int | None = None
        self.reason: PtyExitReason | None = None
        self.output = PtyOutput()
        self._on_output = on_output
        self._on_exit = on_exit
        self._master = -1
        self._process: asyncio.subprocess.Process | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._eof = False

    @property
    def exited(self) -> bool:
        """Whether the process on the PTY has ended."""
        return self.output.exited

    @property
    def pid(self) -> int | None:
        """The pid of the process on the PTY (once started)."""
        return self._process.pid if self._process is not None else None

    async def start(self, launcher: PtyLauncher, argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Open the PTY pair and start ``argv`` on it through ``launcher``."""
        master, slave = os.openpty()
        try:
            _set_size(master, self.cols, self.rows)
            os.set_blocking(master, False)
            self._process = await launcher.launch(argv, cwd=self.cwd, env=env, tty_fd=slave)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._master = master
        asyncio.get_running_loop().add_reader(master, self._on_readable)
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch())]

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self._master, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""  # EIO: every slave end is closed
        if not chunk:
            self._stop_reading()
            return
        self.output.feed(chunk)
        if text := self._decoder.decode(chunk):
            self._chunks.put_nowait(text)

    def _stop_reading(self) -> None:
        if not self._eof:
            self._eof = True
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._master)
            self.output.end_of_output()

    async def _pump(self) -> None:
        while (text := await self._chunks.get()) is not None:
            await self._on_output(text)

    async def _watch(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        await asyncio.sleep(_EXIT_DRAIN_SECONDS)  # let the last output arrive before "exited"
        if not self._eof:
            with contextlib.suppress(OSError):
                self._on_readable()
        self.exit_code = 128 - code if code < 0 else code
        self.reason = "killed" if self._closing else "exit"
        self.output.mark_exited()
        self._chunks.put_nowait(None)
        await self._tasks[0]
        await self._on_exit(self.exit_code, self.reason)

    async def read(self, timeout: float = 0.0, max_bytes: int = _MAX_UNREAD) -> bytes:
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
        view = memoryview(data)
        while view:
            if self.exited:
                raise ChannelAConflict(f"pty session lost: {self.pty_id} has exited", retryable=False)
            try:
                view = view[os.write(self._master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError as err:
                raise ChannelAUnavailable(f"cannot write to {self.pty_id}: {err}") from err

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the foreground program gets ``SIGWINCH``."""
        if self._master < 0:
            raise ChannelAUnsupported(f"{self.pty_id} is not open")
        _set_size(self._master, cols, rows)
        self.cols, self.rows = cols, rows

    async def close(self, grace: float = 1.0) -> tuple[int | None, PtyExitReason]:
        """End the process (hang-up, then ``SIGKILL`` after ``grace``) and release the PTY."""
        process = self._process
        if process is not None and not self.exited:
            self._closing = True
            self._signal(signal.SIGHUP)
            try:
                await asyncio.wait_for(asyncio.shield(self.output.wait_exited()), grace)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await self.output.wait_exited()
        elif process is not None:
            await self.output.wait_exited()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stop_reading()
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        return self.exit_code, self.reason or "exit"

    def _signal(self, signum: signal.Signals) -> None:
        # Only while the leader is unreaped: its pid (and session id) cannot have been reused yet.
        assert self._process is not None
        if self._process.returncode is not None:
            return
        pid = self._process.pid
        targets = _session_members(pid) | {pid}
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)
        for member in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signum)
