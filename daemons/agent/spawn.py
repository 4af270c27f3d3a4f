"""Starting one command for the agent's ``exec`` op and collecting its output, as cheaply as the OS allows.

Most of an ``exec true`` used to be Python overhead around the spawn: asyncio's subprocess support
builds a transport, a protocol and a stream reader per pipe, registers the child with a child
watcher and wraps every step in futures (about 1.2 ms of the daemon's CPU per command, against
0.3 ms for the spawn itself). :func:`start_command` therefore has two ways to run a command, with
the same results:

- **pidfd** (Linux 5.3+): :class:`subprocess.Popen` starts the child (CPython uses ``vfork`` there:
  no page-table copy, ``cwd`` and the new session are set in the child), stdout and stderr are
  plain pipes whose read ends the event loop watches directly, stdin is written from the loop, and
  the exit is noticed through a pidfd, with no child watcher involved. The executable is looked up
  on ``PATH`` once and remembered, so the child does not try every ``PATH`` entry while the daemon
  waits for it (the lookup is checked against the directories' modification times every second,
  so a new or removed command is seen within a second).
- **asyncio** everywhere else (macOS, old kernels): :func:`asyncio.create_subprocess_exec`.

Both give a :class:`RunningCommand`: the pid (which is also the process group, since the command
runs in its own session), :meth:`~RunningCommand.wait` with a deadline, and
:meth:`~RunningCommand.finish_output`, which collects what is left in the pipes for a short grace
(a background child may keep them open forever) and then stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

__all__ = ["CommandOutput", "RunningCommand", "pidfd_supported", "start_command"]

_READ_CHUNK: Final = 65536
_WHICH_CACHE_LIMIT: Final = 256
_WHICH_RECHECK_SECONDS = 1.0
"""A remembered PATH lookup is trusted this long before the directories are looked at again."""


class CommandOutput:
    """One output stream of a command: at most ``cap`` bytes kept, every byte counted."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        """Count ``chunk`` and keep what fits under the cap."""
        self.total += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]


class RunningCommand(Protocol):
    """A started command whose output is being collected."""

    pid: int
    stdout: CommandOutput
    stderr: CommandOutput
    way: str
    """How it was started: ``posix_spawn``, ``popen`` (both watched by pidfd) or ``asyncio``."""

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else ``None``."""
        ...

    async def wait(self, timeout: float | None) -> bool:
        """Wait for the command to exit; ``False`` if ``timeout`` seconds passed first."""
        ...

    async def finish_output(self, grace: float) -> None:
        """Collect output until both pipes close or ``grace`` seconds pass, then stop reading."""
        ...

    def close(self) -> None:
        """Stop watching the command and release its pipes (idempotent; never kills it)."""
        ...


_pidfd_state: bool | None = None


def pidfd_supported() -> bool:
    """Whether this kernel and Python offer pidfds (checked once)."""
    global _pidfd_state
    if _pidfd_state is None:
        if not hasattr(os, "pidfd_open"):
            _pidfd_state = False
        else:
            try:
                os.close(os.pidfd_open(os.getpid()))
            except OSError:
                _pidfd_state = False
            else:
                _pidfd_state = True
    return _pidfd_state


# (name, PATH) -> (path found, mtimes of the PATH directories searched up to and including its own,
# when they were last checked).
_which_cache: dict[tuple[str, str], tuple[str, tuple[int, ...], float]] = {}


