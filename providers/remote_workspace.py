"""Workspace archives of remote boxes (cloud and container providers), built with the box's own GNU tar.

Providers whose boxes the worker cannot read directly (Modal, Docker, E2B, Daytona, Runloop,
Blaxel, Vercel, Cloudflare) capture and restore workspaces through the box's command and file
API: :class:`RemoteWorkspace` runs GNU tar inside the box into a scratch file, downloads it with
the box's binary file read, and for a restore uploads the archive, extracts it into a staging
directory and only then swaps it in, so a failed or corrupt restore leaves the box's tree as it
was. Providers mix in :class:`RemoteWorkspaceSnapshots` for their ``capture_workspace``,
``restore_workspace`` and ``workspace_fingerprint`` (resume the box, then delegate).

The archive has the same layout as the local provider's (:mod:`providers.workspace_archive`): a
POSIX (pax) tar, members in name order, numeric owners, no access or change times, top-level
members ``workspace/`` (the workspace root, wherever the backend keeps it) and ``home/`` (the
box user's HOME, when it is not the workspace itself), modes, symbolic links, empty directories
and modification times kept. An archive captured on one backend restores on another.

Limits: the archive passes through the worker's memory whole (cloud file APIs upload and
download whole files), so this path suits workspaces up to a few hundred MiB; captures are not
compressed (the box may have no ``zstd``), restores accept both archive kinds.
"""

from __future__ import annotations

import io
import posixpath
import secrets
import tarfile
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt

from providers.workspace_archive import CHUNK_SIZE, ZSTD_MAGIC
from sandbox.box import BoxSession, Envelope, ExecResult
from sandbox.errors import ArchiveCorrupt, ProviderError, ProviderUnavailable, SandboxConfigError

__all__ = ["FINGERPRINT_PREFIX", "RemoteWorkspace", "RemoteWorkspaceSnapshots"]

FINGERPRINT_PREFIX: Final = "rw1:"
_CAPTURE_ATTEMPTS: Final = 3
_TAR_TIMEOUT: Final = 600.0

# $1 archive, $2 workspace (relative to /), $3 home (relative to /, or empty).
_CAPTURE_SCRIPT: Final = r"""
set -u
ws="$2"; home="$3"
cd / || exit 2
set -- "$1" --transform="s,^$ws\(/\|\$\),workspace\1,S"
members="$ws"
if [ -n "$home" ]; then
  set -- "$@" --transform="s,^$home\(/\|\$\),home\1,S"
  [ -d "/$home" ] && members="$ws $home"
fi
archive="$1"; shift
exec tar --create --file="$archive" --format=pax --sort=name --numeric-owner \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  --warning=no-file-ignored "$@" $members
"""

# $1 archive, $2 workspace (absolute), $3 home (absolute, or empty).
_RESTORE_SCRIPT: Final = r"""
set -eu
archive="$1"; ws="$2"; home="$3"
stage=$(mktemp -d "${archive}.stage.XXXXXX")
trap 'rm -rf "$stage" "$archive"' EXIT
tar --extract --file="$archive" -C "$stage" --numeric-owner --preserve-permissions \
  --delay-directory-restore --no-overwrite-dir
swap() {  # $1 staged dir, $2 live dir
  mkdir -p "$2"
  find "$2" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
  if [ -d "$1" ]; then
    find "$1" -mindepth 1 -maxdepth 1 -exec mv -- {} "$2"/ \;
    chmod --reference="$1" "$2" 2>/dev/null || true
    touch -m --reference="$1" "$2" 2>/dev/null || true
  fi
}
swap "$stage/workspace" "$ws"
if [ -n "$home" ]; then swap "$stage/home" "$home"; fi
"""

# $1 workspace (absolute), $2 home (absolute, or empty): metadata of every entry, no contents.
_FINGERPRINT_SCRIPT: Final = r"""
set -u
export LC_ALL=C
{ find "$1" -xdev -printf 'w %P %y %s %m %T@ %i\n'
  if [ -n "$2" ] && [ -d "$2" ]; then find "$2" -xdev -printf 'h %P %y %s %m %T@ %i\n'; fi
} | sort | sha256sum
"""


