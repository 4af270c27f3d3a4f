"""Edges that run on the worker host, for boxes the host cannot reach over TCP (local boxes).

A local box has its own network namespace and no view of the runtime's code, so its desktop and
terminal edges run here, as host processes, and reach the box's VNC servers and ttyds through
their unix sockets, which the host sees under the box's ``/tmp`` (``<box tmp>/.sandbox-edge/
desktop/vnc.sock`` and so on). The box never sees the edge's key: it lives in the box's private
directory (root-owned, 0700, not visible inside the box), with the edge's pid file, port file and
log::

    <private>/key              the box's derived key, 64 hex digits, 0600
    <private>/<plane>.pid      "<pid> <start time> <epoch>" of the running edge
    <private>/<plane>.port     the port it listens on (written by the edge once listening)
    <private>/<plane>.log      its log (never a token or the key)
    <private>/<plane>.lock     serialises bring-ups across workers on this host

:meth:`HostEdges.ensure` is idempotent: an edge recorded in the pid file that is still the same
process (its start time, like the in-box scripts' ``pid_alive``), serves the requested epoch and
answers on its port is reused; otherwise it is stopped and a new one is started on the same port
when that port is free (viewers keep their URL), else on any free port. An edge is started in its
own session, detached from the worker (it outlives the activity and the worker), with a minimal
environment (none of the worker's secrets) that carries the box's marker variable, so that the
provider's ``terminate`` kills it with the box; it also exits by itself once the box's ``/tmp``
directory is gone (``--watch-dir``). It listens on 127.0.0.1 only.

The socket directory belongs to the box, so the edge opens its targets without following
symbolic links (:mod:`daemons.edge.target`); the paths handed to it are resolved here up to the
box's ``/tmp`` directory, which the box cannot replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "EDGE_SOCKETS",
    "HostEdgeError",
    "HostEdgeLayout",
    "HostEdgeUp",
    "HostEdges",
    "Plane",
    "drop_key",
    "ensure_private_dir",
    "write_key",
]

Plane = Literal["desktop", "terminal"]

EDGE_SOCKETS: Final[dict[Plane, tuple[str, str]]] = {
    "desktop": ("vnc.sock", "vnc-view.sock"),
    "terminal": ("ttyd.sock", "ttyd-view.sock"),
}
"""The (control, view) sockets of each plane in its state directory (see the in-box scripts)."""

_STATE_DIR: Final = ".sandbox-edge"
_EDGE_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_KEY_HEX_LENGTH: Final = 64


class HostEdgeError(Exception):
    """A host edge could not be started (``stage`` ``edge``) or its lock was held too long (``lock``)."""

    def __init__(self, message: str, *, stage: Literal["edge", "lock"] = "edge") -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage


@dataclass(frozen=True)
class HostEdgeLayout:
    """Where one local box's edges keep their state, and where its plane sockets are, on the host.

    Attributes:
        private: The box's host-only directory (key, pid, port and log files).
        box_tmp: The host directory the box sees as ``/tmp``.
    """

    private: Path
    box_tmp: Path

    @property
    def key_file(self) -> Path:
        """The edge key file."""
        return self.private / "key"

    def targets(self, plane: Plane) -> tuple[Path, Path]:
        """The (control, view) sockets of ``plane``, as host paths resolved up to the box's ``/tmp``."""
        state = Path(os.path.realpath(self.box_tmp)) / _STATE_DIR / plane
        control, view = EDGE_SOCKETS[plane]
        return state / control, state / view

    def file(self, plane: Plane, suffix: str) -> Path:
        """``<private>/<plane>.<suffix>``."""
        return self.private / f"{plane}.{suffix}"


@dataclass(frozen=True)
class HostEdgeUp:
    """A running host edge: its port on 127.0.0.1 and whether it was already running."""

    port: int
    already: bool


@dataclass(frozen=True)
class _Record:
    pid: int
    start: int
    epoch: int


def _proc_start(pid: int) -> int | None:
    """The start time (field 22 of ``/proc/<pid>/stat``) of a live, non-zombie process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _read_small(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_private_dir(private: Path) -> None:
    """Create the private directory (0700) if needed; refuse one that is not a plain directory.

    Raises:
        HostEdgeError: It is a symbolic link or not a directory.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(private, 0o700)
    st = os.lstat(private)
    if not stat.S_ISDIR(st.st_mode):
        raise HostEdgeError(f"the edge's private directory {private} is not a directory")
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(private, 0o700)


def write_key(layout: HostEdgeLayout, key: bytes) -> None:
    """Write the box's derived key into ``<private>/key`` (0600, atomically, only when it changed)."""
    ensure_private_dir(layout.private)
    data = key.hex().encode() + b"\n"
    current = _read_small(layout.key_file)
    if current is not None and current.encode() == data:
        return
    _atomic_write(layout.key_file, data)


def drop_key(layout: HostEdgeLayout) -> None:
    """Delete the key file (nothing is admitted without it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.key_file)


async def _answers(port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class HostEdges:
    """Starts, reuses and stops the host edges of local boxes (one per box and plane).

    Args:
        python: The interpreter that runs ``-m daemons.edge`` (this one by default).
        source_root: Put on the edge's ``PYTHONPATH`` (the directory holding this package).
        marker_var: The environment variable that marks a box's processes (the provider's).
        start_timeout: How long a new edge may take to listen.
        lock_timeout: How long to wait for a concurrent bring-up of the same edge.
    """

    def __init__(
        self,
        *,
        python: str = sys.executable,
        source_root: Path | None = None,
        marker_var: str = "SANDBOX_BOX_ID",
        start_timeout: float = 20.0,
        lock_timeout: float = 30.0,
    ) -> None:
        self._python = python
        self._source_root = source_root or Path(__file__).resolve().parent.parent.parent
        self._marker_var = marker_var
        self._start_timeout = start_timeout
        self._lock_timeout = lock_timeout
        self._locks: dict[tuple[Path, Plane], asyncio.Lock] = {}

    # -- state ----------------------------------------------------------------------------------

    def _record(self, layout: HostEdgeLayout, plane: Plane) -> _Record | None:
        text = _read_small(layout.file(plane, "pid"))
        if text is None:
            return None
        parts = text.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        record = _Record(int(parts[0]), int(parts[1]), int(parts[2]))
        return record if _proc_start(record.pid) == record.start else None

    def _port(self, layout: HostEdgeLayout, plane: Plane) -> int | None:
        text = _read_small(layout.file(plane, "port"))
        if text is None or not text.strip().isdigit():
            return None
        port = int(text.strip())
        return port if 1 <= port <= 65535 else None

    def running(self, layout: HostEdgeLayout, plane: Plane) -> int | None:
        """The pid of the recorded edge of ``plane`` if it still runs (tests and diagnostics)."""
        record = self._record(layout, plane)
        return record.pid if record is not None else None

    async def status(self, layout: HostEdgeLayout, plane: Plane, *, epoch: int | None = None) -> int | None:
        """The port of a healthy edge of ``plane`` (of ``epoch``, if given), or None."""
        record = self._record(layout, plane)
        port = self._port(layout, plane)
        if record is None or port is None or (epoch is not None and record.epoch != epoch):
            return None
        return port if await _answers(port) else None

    # -- locking --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, layout: HostEdgeLayout, plane: Plane) -> AsyncIterator[None]:
        key = (layout.private, plane)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            ensure_private_dir(layout.private)
            fd = os.open(layout.file(plane, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + self._lock_timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise HostEdgeError(
                                f"another bring-up of the {plane} edge held its lock for {self._lock_timeout:g} s",
                                stage="lock",
                            ) from None
                        await asyncio.sleep(0.02)
                yield
            finally:
                os.close(fd)

    # -- operations -----------------------------------------------------------------------------

    async def ensure(self, layout: HostEdgeLayout, plane: Plane, *, box_id: str, epoch: int) -> HostEdgeUp:
        """A healthy edge of ``plane`` for ``epoch``: the running one, or a new one.

        The key must already be in place (:func:`write_key`).

        Raises:
            HostEdgeError: The edge did not come up, or a concurrent bring-up held the lock too long.
        """
        port = await self.status(layout, plane, epoch=epoch)
        if port is not None:
            return HostEdgeUp(port, already=True)
        async with self._locked(layout, plane):
            port = await self.status(layout, plane, epoch=epoch)
            if port is not None:
                return HostEdgeUp(port, already=True)
            preferred = self._port(layout, plane) or 0
            await self._stop_locked(layout, plane)
            return HostEdgeUp(await self._start(layout, plane, box_id, epoch, preferred), already=False)

    async def stop(self, layout: HostEdgeLayout, plane: Plane) -> None:
        """Stop the edge of ``plane`` (and its per-connection children); nothing running is fine."""
        if not layout.private.is_dir():
            return
        async with self._locked(layout, plane):
            await self._stop_locked(layout, plane)
        lock = self._locks.get((layout.private, plane))
        if lock is not None and not lock.locked():
            del self._locks[(layout.private, plane)]

    async def _stop_locked(self, layout: HostEdgeLayout, plane: Plane) -> None:
        record = self._record(layout, plane)
        if record is not None:
            # The edge leads its own process group; websockify's per-connection children are in it.
            # It is stateless, so it takes KILL at once (it is slow to handle TERM).
            try:
                os.killpg(record.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while _proc_start(record.pid) == record.start and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        for suffix in ("pid", "port"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.file(plane, suffix))

    def _argv(self, layout: HostEdgeLayout, plane: Plane, epoch: int, preferred: int) -> list[str]:
        control, view = layout.targets(plane)
        return [
            self._python, "-P", "-s", "-m", "daemons.edge", plane,
            "--host", "127.0.0.1",
            "--port", str(preferred), "--any-port",
            "--port-file", str(layout.file(plane, "port")),
            "--unix-target", str(control),
            "--view-target", str(view),
            "--key-file", str(layout.key_file),
            "--epoch", str(epoch),
            # A box that vanishes without a tear-down (its directory removed) takes its edge along.
            "--watch-dir", os.path.realpath(layout.box_tmp),
        ]  # fmt: skip

    def _env(self, box_id: str) -> dict[str, str]:
        # Nothing of the worker's environment (it may hold secrets): what the interpreter needs,
        # and the box's marker, so that terminating the box kills its edges too.
        return {
            "PATH": _EDGE_PATH,
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self._source_root),
            "PYTHONDONTWRITEBYTECODE": "1",
            self._marker_var: box_id,
        }

    async def _start(self, layout: HostEdgeLayout, plane: Plane, box_id: str, epoch: int, preferred: int) -> int:
        log_path = layout.file(plane, "log")
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # A shell forks the edge into the background, prints its pid and exits: the edge is
            # orphaned at once (init reaps it, whenever it ends, even after this worker is gone),
            # and setsid makes it the leader of its own session (a background child of a shell
            # without job control is no group leader, so setsid does not fork again).
            launcher = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                'setsid "$@" >&2 & echo "$!"',
                "launch-edge",
                *self._argv(layout, plane, epoch, preferred),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                cwd=layout.private,
                env=self._env(box_id),
            )
        except OSError as err:
            raise HostEdgeError(f"cannot start the {plane} edge: {err.strerror or err}") from err
        finally:
            os.close(log_fd)
        out, _ = await launcher.communicate()
        text = out.decode("ascii", "replace").strip()
        if launcher.returncode != 0 or not text.isdigit():
            raise HostEdgeError(f"cannot start the {plane} edge: {_log_tail(log_path)}")
        pid = int(text)
        start = _proc_start(pid)
        if start is None:
            raise HostEdgeError(f"the {plane} edge exited at once: {_log_tail(log_path)}")
        _atomic_write(layout.file(plane, "pid"), f"{pid} {start} {epoch}\n".encode())
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            port = self._port(layout, plane)
            if port is not None and await _answers(port):
                return port
            if _proc_start(pid) != start:
                break
            await asyncio.sleep(0.02)
        alive = _proc_start(pid) == start
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        what = f"did not listen within {self._start_timeout:g} s" if alive else "exited"
        raise HostEdgeError(f"the {plane} edge {what}: {_log_tail(log_path)}")


def _log_tail(path: Path, limit: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError as err:
        return f"(no log: {os.strerror(err.errno or errno.EIO)})"