def _dir_stamps(entries: list[str]) -> tuple[int, ...]:
    stamps: list[int] = []
    for entry in entries:
        try:
            stamps.append(os.stat(entry).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def _resolve(name: str, env: Mapping[bytes, bytes]) -> str | None:
    """The absolute path the child would run for ``name`` under ``env``'s PATH, or ``None`` to let it search.

    A lookup is remembered together with the modification times of the directories searched and
    checked against them again after :data:`_WHICH_RECHECK_SECONDS`, so a command added earlier in
    PATH (or removed) is seen within a second, instead of the child trying one ``execve`` per PATH
    entry while the daemon waits for it.
    """
    if "/" in name:
        return None
    path = os.fsdecode(env.get(b"PATH", os.defpath.encode()))
    entries = path.split(os.pathsep)
    if any(not os.path.isabs(entry) for entry in entries):
        return None  # a relative PATH entry means something else in the command's cwd
    key = (name, path)
    cached = _which_cache.get(key)
    now = time.monotonic()
    if cached is not None:
        remembered, stamps, checked = cached
        if now - checked < _WHICH_RECHECK_SECONDS:
            return remembered
        if _dir_stamps(entries[: len(stamps)]) == stamps:
            _which_cache[key] = (remembered, stamps, now)
            return remembered
    found = shutil.which(name, path=path)
    if found is None:
        _which_cache.pop(key, None)
        return None
    searched = next((i + 1 for i, entry in enumerate(entries) if os.path.join(entry, name) == found), len(entries))
    if len(_which_cache) >= _WHICH_CACHE_LIMIT:
        _which_cache.clear()
    _which_cache[key] = (found, _dir_stamps(entries[:searched]), now)
    return found


def _forget(name: str, env: Mapping[bytes, bytes]) -> None:
    path = os.fsdecode(env.get(b"PATH", os.defpath.encode()))
    _which_cache.pop((name, path), None)


def _environment(base: Mapping[bytes, bytes] | None, overrides: Mapping[str, str]) -> dict[bytes, bytes]:
    env = dict(os.environb if base is None else base)
    for key, value in overrides.items():
        env[os.fsencode(key)] = os.fsencode(value)
    return env


class _Child(Protocol):
    """How a started child is reaped: a :class:`subprocess.Popen` or :class:`_SpawnedChild`."""

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


class _SpawnedChild:
    """A child started with ``os.posix_spawn``, reaped like a Popen (``returncode`` negative for a signal)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere; nothing more to learn
                self.returncode = 255
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        code = self._reap(0)
        assert code is not None
        return code


class _PidfdCommand:
    """A command watched through its pidfd and its raw pipe fds on the running loop."""

    def __init__(
        self, pid: int, child: _Child, way: str, out_fd: int, err_fd: int, in_fd: int | None, stdin: bytes, cap: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._proc = child
        self.pid = pid
        self.way = way
        self.stdout = CommandOutput(cap)
        self.stderr = CommandOutput(cap)
        self._sinks = {out_fd: self.stdout, err_fd: self.stderr}
        self._exited = self._loop.create_future()
        self._drained = self._loop.create_future()
        self._pidfd: int | None = os.pidfd_open(pid)
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_readable, fd)
        self._loop.add_reader(self._pidfd, self._on_exit)
        self._in_fd = in_fd
        self._pending = memoryview(stdin)
        if in_fd is not None:
            os.set_blocking(in_fd, False)
            self._on_writable()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def _on_readable(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._sinks[fd].feed(chunk)
            return
        self._close_pipe(fd)

    def _close_pipe(self, fd: int) -> None:
        if self._sinks.pop(fd, None) is None:
            return
        self._loop.remove_reader(fd)
        os.close(fd)
        if not self._sinks and not self._drained.done():
            self._drained.set_result(None)

    def _on_writable(self) -> None:
        fd = self._in_fd
        if fd is None:
            return
        try:
            while self._pending:
                written = os.write(fd, self._pending)
                self._pending = self._pending[written:]
        except BlockingIOError:
            self._loop.add_writer(fd, self._on_writable)
            return
        except OSError as err:  # EPIPE: the command does not read its input, which is its business
            if err.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
        self._close_stdin()

    def _close_stdin(self) -> None:
        fd, self._in_fd = self._in_fd, None
        if fd is not None:
            self._loop.remove_writer(fd)
            os.close(fd)

    def _on_exit(self) -> None:
        if self._pidfd is None:
            return  # closed: whoever closed it reaps the child
        if self._proc.poll() is None:
            return  # a spurious wake-up: the child is not reapable yet
        self._close_pidfd()
        self._close_stdin()
        if not self._exited.done():
            self._exited.set_result(None)

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    async def wait(self, timeout: float | None) -> bool:
        done, _ = await asyncio.wait({self._exited}, timeout=timeout)
        return bool(done)

    async def finish_output(self, grace: float) -> None:
        if self._sinks:
            await asyncio.wait({self._drained}, timeout=grace)
        for fd in list(self._sinks):
            self._close_pipe(fd)

    def close(self) -> None:
        for fd in list(self._sinks):
            self._close_pipe(fd)
        self._close_stdin()
        self._close_pidfd()
        if self._proc.returncode is None and self._proc.poll() is None:
            # Still running (killed by the caller a moment ago): reap it in the background.
            self._loop.run_in_executor(None, self._proc.wait)


_devnull: int | None = None


def _null_input() -> int:
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


def _in_own_directory(cwd: str) -> bool:
    """Whether ``cwd`` is this process's working directory (``posix_spawn`` cannot set another)."""
    try:
        return os.getcwd() == cwd
    except OSError:
        return False


def _spawn(
    executable: str | None, argv: Sequence[str], cwd: str, environment: dict[bytes, bytes], fds: tuple[int, int, int]
) -> tuple[int, _Child, str]:
    """Start the child: ``posix_spawn`` when it can do the job, else ``Popen`` (vfork + exec either way)."""
    if executable is not None and min(fds) > 2 and _in_own_directory(cwd):
        # posix_spawn has no cwd, but the agent daemon works in its root (most commands' cwd);
        # it skips Popen's Python set-up, about a quarter of a millisecond of CPU per command.
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        pid = os.posix_spawn(executable, list(argv), environment, file_actions=actions, setsid=True)
        return pid, _SpawnedChild(pid), "posix_spawn"
    try:
        proc = subprocess.Popen(
            list(argv),
            executable=executable,
            cwd=cwd,
            env=environment,
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            start_new_session=True,
        )
    except FileNotFoundError:
        if executable is None:
            raise
        _forget(argv[0], environment)  # the remembered path went away: let the child search PATH
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=environment,
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            start_new_session=True,
        )
    return proc.pid, proc, "popen"


