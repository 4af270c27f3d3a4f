"""The snapshot ledger: one ``sandbox_snapshots`` row per workspace archive, and the GC's work queue.

A row's life::

    candidate ──publish──▶ current ──next publish──▶ previous ──next publish──▶ delete_pending
        │                                                                            │
        └── older than the candidate TTL, never published ─────────────────────┐      │
                                                                               ▼      ▼
                                              deleted ◀──settle── deleting ◀──claim──┘
                                                                   │    ▲
                                                                   ▼    │ (backoff elapsed)
                                                              delete_failed

A capture records its row as ``candidate`` *before* it writes the archive, so every stored object
has a row and a crashed capture is collected like any unpublished candidate. :meth:`SnapshotLedger.publish`
makes a candidate ``current`` in one transaction, demoting the old current to ``previous`` and the
old previous to ``delete_pending``; the database enforces at most one current and one previous per
lease. The GC claims eligible rows in batches (``deleting`` with a claim token and expiry), deletes
their objects, and settles each as ``deleted`` or ``delete_failed`` with exponential backoff; a
``current`` or ``previous`` row is never eligible. Claims are race-free: PostgreSQL picks rows with
``FOR UPDATE SKIP LOCKED``, SQLite runs the claim as one guarded ``UPDATE`` under its single writer lock.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, Table, and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox.errors import InvalidRequest, SnapshotConflict, SnapshotNotFound
from store.database import Database
from store.models import SNAPSHOT_KINDS, SnapshotRow
from store.records import UtcDatetime

__all__ = ["GcClaim", "GcPolicy", "SnapshotLedger", "SnapshotRecord", "new_snapshot_id"]

_T: Table = SnapshotRow.__table__  # type: ignore[assignment]

_PUBLISHED = ("current", "previous")


def new_snapshot_id() -> str:
    """A fresh snapshot id: ``snap-`` + 32 hex digits."""
    return "snap-" + uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SnapshotRecord(BaseModel):
    """One row of the ledger as callers see it.

    Attributes:
        snapshot_id: The row's id (``snap-...``), also the archive's file name.
        lease_id: The lease the archive belongs to.
        workspace_id: Workspace of the lease.
        group_id: Sandbox group of the lease.
        epoch: The lease epoch of the box that was captured.
        state: candidate | current | previous | delete_pending | deleting | deleted | delete_failed.
        key: Artifact-store key of the archive, or the provider's id for a ``native`` snapshot.
        sha256: SHA-256 of the stored bytes; None while the capture is still writing.
        size_bytes: Size of the stored bytes; None while the capture is still writing.
        kind: tar | tar+zstd | native.
        backend: The backend the box ran on (native snapshots are deleted through it).
        fingerprint: The provider's workspace fingerprint when captured (cheap change detection).
        created_at: When the capture started (publication never lets an older capture win).
        published_at: When it became current.
        delete_after: Earliest time the GC may delete it (set when it leaves the slots).
        delete_attempts: Failed delete attempts so far.
        last_delete_error: The last delete failure.
        next_attempt_at: ``delete_failed``: earliest retry; ``deleting``: claim expiry;
            ``deleted``: when the delete completed.
    """

    model_config = ConfigDict(frozen=True)

    snapshot_id: str
    lease_id: str
    workspace_id: str
    group_id: str
    epoch: int
    state: str
    key: str
    sha256: str | None = None
    size_bytes: int | None = None
    kind: str
    backend: str
    fingerprint: str | None = None
    created_at: UtcDatetime
    published_at: UtcDatetime | None = None
    delete_after: UtcDatetime | None = None
    delete_attempts: int = 0
    last_delete_error: str | None = None
    next_attempt_at: UtcDatetime | None = None


class GcPolicy(BaseModel):
    """How the GC picks and retries (seconds)."""

    batch_size: int = Field(default=50, ge=1, le=1000)
    claim_ttl_seconds: float = Field(default=600.0, gt=0)
    """A ``deleting`` claim older than this is taken to be abandoned (crashed worker) and reclaimed."""
    candidate_ttl_seconds: float = Field(default=3600.0, gt=0)
    """An unpublished candidate older than this is garbage (must exceed the capture timeout)."""
    backoff_base_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=6 * 3600.0, gt=0)
    tombstone_ttl_seconds: float = Field(default=30 * 86400.0, gt=0)
    """How long ``deleted`` rows are kept before :meth:`SnapshotLedger.prune_tombstones` removes them."""

    def backoff(self, failed_attempts: int) -> timedelta:
        """Delay before the next try after ``failed_attempts`` failures: base × 2^(n-1), capped."""
        exponent = min(max(failed_attempts - 1, 0), 17)
        return timedelta(seconds=min(self.backoff_max_seconds, self.backoff_base_seconds * 2**exponent))


class GcClaim(BaseModel):
    """A row the GC claimed: delete its object, then settle it with the same token."""

    model_config = ConfigDict(frozen=True)

    snapshot_id: str
    key: str
    kind: str
    backend: str
    claim_token: str
    delete_attempts: int = 0


def _record(row: Any) -> SnapshotRecord:
    return SnapshotRecord(
        snapshot_id=row.id,
        lease_id=row.lease_id,
        workspace_id=row.workspace_id,
        group_id=row.group_id,
        epoch=row.epoch,
        state=row.state,
        key=row.key,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        kind=row.kind,
        backend=row.backend,
        fingerprint=row.fingerprint,
        created_at=row.created_at,
        published_at=row.published_at,
        delete_after=row.delete_after,
        delete_attempts=row.delete_attempts,
        last_delete_error=row.last_delete_error,
        next_attempt_at=row.next_attempt_at,
    )


def _lock_key(lease_id: str) -> int:
    return int.from_bytes(hashlib.sha256(b"sandbox_snapshots:" + lease_id.encode()).digest()[:8], "big", signed=True)


class SnapshotLedger:
    """Reads and writes ``sandbox_snapshots``.

    Args:
        db: The store.
        clock: Current time (UTC, aware); tests pass a fake one, and most methods also take ``now``.
    """

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._db = db
        self._clock = clock

    def _now(self, now: datetime | None) -> datetime:
        value = now if now is not None else self._clock()
        if value.tzinfo is None:
            raise InvalidRequest("the ledger needs timezone-aware times")
        return value

    # -- captures -------------------------------------------------------------------------------

    async def record_candidate(
        self,
        *,
        lease_id: str,
        workspace_id: str,
        group_id: str,
        epoch: int,
        key: str,
        kind: str,
        backend: str,
        snapshot_id: str | None = None,
        created_at: datetime | None = None,
    ) -> SnapshotRecord:
        """Add a ``candidate`` row for a capture about to write ``key`` (before any byte is stored).

        Raises:
            InvalidRequest: unknown kind or empty ids.
        """
        if kind not in SNAPSHOT_KINDS:
            raise InvalidRequest(f"snapshot kind must be one of {', '.join(SNAPSHOT_KINDS)}, not {kind!r}")
        if not (lease_id and workspace_id and group_id and key and backend):
            raise InvalidRequest("lease_id, workspace_id, group_id, key and backend must be non-empty")
        values: dict[str, Any] = {
            "id": snapshot_id or new_snapshot_id(),
            "lease_id": lease_id,
            "workspace_id": workspace_id,
            "group_id": group_id,
            "epoch": epoch,
            "state": "candidate",
            "key": key,
            "kind": kind,
            "backend": backend,
            "created_at": self._now(created_at),
            "delete_attempts": 0,
        }
        async with self._db.sessionmaker.begin() as session:
            row = (await session.execute(_T.insert().values(values).returning(*_T.c))).one()
        return _record(row)

    async def complete_candidate(
        self, snapshot_id: str, *, sha256: str, size_bytes: int, fingerprint: str | None = None
    ) -> SnapshotRecord:
        """Record the stored archive's SHA-256 and size on its candidate row (the capture finished).

        Raises:
            SnapshotNotFound: no such row.
            SnapshotConflict: the row is no longer a candidate (the GC collected it meanwhile).
        """
        stmt = (
            update(_T)
            .where(_T.c.id == snapshot_id, _T.c.state == "candidate")
            .values(sha256=sha256, size_bytes=size_bytes, fingerprint=fingerprint)
            .returning(*_T.c)
        )
        async with self._db.sessionmaker.begin() as session:
            row = (await session.execute(stmt)).one_or_none()
            if row is None:
                await self._explain_missing(session, snapshot_id, "complete")
        return _record(row)

    async def abandon_candidate(self, snapshot_id: str, *, object_deleted: bool, now: datetime | None = None) -> bool:
        """Give up a candidate: forget the row if its object is gone (or was never stored), else hand it to the GC.

        With ``object_deleted`` the row is removed (nothing is left to track); otherwise it becomes
        ``delete_pending``. Returns whether the row was a candidate (any other row is left alone).
        """
        at = self._now(now)
        where = and_(_T.c.id == snapshot_id, _T.c.state == "candidate")
        if object_deleted:
            stmt: Any = delete(_T).where(where).returning(_T.c.id)
        else:
            stmt = (
                update(_T)
                .where(where)
                .values(state="delete_pending", delete_after=at, next_attempt_at=None)
                .returning(_T.c.id)
            )
        async with self._db.sessionmaker.begin() as session:
            return (await session.execute(stmt)).one_or_none() is not None

    async def set_fingerprint(self, snapshot_id: str, fingerprint: str | None) -> None:
        """Remember the workspace fingerprint that matches an archive (after an unchanged capture)."""
        async with self._db.sessionmaker.begin() as session:
            await session.execute(update(_T).where(_T.c.id == snapshot_id).values(fingerprint=fingerprint))

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, snapshot_id: str) -> SnapshotRecord | None:
        """The row with this id, or None."""
        async with self._db.sessionmaker() as session:
            row = (await session.execute(select(_T).where(_T.c.id == snapshot_id))).one_or_none()
        return None if row is None else _record(row)

    async def slots(self, lease_id: str) -> builtins.list[SnapshotRecord]:
        """The lease's published archives, best first: current, then previous (each if present)."""
        async with self._db.sessionmaker() as session:
            return await self._slots(session, lease_id)

    async def find_published(self, lease_id: str, sha256: str) -> SnapshotRecord | None:
        """The lease's current or previous archive with this SHA-256 (current preferred), or None."""
        for record in await self.slots(lease_id):
            if record.sha256 == sha256:
                return record
        return None

    async def list(
        self, workspace_id: str, group_id: str, *, include_deleted: bool = True, limit: int = 1000
    ) -> builtins.list[SnapshotRecord]:
        """The archives of a workspace's sandbox group, newest capture first.

        Raises:
            InvalidRequest: ``limit`` is not positive.
        """
        if limit <= 0:
            raise InvalidRequest(f"limit must be positive, got {limit}")
        stmt = select(_T).where(_T.c.workspace_id == workspace_id, _T.c.group_id == group_id)
        if not include_deleted:
            stmt = stmt.where(_T.c.state != "deleted")
        stmt = stmt.order_by(_T.c.created_at.desc(), _T.c.id).limit(limit)
        async with self._db.sessionmaker() as session:
            return [_record(row) for row in await session.execute(stmt)]

    async def counts(self) -> dict[str, int]:
        """How many rows are in each state (states with no rows are omitted)."""
        stmt = select(_T.c.state, func.count()).group_by(_T.c.state)
        async with self._db.sessionmaker() as session:
            return {state: int(n) for state, n in await session.execute(stmt)}

    async def _slots(self, session: AsyncSession, lease_id: str) -> builtins.list[SnapshotRecord]:
        stmt = select(_T).where(_T.c.lease_id == lease_id, _T.c.state.in_(_PUBLISHED))
        rows = [_record(row) for row in await session.execute(stmt)]
        return sorted(rows, key=lambda r: _PUBLISHED.index(r.state))

    async def _explain_missing(self, session: AsyncSession, snapshot_id: str, action: str) -> None:
        row = (await session.execute(select(_T.c.state).where(_T.c.id == snapshot_id))).one_or_none()
        if row is None:
            raise SnapshotNotFound(f"no snapshot {snapshot_id} in the ledger")
        raise SnapshotConflict(f"cannot {action} snapshot {snapshot_id}: it is {row.state}, not a candidate")

    # -- publication ----------------------------------------------------------------------------

    async def publish(
        self, lease_id: str, snapshot_id: str, *, now: datetime | None = None
    ) -> builtins.list[SnapshotRecord]:
        """Make a complete candidate the lease's current archive; returns the slots (current, previous).

        In one transaction, serialised per lease: the old previous becomes ``delete_pending``, the
        old current becomes ``previous``, the candidate becomes ``current``. Publishing a snapshot
        that is already current or previous changes nothing (a retried publish).

        Raises:
            SnapshotNotFound: no such snapshot for this lease.
            SnapshotConflict: the snapshot is not a complete candidate (collected, or still being
                written), or the current archive was captured after it (a late capture never
                replaces a fresher one).
        """
        at = self._now(now)
        async with self._db.sessionmaker.begin() as session:
            await self._lock_lease(session, lease_id, snapshot_id)
            row = (await session.execute(select(_T).where(_T.c.id == snapshot_id))).one_or_none()
            if row is None or row.lease_id != lease_id:
                raise SnapshotNotFound(f"no snapshot {snapshot_id} for lease {lease_id}")
            if row.state in _PUBLISHED:
                return await self._slots(session, lease_id)
            if row.state != "candidate":
                raise SnapshotConflict(f"snapshot {snapshot_id} is {row.state}; only a candidate can be published")
            if row.sha256 is None:
                raise SnapshotConflict(f"snapshot {snapshot_id} is still being written; publish it once captured")
            current = (
                await session.execute(select(_T).where(_T.c.lease_id == lease_id, _T.c.state == "current"))
            ).one_or_none()
            if current is not None and _aware(row.created_at) < _aware(current.created_at):
                raise SnapshotConflict(
                    f"snapshot {snapshot_id} was captured before the current {current.id}; "
                    "a late capture never replaces a fresher one"
                )
            # Order matters: each step keeps "one current, one previous per lease" true.
            await session.execute(
                update(_T)
                .where(_T.c.lease_id == lease_id, _T.c.state == "previous")
                .values(state="delete_pending", delete_after=at, next_attempt_at=None)
            )
            if current is not None:
                await session.execute(update(_T).where(_T.c.id == current.id).values(state="previous"))
            await session.execute(update(_T).where(_T.c.id == snapshot_id).values(state="current", published_at=at))
            return await self._slots(session, lease_id)

    async def _lock_lease(self, session: AsyncSession, lease_id: str, snapshot_id: str) -> None:
        """Serialise publications of one lease for the rest of the transaction."""
        if self._db.dialect == "postgresql":
            await session.execute(select(func.pg_advisory_xact_lock(_lock_key(lease_id))))
        else:
            # SQLite has one writer: starting with a write takes the lock before anything is read.
            await session.execute(update(_T).where(_T.c.id == snapshot_id).values(state=_T.c.state))

    # -- garbage collection ---------------------------------------------------------------------

    def _eligible(self, now: datetime, policy: GcPolicy) -> ColumnElement[bool]:
        stale_candidate = now - timedelta(seconds=policy.candidate_ttl_seconds)
        return or_(
            and_(
                _T.c.state.in_(("delete_pending", "delete_failed")),
                or_(_T.c.next_attempt_at.is_(None), _T.c.next_attempt_at <= now),
                or_(_T.c.delete_after.is_(None), _T.c.delete_after <= now),
            ),
            and_(_T.c.state == "deleting", _T.c.next_attempt_at <= now),
            and_(_T.c.state == "candidate", _T.c.created_at <= stale_candidate),
        )

    async def claim_for_gc(
        self, *, policy: GcPolicy | None = None, limit: int | None = None, now: datetime | None = None
    ) -> builtins.list[GcClaim]:
        """Claim up to ``limit`` (default ``policy.batch_size``) eligible rows as ``deleting``.

        Eligible: ``delete_pending``/``delete_failed`` past ``delete_after`` and their backoff, an
        abandoned ``deleting`` claim, or a candidate older than the candidate TTL. Never a current
        or previous row. Concurrent claimers get disjoint rows.
        """
        policy = policy or GcPolicy()
        at = self._now(now)
        batch = limit if limit is not None else policy.batch_size
        if batch <= 0:
            raise InvalidRequest(f"limit must be positive, got {batch}")
        token = secrets.token_hex(12)
        eligible = self._eligible(at, policy)
        pick = select(_T.c.id).where(eligible).order_by(_T.c.created_at, _T.c.id).limit(batch)
        if self._db.dialect == "postgresql":
            # A materialised CTE is evaluated once; an IN (subquery) may be re-run by the planner
            # (and re-checked after a concurrent update), claiming more than the batch.
            picked = pick.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
            target = update(_T).where(_T.c.id == picked.c.id, eligible)
        else:
            # SQLite runs the whole statement under its single writer lock: the guard is the statement.
            target = update(_T).where(_T.c.id.in_(pick.scalar_subquery()), eligible)
        stmt = target.values(
            state="deleting",
            claim_token=token,
            next_attempt_at=at + timedelta(seconds=policy.claim_ttl_seconds),
        ).returning(_T.c.id, _T.c.key, _T.c.kind, _T.c.backend, _T.c.delete_attempts)
        async with self._db.sessionmaker.begin() as session:
            rows = (await session.execute(stmt)).all()
        return [
            GcClaim(
                snapshot_id=row.id,
                key=row.key,
                kind=row.kind,
                backend=row.backend,
                claim_token=token,
                delete_attempts=row.delete_attempts,
            )
            for row in sorted(rows, key=lambda r: r.id)
        ]

    async def settle(
        self,
        claim: GcClaim,
        *,
        error: str | None = None,
        policy: GcPolicy | None = None,
        now: datetime | None = None,
    ) -> str | None:
        """Settle a claimed row: ``deleted`` (no ``error``) or ``delete_failed`` with backoff.

        Only the holder of the claim settles it; returns the new state, or None when the claim was
        no longer ours (it expired and another GC run took the row).
        """
        policy = policy or GcPolicy()
        at = self._now(now)
        if error is None:
            values: dict[str, Any] = {"state": "deleted", "next_attempt_at": at, "claim_token": None}
        else:
            failed = claim.delete_attempts + 1
            values = {
                "state": "delete_failed",
                "delete_attempts": failed,
                "last_delete_error": error[:2000],
                "next_attempt_at": at + policy.backoff(failed),
                "claim_token": None,
            }
        stmt = (
            update(_T)
            .where(_T.c.id == claim.snapshot_id, _T.c.state == "deleting", _T.c.claim_token == claim.claim_token)
            .values(values)
            .returning(_T.c.state)
        )
        async with self._db.sessionmaker.begin() as session:
            row = (await session.execute(stmt)).one_or_none()
        return None if row is None else str(row.state)

    async def prune_tombstones(
        self, *, policy: GcPolicy | None = None, limit: int = 500, now: datetime | None = None
    ) -> int:
        """Remove up to ``limit`` ``deleted`` rows older than the tombstone TTL; returns how many."""
        policy = policy or GcPolicy()
        cutoff = self._now(now) - timedelta(seconds=policy.tombstone_ttl_seconds)
        pick = (
            select(_T.c.id)
            .where(_T.c.state == "deleted", _T.c.next_attempt_at <= cutoff)
            .order_by(_T.c.next_attempt_at)
            .limit(limit)
        )
        stmt = delete(_T).where(_T.c.id.in_(pick.scalar_subquery()), _T.c.state == "deleted").returning(_T.c.id)
        async with self._db.sessionmaker.begin() as session:
            return len((await session.execute(stmt)).all())


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
