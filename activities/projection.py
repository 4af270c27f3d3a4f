"""Activities that write the lease projection to the store and read it back when a lease restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio import activity

from store.heartbeats import HolderHeartbeats
from store.leases import LeaseRepository
from workflows.activity_names import ActivityName
from workflows.backend_profile import backend_profile
from workflows.models.boxes import HolderBeats, HolderBeatsInput, ProjectionInput, SeedInput, SeedResult


class ProjectionActivities:
    """Store-facing activities; one instance per worker, holding the repository."""

    def __init__(self, leases: LeaseRepository, beats: HolderHeartbeats, store_id: str | None = None) -> None:
        self._leases = leases
        self._beats = beats
        self._store_id = store_id

    @activity.defn(name=ActivityName.PROJECT_LEASE)
    async def project(self, inp: ProjectionInput) -> bool:
        """Write the lease row, its holders and new events; an older version never overwrites a newer one."""
        return await self._leases.apply(inp.record, inp.events)

    @activity.defn(name=ActivityName.LOAD_LEASE_SEED)
    async def load_seed(self, inp: SeedInput) -> SeedResult:
        """The epoch a new run of a lease must start from (epochs never repeat across runs), and its backend's profile.

        The profile is read from the descriptor table here, in an activity, so the lease's history
        holds it and a replay never reads the table.
        """
        profile = backend_profile(inp.backend) if inp.backend is not None else None
        record = await self._leases.get_by_id(inp.lease_id)
        if record is None:
            return SeedResult(backend_profile=profile, store_id=self._store_id)
        # A box the previous run still held belongs to a tenure that is over: start past it.
        epoch = record.epoch + (1 if record.instance_id else 0)
        return SeedResult(
            epoch=epoch, version=record.transition_seq, found=True, backend_profile=profile, store_id=self._store_id
        )

    @activity.defn(name=ActivityName.READ_HOLDER_BEATS)
    async def read_holder_beats(self, inp: HolderBeatsInput) -> HolderBeats:
        """The heartbeat marks of a lease's holders, read at a holder's deadline (stale marks pruned)."""
        now = datetime.now(UTC)
        keep = inp.forget_older_than_seconds
        marks = await self._beats.read(
            inp.lease_id, forget_before=now - timedelta(seconds=keep) if keep is not None else None
        )
        return HolderBeats(read_at=now, marks=marks)
