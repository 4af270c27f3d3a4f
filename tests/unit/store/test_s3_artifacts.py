"""The S3 artifact store on a real S3-protocol server (moto): multipart atomicity, typed errors, memory, settings.

The behaviour both stores share (round trip, failed put, missing key, malformed keys) runs on both
in test_artifacts.py; this file covers what only an object store has: multipart uploads aborted on
failure and cancellation, a missing bucket, an unreachable or refusing server, an object damaged in
the bucket, the file path of recordings, memory flat in the object's size, and the settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
import pytest
from aiohttp import web

from activities.recording import RecordingActivities
from sandbox.errors import (
    ArchiveCorrupt,
    ArtifactNotFound,
    ArtifactStoreUnavailable,
    InvalidRequest,
    SandboxConfigError,
)
from sandbox.settings import Settings
from store.artifacts import (
    CHUNK_SIZE,
    FilesystemArtifactStore,
    LocalFileArtifactStore,
    StoredArtifact,
    artifact_store,
    verified,
)
from store.s3_artifacts import S3ArtifactStore, parse_s3_url
from tests.conftest import REPO, S3Server, eventually, free_port

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part: multipart paths are reached with little data
FAST_FAIL: Any = {"max_retries": 1, "retry_timeout": timedelta(seconds=3)}


def payload(size: int) -> bytes:
    block = os.urandom(1 << 16)
    return (block * (size // len(block) + 1))[:size]


async def stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def pieces(data: bytes, size: int = 700_000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def store(s3_server: S3Server, bucket: str) -> S3ArtifactStore:
    return s3_server.store(bucket, part_size=PART)  # type: ignore[no-any-return]


def pending(s3_server: S3Server, bucket: str) -> list[Any]:
    return list(s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def objects(s3_server: S3Server, bucket: str) -> list[str]:
    return [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


# --- multipart: complete objects or nothing --------------------------------------------------------


async def test_a_multipart_object_round_trips_under_its_prefix(
    store: S3ArtifactStore, s3_server: S3Server, bucket: str
) -> None:
    data = payload(3 * PART + 12_345)
    stored = await store.put("snapshots/ws/g/big.tar", stream(pieces(data)))
    assert stored == StoredArtifact("snapshots/ws/g/big.tar", hashlib.sha256(data).hexdigest(), len(data))
    head = s3_server.client().head_object(Bucket=bucket, Key="artifacts/snapshots/ws/g/big.tar")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-4"'), "four parts, one object"
    chunks = [chunk async for chunk in store.get("snapshots/ws/g/big.tar")]
    assert b"".join(chunks) == data and max(map(len, chunks)) <= CHUNK_SIZE
    assert await store.size_of("snapshots/ws/g/big.tar") == len(data)
    assert pending(s3_server, bucket) == []


async def test_empty_and_small_objects_take_one_put(store: S3ArtifactStore, s3_server: S3Server, bucket: str) -> None:
    assert (await store.put("k/empty", stream([]))).size_bytes == 0
    assert await collect(store.get("k/empty")) == b""
    await store.put("k/small", stream([b"ab", b"", b"cd"]))
    assert await collect(store.get("k/small")) == b"abcd"
    etag = s3_server.client().head_object(Bucket=bucket, Key="artifacts/k/small")["ETag"]
    assert "-" not in etag, "an object smaller than a part is one PUT, not a multipart upload"


async def test_a_source_failing_after_several_parts_aborts_the_upload_and_keeps_the_old_object(
    store: S3ArtifactStore, s3_server: S3Server, bucket: str
) -> None:
    await store.put("k/obj", stream([b"old"]))
    sent = 0

    async def broken() -> AsyncIterator[bytes]:
        nonlocal sent
        for part in pieces(payload(3 * PART)):
            sent += len(part)
            yield part
        raise RuntimeError("capture died")

    with pytest.raises(RuntimeError, match="capture died"):
        await store.put("k/obj", broken())
    assert sent >= 3 * PART, "the failure came after parts were uploaded"
    assert await collect(store.get("k/obj")) == b"old"
    assert pending(s3_server, bucket) == [], "the multipart upload was aborted"


async def test_a_cancelled_upload_is_aborted_and_stores_nothing(
    store: S3ArtifactStore, s3_server: S3Server, bucket: str
) -> None:
    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        block = payload(MiB)
        while True:
            yield block
            started.set()

    task = asyncio.create_task(store.put("k/cancelled", endless()))
    await asyncio.wait_for(started.wait(), 30)
    # Cancelled once parts are on the server (the upload is under way, not just the first buffer).
    await eventually(lambda: asyncio.to_thread(lambda: bool(pending(s3_server, bucket))), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await store.exists("k/cancelled")
    assert pending(s3_server, bucket) == [], "the cancelled multipart upload was aborted"


# --- typed errors ----------------------------------------------------------------------------------


async def test_missing_key_is_artifact_not_found(store: S3ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound) as err:
        await collect(store.get("k/nope"))
    assert err.value.key == "k/nope"
    with pytest.raises(ArtifactNotFound):
        await store.size_of("k/nope")
    assert not await store.exists("k/nope") and await store.delete("k/nope") is False


async def test_a_missing_bucket_is_unavailable_not_a_missing_key(s3_server: S3Server) -> None:
    store = s3_server.store("no-such-bucket-here")
    for attempt in (
        store.put("k/x", stream([b"x"])),
        collect(store.get("k/x")),
        store.exists("k/x"),
        store.delete("k/x"),
    ):
        with pytest.raises(ArtifactStoreUnavailable, match="bucket does not exist") as err:
            await attempt
        assert err.value.retryable


async def test_an_unreachable_server_is_unavailable_within_the_retry_bound(s3_server: S3Server) -> None:
    port = free_port()  # nothing listens there
    store = S3ArtifactStore(
        "bucket", endpoint=f"http://127.0.0.1:{port}", access_key_id="a", secret_access_key="b", retry=FAST_FAIL
    )
    started = time.monotonic()
    for attempt in (store.put("k/x", stream([b"x"])), collect(store.get("k/x")), store.exists("k/x")):
        with pytest.raises(ArtifactStoreUnavailable) as err:
            await attempt
        assert err.value.retryable and "\n" not in str(err.value)
    assert time.monotonic() - started < 30


@pytest.fixture
async def refusing_server() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP server that answers every request 503 (an overloaded or broken S3 endpoint)."""
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.method)
        await request.read()
        return web.Response(status=503, text="<Error><Code>SlowDown</Code></Error>")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_refusing_server_is_unavailable_after_bounded_retries(
    refusing_server: tuple[str, list[str]],
) -> None:
    endpoint, seen = refusing_server
    store = S3ArtifactStore("bucket", endpoint=endpoint, access_key_id="a", secret_access_key="b", retry=FAST_FAIL)
    with pytest.raises(ArtifactStoreUnavailable, match="cannot write artifact k/x") as err:
        await store.put("k/x", stream([b"x"]))
    assert err.value.retryable
    with pytest.raises(ArtifactStoreUnavailable, match="cannot read artifact k/x"):
        await collect(store.get("k/x"))
    assert 2 <= len(seen) <= 6, f"retried, but a bounded number of times: {seen}"


