"""Activities that touch boxes through providers: provision, probe, exec, terminate, discard.

Resumed sessions are cached per (backend, instance id) (:class:`~activities.box_sessions.BoxSessions`) so
repeated execs against a warm box do not pay for a resume each time; a typed ``BoxNotFound`` drops the
cache entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

from activities.box_sessions import BoxSessions
from activities.metrics import SandboxMetrics
from activities.provider_errors import maps_provider_errors
from activities.snapshots import native_ref_sha256
from activities.tracing import box_operation_span
from providers.registry import ProviderRegistry
from sandbox.box import BoxSpec, Envelope, NativeWorkspaceSnapshots, Provider
from sandbox.errors import (
    ArchiveCorrupt,
    ArtifactNotFound,
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    ProvisionFailed,
    SandboxConfigError,
    Unsupported,
)
from store.artifacts import ArtifactStore, verified
from workflows.activity_names import ActivityName
from workflows.models.boxes import (
    BoxRef,
    CheckResult,
    DiscardInput,
    DiscardResult,
    ExecInput,
    ExecOutput,
    ProvisionInput,
    ProvisionResult,
)
from workflows.models.lease import ArchiveRef, RestoreOutcome


@contextlib.asynccontextmanager
async def _heartbeating(interval: float = 1.0) -> AsyncIterator[None]:
    """Heartbeat in the background so a dead worker is noticed within the heartbeat timeout."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


def _cap(data: bytes, limit: int) -> tuple[str, bool]:
    truncated = len(data) > limit
    return data[:limit].decode("utf-8", errors="replace"), truncated


