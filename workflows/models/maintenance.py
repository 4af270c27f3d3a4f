"""Inputs and results of the maintenance activities and workflows: snapshot GC and orphan sweep.

Like every module of :mod:`workflows.models`, these cross the Temporal boundary as JSON and are
imported by the workflows and their activities, so this module imports no provider or database
code. The activities' names are :class:`workflows.activity_names.ActivityName`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictInt

# ---------------------------------------------------------------- snapshot GC


class GcSettings(BaseModel):
    """How one GC run claims and retries (seconds); mirrors :class:`store.snapshots.GcPolicy`."""

    batch_size: int = Field(default=50, ge=1, le=1000)
    claim_ttl_seconds: float = Field(default=600.0, gt=0)
    candidate_ttl_seconds: float = Field(default=3600.0, gt=0)
    backoff_base_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=6 * 3600.0, gt=0)
    tombstone_ttl_seconds: float = Field(default=30 * 86400.0, gt=0)


class GcItem(BaseModel):
    """One claimed snapshot: what to delete and the claim that settles it."""

    snapshot_id: str
    key: str
    kind: str
    backend: str
    claim_token: str
    delete_attempts: int = 0


class GcClaimRequest(BaseModel):
    """Claim the next batch of eligible snapshots."""

    settings: GcSettings = Field(default_factory=GcSettings)


class GcBatch(BaseModel):
    """The claimed snapshots (empty when nothing is eligible)."""

    items: list[GcItem] = Field(default_factory=list)
    pruned: int = 0
    """Old ``deleted`` tombstones removed while claiming."""


class GcDeleteOutcome(BaseModel):
    """What happened to one claimed snapshot's object: ``error`` is None when it is gone."""

    item: GcItem
    error: str | None = None
    existed: bool = True


class GcDeleteResult(BaseModel):
    """One outcome per item of the batch, in order."""

    outcomes: list[GcDeleteOutcome] = Field(default_factory=list)


class GcSettleRequest(BaseModel):
    """Record the outcomes: ``deleted``, or ``delete_failed`` with backoff."""

    outcomes: list[GcDeleteOutcome]
    settings: GcSettings = Field(default_factory=GcSettings)


class GcSettleResult(BaseModel):
    """How the batch settled (``lost``: the claim expired and another run owns the row now)."""

    deleted: int = 0
    failed: int = 0
    lost: int = 0


class SnapshotGcInput(BaseModel):
    """One run of the snapshot GC."""

    settings: GcSettings = Field(default_factory=GcSettings)
    max_batches: int = Field(default=20, ge=1)
    """The run stops after this many batches; the next scheduled run continues."""


class SnapshotGcResult(BaseModel):
    """What one GC run did."""

    batches: int = 0
    claimed: int = 0
    deleted: int = 0
    failed: int = 0
    lost: int = 0
    pruned: int = 0
    errors: list[str] = Field(default_factory=list)
    """The first few delete failures, ``<snapshot_id>: <error>``."""


# ---------------------------------------------------------------- orphan sweep


class OrphanBox(BaseModel):
    """A box the provider says we own and no live lease names."""

    backend: str
    instance_id: str
    lease_id: str | None = None
    epoch: StrictInt | None = None
    created_at: float | None = None
    """Unix time the box was created, when the provider knows it."""
    age_seconds: float | None = None
    reason: str
    """Why no live lease names it: ``no lease``, ``lease cold``, ``lease moved on to epoch N``, ..."""


class OrphanScanRequest(BaseModel):
    """Find orphans among the boxes of these backends; boxes younger than the grace are left out."""

    backends: list[str] = Field(default_factory=lambda: ["local"])
    grace_seconds: float = Field(default=900.0, ge=0)


class OrphanScanResult(BaseModel):
    """What the scan saw."""

    scanned: int = 0
    live: int = 0
    young: int = 0
    """Unnamed boxes still within the grace period (a box being provisioned looks like this)."""
    orphans: list[OrphanBox] = Field(default_factory=list)
    skipped_backends: list[str] = Field(default_factory=list)


class OrphanTerminateRequest(BaseModel):
    """Terminate one orphan after checking again, right before, that no live lease names it."""

    box: OrphanBox
    grace_seconds: float = Field(default=900.0, ge=0)


class OrphanTerminateResult(BaseModel):
    """``terminated`` false means the re-check spared the box (``reason`` says why) or it was gone."""

    instance_id: str
    terminated: bool
    reason: str


class OrphanSweepInput(BaseModel):
    """One run of the orphan sweep."""

    backends: list[str] = Field(default_factory=lambda: ["local"])
    grace_seconds: float = Field(default=900.0, ge=0)
    """A box must be at least this old and unnamed by any live lease to be a candidate."""
    recheck_delay_seconds: float = Field(default=30.0, ge=0)
    """Wait between finding candidates and re-checking each right before terminating it."""


class OrphanSweepResult(BaseModel):
    """What one sweep did."""

    scanned: int = 0
    live: int = 0
    young: int = 0
    candidates: list[OrphanBox] = Field(default_factory=list)
    terminated: list[str] = Field(default_factory=list)
    spared: list[OrphanTerminateResult] = Field(default_factory=list)
