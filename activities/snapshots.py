"""Activities of workspace snapshots: capture into the artifact store, publish, and the GC's claim/delete/settle.

Capture streams the provider's archive straight into the artifact store; the SHA-256 and size are
computed on the way, so memory does not grow with the workspace. The ledger row is written as a
``candidate`` before the first byte is stored, so no stored object is ever without a row (a
crashed capture leaves a candidate the GC collects).

"Changed?" for periodic captures is answered in two steps: first the provider's cheap
:meth:`~sandbox.box.Provider.workspace_fingerprint` (metadata only) against the fingerprint
remembered with the previous archive; when that cannot decide, a full capture whose SHA-256 is
compared with the previous one (archives are deterministic), and an identical one is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from temporalio import activity

from activities.metrics import SandboxMetrics
from activities.provider_errors import maps_provider_errors
from providers.registry import ProviderRegistry
from providers.workspace_archive import archive_kind
from sandbox.box import Envelope, NativeWorkspaceSnapshots, Provider
from sandbox.errors import ProviderError, SandboxError, SnapshotConflict
from store.artifacts import ArtifactStore, snapshot_key
from store.snapshots import GcClaim, GcPolicy, SnapshotLedger, SnapshotRecord, new_snapshot_id
from workflows.activity_names import ActivityName
from workflows.models.boxes import CaptureRequest, PublishRequest
from workflows.models.lease import ArchiveRef
from workflows.models.maintenance import (
    GcBatch,
    GcClaimRequest,
    GcDeleteOutcome,
    GcDeleteResult,
    GcItem,
    GcSettings,
    GcSettleRequest,
    GcSettleResult,
)

__all__ = ["SnapshotActivities", "archive_ref", "native_ref_sha256"]

_HEARTBEAT_SECONDS = 1.0


def archive_ref(record: SnapshotRecord, *, unchanged: bool = False) -> ArchiveRef:
    """The :class:`ArchiveRef` of a complete ledger row."""
    return ArchiveRef.model_validate(
        {
            "snapshot_id": record.snapshot_id,
            "key": record.key,
            "sha256": record.sha256 or "",
            "size_bytes": record.size_bytes or 0,
            "kind": record.kind,
            "epoch": record.epoch,
            "unchanged": unchanged,
        }
    )


def native_ref_sha256(native_id: str) -> str:
    """The SHA-256 a ``native`` archive row records: of the provider's snapshot id (there are no bytes)."""
    return hashlib.sha256(native_id.encode()).hexdigest()


def _policy(settings: GcSettings) -> GcPolicy:
    return GcPolicy.model_validate(settings.model_dump())


class _Progress:
    def __init__(self) -> None:
        self.bytes = 0


@contextlib.asynccontextmanager
async def _heartbeating(progress: _Progress | None = None) -> AsyncIterator[None]:
    """Heartbeat in the background (with bytes streamed so far) so a dead worker is noticed quickly."""

    async def beat() -> None:
        while True:
            if progress is None:
                activity.heartbeat()
            else:
                activity.heartbeat({"bytes": progress.bytes})
            await asyncio.sleep(_HEARTBEAT_SECONDS)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


