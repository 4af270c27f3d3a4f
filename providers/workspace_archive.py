"""Portable workspace archives: a tar stream (zstd-compressed when ``zstandard`` is importable) of host directories.

Used by providers whose boxes live on a file system the worker can read (the ``local`` provider):
:func:`stream_tar` runs GNU tar on the host and yields the archive in chunks of about 1 MiB,
:func:`extract_tar` feeds chunks into GNU tar extracting into a directory, and
:func:`tree_fingerprint` summarises a tree's metadata cheaply so an unchanged workspace can be
recognised without reading its files.

The archive is a POSIX (pax) tar with members in name order, numeric owners and no access or
change times, so the same tree always gives the same bytes (and the same SHA-256); it keeps file
modes, symbolic links, hard links, empty directories and modification times to the nanosecond.
GNU tar runs in its own process and compression in a dedicated thread (``zstandard`` releases the
GIL), with at most :data:`QUEUE_DEPTH` chunks in flight, so memory does not grow with the size of
the workspace. Sockets are skipped (they cannot be archived); extended attributes and ACLs are
not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal

from sandbox.errors import ArchiveCorrupt, ProviderError, ProviderUnavailable, SandboxConfigError

__all__ = [
    "CHUNK_SIZE",
    "QUEUE_DEPTH",
    "ZSTD_MAGIC",
    "ZSTD_LEVEL",
    "ArchiveKind",
    "archive_kind",
    "extract_tar",
    "stream_tar",
    "tree_fingerprint",
    "zstd_available",
]

ArchiveKind = Literal["tar", "tar+zstd"]

CHUNK_SIZE: Final = 1024 * 1024
QUEUE_DEPTH: Final = 8
"""Chunks in flight between GNU tar's thread and the event loop (bounds memory at ~8 MiB)."""
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL: Final = 3
_F_SETPIPE_SZ: Final = 1031
_STDERR_TAIL: Final = 2000

_CREATE_FLAGS: Final = (
    "--create",
    "--file=-",
    "--format=pax",
    "--sort=name",
    "--numeric-owner",
    # Deterministic output: fixed extended-header names, no atime/ctime records.
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--warning=no-file-ignored",
)
_EXTRACT_FLAGS: Final = (
    "--extract",
    "--file=-",
    "--numeric-owner",
    "--preserve-permissions",
    "--delay-directory-restore",
    "--no-overwrite-dir",
)


def zstd_available() -> bool:
    """Whether the ``zstandard`` package can be imported (archives are then compressed)."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def archive_kind(head: bytes) -> ArchiveKind:
    """The kind of an archive from its first bytes: ``tar+zstd`` if it starts with the zstd frame magic."""
    return "tar+zstd" if head.startswith(ZSTD_MAGIC) else "tar"


def _tar() -> str:
    tar = shutil.which("tar")
    if tar is None:
        raise SandboxConfigError("GNU tar is required to capture and restore workspaces (apt install tar)")
    return tar


class _Stopped(Exception):
    """The consumer went away; the producer thread stops."""


class _End:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _ToLoop:
    """Hands chunks from a producer thread to the event loop with back-pressure (at most ``depth`` queued)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = QUEUE_DEPTH) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | _End] = asyncio.Queue()
        self._slots = threading.Semaphore(depth)
        self.stopped = threading.Event()

    def put(self, chunk: bytes) -> None:
        """Called from the producer thread; blocks while ``depth`` chunks wait."""
        while not self._slots.acquire(timeout=0.1):
            if self.stopped.is_set():
                raise _Stopped
        if self.stopped.is_set():
            raise _Stopped
        self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)

    def finish(self, error: BaseException | None) -> None:
        """Called once by the producer thread when it is done."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _End(error))

    async def get(self) -> bytes | _End:
        item = await self._queue.get()
        if not isinstance(item, _End):
            self._slots.release()
        return item


class _FromLoop:
    """Hands chunks from the event loop to a consumer thread with back-pressure; ``read`` is file-like."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = QUEUE_DEPTH) -> None:
        import queue

        self._loop = loop
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(depth)

    async def put(self, chunk: bytes) -> None:
        await self._slots.acquire()
        self._queue.put(chunk)

    def close(self) -> None:
        """End of input (also used to abort: the thread sees EOF)."""
        self._queue.put(None)

    def read(self, _size: int = -1) -> bytes:
        """Called from the consumer thread: the next chunk, ``b""`` at the end."""
        chunk = self._queue.get()
        if chunk is None:
            self._queue.put(None)  # later reads see EOF again
            return b""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._slots.release)
        return chunk

    def drain(self) -> None:
        """Consume and drop everything until the end (after the consumer failed), so the loop never blocks."""
        while self.read():
            pass