class BoxActivities:
    """Provider-facing activities; one instance per worker, holding the provider registry.

    Args:
        providers: The worker's provider registry.
        artifacts: Where workspace archives are kept; needed to restore them on provision.
        metrics: Where provision, restore and exec durations are recorded (none when omitted).
    """

    def __init__(
        self,
        providers: ProviderRegistry,
        artifacts: ArtifactStore | None = None,
        *,
        metrics: SandboxMetrics | None = None,
    ) -> None:
        self._providers = providers
        self._artifacts = artifacts
        self._sessions = BoxSessions(providers)
        self._metrics = metrics or SandboxMetrics()

    @activity.defn(name=ActivityName.PROVISION_BOX)
    @maps_provider_errors
    async def provision(self, inp: ProvisionInput) -> ProvisionResult:
        """Create (or adopt by idempotency key) the box for a lease epoch, restore its workspace, probe it.

        With ``inp.restore`` the archives are tried in order after the box is created and before
        the probe; the first whose SHA-256 verifies is restored (see :meth:`_restore`).
        """
        with (
            box_operation_span("provision", inp.backend, epoch=inp.epoch),
            self._metrics.timed("provision", inp.backend),
        ):
            return await self._provision(inp)

    async def _provision(self, inp: ProvisionInput) -> ProvisionResult:
        provider = self._providers.get(inp.backend)
        spec = BoxSpec(
            lease_id=inp.lease_id,
            workspace_id=inp.workspace_id,
            group_id=inp.group_id,
            epoch=inp.epoch,
            image=inp.image,
            os=inp.os,
            environment=inp.environment,
            agent_id=inp.agent_id,
        )
        outcome: RestoreOutcome | None = None
        async with _heartbeating():
            session = await provider.create(spec, inp.idempotency_key)
            if inp.restore:
                with self._metrics.timed("restore", inp.backend):
                    outcome = await self._restore(provider, session.serialize_state(), inp.restore)
            try:
                probe = await session.exec(["true"], timeout=inp.probe_timeout_seconds)
            except ExecTimeout as err:
                await provider.terminate(session.serialize_state())
                raise ProvisionFailed(f"readiness probe timed out after {err.timeout:g}s", retryable=False) from err
            if probe.exit_code != 0:
                await provider.terminate(session.serialize_state())
                # A box that fails `true` is broken, not slow: retrying would only build the same box again.
                raise ProvisionFailed(
                    f"readiness probe `true` exited {probe.exit_code}: {probe.stderr[-300:].decode(errors='replace')}",
                    retryable=False,
                )
        envelope = session.serialize_state()
        self._sessions.keep(inp.backend, envelope.instance_id, session)
        return ProvisionResult(envelope=Envelope(**envelope.model_dump()), restore=outcome)

    async def _restore(self, provider: Provider, envelope: Envelope, refs: list[ArchiveRef]) -> RestoreOutcome:
        """Restore the first archive of ``refs`` that verifies; report which failed and why.

        Only proof that an archive is unusable moves on to the next one: it is missing
        (``ArtifactNotFound``), fails verification or decoding (``ArchiveCorrupt``), or is of a
        kind this build cannot restore. Anything else (an I/O error of the store, a provider
        failure, ``BoxNotFound``) fails the activity so it is retried, rather than silently
        restoring an older archive. The provider discards a tree whose stream did not verify.
        """
        if self._artifacts is None:
            raise SandboxConfigError("this worker has no artifact store, so it cannot restore workspace archives")
        notes: list[str] = []
        for ref in refs:
            if ref.kind == "native":
                if await self._restore_native(provider, envelope, ref, notes):
                    return RestoreOutcome(restored_from=ref.snapshot_id, notes=notes)
                continue
            try:
                chunks = verified(self._artifacts.get(ref.key), sha256=ref.sha256, size_bytes=ref.size_bytes)
                await provider.restore_workspace(envelope, chunks)
            except (ArtifactNotFound, ArchiveCorrupt, InvalidRequest, Unsupported) as err:
                notes.append(f"{ref.snapshot_id}: {err.error_type}: {err.message}")
                activity.logger.warning("archive %s not restored: %s", ref.snapshot_id, err.message)
                continue
            return RestoreOutcome(restored_from=ref.snapshot_id, notes=notes)
        return RestoreOutcome(restored_from=None, degraded=True, notes=notes)

    async def _restore_native(self, provider: Provider, envelope: Envelope, ref: ArchiveRef, notes: list[str]) -> bool:
        """Mount a provider-native snapshot; False (with a note) when this one is unusable."""
        if not isinstance(provider, NativeWorkspaceSnapshots):
            notes.append(f"{ref.snapshot_id}: this backend cannot restore native snapshots")
            return False
        if native_ref_sha256(ref.key) != ref.sha256:
            notes.append(f"{ref.snapshot_id}: ArchiveCorrupt: the row does not name the snapshot it recorded")
            return False
        try:
            await provider.mount_native(envelope, ref.key)
        except BoxNotFound:
            raise
        except (ProviderUnavailable, ProviderAuthError, ProviderQuotaError):
            raise  # transient or credentials: retry the activity rather than fall back to an older archive
        except (ProviderError, InvalidRequest) as err:
            notes.append(f"{ref.snapshot_id}: {err.error_type}: {err.message}")
            activity.logger.warning("native snapshot %s not restored: %s", ref.snapshot_id, err.message)
            return False
        return True

    @activity.defn(name=ActivityName.TERMINATE_BOX)
    @maps_provider_errors
    async def terminate(self, ref: BoxRef) -> None:
        """Destroy a box and every process in it (idempotent)."""
        provider = self._providers.get(ref.backend)
        self._sessions.forget(ref.backend, ref.envelope.instance_id)
        async with _heartbeating():
            await provider.terminate(Envelope(**ref.envelope.model_dump()))

    @activity.defn(name=ActivityName.DISCARD_LEASE_BOXES)
    @maps_provider_errors
    async def discard(self, inp: DiscardInput) -> DiscardResult:
        """Terminate every box the provider holds for a lease (after a failed warming)."""
        provider = self._providers.get(inp.backend)
        terminated: list[str] = []
        for box in await provider.list_owned():
            if box.lease_id != inp.lease_id:
                continue
            self._sessions.forget(inp.backend, box.instance_id)
            envelope = Envelope(backend_id=provider.backend_id, instance_id=box.instance_id, state=dict(box.labels))
            await provider.terminate(envelope)
            terminated.append(box.instance_id)
        return DiscardResult(terminated=terminated)

    @activity.defn(name=ActivityName.EXEC_IN_BOX)
    @maps_provider_errors
    async def exec(self, inp: ExecInput) -> ExecOutput:
        """Run one command in the box; output is capped and decoded as UTF-8."""
        try:
            session = await self._sessions.get(inp.backend, inp.envelope)
            async with _heartbeating():
                with (
                    box_operation_span(
                        "exec", inp.backend, epoch=inp.epoch, **{"sandbox.argv0": inp.cmd[0] if inp.cmd else ""}
                    ) as span,
                    self._metrics.timed("exec", inp.backend),
                ):
                    result = await session.exec(
                        inp.cmd, workdir=inp.workdir, timeout=inp.timeout_seconds, env=inp.env or None
                    )
                    span.set_attribute("sandbox.exit_code", result.exit_code)
        except BoxNotFound:
            self._sessions.forget(inp.backend, inp.envelope.instance_id)
            raise
        stdout, out_cut = _cap(result.stdout, inp.output_limit_bytes)
        stderr, err_cut = _cap(result.stderr, inp.output_limit_bytes)
        return ExecOutput(
            exit_code=result.exit_code,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=out_cut,
            stderr_truncated=err_cut,
        )

    @activity.defn(name=ActivityName.CHECK_BOX)
    @maps_provider_errors
    async def check(self, ref: BoxRef) -> CheckResult:
        """Whether the box still exists; only a typed ``BoxNotFound`` says it does not."""
        self._sessions.forget(ref.backend, ref.envelope.instance_id)
        try:
            session = await self._sessions.get(ref.backend, ref.envelope)
            await session.exec(["true"], timeout=30)
        except BoxNotFound:
            self._sessions.forget(ref.backend, ref.envelope.instance_id)
            return CheckResult(alive=False)
        return CheckResult(alive=True)