async def test_an_object_damaged_in_the_bucket_fails_verification(store: S3ArtifactStore) -> None:
    data = payload(2 * PART)
    stored = await store.put("snapshots/ws/g/a.tar", stream(pieces(data)))
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    # Behind the store's back, as bit rot or another writer would.
    await obstore.put_async(store.object_store, "snapshots/ws/g/a.tar", bytes(damaged))
    with pytest.raises(ArchiveCorrupt, match="SHA-256"):
        await collect(verified(store.get(stored.key), sha256=stored.sha256, size_bytes=stored.size_bytes))
    await obstore.put_async(store.object_store, "snapshots/ws/g/a.tar", data[:-1])
    with pytest.raises(ArchiveCorrupt, match="bytes"):
        await collect(verified(store.get(stored.key), sha256=stored.sha256, size_bytes=stored.size_bytes))
    # Positive control: the intact object passes.
    await obstore.put_async(store.object_store, "snapshots/ws/g/a.tar", data)
    assert await collect(verified(store.get(stored.key), sha256=stored.sha256, size_bytes=stored.size_bytes)) == data


async def test_malformed_key_is_refused_before_any_request(store: S3ArtifactStore) -> None:
    for key in ("../x", "a//b", ""):
        with pytest.raises(InvalidRequest):
            await store.put(key, stream([b"x"]))
        with pytest.raises(InvalidRequest):
            await collect(store.get(key))
        with pytest.raises(InvalidRequest):
            await store.put_file(key, 0, 1)


