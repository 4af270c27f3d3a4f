"""The Temporal Schedules of the maintenance workflows, registered idempotently when a worker starts.

Two schedules per task queue (so several runtimes can share a namespace):
``snapshot-gc/<task_queue>`` runs :class:`~workflows.snapshot_gc.SnapshotGcWorkflow` and
``orphan-sweep/<task_queue>`` runs :class:`~workflows.orphan_sweep.OrphanSweepWorkflow`, both
with overlap policy SKIP (a run still going makes the next tick a no-op). :func:`ensure_schedules`
creates them, or updates an existing one to the current policy while keeping its paused/unpaused
state, so any number of workers can call it at start. :func:`run_snapshot_gc_now` and
:func:`run_orphan_sweep_now` run one pass on demand (the CLI's ``--now`` / ``--sweep``).
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from sandbox.settings import Settings
from workflows.models.maintenance import (
    GcSettings,
    OrphanSweepInput,
    OrphanSweepResult,
    SnapshotGcInput,
    SnapshotGcResult,
)
from workflows.orphan_sweep import OrphanSweepWorkflow
from workflows.snapshot_gc import SnapshotGcWorkflow

__all__ = [
    "MaintenancePolicy",
    "ensure_schedules",
    "orphan_sweep_schedule_id",
    "run_orphan_sweep_now",
    "run_snapshot_gc_now",
    "snapshot_gc_schedule_id",
]

_RUN_TIMEOUT = timedelta(hours=1)


class MaintenancePolicy(BaseModel):
    """How often the maintenance workflows run and with what parameters (seconds)."""

    schedules_enabled: bool = True
    snapshot_gc_interval_seconds: float = Field(default=300.0, gt=0)
    orphan_sweep_interval_seconds: float = Field(default=900.0, gt=0)
    orphan_grace_seconds: float = Field(default=900.0, ge=0)
    orphan_recheck_delay_seconds: float = Field(default=30.0, ge=0)
    orphan_backends: list[str] = Field(default_factory=lambda: ["local"])
    gc: GcSettings = Field(default_factory=GcSettings)

    @classmethod
    def from_settings(cls, settings: Settings) -> MaintenancePolicy:
        """The policy the settings ask for; fields the settings do not define keep their defaults.

        Reads ``maintenance_schedules_enabled``, ``snapshot_gc_interval_seconds``,
        ``orphan_sweep_interval_seconds``, ``orphan_grace_seconds``,
        ``orphan_recheck_delay_seconds`` and ``snapshot_candidate_ttl_seconds`` when
        :class:`~sandbox.settings.Settings` has them (``SANDBOX_`` environment variables).
        """
        defined = type(settings).model_fields
        values: dict[str, Any] = {}
        gc: dict[str, Any] = {}
        for setting, target, field in (
            ("maintenance_schedules_enabled", values, "schedules_enabled"),
            ("snapshot_gc_interval_seconds", values, "snapshot_gc_interval_seconds"),
            ("orphan_sweep_interval_seconds", values, "orphan_sweep_interval_seconds"),
            ("orphan_grace_seconds", values, "orphan_grace_seconds"),
            ("orphan_recheck_delay_seconds", values, "orphan_recheck_delay_seconds"),
            ("snapshot_candidate_ttl_seconds", gc, "candidate_ttl_seconds"),
        ):
            if setting in defined:
                target[field] = getattr(settings, setting)
        values["orphan_backends"] = _sweep_backends(settings)
        return cls(**values, gc=GcSettings(**gc))

    def gc_input(self) -> SnapshotGcInput:
        """The input of one GC run."""
        return SnapshotGcInput(settings=self.gc)

    def sweep_input(self) -> OrphanSweepInput:
        """The input of one orphan sweep."""
        return OrphanSweepInput(
            backends=list(self.orphan_backends),
            grace_seconds=self.orphan_grace_seconds,
            recheck_delay_seconds=self.orphan_recheck_delay_seconds,
        )


def _sweep_backends(settings: Settings) -> list[str]:
    """The backends to sweep: the configured list, else ``local`` and the default backend."""
    configured = getattr(settings, "orphan_sweep_backends", "")
    if configured:
        return [name.strip() for name in configured.split(",") if name.strip()]
    default = getattr(settings, "default_backend", "local")
    return ["local"] if default in ("local", "none", "selfhosted") else ["local", default]


def snapshot_gc_schedule_id(task_queue: str) -> str:
    """The id of the snapshot GC schedule of a task queue (also the prefix of its runs' workflow ids)."""
    return f"snapshot-gc/{task_queue}"


def orphan_sweep_schedule_id(task_queue: str) -> str:
    """The id of the orphan sweep schedule of a task queue (also the prefix of its runs' workflow ids)."""
    return f"orphan-sweep/{task_queue}"


def _schedules(settings: Settings, policy: MaintenancePolicy) -> dict[str, Schedule]:
    tq = settings.task_queue
    skip = SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP)
    gc_id = snapshot_gc_schedule_id(tq)
    sweep_id = orphan_sweep_schedule_id(tq)
    return {
        gc_id: Schedule(
            action=ScheduleActionStartWorkflow(
                SnapshotGcWorkflow.run, policy.gc_input(), id=gc_id, task_queue=tq, execution_timeout=_RUN_TIMEOUT
            ),
            spec=ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=policy.snapshot_gc_interval_seconds))]
            ),
            policy=skip,
        ),
        sweep_id: Schedule(
            action=ScheduleActionStartWorkflow(
                OrphanSweepWorkflow.run,
                policy.sweep_input(),
                id=sweep_id,
                task_queue=tq,
                execution_timeout=_RUN_TIMEOUT,
            ),
            spec=ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=policy.orphan_sweep_interval_seconds))]
            ),
            policy=skip,
        ),
    }


