"""Finalize's copy path: ``FilesystemArtifactStore.put_file`` and the upload's choice between copy and stream.

``put_file`` copies an open file in the kernel and hashes the copy while ``fsync`` runs; it must
keep the store's guarantees: the digest and size are those of the stored bytes, a key names a
complete object or nothing (failures and cancellation leave no object and no temporary file), and
only ``size_bytes`` bytes are taken from a source that grew.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import store.artifacts as artifacts_module
from activities.recording import RecordingActivities
from sandbox.errors import ArtifactStoreUnavailable, InvalidRequest, RecordingError
from store.artifacts import (
    COPY_CHUNK_SIZE,
    FilesystemArtifactStore,
    LocalFileArtifactStore,
    StoredArtifact,
)

KEY = "recordings/ws/s1/rec-1.mp4"


def payload(size: int) -> bytes:
    block = os.urandom(1 << 16)
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def store(tmp_path: Path) -> FilesystemArtifactStore:
    return FilesystemArtifactStore(tmp_path / "artifacts")


def source(tmp_path: Path, data: bytes, name: str = "video.mp4") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def open_fd() -> Iterator[Any]:
    fds: list[int] = []

    def opener(path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)


def temps(store: FilesystemArtifactStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.name.startswith(".put-")]


@pytest.mark.parametrize("size", [0, 1, COPY_CHUNK_SIZE - 1, COPY_CHUNK_SIZE, 2 * COPY_CHUNK_SIZE + 12345])
async def test_put_file_stores_the_bytes_with_their_digest(
    store: FilesystemArtifactStore, tmp_path: Path, open_fd: Any, size: int
) -> None:
    data = payload(size)
    stored = await store.put_file(KEY, open_fd(source(tmp_path, data)), size)
    assert stored == StoredArtifact(key=KEY, sha256=hashlib.sha256(data).hexdigest(), size_bytes=size)
    assert store.path_of(KEY).read_bytes() == data
    assert b"".join([c async for c in store.get(KEY)]) == data
    assert not temps(store)


async def test_put_file_takes_only_the_inspected_size_of_a_grown_file(
    store: FilesystemArtifactStore, tmp_path: Path, open_fd: Any
) -> None:
    data = payload(3 * 1024 * 1024)
    stored = await store.put_file(KEY, open_fd(source(tmp_path, data)), 1_000_000)
    assert stored.size_bytes == 1_000_000 and stored.sha256 == hashlib.sha256(data[:1_000_000]).hexdigest()
    assert store.path_of(KEY).read_bytes() == data[:1_000_000]


async def test_put_file_of_a_shrunk_file_reports_what_it_stored(
    store: FilesystemArtifactStore, tmp_path: Path, open_fd: Any
) -> None:
    data = payload(500_000)
    stored = await store.put_file(KEY, open_fd(source(tmp_path, data)), 2_000_000)
    assert stored.size_bytes == 500_000 and stored.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
async def test_without_a_kernel_copy_it_copies_through_user_space(
    store: FilesystemArtifactStore, tmp_path: Path, open_fd: Any, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    calls = 0

    def refuse(*args: Any) -> int:
        nonlocal calls
        calls += 1
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    data = payload(COPY_CHUNK_SIZE + 777)
    stored = await store.put_file(KEY, open_fd(source(tmp_path, data)), len(data))
    assert calls == 1, "one refusal switches the whole copy to pread/pwrite"
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.path_of(KEY).read_bytes() == data


async def test_a_failing_copy_stores_nothing_and_keeps_the_previous_object(
    store: FilesystemArtifactStore, tmp_path: Path, open_fd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = b"the earlier upload"
    await store.put_file(KEY, open_fd(source(tmp_path, previous, "old.mp4")), len(previous))

    def disk_error(*args: Any) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", disk_error)
    with pytest.raises(ArtifactStoreUnavailable, match="I/O error"):
        await store.put_file(KEY, open_fd(source(tmp_path, payload(100_000))), 100_000)
    assert store.path_of(KEY).read_bytes() == previous
    assert not temps(store)


async def test_cancelling_stops_the_copy_and_leaves_nothing(
    store: FilesystemArtifactStore, tmp_path: Path, open_fd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.copy_file_range
    chunks = 0

    def slow(*args: Any) -> int:
        nonlocal chunks
        chunks += 1
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", slow)
    monkeypatch.setattr(artifacts_module, "COPY_CHUNK_SIZE", 64 * 1024)
    size = 200 * 64 * 1024  # 200 chunks: 10 s at this pace
    task = asyncio.create_task(store.put_file(KEY, open_fd(source(tmp_path, payload(size))), size))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0, "the copy thread stops at the next chunk"
    assert chunks < 50
    assert not store.path_of(KEY).exists() and not temps(store)


async def test_a_negative_size_is_an_invalid_request(store: FilesystemArtifactStore) -> None:
    with pytest.raises(InvalidRequest):
        await store.put_file(KEY, 0, -1)


async def test_a_volatile_store_copies_without_fsync(tmp_path: Path, open_fd: Any) -> None:
    volatile = FilesystemArtifactStore(tmp_path / "v", durable=False)
    data = payload(1_234_567)
    stored = await volatile.put_file(KEY, open_fd(source(tmp_path, data)), len(data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and volatile.path_of(KEY).read_bytes() == data


# --- the upload's choice ----------------------------------------------------------------------


class StreamingOnly:
    """An ArtifactStore without ``put_file`` (as an object store would be): uploads must stream to it."""

    def __init__(self, inner: FilesystemArtifactStore) -> None:
        self.inner = inner
        self.chunk_sizes: list[int] = []

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> StoredArtifact:
        async def counted() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                self.chunk_sizes.append(len(chunk))
                yield chunk

        return await self.inner.put(key, counted())

    def get(self, key: str) -> AsyncIterator[bytes]:
        return self.inner.get(key)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)


def activities(store: Any) -> RecordingActivities:
    return RecordingActivities(providers=None, recordings=None, artifacts=store)  # type: ignore[arg-type]


async def test_the_filesystem_store_takes_the_copy_path(
    store: FilesystemArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(store, LocalFileArtifactStore)
    streamed: list[str] = []
    real_put = store.put

    async def spy_put(key: str, chunks: AsyncIterable[bytes]) -> StoredArtifact:
        streamed.append(key)
        return await real_put(key, chunks)

    monkeypatch.setattr(store, "put", spy_put)
    data = payload(2_500_000)
    stored = await activities(store)._put_host_file(KEY, source(tmp_path, data), len(data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and not streamed


async def test_a_store_without_put_file_gets_the_file_streamed_in_bounded_chunks(
    store: FilesystemArtifactStore, tmp_path: Path
) -> None:
    streaming = StreamingOnly(store)
    assert not isinstance(streaming, LocalFileArtifactStore)
    data = payload(2_500_000)
    stored = await activities(streaming)._put_host_file(KEY, source(tmp_path, data), len(data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and store.path_of(KEY).read_bytes() == data
    assert len(streaming.chunk_sizes) > 1 and max(streaming.chunk_sizes) <= 1024 * 1024


async def test_a_symlinked_box_file_is_refused(store: FilesystemArtifactStore, tmp_path: Path) -> None:
    secret = source(tmp_path, b"host secret", "secret")
    link = tmp_path / "og-rec-x.mp4"
    link.symlink_to(secret)
    with pytest.raises(RecordingError, match="cannot open"):
        await activities(store)._put_host_file(KEY, link, 11)
    assert not store.path_of(KEY).exists()


async def test_a_box_file_that_is_not_regular_is_refused(store: FilesystemArtifactStore, tmp_path: Path) -> None:
    fifo = tmp_path / "og-rec-fifo.mp4"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # so opening it for reading does not block
    try:
        with pytest.raises(RecordingError, match="not a regular file"):
            await activities(store)._put_host_file(KEY, fifo, 10)
    finally:
        os.close(writer)
    assert not store.path_of(KEY).exists()
