"""The artifact store: large immutable objects (workspace archives) addressed by key, streamed in and out.

:class:`ArtifactStore` is the protocol; :class:`FilesystemArtifactStore` (the embedded default)
keeps each object as one file under a root directory in the data dir, and
:class:`~store.s3_artifacts.S3ArtifactStore` keeps it in an S3-compatible bucket every host can read;
:func:`artifact_store` chooses between them from the settings (``SANDBOX_ARTIFACTS_URL``). The
filesystem store writes atomically (temporary file, ``fsync``, rename, ``fsync`` of the directory),
so a key either names a complete object or nothing, and :meth:`ArtifactStore.put` computes the
SHA-256 and size while the bytes stream through: memory does not grow with the object's size.

A file the worker can open itself (a local box's recording) takes a faster path,
:meth:`FilesystemArtifactStore.put_file`: the kernel copies it (``copy_file_range``, falling back to
``pread``/``pwrite``) with write-back started chunk by chunk, and the SHA-256 is computed by reading
the copy back while the final ``fsync`` waits for the disk, so the digest is that of the stored
bytes and hashing costs no wall time of its own.

Keys are relative, ``/``-separated paths of safe characters; workspace archives use
:func:`snapshot_key`: ``snapshots/<workspace>/<group>/<snapshot_id>.tar[.zst]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar, runtime_checkable

from sandbox.errors import ArchiveCorrupt, ArtifactNotFound, ArtifactStoreUnavailable, InvalidRequest
from sandbox.settings import Settings

__all__ = [
    "CHUNK_SIZE",
    "ArtifactStore",
    "COPY_CHUNK_SIZE",
    "FilesystemArtifactStore",
    "LocalFileArtifactStore",
    "StoredArtifact",
    "artifact_root",
    "artifact_store",
    "check_key",
    "snapshot_key",
    "verified",
]

CHUNK_SIZE: Final = 1024 * 1024
"""Size of the chunks :meth:`FilesystemArtifactStore.get` yields."""

COPY_CHUNK_SIZE: Final = 8 * 1024 * 1024
"""Bytes per kernel copy (and per read when hashing) in :meth:`FilesystemArtifactStore.put_file`."""

_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:+-]*$")
_MAX_KEY_LEN: Final = 1024
_TEMP_PREFIX: Final = ".put-"
_STALE_TEMP_SECONDS: Final = 3600.0
# copy_file_range refuses these file pairs (another file system on an old kernel, special files):
# copy through user space instead.
_NO_KERNEL_COPY: Final = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_SYNC_FILE_RANGE_WRITE: Final = 2
_T = TypeVar("_T")


@dataclass(frozen=True)
class StoredArtifact:
    """What :meth:`ArtifactStore.put` wrote: the key, the SHA-256 (hex) and the size of the bytes."""

    key: str
    sha256: str
    size_bytes: int


@runtime_checkable
class ArtifactStore(Protocol):
    """Streaming object storage for workspace archives."""

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> StoredArtifact:
        """Store the bytes of ``chunks`` under ``key`` atomically, replacing any object there.

        The SHA-256 and size are computed while streaming. If ``chunks`` raises, nothing is stored
        and the error propagates.

        Raises:
            InvalidRequest: the key is malformed.
            ArtifactStoreUnavailable: the store failed to write (disk full, permissions, ...).
        """
        ...

    def get(self, key: str) -> AsyncIterator[bytes]:
        """Stream the object's bytes.

        Raises (on the first iteration):
            InvalidRequest: the key is malformed.
            ArtifactNotFound: no object under the key.
            ArtifactStoreUnavailable: the store failed to read.
        """
        ...

    async def delete(self, key: str) -> bool:
        """Delete the object; idempotent. Returns whether an object was there.

        Raises:
            InvalidRequest: the key is malformed.
            ArtifactStoreUnavailable: the object exists but could not be deleted.
        """
        ...

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...


@runtime_checkable
class LocalFileArtifactStore(ArtifactStore, Protocol):
    """An :class:`ArtifactStore` that can also copy a file the worker has open (faster than streaming)."""

    async def put_file(self, key: str, source_fd: int, size_bytes: int) -> StoredArtifact:
        """Store the first ``size_bytes`` bytes of the open regular file ``source_fd`` under ``key`` atomically.

        A source shorter than ``size_bytes`` stores what is there (the returned size says how much);
        the caller owns ``source_fd`` and closes it.

        Raises:
            InvalidRequest: the key is malformed.
            ArtifactStoreUnavailable: reading the source or writing the store failed.
        """
        ...


def snapshot_key(workspace_id: str, group_id: str, snapshot_id: str, *, compressed: bool) -> str:
    """The key of a workspace archive: ``snapshots/<workspace>/<group>/<snapshot_id>.tar[.zst]``.

    Raises:
        InvalidRequest: one of the ids cannot be a key segment.
    """
    key = f"snapshots/{workspace_id}/{group_id}/{snapshot_id}.tar" + (".zst" if compressed else "")
    _key_parts(key)
    return key


def artifact_root(settings: Settings) -> Path:
    """Where the filesystem artifact store of these settings keeps its objects (``<data>/artifacts``)."""
    return (settings.data_dir / "artifacts").resolve()


def artifact_store(settings: Settings) -> LocalFileArtifactStore:
    """The artifact store these settings name: S3 for ``SANDBOX_ARTIFACTS_URL=s3://...``, else files in the data dir.

    The one place the worker, the client and the tools choose their store (workspace archives and
    recordings go to the same one).

    Raises:
        SandboxConfigError: the S3 settings are malformed or half set.
    """
    if settings.artifacts_url is None:
        return FilesystemArtifactStore(artifact_root(settings))
    from store.s3_artifacts import S3ArtifactStore  # it builds on this module

    return S3ArtifactStore.from_settings(settings)


def check_key(key: str) -> str:
    """``key`` itself if it is a valid artifact key (relative, ``/``-separated safe segments).

    Raises:
        InvalidRequest: the key is malformed.
    """
    _key_parts(key)
    return key


def _key_parts(key: str) -> list[str]:
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LEN:
        raise InvalidRequest(f"artifact key must be 1..{_MAX_KEY_LEN} characters")
    parts = key.split("/")
    for part in parts:
        if not _SEGMENT_RE.fullmatch(part) or part.startswith(_TEMP_PREFIX):
            raise InvalidRequest(
                f"artifact key {key!r} has an invalid segment {part!r} "
                "(letters, digits and ._:+- only, not starting with a dot or dash)"
            )
    return parts


async def verified(chunks: AsyncIterable[bytes], *, sha256: str, size_bytes: int) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through, checking them against the recorded SHA-256 and size.

    The check of the hash can only complete at the end, so the last step of the iteration raises
    :class:`ArchiveCorrupt` on a mismatch: a consumer must treat what it received as unverified
    until the iteration finished without error. A stream longer than ``size_bytes`` fails as soon
    as it passes the size.
    """
    digest = hashlib.sha256()
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > size_bytes:
            raise ArchiveCorrupt(f"archive is longer than its recorded {size_bytes} bytes")
        digest.update(chunk)
        yield chunk
    if seen != size_bytes:
        raise ArchiveCorrupt(f"archive has {seen} bytes, its record says {size_bytes}")
    actual = digest.hexdigest()
    if actual != sha256:
        raise ArchiveCorrupt(f"archive SHA-256 is {actual}, its record says {sha256}")


