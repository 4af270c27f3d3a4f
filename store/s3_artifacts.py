"""An :class:`~store.artifacts.ArtifactStore` on an S3-compatible object store (AWS S3, MinIO, Ceph, R2, ...).

Every host of a deployment reads the same bucket, so a box lost with its host can be restored on
another (``SANDBOX_ARTIFACTS_URL=s3://bucket/prefix``; :func:`~store.artifacts.artifact_store`
chooses it). The client is obstore (Rust ``object_store``): requests are signed with the SHA-256 of
their payload, so the server refuses bytes damaged on the way.

* **Atomic.** An S3 object appears only when its upload completes: a key names a complete object
  or nothing. An object smaller than one part goes up in one ``PUT``; a larger one as a multipart
  upload, which is aborted when the source fails, the store fails or the caller is cancelled.
* **Streaming, memory flat in the size.** The caller's chunks pass through a queue of
  :data:`_QUEUE_DEPTH` chunks into parts of ``part_size`` bytes, at most ``max_concurrency`` of
  them in flight; a read yields chunks of at most :data:`~store.artifacts.CHUNK_SIZE`.
* **Checksums.** :meth:`S3ArtifactStore.put` computes the SHA-256 and size while the bytes stream
  through; a reader checks them with :func:`~store.artifacts.verified`, as with the filesystem store.
* **Typed errors.** A missing key is :class:`~sandbox.errors.ArtifactNotFound`; an unreachable or
  refusing server, a missing bucket or refused credentials is
  :class:`~sandbox.errors.ArtifactStoreUnavailable` (retryable), after a bounded number of retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

from sandbox.errors import ArtifactNotFound, ArtifactStoreUnavailable, InvalidRequest, SandboxConfigError
from sandbox.settings import Settings
from store.artifacts import CHUNK_SIZE, StoredArtifact, check_key

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

__all__ = ["PART_SIZE", "S3ArtifactStore", "parse_s3_url"]

PART_SIZE: Final = 6 * 1024 * 1024
"""Bytes per part of a multipart upload (S3's minimum is 5 MiB); smaller objects take one ``PUT``."""

_QUEUE_DEPTH: Final = 4
_MAX_CONCURRENCY: Final = 3
_ABORT_WAIT_SECONDS: Final = 30.0
_HASH_IN_THREAD_BYTES: Final = 256 * 1024
_DEFAULT_RETRY: Final[RetryConfig] = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=30),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5), "base": 2},
}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]`` (the prefix without leading or trailing ``/``).

    Raises:
        SandboxConfigError: it is not an ``s3://`` URL with a bucket.
    """
    if not url.startswith("s3://"):
        raise SandboxConfigError(f"SANDBOX_ARTIFACTS_URL must be s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise SandboxConfigError(f"SANDBOX_ARTIFACTS_URL names no bucket: {url!r}")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except InvalidRequest as err:
            raise SandboxConfigError(f"SANDBOX_ARTIFACTS_URL has an invalid prefix: {err}") from None
    return bucket, prefix


class _Feed:
    """The async iterator obstore's multipart upload pulls parts from: a bounded queue the caller fills.

    ``None`` in the queue ends the upload; :data:`_ABORT` makes the next pull raise, so obstore
    aborts the multipart upload instead of completing it.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None | _Abort] = asyncio.Queue(maxsize=_QUEUE_DEPTH)

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> bytes:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, _Abort):
            raise _UploadAbandoned("the upload's source failed or was cancelled")
        return item

    def abort(self) -> None:
        """Make the upload fail at its next pull (drops what was queued: the object will not exist)."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_ABORT)


class _Abort:
    pass


_ABORT: Final = _Abort()


class _UploadAbandoned(Exception):
    """Raised into obstore's upload so that it aborts the multipart upload."""