async def _close(iterator: AsyncIterator[bytes]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


class SnapshotActivities:
    """Snapshot activities; one instance per worker.

    Args:
        providers: The worker's provider registry.
        ledger: The snapshot ledger in the store.
        artifacts: Where archives are kept.
        metrics: Where capture durations and archive sizes are recorded (none when omitted).
    """

    def __init__(
        self,
        providers: ProviderRegistry,
        ledger: SnapshotLedger,
        artifacts: ArtifactStore,
        *,
        native_ttl_seconds: int | None = 30 * 24 * 3600,
        metrics: SandboxMetrics | None = None,
    ) -> None:
        self._metrics = metrics or SandboxMetrics()
        self._providers = providers
        self._ledger = ledger
        self._artifacts = artifacts
        self._native_ttl = native_ttl_seconds

    # -- capture and publish --------------------------------------------------------------------

    @activity.defn(name=ActivityName.CAPTURE_WORKSPACE)
    @maps_provider_errors
    async def capture(self, req: CaptureRequest) -> ArchiveRef:
        """Capture the box's workspace and home into the artifact store as a ``candidate`` row.

        With ``only_if_changed`` and a ``previous_sha256`` that is one of the lease's published
        archives, an unchanged workspace returns that archive with ``unchanged=True`` and adds no
        row. Raises ``BoxNotFound`` when the box is gone (never retried by the lease).
        """
        with self._metrics.timed("capture", req.backend):
            ref = await self._capture(req)
        if not ref.unchanged and ref.kind != "native":
            self._metrics.archive_size(req.backend, ref.size_bytes)
        return ref

    async def _capture(self, req: CaptureRequest) -> ArchiveRef:
        provider = self._providers.get(req.backend)
        envelope = Envelope(**req.envelope.model_dump())
        started = datetime.now(UTC)
        progress = _Progress()
        async with _heartbeating(progress):
            # Only periodic captures of a held box ever compare fingerprints; a drain or rotation
            # capture is the box's last, so it skips the walk.
            fingerprint = await provider.workspace_fingerprint(envelope) if req.only_if_changed else None
            previous: SnapshotRecord | None = None
            if req.only_if_changed and req.previous_sha256:
                previous = await self._ledger.find_published(req.lease_id, req.previous_sha256)
                if previous is not None and fingerprint is not None and previous.fingerprint == fingerprint:
                    return archive_ref(previous, unchanged=True)
            if isinstance(provider, NativeWorkspaceSnapshots) and provider.native_workspace_snapshots:
                return await self._capture_native(req, provider, envelope, started, fingerprint)
            record, stored_sha, stored_size = await self._stream_into_store(req, provider, envelope, started, progress)
            if previous is not None and stored_sha == previous.sha256:
                # Same bytes as the previous archive: keep that one, drop this copy, remember the fingerprint.
                try:
                    await self._artifacts.delete(record.key)
                    deleted = True
                except SandboxError:
                    deleted = False  # the GC deletes it later
                await self._ledger.abandon_candidate(record.snapshot_id, object_deleted=deleted)
                await self._ledger.set_fingerprint(previous.snapshot_id, fingerprint)
                return archive_ref(previous, unchanged=True)
            try:
                done = await self._ledger.complete_candidate(
                    record.snapshot_id, sha256=stored_sha, size_bytes=stored_size, fingerprint=fingerprint
                )
            except SnapshotConflict as err:
                # The GC took the row while we wrote (a capture slower than the candidate TTL).
                with contextlib.suppress(SandboxError):
                    await self._artifacts.delete(record.key)
                raise SnapshotConflict(f"{err.message}; capture again", retryable=True) from err
        return archive_ref(done)

    async def _capture_native(
        self,
        req: CaptureRequest,
        provider: NativeWorkspaceSnapshots,
        envelope: Envelope,
        started: datetime,
        fingerprint: str | None,
    ) -> ArchiveRef:
        """Take a provider-native snapshot and record it as a complete ``native`` candidate.

        The snapshot exists before its row (its id is only known then); one orphaned by a crash in
        between expires at the provider after ``native_ttl_seconds``. Its "hash" is the SHA-256 of
        its id, which restore checks so a row can only ever name the snapshot it recorded.
        """
        native_id = await provider.snapshot_native(envelope, ttl_seconds=self._native_ttl)
        record = await self._ledger.record_candidate(
            snapshot_id=new_snapshot_id(),
            lease_id=req.lease_id,
            workspace_id=req.workspace_id,
            group_id=req.group_id,
            epoch=req.epoch,
            key=native_id,
            kind="native",
            backend=req.backend,
            created_at=started,
        )
        done = await self._ledger.complete_candidate(
            record.snapshot_id, sha256=native_ref_sha256(native_id), size_bytes=0, fingerprint=fingerprint
        )
        return archive_ref(done)

    async def _stream_into_store(
        self,
        req: CaptureRequest,
        provider: Provider,
        envelope: Envelope,
        started: datetime,
        progress: _Progress,
    ) -> tuple[SnapshotRecord, str, int]:
        chunks = provider.capture_workspace(envelope)
        try:
            first = b""
            async for chunk in chunks:
                if chunk:
                    first = chunk
                    break
            if not first:
                raise ProviderError(f"the {req.backend} provider produced an empty archive")
            kind = archive_kind(first)
            snapshot_id = new_snapshot_id()
            key = snapshot_key(req.workspace_id, req.group_id, snapshot_id, compressed=kind == "tar+zstd")
            record = await self._ledger.record_candidate(
                snapshot_id=snapshot_id,
                lease_id=req.lease_id,
                workspace_id=req.workspace_id,
                group_id=req.group_id,
                epoch=req.epoch,
                key=key,
                kind=kind,
                backend=req.backend,
                created_at=started,
            )

            async def stream() -> AsyncIterator[bytes]:
                progress.bytes += len(first)
                yield first
                async for chunk in chunks:
                    progress.bytes += len(chunk)
                    yield chunk

            try:
                stored = await self._artifacts.put(key, stream())
            except Exception:
                # put stores all or nothing: nothing is stored, so the row can go straight to deleted.
                with contextlib.suppress(Exception):
                    await self._ledger.abandon_candidate(snapshot_id, object_deleted=True)
                raise
        finally:
            await _close(chunks)
        return record, stored.sha256, stored.size_bytes

    @activity.defn(name=ActivityName.PUBLISH_SNAPSHOT)
    @maps_provider_errors
    async def publish(self, req: PublishRequest) -> list[ArchiveRef]:
        """Make the candidate current (current → previous, previous → delete_pending); idempotent.

        Returns the lease's archives best first (current, previous): exactly what the next
        provision should get as ``ProvisionInput.restore``.
        """
        slots = await self._ledger.publish(req.lease_id, req.snapshot_id)
        return [archive_ref(record) for record in slots]

    # -- garbage collection ---------------------------------------------------------------------

    @activity.defn(name=ActivityName.CLAIM_SNAPSHOT_GC)
    @maps_provider_errors
    async def claim_gc(self, req: GcClaimRequest) -> GcBatch:
        """Claim the next batch of eligible snapshots (and prune old tombstones)."""
        policy = _policy(req.settings)
        claims = await self._ledger.claim_for_gc(policy=policy)
        pruned = await self._ledger.prune_tombstones(policy=policy)
        return GcBatch(items=[GcItem(**claim.model_dump()) for claim in claims], pruned=pruned)

    @activity.defn(name=ActivityName.DELETE_SNAPSHOT_OBJECTS)
    @maps_provider_errors
    async def delete_objects(self, batch: GcBatch) -> GcDeleteResult:
        """Delete each claimed snapshot's object (artifact store, or the provider for ``native``).

        Deletes are idempotent (an object already gone counts as deleted); a failure is reported
        in its outcome rather than raised, so the rest of the batch still settles.
        """
        outcomes: list[GcDeleteOutcome] = []
        async with _heartbeating():
            for item in batch.items:
                try:
                    if item.kind == "native":
                        await self._providers.get(item.backend).delete_snapshot(item.key)
                        existed = True
                    else:
                        existed = await self._artifacts.delete(item.key)
                except SandboxError as err:
                    outcomes.append(GcDeleteOutcome(item=item, error=f"{err.error_type}: {err.message}"))
                except Exception as err:  # any failure is this item's: settled with backoff
                    outcomes.append(GcDeleteOutcome(item=item, error=f"{type(err).__name__}: {err}"))
                else:
                    outcomes.append(GcDeleteOutcome(item=item, existed=existed))
        return GcDeleteResult(outcomes=outcomes)

    @activity.defn(name=ActivityName.SETTLE_SNAPSHOT_GC)
    @maps_provider_errors
    async def settle_gc(self, req: GcSettleRequest) -> GcSettleResult:
        """Settle each outcome: ``deleted``, or ``delete_failed`` with exponential backoff."""
        policy = _policy(req.settings)
        result = GcSettleResult()
        for outcome in req.outcomes:
            state = await self._ledger.settle(GcClaim(**outcome.item.model_dump()), error=outcome.error, policy=policy)
            if state is None:
                result.lost += 1
            elif state == "deleted":
                result.deleted += 1
            else:
                result.failed += 1
        return result
