"""Paths confined to one directory: no ``..``, no symlink and no race leads outside it.

The one symlink-safe walk of the runtime, used by the local provider (a box's workspace, seen from
the host) and by the self-hosted agent (its ``--root``). A path is taken in two steps:

1. :func:`resolve_components` walks it component by component, following symlinks as the file
   system would, and raises :class:`PathEscape` for any step that leaves the base: a ``..`` above
   it, or a symlink whose absolute target the caller's ``absolute_target`` refuses. Where the
   absolute names of the base live is the caller's business (``/workspace`` inside a box, the real
   path of the agent's root), so it is a parameter.
2. :func:`open_directory` opens the resolved directories one at a time relative to directory file
   descriptors with ``O_NOFOLLOW``, so a symlink swapped in after the check fails the open
   (``ELOOP``/``ENOTDIR``) instead of escaping.

Errors are this module's (:class:`PathEscape`, :class:`SymlinkLoop`, :class:`BaseUnavailable`) or
the ``OSError`` of the step that failed; each caller maps them to its own error types in one place.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "DIRECTORY_FLAGS",
    "MAX_SYMLINK_HOPS",
    "BaseUnavailable",
    "ConfinedPathError",
    "PathEscape",
    "SymlinkLoop",
    "open_directory",
    "resolve_components",
    "split_relative",
]

MAX_SYMLINK_HOPS: Final = 40
"""Symlinks one resolution may follow (Linux's own limit) before :class:`SymlinkLoop`."""
DIRECTORY_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ConfinedPathError(Exception):
    """A path that cannot be taken under the base (base class of this module's errors)."""


class PathEscape(ConfinedPathError):
    """The path leads outside the base; ``why`` says how (``climbs above the root``, ...)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class SymlinkLoop(ConfinedPathError):
    """More than :data:`MAX_SYMLINK_HOPS` symlinks on the way."""


class BaseUnavailable(ConfinedPathError):
    """The base directory itself cannot be opened (gone, or no longer a directory)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def split_relative(path: str) -> list[str]:
    """The components of a relative path, without empty and ``.`` parts."""
    return [part for part in path.split("/") if part not in ("", ".")]


def resolve_components(
    base: str,
    parts: Sequence[str],
    *,
    absolute_target: Callable[[str], list[str]],
    max_hops: int = MAX_SYMLINK_HOPS,
) -> list[str]:
    """Resolve ``parts`` (relative to ``base``) into components that stay under ``base``.

    Symlinks are followed: a relative target continues from the link's directory, an absolute one
    from the base with the components ``absolute_target(target)`` returns (it raises
    :class:`PathEscape` for a target outside the base). Components that do not exist yet are kept
    as they are (a file about to be created).

    Raises:
        PathEscape: a ``..`` climbs above the base, or ``absolute_target`` refused a link.
        SymlinkLoop: too many symlinks.
        OSError: ``lstat`` or ``readlink`` failed other than by a missing component.
    """
    pending = list(parts)
    pending.reverse()
    resolved: list[str] = []
    hops = 0
    exists = True
    while pending:
        part = pending.pop()
        if part == "..":
            if not resolved:
                raise PathEscape("climbs above the root")
            resolved.pop()
            continue
        if exists:
            candidate = os.path.join(base, *resolved, part)
            try:
                st = os.lstat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                exists = False
            else:
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > max_hops:
                        raise SymlinkLoop("too many levels of symbolic links")
                    target = os.readlink(candidate)
                    if target.startswith("/"):
                        resolved = []
                        target_parts = absolute_target(target)
                    else:
                        target_parts = split_relative(target)
                    pending.extend(reversed(target_parts))
                    continue
        resolved.append(part)
    return resolved


def open_directory(
    base: str,
    parts: Sequence[str],
    *,
    create: bool,
    mode: int = 0o755,
    owner: tuple[int, int] | None = None,
) -> int:
    """Open directory ``parts`` under ``base`` without following any symlink; return its fd.

    With ``create``, missing directories are made (``mode``, then given to ``owner`` when set, so
    a box user can write in them).

    Raises:
        BaseUnavailable: ``base`` cannot be opened.
        OSError: a component is missing (``FileNotFoundError``, without ``create``), is a symlink
            (``ELOOP``), is not a directory (``ENOTDIR``), or cannot be opened.
    """
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise BaseUnavailable(err) from None
    try:
        for part in parts:
            try:
                nfd = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                nfd = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(nfd, *owner)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd
