"""Activities of the orphan sweep: find boxes no live lease names, and terminate one after re-checking.

A box is *named* (and never touched) when the lease projection says its lease holds exactly that
instance and is not cold, or when its lease has not moved past the epoch the box was made for (a
box being provisioned, or about to be adopted by a retried provision, before the projection
shows it). Everything else the provider lists as ours is an orphan once it is older than the
grace period. The selfhosted backend is never swept: the user's machine is the persistence.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from temporalio import activity

from activities.provider_errors import maps_provider_errors
from providers.registry import ProviderRegistry
from sandbox.box import Envelope, OwnedBox
from store.leases import LeaseRepository
from workflows.activity_names import ActivityName
from workflows.models.maintenance import (
    OrphanBox,
    OrphanScanRequest,
    OrphanScanResult,
    OrphanTerminateRequest,
    OrphanTerminateResult,
)

__all__ = ["NEVER_SWEPT", "OrphanActivities"]

NEVER_SWEPT: frozenset[str] = frozenset({"none", "selfhosted"})
"""Backends whose boxes the sweep never terminates (no boxes, or the user's own machine)."""

_LIVE = ("warming", "warm", "draining")
_LIST_LIMIT = 1_000_000


def _epoch_of(box: OwnedBox) -> int | None:
    try:
        return int(box.labels["epoch"])
    except (KeyError, ValueError):
        return None


class OrphanActivities:
    """Orphan-sweep activities; one instance per worker.

    Args:
        providers: The worker's provider registry.
        leases: The lease projection.
        clock: Current Unix time (tests pass a fake one).
    """

    def __init__(
        self, providers: ProviderRegistry, leases: LeaseRepository, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._providers = providers
        self._leases = leases
        self._clock = clock

    async def find_orphans(self, backends: list[str], grace_seconds: float) -> OrphanScanResult:
        """Classify every box of ``backends``: live, young (unnamed but within the grace), or orphan."""
        result = OrphanScanResult()
        named: set[str] | None = None
        for backend in backends:
            if backend in NEVER_SWEPT:
                result.skipped_backends.append(backend)
                continue
            provider = self._providers.get(backend)
            for box in await provider.list_owned():
                result.scanned += 1
                if named is None and box.lease_id is None:
                    named = await self._live_instances()
                live, reason = await self._judge(box, named)
                if live:
                    result.live += 1
                    continue
                orphan = self._orphan(backend, box, reason)
                if orphan.age_seconds is not None and orphan.age_seconds < grace_seconds:
                    result.young += 1
                    continue
                result.orphans.append(orphan)
        return result

    @activity.defn(name=ActivityName.SCAN_ORPHAN_BOXES)
    @maps_provider_errors
    async def scan(self, req: OrphanScanRequest) -> OrphanScanResult:
        """List the orphans older than the grace period (terminates nothing)."""
        return await self.find_orphans(req.backends, req.grace_seconds)

    @activity.defn(name=ActivityName.TERMINATE_ORPHAN_BOX)
    @maps_provider_errors
    async def terminate(self, req: OrphanTerminateRequest) -> OrphanTerminateResult:
        """Check the box again against the projection and, if it is still an orphan, terminate it."""
        backend = req.box.backend
        instance_id = req.box.instance_id
        if backend in NEVER_SWEPT:
            return OrphanTerminateResult(instance_id=instance_id, terminated=False, reason=f"{backend} is never swept")
        provider = self._providers.get(backend)
        box = next((b for b in await provider.list_owned() if b.instance_id == instance_id), None)
        if box is None:
            return OrphanTerminateResult(instance_id=instance_id, terminated=False, reason="already gone")
        named = await self._live_instances() if box.lease_id is None else None
        live, reason = await self._judge(box, named)
        if live:
            return OrphanTerminateResult(instance_id=instance_id, terminated=False, reason=reason)
        orphan = self._orphan(backend, box, reason)
        if orphan.age_seconds is not None and orphan.age_seconds < req.grace_seconds:
            return OrphanTerminateResult(
                instance_id=instance_id, terminated=False, reason="younger than the grace period"
            )
        activity.logger.info("terminating orphan box %s (%s)", instance_id, reason)
        await provider.terminate(Envelope(backend_id=provider.backend_id, instance_id=instance_id, state={}))
        return OrphanTerminateResult(instance_id=instance_id, terminated=True, reason=reason)

    def _orphan(self, backend: str, box: OwnedBox, reason: str) -> OrphanBox:
        age = None if box.created_at is None else max(0.0, self._clock() - box.created_at)
        return OrphanBox(
            backend=backend,
            instance_id=box.instance_id,
            lease_id=box.lease_id,
            epoch=_epoch_of(box),
            created_at=box.created_at,
            age_seconds=age,
            reason=reason,
        )

    async def _judge(self, box: OwnedBox, named: set[str] | None) -> tuple[bool, str]:
        """Whether a live lease names the box, and why (or why not)."""
        if box.lease_id is None:
            if named is not None and box.instance_id in named:
                return True, "named by a live lease"
            return False, "no lease label and no live lease names it"
        lease = await self._leases.get_by_id(box.lease_id)
        if lease is None:
            return False, f"lease {box.lease_id} is not in the projection"
        if lease.instance_id == box.instance_id and lease.liveness != "cold":
            return True, f"held by {lease.lease_id} ({lease.liveness}, epoch {lease.epoch})"
        epoch = _epoch_of(box)
        if epoch is not None and epoch >= lease.epoch:
            # The lease has not moved past the box's epoch: a provision in flight may still adopt it.
            return True, f"made for epoch {epoch} of {lease.lease_id}, which is at epoch {lease.epoch}"
        if lease.liveness == "cold":
            return False, f"lease {lease.lease_id} is cold at epoch {lease.epoch}"
        return False, f"lease {lease.lease_id} moved on to {lease.instance_id or 'no box'} at epoch {lease.epoch}"

    async def _live_instances(self) -> set[str]:
        named: set[str] = set()
        for liveness in _LIVE:
            for lease in await self._leases.list(liveness=liveness, limit=_LIST_LIMIT):
                if lease.instance_id:
                    named.add(lease.instance_id)
        return named