# --- recordings: the file path ---------------------------------------------------------------------


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


@pytest.mark.parametrize("size", [0, 1, PART + 1, 2 * PART + 12_345])
async def test_put_file_streams_the_file_with_its_digest(
    store: S3ArtifactStore, tmp_path: Path, open_fd: Any, size: int
) -> None:
    data = payload(size)
    (tmp_path / "v.mp4").write_bytes(data)
    stored = await store.put_file("recordings/ws/s/r.mp4", open_fd(tmp_path / "v.mp4"), size)
    assert stored == StoredArtifact("recordings/ws/s/r.mp4", hashlib.sha256(data).hexdigest(), size)
    assert await collect(store.get("recordings/ws/s/r.mp4")) == data


async def test_put_file_takes_the_inspected_size_of_a_grown_file_and_what_is_there_of_a_shrunk_one(
    store: S3ArtifactStore, tmp_path: Path, open_fd: Any
) -> None:
    data = payload(3 * MiB)
    (tmp_path / "v.mp4").write_bytes(data)
    grown = await store.put_file("recordings/ws/s/a.mp4", open_fd(tmp_path / "v.mp4"), 1_000_000)
    assert grown.size_bytes == 1_000_000 and grown.sha256 == hashlib.sha256(data[:1_000_000]).hexdigest()
    shrunk = await store.put_file("recordings/ws/s/b.mp4", open_fd(tmp_path / "v.mp4"), 5 * MiB)
    assert shrunk.size_bytes == len(data) and await collect(store.get("recordings/ws/s/b.mp4")) == data