class RemoteWorkspace:
    """Capture, restore and fingerprint the workspace of a remote box through its BoxSession.

    Args:
        workspace_root: Absolute path of the workspace inside the box (the descriptor's).
        home_dir: The box user's HOME, archived as ``home/``; None (or the workspace root
            itself) when there is no separate HOME to keep.
        scratch_dir: A writable directory in the box for the archive file in transit.
    """

    def __init__(self, *, workspace_root: str, home_dir: str | None = "/root", scratch_dir: str = "/tmp") -> None:
        for name, value in (("workspace_root", workspace_root), ("scratch_dir", scratch_dir), ("home_dir", home_dir)):
            if value is not None and (not value.startswith("/") or posixpath.normpath(value) == "/"):
                raise SandboxConfigError(f"{name} must be an absolute directory below /, not {value!r}")
        self.workspace_root = posixpath.normpath(workspace_root)
        home = posixpath.normpath(home_dir) if home_dir else None
        self.home_dir = None if home in (None, self.workspace_root) else home
        self.scratch_dir = posixpath.normpath(scratch_dir)

    def _scratch(self, what: str) -> str:
        return f"{self.scratch_dir}/.sandbox-{what}-{secrets.token_hex(8)}.tar"

    async def capture(self, session: BoxSession) -> AsyncIterator[bytes]:
        """Yield a tar archive of the workspace and HOME, in chunks of about 1 MiB.

        Raises (while iterating):
            BoxNotFound: the box is gone.
            ProviderError: tar failed in the box (the workspace kept changing, a missing root, ...).
        """
        scratch = self._scratch("capture")
        home = self.home_dir.lstrip("/") if self.home_dir else ""
        # GNU tar exits 1 when a file changed while it was read: capture again (as upstream, 3 tries).
        # After the last try its result stands, whatever it is.
        tar_again = AsyncRetrying(
            retry=retry_if_result(lambda done: done.exit_code == 1),
            stop=stop_after_attempt(_CAPTURE_ATTEMPTS),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        try:
            done: ExecResult = await tar_again(
                session.exec,
                ["sh", "-c", _CAPTURE_SCRIPT, "sh", scratch, self.workspace_root.lstrip("/"), home],
                workdir="/",
                timeout=_TAR_TIMEOUT,
            )
            if done.exit_code != 0:
                detail = done.stderr.decode(errors="replace").strip()[-500:]
                raise ProviderError(f"tar could not archive {self.workspace_root} in the box: {detail}")
            data = await session.read_file(scratch)
        finally:
            await _remove(session, scratch)
        if not data:
            raise ProviderError("the box produced an empty workspace archive")
        for start in range(0, len(data), CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE]

    async def restore(self, session: BoxSession, chunks: AsyncIterable[bytes]) -> None:
        """Replace the workspace (and HOME) with the archive streamed by ``chunks``.

        ``chunks`` is consumed completely before the box is touched, so a verifying iterator that
        raises at its end leaves the box as it was.

        Raises:
            ArchiveCorrupt: the stream is not a tar (or zstd tar) of ``workspace/`` and ``home/``.
            BoxNotFound: the box is gone.
            ProviderUnavailable: extraction failed in the box (disk full, ...); retry.
        """
        parts = [chunk async for chunk in chunks]
        data = _plain_tar(b"".join(parts))
        _check_members(data)
        scratch = self._scratch("restore")
        await session.write_file(scratch, data)
        try:
            done = await session.exec(
                ["sh", "-c", _RESTORE_SCRIPT, "sh", scratch, self.workspace_root, self.home_dir or ""],
                workdir="/",
                timeout=_TAR_TIMEOUT,
            )
        except BaseException:
            await _remove(session, scratch)
            raise
        if done.exit_code != 0:
            detail = done.stderr.decode(errors="replace").strip()[-500:]
            raise ProviderUnavailable(f"restoring the workspace archive in the box failed: {detail}")

    async def fingerprint(self, session: BoxSession) -> str | None:
        """A SHA-256 over the paths, kinds, sizes, modes, mtimes and inodes of the tree; None if it cannot tell.

        Raises:
            BoxNotFound: the box is gone.
        """
        done = await session.exec(
            ["sh", "-c", _FINGERPRINT_SCRIPT, "sh", self.workspace_root, self.home_dir or ""],
            workdir="/",
            timeout=_TAR_TIMEOUT,
        )
        digest = done.stdout.split(b" ", 1)[0].decode(errors="replace")
        if done.exit_code != 0 or len(digest) != 64:
            return None
        return FINGERPRINT_PREFIX + digest


class RemoteWorkspaceSnapshots:
    """The workspace-snapshot methods of a provider whose boxes are archived by :class:`RemoteWorkspace`.

    A provider class mixes this in and sets ``remote_workspace``; each method resumes the box of
    the envelope (the provider's own ``resume``) and delegates to the :class:`RemoteWorkspace` that
    :meth:`workspace_of` picks for that box (``remote_workspace`` unless a provider overrides it,
    e.g. to ask the box where its HOME is).
    """

    remote_workspace: RemoteWorkspace

    async def resume(self, envelope: Envelope) -> BoxSession:
        """Find the box of ``envelope`` again (the provider's own method)."""
        raise NotImplementedError

    async def workspace_of(self, session: BoxSession) -> RemoteWorkspace:
        """The :class:`RemoteWorkspace` that archives ``session``'s box."""
        del session
        return self.remote_workspace

    async def capture_workspace(self, envelope: Envelope) -> AsyncIterator[bytes]:
        """Stream a portable tar of the box's workspace (and HOME), made by GNU tar in the box.

        Raises (while iterating):
            BoxNotFound: the box is gone.
            ProviderError: tar failed in the box.
        """
        session = await self.resume(envelope)
        async for chunk in (await self.workspace_of(session)).capture(session):
            yield chunk

    async def restore_workspace(self, envelope: Envelope, chunks: AsyncIterable[bytes]) -> None:
        """Replace the box's workspace (and HOME) with the archive in ``chunks`` (staged, then swapped in).

        Raises:
            BoxNotFound: the box is gone.
            ArchiveCorrupt: the stream is not a workspace archive.
            ProviderUnavailable: extraction failed in the box.
        """
        session = await self.resume(envelope)
        await (await self.workspace_of(session)).restore(session, chunks)

    async def workspace_fingerprint(self, envelope: Envelope) -> str | None:
        """A digest of the workspace tree's metadata, computed in the box; None if it cannot tell.

        Raises:
            BoxNotFound: the box is gone.
        """
        session = await self.resume(envelope)
        return await (await self.workspace_of(session)).fingerprint(session)


async def _remove(session: BoxSession, path: str) -> None:
    try:
        await session.exec(["rm", "-f", "--", path], workdir="/", timeout=60)
    except Exception:  # best effort: a leftover scratch file in /tmp harms nothing
        pass


def _plain_tar(data: bytes) -> bytes:
    if not data.startswith(ZSTD_MAGIC):
        return data
    try:
        import zstandard
    except ImportError as err:
        raise ArchiveCorrupt("the archive is zstd-compressed but zstandard is not installed") from err
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            return reader.read()
    except zstandard.ZstdError as err:
        raise ArchiveCorrupt(f"the workspace archive is not valid zstd: {err}") from err


def _check_members(data: bytes) -> None:
    """Refuse archives that are not ours before they reach the box: only ``workspace/``/``home/``, no escapes."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                name = member.name.rstrip("/")
                top = name.split("/", 1)[0]
                if top not in ("workspace", "home") or name.startswith("/") or ".." in name.split("/"):
                    raise ArchiveCorrupt(f"the workspace archive holds an unexpected member {member.name!r}")
                if member.islnk() and (member.linkname.startswith("/") or ".." in member.linkname.split("/")):
                    raise ArchiveCorrupt(f"the workspace archive holds a hard link leaving it: {member.name!r}")
    except tarfile.TarError as err:
        raise ArchiveCorrupt(f"the workspace archive is not a tar: {err}") from err
