"""Secrets kept as private files in the data dir (mode 0600, in directories of mode 0700).

Every secret the runtime makes for itself lives in one of these: the stream-token root secret,
the control-signing key, the embedded NATS server's role keys. :func:`load_or_create_secret`
creates one on first use so that concurrent first starts agree on a single value (the file is
written privately and linked into place, so no reader sees a partial file), and
:func:`write_private_file` replaces a file atomically with the same mode; :func:`read_secret` reads
one without ever creating it (for a process that uses a secret another one makes). A secret file
that group or others can read is refused, as ssh refuses such a key: the error says to
``chmod 600`` it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from sandbox.errors import SandboxConfigError

__all__ = ["load_or_create_secret", "read_secret", "write_private_file"]


def read_secret(path: Path, *, what: str) -> bytes | None:
    """The bytes of the secret file ``path``, or None when there is none; never creates anything.

    For a process that only uses a secret another one makes (a client reading what the worker
    made): it creates neither the file nor its directory.

    Raises:
        SandboxConfigError: as :func:`load_or_create_secret`, for a file that exists.
    """
    try:
        return _read_private(Path(path), what=what, verb="read")
    except FileNotFoundError:
        return None


def load_or_create_secret(path: Path, *, what: str, make: Callable[[], bytes] | None = None, size: int = 32) -> bytes:
    """The bytes of the secret file ``path``, creating it first with ``make()`` (default: ``size`` random bytes).

    A missing directory is created (the last level with mode 0700).

    Raises:
        SandboxConfigError: the file exists but is empty, is readable by group or others, or
            cannot be read or created (the message names ``what`` and the path).
    """
    path = Path(path)
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
            try:
                with os.fdopen(fd, "wb") as tmp:
                    tmp.write(make() if make is not None else secrets.token_bytes(size))
                    tmp.flush()
                    os.fsync(tmp.fileno())
                try:
                    os.link(tmp_name, path)  # fails if another process created it first: use theirs
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp_name)
        return _read_private(path, what=what, verb="read or create")
    except OSError as exc:
        raise _unusable(path, what, "read or create", exc) from exc


def _read_private(path: Path, *, what: str, verb: str) -> bytes:
    """The file's bytes, refused when empty or readable by others; FileNotFoundError passes through."""
    try:
        # Never through a symlink: one could point the runtime at a secret it should not use.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            value = file.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _unusable(path, what, verb, exc) from exc
    if not value:
        raise SandboxConfigError(f"the {what} file {path} is empty; delete it or fill it")
    if stat.S_IMODE(mode) & 0o077:
        raise SandboxConfigError(
            f"the {what} file {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    return value


def _unusable(path: Path, what: str, verb: str, exc: OSError) -> SandboxConfigError:
    return SandboxConfigError(
        f"cannot {verb} the {what} at {path} ({exc.strerror}; a symlink is not followed): "
        "fix its permissions or point the setting at a regular file"
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600 (its directory is created with mode 0700).

    Raises:
        OSError: the directory or file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
