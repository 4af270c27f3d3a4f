"""File access confined to the agent's root: no ``..``, no symlink, no race leads outside it.

A request path is resolved in two steps, by the runtime's one symlink-safe walk
(:mod:`sandbox.confined_path`). :meth:`Root.resolve` walks it component by component, following
symlinks as the file system would, and refuses (``path_escape``) any step that leaves the root: a
``..`` above it, an absolute path outside it, a symlink whose target is outside it. The resulting
components are then opened one at a time relative to directory file descriptors with
``O_NOFOLLOW``, so a symlink swapped in after the check fails the open instead of escaping.

A written file never gets the setuid, setgid or sticky bit: a requested mode is masked to its
permission bits (``0o777``), not refused, and so is the mode a rewrite keeps from the file it
replaces, so no request can plant a set-id program for whoever runs it later.

Failures raise :class:`OpRefused` carrying the wire error (code, message, detail); the operations
layer turns it into the agent's error reply.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sandbox.confined_path import (
    DIRECTORY_FLAGS,
    BaseUnavailable,
    PathEscape,
    SymlinkLoop,
    open_directory,
    resolve_components,
    split_relative,
)
from sandbox.control_protocol import ControlErrorCode, FsEntry

__all__ = ["MAX_LIST_DEPTH", "MAX_LIST_ENTRIES", "OpRefused", "Root", "os_refusal"]

MAX_LIST_ENTRIES: Final = 100_000
MAX_LIST_DEPTH: Final = 256
"""The deepest level a recursive listing returns; an entry below it refuses the listing (each level holds an fd)."""
_UPLOAD_PREFIX: Final = ".sandbox-upload-"
_PERMISSION_BITS: Final = 0o777
"""The mode bits a write may set: setuid, setgid and sticky are masked off."""


@dataclass
class OpRefused(Exception):
    """An op the agent refuses or fails, with the error it answers (internal to the daemon)."""

    code: ControlErrorCode
    message: str
    detail: dict[str, str] = field(default_factory=dict)
    retryable: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)


def os_refusal(err: OSError, path: str) -> OpRefused:
    """The wire error for an ``OSError`` on ``path``: ENOENT is ``NOT_FOUND``, the rest ``OS``."""
    name = errno.errorcode.get(err.errno or 0, "EIO")
    code = ControlErrorCode.NOT_FOUND if err.errno == errno.ENOENT else ControlErrorCode.OS
    text = os.strerror(err.errno) if err.errno else str(err)
    return OpRefused(code, f"{text}: {path}", {"errno": name, "path": path})


def _escape(path: str, why: str) -> OpRefused:
    return OpRefused(
        ControlErrorCode.OS,
        f"path {path!r} {why}; the agent serves only its root",
        {"reason": "path_escape", "errno": "EACCES", "path": path},
    )


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _entry(name: str, rel: str, st: os.stat_result) -> FsEntry:
    return FsEntry(
        name=name,
        path=rel,
        kind=_kind(st.st_mode),
        size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
        modified_ms=int(st.st_mtime * 1000),
        mode=stat.S_IMODE(st.st_mode),
    )


class Root:
    """The directory an agent serves; every path of every op is resolved inside it."""

    def __init__(self, path: Path) -> None:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise NotADirectoryError(f"agent root {path} is not a directory")
        self.real = real

    # --- resolution ---

    def resolve(self, path: str) -> list[str]:
        """The components of ``path`` under the root, symlinks followed inside it.

        ``path`` is relative to the root, or absolute and inside the root's real path.

        Raises:
            OpRefused: the path leaves the root (``path_escape``), has a NUL, or loops; any other
                ``OSError`` on the way (a name too long, a directory it may not search) is mapped by
                :func:`os_refusal`.
        """
        if "\0" in path:
            raise OpRefused(ControlErrorCode.OS, "path contains a NUL byte", {"errno": "EINVAL", "path": path})
        rel = path
        if path.startswith("/"):
            if path == self.real or path.startswith(self.real.rstrip("/") + "/"):
                rel = path[len(self.real) :]
            else:
                raise _escape(path, "is outside the root")

        def absolute_target(target: str) -> list[str]:
            if target != self.real and not target.startswith(self.real.rstrip("/") + "/"):
                raise PathEscape(f"goes through a symlink to {target!r} outside the root")
            return split_relative(target[len(self.real) :])

        try:
            return resolve_components(self.real, split_relative(rel), absolute_target=absolute_target)
        except PathEscape as escape:
            raise _escape(path, escape.why) from None
        except SymlinkLoop:
            raise OpRefused(
                ControlErrorCode.OS, f"too many symbolic links: {path}", {"errno": "ELOOP", "path": path}
            ) from None
        except OSError as err:
            # ENAMETOOLONG, EACCES, ELOOP...: the op still gets a typed reply, not an exception.
            raise os_refusal(err, path) from None

    def absolute(self, parts: list[str]) -> str:
        """The host path of resolved components."""
        return os.path.join(self.real, *parts)

    # --- descriptors ---

    def _open_dir(self, parts: list[str], *, create: bool, path: str) -> int:
        try:
            return open_directory(self.real, parts, create=create, mode=0o777)
        except BaseUnavailable as gone:
            # The root itself vanished (or is no longer a directory): a typed refusal, so the caller gets a reply.
            raise os_refusal(gone.error, path) from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _escape(path, "changed into a symlink while being opened") from None
            raise os_refusal(err, path) from None

    @contextlib.contextmanager
    def parent(self, path: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """``(directory fd, final name)`` of a path that names something below the root itself."""
        parts = self.resolve(path)
        if not parts:
            raise OpRefused(ControlErrorCode.OS, "the root itself is a directory", {"errno": "EISDIR", "path": path})
        fd = self._open_dir(parts[:-1], create=create, path=path)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    # --- operations ---

    def read(self, path: str, offset: int, length: int, limit: int) -> tuple[bytes, int]:
        """``length`` bytes (0 = to the end) from ``offset`` and the file's size.

        Raises:
            OpRefused: missing, not a regular file, escape, or more than ``limit`` bytes requested
                (``PAYLOAD_TOO_LARGE``: read it in ranges).
        """
        with self.parent(path) as (dfd, name):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
            except OSError as err:
                raise os_refusal(err, path) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                    raise OpRefused(ControlErrorCode.OS, f"{path} is {what}", {"errno": "EISDIR", "path": path})
                size = st.st_size
                want = max(0, size - offset) if length == 0 else length
                if want > limit:
                    raise OpRefused(
                        ControlErrorCode.PAYLOAD_TOO_LARGE,
                        f"{want} bytes requested, at most {limit} per message",
                        {"encoded_bytes": str((want + 2) // 3 * 4), "max_payload": str(limit // 3 * 4)},
                    )
                return os.pread(fd, want, offset) if want else b"", size
            finally:
                os.close(fd)

    def write(self, path: str, content: bytes, *, create_parents: bool, append: bool, mode: int) -> int:
        """Write a whole file atomically (temp file + rename), or append to it.

        ``mode`` (0 = keep the file's mode, or the default for a new file) is masked to ``0o777``;
        a mode that is only set-id or sticky bits therefore counts as 0.
        """
        mode &= _PERMISSION_BITS
        with self.parent(path, create=create_parents) as (dfd, name):
            try:
                if append:
                    fd = os.open(
                        name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd
                    )
                    try:
                        _write_all(fd, content)
                        # Appending changes the program a set-id file runs, so its set-id bits go too.
                        current = stat.S_IMODE(os.fstat(fd).st_mode)
                        wanted = mode or current & _PERMISSION_BITS
                        if wanted != current:
                            os.fchmod(fd, wanted)
                    finally:
                        os.close(fd)
                    return len(content)
                keep_mode = mode or self._existing_mode(dfd, name)
                tmp = f".{name[:64]}.{secrets.token_hex(6)}.sandbox-tmp"
                fd = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd
                )
                try:
                    _write_all(fd, content)
                    if keep_mode:
                        os.fchmod(fd, keep_mode)
                finally:
                    os.close(fd)
                try:
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                return len(content)
            except OSError as err:
                raise os_refusal(err, path) from None

    @staticmethod
    def _existing_mode(dfd: int, name: str) -> int:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return 0
        # A rewrite keeps the old file's permissions but never its set-id bits (the content is new).
        return stat.S_IMODE(st.st_mode) & _PERMISSION_BITS if stat.S_ISREG(st.st_mode) else 0

    def write_chunk(
        self, path: str, content: bytes, *, upload_id: str, offset: int, final: bool, create_parents: bool, mode: int
    ) -> int:
        """Write one upload chunk at ``offset`` of a staging file; ``final`` renames it onto ``path``.

        A resent chunk overwrites itself (the staging file is cut at ``offset`` first), so the
        sender may repeat a chunk whose reply it lost. A chunk that would leave a gap is refused.
        ``mode`` is masked to ``0o777`` as in :meth:`write`.
        """
        mode &= _PERMISSION_BITS
        with self.parent(path, create=create_parents) as (dfd, name):
            staging = f"{_UPLOAD_PREFIX}{upload_id}"
            try:
                fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd)
                try:
                    size = os.fstat(fd).st_size
                    if size < offset:
                        raise OpRefused(
                            ControlErrorCode.PROTOCOL,
                            f"upload chunk at {offset} but only {size} bytes staged",
                            {"staged_bytes": str(size), "path": path},
                        )
                    os.ftruncate(fd, offset)
                    os.lseek(fd, offset, os.SEEK_SET)
                    _write_all(fd, content)
                    if final:
                        keep_mode = mode or self._existing_mode(dfd, name)
                        if keep_mode:
                            os.fchmod(fd, keep_mode)
                finally:
                    os.close(fd)
                if final:
                    os.replace(staging, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as err:
                raise os_refusal(err, path) from None
            return len(content)

    def stat(self, path: str) -> FsEntry | None:
        """The entry a path names, or None when it does not exist."""
        parts = self.resolve(path)
        if not parts:
            try:
                st = os.stat(self.real)
            except OSError as err:
                raise os_refusal(err, path) from None
            return _entry("", "", st)
        try:
            fd = self._open_dir(parts[:-1], create=False, path=path)
        except OpRefused as refusal:
            if refusal.code is ControlErrorCode.NOT_FOUND or refusal.detail.get("errno") == "ENOTDIR":
                return None
            raise
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise os_refusal(err, path) from None
        finally:
            os.close(fd)
        return _entry(parts[-1], "/".join(parts), st)

    def list_dir(self, path: str, *, recursive: bool) -> list[FsEntry]:
        """A directory's entries (symlinks listed, never followed), sorted by relative path."""
        parts = self.resolve(path)
        fd = self._open_dir(parts, create=False, path=path)
        entries: list[FsEntry] = []
        try:
            self._walk(fd, recursive, entries, path)
        except OSError as err:
            # Only the top directory's scandir can get here (below it unreadable entries are skipped).
            raise os_refusal(err, path) from None
        finally:
            os.close(fd)
        entries.sort(key=lambda e: e.path)
        return entries

    def _walk(self, top: int, recursive: bool, out: list[FsEntry], path: str) -> None:
        # An explicit stack (pre-order, like the recursion it replaces): a hostile tree thousands of
        # levels deep must not overflow Python's stack. Each frame holds its directory's fd (the top
        # one is the caller's), so the depth is capped to bound the descriptors held at once.
        with os.scandir(top) as it:
            children = list(it)
        stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = [(top, "", iter(children))]
        try:
            while stack:
                fd, prefix, pending = stack[-1]
                child = next(pending, None)
                if child is None:
                    stack.pop()
                    if fd != top:
                        os.close(fd)
                    continue
                if child.name.startswith(_UPLOAD_PREFIX):
                    continue
                try:
                    st = child.stat(follow_symlinks=False)
                except OSError:
                    continue
                if len(stack) > MAX_LIST_DEPTH:
                    # An entry below the deepest level listed: the stack holds MAX_LIST_DEPTH + 1 fds at most.
                    raise OpRefused(
                        ControlErrorCode.PAYLOAD_TOO_LARGE,
                        f"{path} is more than {MAX_LIST_DEPTH} levels deep; list a deeper directory by itself",
                        {"path": path, "reason": "too_deep"},
                    )
                rel = f"{prefix}{child.name}"
                out.append(_entry(child.name, rel, st))
                if len(out) > MAX_LIST_ENTRIES:
                    raise OpRefused(
                        ControlErrorCode.PAYLOAD_TOO_LARGE,
                        f"more than {MAX_LIST_ENTRIES} entries under {path}; list a smaller directory",
                        {"path": path},
                    )
                if not (recursive and stat.S_ISDIR(st.st_mode)):
                    continue
                try:
                    sub = os.open(child.name, DIRECTORY_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    with os.scandir(sub) as it:
                        grandchildren = list(it)
                except OSError:
                    # Below the top an unreadable directory is listed but not entered, as before.
                    os.close(sub)
                    continue
                stack.append((sub, rel + "/", iter(grandchildren)))
        finally:
            for fd, _, _ in stack:
                if fd != top:
                    os.close(fd)

    def directory(self, path: str) -> str:
        """The host path of an existing directory under the root (for an exec's cwd)."""
        parts = self.resolve(path)
        fd = self._open_dir(parts, create=False, path=path)
        os.close(fd)
        return self.absolute(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