class FilesystemArtifactStore:
    """An :class:`ArtifactStore` keeping one file per object under ``root`` (created on first write).

    Args:
        root: The store's directory, normally :func:`artifact_root` of the settings.
        durable: ``fsync`` each object and its directory before the rename is considered done.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self._root = Path(os.path.abspath(root))
        self._durable = durable

    def __repr__(self) -> str:
        return f"FilesystemArtifactStore({self._root})"

    @property
    def root(self) -> Path:
        """The store's directory."""
        return self._root

    def path_of(self, key: str) -> Path:
        """The file that holds (or would hold) the object under ``key``.

        Raises:
            InvalidRequest: the key is malformed.
        """
        return self._root.joinpath(*_key_parts(key))

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> StoredArtifact:
        """Stream ``chunks`` into a temporary file, then rename it over ``key`` (see :class:`ArtifactStore`)."""
        final = self.path_of(key)
        digest = hashlib.sha256()
        size = 0
        try:
            fd, temp = await asyncio.to_thread(self._open_temp, final)
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot write artifact {key}: {err}") from err
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                # One thread hop per chunk: hashing and writing both release the GIL.
                await asyncio.to_thread(_hash_and_write, fd, digest, chunk, size if self._durable else None)
                size += len(chunk)
            if self._durable:
                await asyncio.to_thread(os.fsync, fd)
            os.close(fd)
            fd = -1
            await asyncio.to_thread(self._commit, temp, final)
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot write artifact {key}: {err}") from err
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return StoredArtifact(key=key, sha256=digest.hexdigest(), size_bytes=size)

    async def put_file(self, key: str, source_fd: int, size_bytes: int) -> StoredArtifact:
        """Copy an open file into a temporary file in the kernel, then rename it over ``key``.

        See :class:`LocalFileArtifactStore`. The copy starts write-back as it goes; the SHA-256 is
        read back from the temporary file while ``fsync`` waits, so it is the digest of what is stored.
        """
        if size_bytes < 0:
            raise InvalidRequest(f"size_bytes must be >= 0, not {size_bytes}")
        final = self.path_of(key)
        try:
            fd, temp = await asyncio.to_thread(self._open_temp, final, os.O_RDWR)
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot write artifact {key}: {err}") from err
        stop = threading.Event()
        try:
            size = await _in_thread(stop, _copy_into, source_fd, fd, size_bytes, stop, self._durable)
            hashing = _in_thread(stop, _sha256_of, fd, size, stop)
            if self._durable:
                _, sha256 = await asyncio.gather(_in_thread(stop, os.fsync, fd), hashing)
            else:
                sha256 = await hashing
            os.close(fd)
            fd = -1
            await asyncio.to_thread(self._commit, temp, final)
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot write artifact {key}: {err}") from err
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return StoredArtifact(key=key, sha256=sha256, size_bytes=size)

    async def get(self, key: str) -> AsyncIterator[bytes]:
        """Yield the object's bytes in chunks of :data:`CHUNK_SIZE` (see :class:`ArtifactStore`)."""
        path = self.path_of(key)
        try:
            f = await asyncio.to_thread(open, path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactNotFound(f"no artifact {key} in {self._root}", key=key) from None
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot read artifact {key}: {err}") from err
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(f.read, CHUNK_SIZE)
                except OSError as err:
                    raise ArtifactStoreUnavailable(f"cannot read artifact {key}: {err}") from err
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    async def delete(self, key: str) -> bool:
        """Unlink the object's file; a missing object is not an error (see :class:`ArtifactStore`)."""
        path = self.path_of(key)
        try:
            await asyncio.to_thread(os.unlink, path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot delete artifact {key}: {err}") from err
        return True

    async def exists(self, key: str) -> bool:
        """Whether a file holds an object under ``key``."""
        path = self.path_of(key)
        return await asyncio.to_thread(path.is_file)

    async def size_of(self, key: str) -> int:
        """The stored object's size in bytes.

        Raises:
            ArtifactNotFound: no object under the key.
        """
        path = self.path_of(key)
        try:
            return (await asyncio.to_thread(os.stat, path)).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactNotFound(f"no artifact {key} in {self._root}", key=key) from None

    def _open_temp(self, final: Path, access: int = os.O_WRONLY) -> tuple[int, str]:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final.parent)
        temp = str(final.parent / f"{_TEMP_PREFIX}{final.name}.{secrets.token_hex(6)}")
        fd = os.open(temp, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, temp

    def _commit(self, temp: str, final: Path) -> None:
        os.replace(temp, final)
        if self._durable:
            dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _hash_and_write(fd: int, digest: hashlib._Hash, chunk: bytes, writeback_at: int | None) -> None:
    """Hash and append ``chunk``; with ``writeback_at`` (its offset) start its write-back at once."""
    digest.update(chunk)
    view = memoryview(chunk)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except OSError as err:
            if err.errno == errno.EINTR:
                continue
            raise
    if writeback_at is not None:
        _start_writeback(fd, writeback_at, len(chunk))


async def _in_thread(stop: threading.Event, func: Callable[..., _T], *args: object) -> _T:
    """Run ``func`` in a thread; on cancellation ask it to stop (``stop``) and wait for it to return.

    Waiting matters: the caller closes the descriptors the thread uses once this returns, and a
    descriptor closed under a running copy could be reused by an unrelated ``open``.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        raise


def _copy_into(src: int, dst: int, size: int, stop: threading.Event, writeback: bool) -> int:
    """Copy the first ``size`` bytes of ``src`` to the start of ``dst``; returns the bytes copied.

    ``copy_file_range`` keeps the bytes in the kernel; where it is refused, ``pread``/``pwrite``
    through one reused buffer. With ``writeback`` each chunk's write-back starts at once, so the
    final ``fsync`` finds little left to write.
    """
    offset = 0
    kernel = True
    buffer: bytearray | None = None
    while offset < size and not stop.is_set():
        want = min(COPY_CHUNK_SIZE, size - offset)
        try:
            if kernel:
                n = os.copy_file_range(src, dst, want, offset, offset)
            else:
                if buffer is None:
                    buffer = bytearray(COPY_CHUNK_SIZE)
                view = memoryview(buffer)[:want]
                n = os.preadv(src, [view], offset)
                _pwrite_all(dst, view[:n], offset)
        except InterruptedError:
            continue
        except OSError as err:
            if kernel and err.errno in _NO_KERNEL_COPY:
                kernel = False
                continue
            raise
        if n == 0:
            break  # the source is shorter than size
        if writeback:
            _start_writeback(dst, offset, n)
        offset += n
    return offset


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        try:
            n = os.pwrite(fd, data, offset)
        except InterruptedError:
            continue
        data, offset = data[n:], offset + n


def _sha256_of(fd: int, size: int, stop: threading.Event) -> str:
    """SHA-256 of the first ``size`` bytes of ``fd`` (read with ``pread``; hashlib releases the GIL)."""
    digest = hashlib.sha256()
    buffer = bytearray(min(COPY_CHUNK_SIZE, max(size, 1)))
    offset = 0
    while offset < size and not stop.is_set():
        view = memoryview(buffer)[: min(len(buffer), size - offset)]
        try:
            n = os.preadv(fd, [view], offset)
        except InterruptedError:
            continue
        if n == 0:
            raise OSError(errno.EIO, f"the copy ended at {offset} of {size} bytes while hashing it")
        digest.update(view[:n])
        offset += n
    return digest.hexdigest()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    call: Callable[[int, int, int, int], int] = func
    return call


_sync_file_range: Final = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (a hint: failures are ignored)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _remove_stale_temps(directory: Path) -> None:
    """Remove temporary files a crashed ``put`` left behind (older than an hour, so never a live one)."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(_TEMP_PREFIX):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
