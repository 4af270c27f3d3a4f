"""The artifact stores: streaming put/get with SHA-256, atomic writes, idempotent deletes.

The shared behaviour runs on both stores: the filesystem one and S3 on a real S3-protocol server.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.errors import ArchiveCorrupt, ArtifactNotFound, ArtifactStoreUnavailable, InvalidRequest
from store.artifacts import CHUNK_SIZE, ArtifactStore, FilesystemArtifactStore, snapshot_key, verified
from tests.conftest import S3Server


async def stream(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.fixture
def fs_store(tmp_path: Path) -> FilesystemArtifactStore:
    return FilesystemArtifactStore(tmp_path / "artifacts")


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """Each test below runs on both stores: the embedded filesystem one and S3 (moto's server)."""
    if request.param == "filesystem":
        return FilesystemArtifactStore(tmp_path / "artifacts")
    s3: S3Server = request.getfixturevalue("s3_server")
    return s3.store()  # type: ignore[no-any-return]


def pending_uploads(request: pytest.FixtureRequest, store: Any) -> list[Any]:
    """Multipart uploads the S3 server still holds for the store's bucket (parts nobody completed)."""
    s3: S3Server = request.getfixturevalue("s3_server")
    bucket = store.url.removeprefix("s3://").split("/")[0]
    return list(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


async def test_put_get_round_trip_reports_sha256_and_size(store: Any) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 17)
    parts = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    stored = await store.put("snapshots/ws/g/snap-1.tar", stream(parts))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)
    assert await store.exists("snapshots/ws/g/snap-1.tar")
    chunks = [chunk async for chunk in store.get("snapshots/ws/g/snap-1.tar")]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= CHUNK_SIZE
    if isinstance(store, FilesystemArtifactStore):
        assert store.path_of("snapshots/ws/g/snap-1.tar").stat().st_mode & 0o777 == 0o600


async def test_put_that_fails_midway_stores_nothing_and_keeps_the_old_object(
    store: Any, request: pytest.FixtureRequest
) -> None:
    await store.put("k/obj", stream([b"old"]))

    async def broken() -> AsyncIterator[bytes]:
        yield b"new bytes"
        raise RuntimeError("capture died")

    with pytest.raises(RuntimeError, match="capture died"):
        await store.put("k/obj", broken())
    assert await collect(store.get("k/obj")) == b"old"
    if isinstance(store, FilesystemArtifactStore):
        assert sorted(os.listdir(store.root / "k")) == ["obj"], "no temporary file may be left behind"
    else:
        assert pending_uploads(request, store) == [], "no upload may be left behind"


async def test_missing_object_and_idempotent_delete(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound) as err:
        await collect(store.get("snapshots/ws/g/nope.tar"))
    assert err.value.key == "snapshots/ws/g/nope.tar"
    assert not await store.exists("snapshots/ws/g/nope.tar")
    await store.put("snapshots/ws/g/x.tar", stream([b"x"]))
    assert await store.delete("snapshots/ws/g/x.tar") is True
    assert await store.delete("snapshots/ws/g/x.tar") is False
    assert not await store.exists("snapshots/ws/g/x.tar")


async def test_write_failure_is_a_typed_retryable_error(fs_store: FilesystemArtifactStore) -> None:
    # The S3 store's counterparts (no bucket, unreachable server): tests/unit/store/test_s3_artifacts.py.
    fs_store.root.mkdir(parents=True)
    (fs_store.root / "blocked").write_text("a file where a directory must go")
    with pytest.raises(ArtifactStoreUnavailable) as err:
        await fs_store.put("blocked/obj", stream([b"x"]))
    assert err.value.retryable


@pytest.mark.parametrize(
    "key",
    ["", "/abs/path", "a/../b", "a//b", ".hidden/x", "a/.put-x", "a b", "a/\0", "x" * 2000, "-flag"],
)
async def test_malformed_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidRequest):
        await store.put(key, stream([b"x"]))
    with pytest.raises(InvalidRequest):
        await store.delete(key)


def test_snapshot_key_layout() -> None:
    assert snapshot_key("ws1", "g1", "snap-ab", compressed=True) == "snapshots/ws1/g1/snap-ab.tar.zst"
    assert snapshot_key("ws1", "g1", "snap-ab", compressed=False) == "snapshots/ws1/g1/snap-ab.tar"
    with pytest.raises(InvalidRequest):
        snapshot_key("..", "g1", "snap", compressed=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=5000), cut=st.integers(min_value=1, max_value=700))
async def test_verified_passes_exact_streams_and_rejects_any_change(data: bytes, cut: int) -> None:
    digest = hashlib.sha256(data).hexdigest()
    parts = [data[i : i + cut] for i in range(0, len(data), cut)]
    assert await collect(verified(stream(parts), sha256=digest, size_bytes=len(data))) == data
    with pytest.raises(ArchiveCorrupt):
        await collect(verified(stream([*parts, b"!"]), sha256=digest, size_bytes=len(data)))
    if data:
        flipped = bytes([data[0] ^ 1]) + data[1:]
        with pytest.raises(ArchiveCorrupt):
            await collect(verified(stream([flipped]), sha256=digest, size_bytes=len(data)))
        with pytest.raises(ArchiveCorrupt):
            await collect(verified(stream([data[:-1]]), sha256=digest, size_bytes=len(data)))