class S3ArtifactStore:
    """An :class:`~store.artifacts.ArtifactStore` keeping one S3 object per key under ``prefix`` in ``bucket``.

    Args:
        bucket: The bucket (it must exist).
        prefix: Key prefix inside the bucket (``""``: the bucket's root).
        endpoint: The server's URL (MinIO, Ceph, ...; ``http://`` allows plain HTTP); None means AWS.
        region: The region; None means ``AWS_REGION`` or the client's default.
        access_key_id: With ``secret_access_key``, the credentials; None means the ``AWS_*``
            environment and instance metadata, as the AWS SDKs find them.
        secret_access_key: The secret half of the credentials (never logged).
        part_size: Bytes per part of a multipart upload (at least 5 MiB for S3).
        max_concurrency: Parts uploaded at once (memory is about ``part_size * (max_concurrency + 1)``).
        retry: obstore's retry policy (bounded: an unreachable server fails within ``retry_timeout``).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        part_size: int = PART_SIZE,
        max_concurrency: int = _MAX_CONCURRENCY,
        retry: RetryConfig | None = None,
    ) -> None:
        if (access_key_id is None) != (secret_access_key is None):
            raise SandboxConfigError("S3 credentials need both the access key id and the secret access key")
        if part_size < 1 or max_concurrency < 1:
            raise SandboxConfigError("part_size and max_concurrency must be >= 1")
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._endpoint = endpoint
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=5),
            # The whole request, body included: a large archive read at a restore's pace takes long;
            # a stalled connection is caught by the read timeout instead.
            "timeout": timedelta(hours=1),
            "read_timeout": timedelta(seconds=60),
        }
        if endpoint is not None and endpoint.startswith("http://"):
            client["allow_http"] = True
        config: dict[str, str] = {}
        if endpoint is not None:
            config["endpoint"] = endpoint
        if region is not None:
            config["region"] = region
        if access_key_id is not None and secret_access_key is not None:
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
        self._store = S3Store(
            bucket,
            prefix=self._prefix or None,
            config=config,  # type: ignore[arg-type]  # keys checked above; S3Config is a TypedDict
            client_options=client,
            retry_config=retry if retry is not None else _DEFAULT_RETRY,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ArtifactStore:
        """The store ``SANDBOX_ARTIFACTS_URL`` and the ``SANDBOX_S3_*`` settings name.

        Raises:
            SandboxConfigError: the URL is not ``s3://bucket[/prefix]``, the credentials are half
                set, or the secret key file cannot be read.
        """
        if settings.artifacts_url is None:
            raise SandboxConfigError("SANDBOX_ARTIFACTS_URL is not set")
        bucket, prefix = parse_s3_url(settings.artifacts_url)
        secret: str | None = None
        if settings.s3_secret_access_key is not None:
            secret = settings.s3_secret_access_key.get_secret_value()
        elif settings.s3_secret_access_key_file is not None:
            try:
                secret = settings.s3_secret_access_key_file.read_text().strip()
            except OSError as err:
                raise SandboxConfigError(
                    f"cannot read SANDBOX_S3_SECRET_ACCESS_KEY_FILE {settings.s3_secret_access_key_file}: "
                    f"{err.strerror}"
                ) from None
        return cls(
            bucket,
            prefix=prefix,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret,
        )

    def __repr__(self) -> str:
        # What a log line may say: never the credentials.
        where = f" at {self._endpoint}" if self._endpoint else ""
        return f"S3ArtifactStore(s3://{self._bucket}/{self._prefix}{where})"

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` of this store."""
        return f"s3://{self._bucket}/{self._prefix}".rstrip("/")

    @property
    def object_store(self) -> S3Store:
        """The obstore client (its paths are relative to the prefix), for tests and benchmarks."""
        return self._store

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> StoredArtifact:
        """Stream ``chunks`` into one object: a single ``PUT`` below one part, else a multipart upload.

        See :class:`~store.artifacts.ArtifactStore`. A failed or cancelled multipart upload is
        aborted, so the previous object under ``key`` (if any) stays as it was.
        """
        check_key(key)
        digest = hashlib.sha256()
        size = 0
        iterator = aiter(chunks)
        # Up to one part is held back: an object that fits takes one request instead of three.
        head: list[bytes] = []
        buffered = 0
        exhausted = False
        while buffered < self._part_size:
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                exhausted = True
                break
            if not chunk:
                continue
            await _hash(digest, chunk)
            head.append(bytes(chunk))
            buffered += len(chunk)
        size = buffered
        if exhausted:
            body = b"".join(head)
            head.clear()
            try:
                await obstore.put_async(self._store, key, body, use_multipart=False)
            except (ObstoreError, OSError) as err:
                raise _unavailable("write", key, err) from None
            return StoredArtifact(key=key, sha256=digest.hexdigest(), size_bytes=size)

        feed = _Feed()
        upload = asyncio.ensure_future(
            obstore.put_async(
                self._store,
                key,
                feed,
                use_multipart=True,
                chunk_size=self._part_size,
                max_concurrency=self._max_concurrency,
            )
        )
        try:
            while head:
                await _offer(feed, head.pop(0), upload, key)
            async for chunk in iterator:
                if not chunk:
                    continue
                await _hash(digest, chunk)
                size += len(chunk)
                await _offer(feed, bytes(chunk), upload, key)
            await _offer(feed, None, upload, key)
            try:
                await asyncio.shield(upload)
            except (ObstoreError, OSError) as err:
                raise _unavailable("write", key, err) from None
        except BaseException:
            if not upload.done():
                feed.abort()
                # Wait (bounded) for obstore to abort the multipart upload: parts must not linger.
                await asyncio.wait({upload}, timeout=_ABORT_WAIT_SECONDS)
            if upload.done() and not upload.cancelled():
                upload.exception()  # retrieved: the caller gets the original error
            raise
        return StoredArtifact(key=key, sha256=digest.hexdigest(), size_bytes=size)

    async def put_file(self, key: str, source_fd: int, size_bytes: int) -> StoredArtifact:
        """Stream the first ``size_bytes`` bytes of the open file ``source_fd`` into one object.

        See :class:`~store.artifacts.LocalFileArtifactStore`: a shorter source stores what is
        there; the caller owns and closes ``source_fd``. The file is read with ``pread`` one chunk
        ahead of the upload, so memory stays at the upload's bound whatever the file's size.
        """
        if size_bytes < 0:
            raise InvalidRequest(f"size_bytes must be >= 0, not {size_bytes}")
        check_key(key)
        return await self.put(key, _file_chunks(source_fd, size_bytes))

    async def get(self, key: str) -> AsyncIterator[bytes]:
        """Yield the object's bytes in chunks of at most :data:`~store.artifacts.CHUNK_SIZE` (see the protocol)."""
        check_key(key)
        result = await self._get(key)
        # Coalesced to half a chunk: the network's pieces then stay under CHUNK_SIZE, rarely needing a split (a copy).
        stream = result.stream(min_chunk_size=CHUNK_SIZE // 2)
        while True:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except (ObstoreError, OSError) as err:
                raise _unavailable("read", key, err) from None
            if len(chunk) <= CHUNK_SIZE:
                yield chunk
            else:
                view = memoryview(chunk)
                for start in range(0, len(chunk), CHUNK_SIZE):
                    yield bytes(view[start : start + CHUNK_SIZE])

    async def delete(self, key: str) -> bool:
        """Delete the object; a missing object is not an error (see the protocol)."""
        if not await self.exists(key):
            return False
        try:
            await obstore.delete_async(self._store, key)
        except FileNotFoundError:
            return False
        except (ObstoreError, OSError) as err:
            raise _unavailable("delete", key, err) from None
        return True

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``.

        Raises:
            ArtifactStoreUnavailable: the store cannot be asked (unreachable, no bucket, refused).
        """
        try:
            await self._head(key)
        except ArtifactNotFound:
            return False
        return True

    async def size_of(self, key: str) -> int:
        """The stored object's size in bytes.

        Raises:
            ArtifactNotFound: no object under the key.
            ArtifactStoreUnavailable: the store cannot be asked.
        """
        return await self._head(key)

    async def _head(self, key: str) -> int:
        check_key(key)
        try:
            meta = await obstore.head_async(self._store, key)
        except FileNotFoundError:
            # A HEAD's 404 has no body to tell a missing key from a missing bucket; a GET's has.
            result = await self._get(key)
            return int(result.meta["size"])  # written since the HEAD; its body is never read
        except (ObstoreError, OSError) as err:
            raise _unavailable("read", key, err) from None
        return int(meta["size"])

    async def _get(self, key: str) -> Any:
        """Start a GET of ``key``; a missing key is ``ArtifactNotFound``, a missing bucket or any outage unavailable."""
        try:
            return await obstore.get_async(self._store, key)
        except FileNotFoundError as err:
            if _no_bucket(err):
                raise _unavailable("read", key, err) from None
            raise ArtifactNotFound(f"no artifact {key} in {self.url}", key=key) from None
        except (ObstoreError, OSError) as err:
            raise _unavailable("read", key, err) from None


async def _hash(digest: hashlib._Hash, chunk: bytes) -> None:
    # hashlib releases the GIL: a large chunk is hashed off the event loop, a small one in place.
    if len(chunk) >= _HASH_IN_THREAD_BYTES:
        await asyncio.to_thread(digest.update, chunk)
    else:
        digest.update(chunk)


async def _offer(feed: _Feed, item: bytes | None, upload: asyncio.Future[Any], key: str) -> None:
    """Queue ``item`` for the upload; if the upload fails while the queue is full, raise its error."""
    if upload.done():
        _raise_upload_error(upload, key)
    if not feed.queue.full():
        feed.queue.put_nowait(item)
        return
    queued: asyncio.Future[Any] = asyncio.ensure_future(feed.queue.put(item))
    try:
        await asyncio.wait({queued, upload}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not queued.done():
            queued.cancel()
    if not queued.done() or queued.cancelled():
        _raise_upload_error(upload, key)


def _raise_upload_error(upload: asyncio.Future[Any], key: str) -> None:
    err = upload.exception() if not upload.cancelled() else None
    if isinstance(err, ObstoreError | OSError):
        raise _unavailable("write", key, err)
    raise ArtifactStoreUnavailable(f"cannot write artifact {key}: the upload ended early ({err!r})")


async def _file_chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of ``fd`` in chunks of :data:`~store.artifacts.CHUNK_SIZE` (``pread``, in a thread)."""
    offset = 0
    while offset < size:
        try:
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK_SIZE, size - offset), offset)
        except OSError as err:
            raise ArtifactStoreUnavailable(f"cannot read the file to store: {err}") from err
        if not chunk:
            return  # the source is shorter than size
        offset += len(chunk)
        yield chunk


def _no_bucket(err: BaseException) -> bool:
    return "NoSuchBucket" in str(err)


def _unavailable(action: str, key: str, err: BaseException) -> ArtifactStoreUnavailable:
    # obstore's messages carry a multi-line debug dump (and the server's XML): the first line says it.
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if _no_bucket(err):
        first = f"the bucket does not exist ({first})"
    return ArtifactStoreUnavailable(f"cannot {action} artifact {key}: {first[:400]}")
