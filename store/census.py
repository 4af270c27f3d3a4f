"""A count of what the store holds, by the labels an operator's dashboard groups on.

The worker's metrics (:mod:`activities.metrics`) turn a :class:`Census` into gauges every few
seconds. Every count is one ``GROUP BY`` query, so taking a census costs the same for ten leases
as for ten thousand rows of holders.

| gauge                     | labels             | from                                    |
|---------------------------|--------------------|-----------------------------------------|
| ``sandbox_leases``        | liveness, backend  | ``sandbox_leases``                      |
| ``sandbox_boxes``         | backend            | leases with a box (``instance_id`` set) |
| ``sandbox_lease_holders`` | kind               | ``sandbox_lease_holders``               |
| ``sandbox_recordings``    | state              | ``recordings``                          |
| ``sandbox_agents``        | liveness           | enrolled machines (``sandbox.liveness``)|
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select

from sandbox.liveness import selfhosted_liveness
from store.database import Database
from store.machines import EnrollmentRepository
from store.models import LeaseHolderRow, LeaseRow, RecordingRow

__all__ = ["Census", "take_census"]

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Census:
    """Counts keyed by gauge name, then by a sorted tuple of (label, value) pairs."""

    counts: dict[str, dict[Labels, int]] = field(default_factory=dict)


async def take_census(db: Database, *, now: datetime | None = None) -> Census:
    """Count leases, boxes, holders, recordings and enrolled agents as the store holds them now."""
    counts: dict[str, dict[Labels, int]] = {}
    async with db.sessionmaker() as session:
        leases = await session.execute(
            select(LeaseRow.liveness, LeaseRow.backend, func.count()).group_by(LeaseRow.liveness, LeaseRow.backend)
        )
        counts["sandbox_leases"] = {
            (("backend", backend), ("liveness", liveness)): n for liveness, backend, n in leases.all()
        }
        boxes = await session.execute(
            select(LeaseRow.backend, func.count()).where(LeaseRow.instance_id.is_not(None)).group_by(LeaseRow.backend)
        )
        counts["sandbox_boxes"] = {(("backend", backend),): n for backend, n in boxes.all()}
        holders = await session.execute(select(LeaseHolderRow.kind, func.count()).group_by(LeaseHolderRow.kind))
        counts["sandbox_lease_holders"] = {(("kind", kind),): n for kind, n in holders.all()}
        recordings = await session.execute(select(RecordingRow.state, func.count()).group_by(RecordingRow.state))
        counts["sandbox_recordings"] = {(("state", state),): n for state, n in recordings.all()}
    moment = now or datetime.now(UTC)
    agents: Counter[str] = Counter()
    for enrollment in await EnrollmentRepository(db).list(include_revoked=False):
        agents[selfhosted_liveness(enrollment.view(), probe_responded=False, now=moment).state] += 1
    counts["sandbox_agents"] = {(("liveness", state),): n for state, n in agents.items()}
    return Census(counts)