async def test_a_recording_upload_to_s3_takes_the_file_path(
    store: S3ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(store, LocalFileArtifactStore)
    files: list[int] = []
    real = store.put_file

    async def spy(key: str, fd: int, size: int) -> StoredArtifact:
        files.append(size)
        return await real(key, fd, size)

    monkeypatch.setattr(store, "put_file", spy)
    data = payload(2_500_000)
    (tmp_path / "og-rec.mp4").write_bytes(data)
    activities = RecordingActivities(providers=None, recordings=None, artifacts=store)  # type: ignore[arg-type]
    stored = await activities._put_host_file("recordings/ws/s/c.mp4", tmp_path / "og-rec.mp4", len(data))
    assert files == [len(data)] and stored.sha256 == hashlib.sha256(data).hexdigest()


# --- memory flat in the object's size --------------------------------------------------------------

_MEMORY_PROBE = r"""
import asyncio, json, os, sys
from store.s3_artifacts import S3ArtifactStore

endpoint, bucket, key_id, secret, mib = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
BLOCK = os.urandom(1 << 20)

def rss_peak() -> int:
    # VmHWM, not ru_maxrss: that one keeps the (larger) peak of the pytest process this one was forked from.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

async def source(n):
    for i in range(n):
        yield i.to_bytes(8, "big") + BLOCK[8:]

async def main():
    store = S3ArtifactStore(bucket, prefix="mem", endpoint=endpoint, access_key_id=key_id, secret_access_key=secret)
    await store.put("warm/up", source(0))  # loads the client, its runtime and connection pool: no object's cost
    async for _ in store.get("warm/up"):
        pass
    base = rss_peak()
    stored = await store.put("big/object", source(mib))
    after_put = rss_peak()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS: the read is measured on its own
    base_get = rss_peak()
    read = 0
    async for chunk in store.get("big/object"):
        read += len(chunk)
    after_get = rss_peak()
    await store.delete("big/object")
    print(json.dumps({"size": stored.size_bytes, "read": read, "put_growth": after_put - base,
                      "get_growth": after_get - base_get}))

asyncio.run(main())
"""


def memory_growth(s3_server: S3Server, bucket: str, mib: int) -> dict[str, int]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_PROBE,
            s3_server.endpoint,
            bucket,
            s3_server.access_key_id,
            s3_server.secret_access_key,
            str(mib),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["size"] == result["read"] == mib * MiB
    return result


def test_memory_stays_flat_in_the_object_size(s3_server: S3Server, bucket: str) -> None:
    small = memory_growth(s3_server, bucket, 16)
    large = memory_growth(s3_server, bucket, 160)
    print(
        f"\npeak RSS growth: 16 MiB object put {small['put_growth'] / MiB:.1f}"
        f" / get {small['get_growth'] / MiB:.1f} MiB; 160 MiB object put {large['put_growth'] / MiB:.1f}"
        f" / get {large['get_growth'] / MiB:.1f} MiB"
    )
    bound = 48 * MiB  # about (concurrency + 1) parts of 6 MiB in flight plus slack; the object is 160 MiB
    assert large["put_growth"] < bound and large["get_growth"] < bound, large
    # Flat: ten times the bytes, not ten times the memory (the small run already holds parts in flight).
    assert large["get_growth"] <= max(small["get_growth"], small["put_growth"]) + 32 * MiB, (small, large)


# --- settings --------------------------------------------------------------------------------------


async def test_settings_choose_the_store(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    assert isinstance(artifact_store(Settings(data_dir=tmp_path)), FilesystemArtifactStore), "the embedded default"
    settings = Settings(data_dir=tmp_path, **s3_server.settings_values(bucket, prefix="team/a"))
    store = artifact_store(settings)
    assert isinstance(store, S3ArtifactStore)
    await store.put("k/x", stream([b"via settings"]))
    assert "team/a/k/x" in [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert s3_server.secret_access_key not in repr(store) + repr(settings)
    assert settings.s3_endpoint in [f"http://{h}:{p}" for h, p in _endpoints(settings)]


def _endpoints(settings: Settings) -> list[tuple[str, int | None]]:
    from sandbox.egress_policy import runtime_endpoints

    return runtime_endpoints(settings.runtime_endpoint_urls())


async def test_the_secret_key_can_come_from_a_file(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text(s3_server.secret_access_key + "\n")
    values = s3_server.settings_values(bucket)
    del values["s3_secret_access_key"]
    store = artifact_store(Settings(data_dir=tmp_path, s3_secret_access_key_file=secret, **values))
    await store.put("k/y", stream([b"y"]))
    assert await collect(store.get("k/y")) == b"y"
    with pytest.raises(SandboxConfigError, match="SANDBOX_S3_SECRET_ACCESS_KEY_FILE"):
        artifact_store(Settings(data_dir=tmp_path, s3_secret_access_key_file=tmp_path / "missing", **values))
    with pytest.raises(SandboxConfigError, match="not both"):
        Settings(data_dir=tmp_path, s3_secret_access_key_file=secret, **s3_server.settings_values(bucket)).check()


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://", "s3://B_ad/x", "s3://bucket/x y", "s3://bucket/../x"])
def test_a_malformed_artifacts_url_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(SandboxConfigError, match="SANDBOX_ARTIFACTS_URL"):
        artifact_store(Settings(artifacts_url=url))


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    with pytest.raises(SandboxConfigError):
        parse_s3_url("file:///x")


def test_half_set_credentials_are_refused() -> None:
    with pytest.raises(SandboxConfigError, match="both"):
        S3ArtifactStore("bucket", access_key_id="a")
    with pytest.raises(SandboxConfigError, match="both"):
        S3ArtifactStore("bucket", secret_access_key="b")