async def ensure_schedules(client: Client, settings: Settings, policy: MaintenancePolicy | None = None) -> list[str]:
    """Create the maintenance schedules of the settings' task queue, or bring existing ones up to date.

    Idempotent and safe to race: a schedule that already exists is updated to the current policy
    (keeping whether an operator paused it). Returns the schedule ids (none when disabled).
    """
    policy = policy or MaintenancePolicy.from_settings(settings)
    if not policy.schedules_enabled:
        return []
    ids: list[str] = []
    for schedule_id, schedule in _schedules(settings, policy).items():
        try:
            await client.create_schedule(schedule_id, schedule)
        except ScheduleAlreadyRunningError:

            def keep_state(current: ScheduleUpdateInput, desired: Schedule = schedule) -> ScheduleUpdate:
                return ScheduleUpdate(schedule=dataclasses.replace(desired, state=current.description.schedule.state))

            await client.get_schedule_handle(schedule_id).update(keep_state)
        ids.append(schedule_id)
    return ids


async def run_snapshot_gc_now(
    client: Client, settings: Settings, policy: MaintenancePolicy | None = None
) -> SnapshotGcResult:
    """Run one GC pass now on the settings' task queue and wait for its result."""
    policy = policy or MaintenancePolicy.from_settings(settings)
    return await client.execute_workflow(
        SnapshotGcWorkflow.run,
        policy.gc_input(),
        id=f"{snapshot_gc_schedule_id(settings.task_queue)}/manual-{uuid.uuid4().hex[:12]}",
        task_queue=settings.task_queue,
        execution_timeout=_RUN_TIMEOUT,
    )


async def run_orphan_sweep_now(
    client: Client, settings: Settings, policy: MaintenancePolicy | None = None
) -> OrphanSweepResult:
    """Run one orphan sweep now on the settings' task queue and wait for its result."""
    policy = policy or MaintenancePolicy.from_settings(settings)
    return await client.execute_workflow(
        OrphanSweepWorkflow.run,
        policy.sweep_input(),
        id=f"{orphan_sweep_schedule_id(settings.task_queue)}/manual-{uuid.uuid4().hex[:12]}",
        task_queue=settings.task_queue,
        execution_timeout=_RUN_TIMEOUT,
    )