def _grow_pipe(f: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(f.fileno(), _F_SETPIPE_SZ, CHUNK_SIZE)


def _tail(f: IO[bytes]) -> str:
    with contextlib.suppress(OSError):
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _STDERR_TAIL))
        return f.read().decode(errors="replace").strip()
    return ""


async def _reap(proc: subprocess.Popen[bytes], *, kill: bool) -> int:
    if kill and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    return await asyncio.to_thread(proc.wait)


async def stream_tar(
    base: Path,
    members: Sequence[str],
    *,
    compress: bool | None = None,
    on_error: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yield a tar archive of ``members`` (paths relative to ``base``), zstd-compressed when asked.

    ``compress`` defaults to :func:`zstd_available`. GNU tar's exit status 1 ("a file changed as
    we read it") is accepted: a live workspace may change during a capture, and the archive is
    still a valid snapshot. ``on_error`` runs before a tar failure is reported, so a caller can
    replace it with a better error (for example ``BoxNotFound`` when the directory vanished).

    Raises:
        ProviderError: tar failed (exit status 2 or more); the message carries its stderr.
        SandboxConfigError: compression was asked for but ``zstandard`` is not installed.
    """
    if compress is None:
        compress = zstd_available()
    compressor: Any = None
    if compress:
        try:
            import zstandard
        except ImportError as err:
            raise SandboxConfigError("zstd compression needs `pip install zstandard`") from err
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    loop = asyncio.get_running_loop()
    bridge = _ToLoop(loop)
    stderr = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            [_tar(), *_CREATE_FLAGS, f"--directory={base}", "--", *members],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            close_fds=True,
        )
    except BaseException:
        stderr.close()
        raise
    assert proc.stdout is not None
    source = proc.stdout
    _grow_pipe(source)

    def produce() -> None:
        error: BaseException | None = None
        try:
            chunker = None if compressor is None else compressor.chunker(chunk_size=CHUNK_SIZE)
            while chunk := source.read(CHUNK_SIZE):
                if chunker is None:
                    bridge.put(chunk)
                    continue
                for out in chunker.compress(chunk):
                    bridge.put(out)
            if chunker is not None:
                for out in chunker.finish():
                    bridge.put(out)
        except _Stopped:
            pass
        except BaseException as err:  # reported to the consumer, which raises it
            error = err
        finally:
            bridge.finish(error)

    # A dedicated thread, not the default executor: it blocks for the whole capture, and the
    # consumer's own to_thread calls (hashing, writing) must never wait behind it.
    thread = threading.Thread(target=produce, name="workspace-archive-tar", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item = await bridge.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise ProviderError(f"reading tar's output failed: {item.error}") from item.error
                break
            yield item
        code = await _reap(proc, kill=False)
        if code >= 2:
            if on_error is not None:
                on_error()
            raise ProviderError(f"tar exited {code} while archiving {base}: {_tail(stderr)}")
        finished = True
    finally:
        bridge.stopped.set()
        if not finished:
            await _reap(proc, kill=True)
        await asyncio.to_thread(thread.join)
        source.close()
        stderr.close()


async def extract_tar(dest: Path, chunks: AsyncIterable[bytes]) -> ArchiveKind:
    """Extract the archive streamed by ``chunks`` (plain or zstd, told apart by its magic) into ``dest``.

    Every chunk is consumed even if extraction fails part way, so a verifying iterator (see
    :func:`store.artifacts.verified`) always gets to check the whole stream; an error it raises
    wins over the extraction's own. The caller owns ``dest`` and must discard it on any error:
    what was extracted before the failure is not verified. Returns the archive's kind.

    Raises:
        ArchiveCorrupt: the stream is not valid zstd, or is empty.
        ProviderUnavailable: tar failed on a stream that decoded (disk full, permissions, ...).
        SandboxConfigError: the archive is zstd-compressed but ``zstandard`` is not installed.
        Exception: whatever ``chunks`` raised (for example ``ArchiveCorrupt`` on a SHA-256 mismatch).
    """
    iterator = aiter(chunks)
    first = b""
    async for chunk in iterator:
        if chunk:
            first = chunk
            break
    if not first:
        raise ArchiveCorrupt("the archive is empty")
    kind = archive_kind(first)
    decompressor: Any = None
    if kind == "tar+zstd":
        try:
            import zstandard
        except ImportError as err:
            raise SandboxConfigError("this archive is zstd-compressed: `pip install zstandard` to restore it") from err
        decompressor = zstandard.ZstdDecompressor()

    loop = asyncio.get_running_loop()
    bridge = _FromLoop(loop)
    stderr = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            [_tar(), *_EXTRACT_FLAGS, f"--directory={dest}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            close_fds=True,
        )
    except BaseException:
        stderr.close()
        raise
    assert proc.stdin is not None
    sink = proc.stdin
    _grow_pipe(sink)
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            if decompressor is not None:
                decompressor.copy_stream(bridge, sink, read_size=CHUNK_SIZE, write_size=CHUNK_SIZE)
            else:
                while chunk := bridge.read():
                    sink.write(chunk)
        except BaseException as err:  # examined by the coroutine once the input is consumed
            failure.append(err)
            bridge.drain()
        finally:
            with contextlib.suppress(OSError):
                sink.close()

    thread = threading.Thread(target=consume, name="workspace-archive-untar", daemon=True)
    thread.start()
    completed = False
    try:
        await bridge.put(first)
        async for chunk in iterator:
            if chunk:
                await bridge.put(chunk)
        bridge.close()
        await asyncio.to_thread(thread.join)
        code = await _reap(proc, kill=False)
        if failure and not isinstance(failure[0], BrokenPipeError | OSError):
            raise ArchiveCorrupt(f"the archive cannot be decompressed: {failure[0]}") from failure[0]
        if code != 0 or failure:
            raise ProviderUnavailable(f"tar could not extract the archive into {dest} (exit {code}): {_tail(stderr)}")
        completed = True
    finally:
        if not completed:
            bridge.close()
            await _reap(proc, kill=True)
            await asyncio.to_thread(thread.join)
        stderr.close()
    return kind


def tree_fingerprint(base: Path, members: Sequence[str]) -> str:
    """A SHA-256 over the metadata of every entry under ``members`` (relative to ``base``).

    Covers each entry's path, type, mode, owner, size, modification and change times (ns), inode
    and symbolic-link target, without reading file contents. Any write to a file changes its
    change time, which no process can set back, so equal fingerprints mean an unchanged tree;
    a copy of the same tree elsewhere has a different fingerprint (other inodes and change times).
    A missing member counts as empty.
    """
    digest = hashlib.sha256()

    def add(rel: str, st: os.stat_result, target: str = "") -> None:
        digest.update(
            f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0"
            f"{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{target}\n".encode(errors="surrogateescape")
        )

    def walk(top: str, top_rel: str) -> None:
        # An explicit stack instead of recursion (a tree thousands of levels deep must not overflow
        # Python's stack), in the same pre-order: a directory right after its parent's entry, then
        # its whole subtree before its next sibling, so the digest is unchanged.
        stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = []

        def push(path: str, rel: str) -> None:
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except FileNotFoundError:
                return
            stack.append((rel, iter(entries)))

        push(top, top_rel)
        while stack:
            rel, pending = stack[-1]
            entry = next(pending, None)
            if entry is None:
                stack.pop()
                continue
            child_rel = f"{rel}/{entry.name}"
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    add(child_rel, st, os.readlink(entry.path))
                continue
            add(child_rel, st)
            if stat.S_ISDIR(st.st_mode):
                push(entry.path, child_rel)

    for member in members:
        path = os.path.join(base, member)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            digest.update(f"{member}\0missing\n".encode())
            continue
        add(member, st)
        if stat.S_ISDIR(st.st_mode):
            walk(path, member)
    return digest.hexdigest()