def _start_pidfd(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    base_env: Mapping[bytes, bytes] | None,
    stdin: bytes,
    cap: int,
) -> _PidfdCommand:
    environment = _environment(base_env, env)
    executable = _resolve(argv[0], environment)
    fds: list[int] = []
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds += [out_r, out_w]
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds += [err_r, err_w]
        in_r: int | None = None
        in_w: int | None = None
        if stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            fds += [in_r, in_w]
        pid, child, way = _spawn(
            executable, argv, cwd, environment, (in_r if in_r is not None else _null_input(), out_w, err_w)
        )
        # The child holds its own copies now; ours would keep the pipes open after it exits.
        for fd in (out_w, err_w, in_r):
            if fd is not None:
                os.close(fd)
                fds.remove(fd)
        try:
            return _PidfdCommand(pid, child, way, out_r, err_r, in_w, stdin, cap)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            child.wait()
            raise
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol that also says when the process exited, pipes open or not.

    ``Process.wait()`` waits for the pipes to close as well, so a background child holding them
    would keep it waiting; the exec op's grace for such pipes needs the exit on its own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ_CHUNK, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _AsyncioCommand:
    """The portable way: asyncio's subprocess transport with a reader task per pipe."""

    def __init__(
        self, transport: asyncio.SubprocessTransport, protocol: _ExitAwareProtocol, stdin: bytes, cap: int
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self.pid = transport.get_pid()
        self.way = "asyncio"
        self.stdout = CommandOutput(cap)
        self.stderr = CommandOutput(cap)
        assert protocol.stdout is not None and protocol.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._pump(protocol.stdout, self.stdout)),
            asyncio.ensure_future(self._pump(protocol.stderr, self.stderr)),
        ]
        self._writer = asyncio.ensure_future(self._feed(stdin)) if stdin else None

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, sink: CommandOutput) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            sink.feed(chunk)

    async def _feed(self, data: bytes) -> None:
        pipe = self._transport.get_pipe_transport(0)
        if not isinstance(pipe, asyncio.WriteTransport):
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            pipe.write(data)
            writer = asyncio.StreamWriter(pipe, self._protocol, None, asyncio.get_running_loop())
            await writer.drain()
        pipe.close()

    async def wait(self, timeout: float | None) -> bool:
        done, _ = await asyncio.wait({self._protocol.exited}, timeout=timeout)
        return bool(done)

    async def finish_output(self, grace: float) -> None:
        _done, pending = await asyncio.wait(self._readers, timeout=grace)
        for task in pending:
            task.cancel()

    def close(self) -> None:
        for task in [*self._readers, *([self._writer] if self._writer else [])]:
            if not task.done():
                task.cancel()
        # Only ever called once the command exited or its group was killed: closing frees the pipes.
        self._transport.close()


async def _start_asyncio(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    base_env: Mapping[bytes, bytes] | None,
    stdin: bytes,
    cap: int,
) -> _AsyncioCommand:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _ExitAwareProtocol(loop),
        *argv,
        cwd=cwd,
        env=_environment(base_env, env),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    return _AsyncioCommand(transport, protocol, stdin, cap)


async def start_command(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdin: bytes = b"",
    cap: int,
    base_env: Mapping[bytes, bytes] | None = None,
    use_pidfd: bool | None = None,
) -> RunningCommand:
    """Start ``argv`` in its own session with ``cwd``, ``base_env`` plus ``env``, and ``stdin``.

    ``base_env`` is the environment the command starts from (default: this process's, read now).

    ``use_pidfd`` chooses the way (default: pidfd where the OS has it). Output beyond ``cap``
    bytes per stream is counted, not kept.

    Raises:
        FileNotFoundError: No such command.
        PermissionError: The command is not executable.
    """
    if not argv:
        raise ValueError("an empty command line")
    if use_pidfd if use_pidfd is not None else pidfd_supported():
        return _start_pidfd(argv, cwd=cwd, env=env, base_env=base_env, stdin=stdin, cap=cap)
    return await _start_asyncio(argv, cwd=cwd, env=env, base_env=base_env, stdin=stdin, cap=cap)
