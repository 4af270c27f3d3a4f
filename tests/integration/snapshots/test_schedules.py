"""The maintenance schedules: registered idempotently at worker start, overlap SKIP, an operator's pause kept."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from temporalio.client import ScheduleActionStartWorkflow, ScheduleOverlapPolicy

from sandbox.settings import Settings
from workflows.schedules import (
    MaintenancePolicy,
    ensure_schedules,
    orphan_sweep_schedule_id,
    snapshot_gc_schedule_id,
)


async def test_ensure_schedules_is_idempotent_and_keeps_a_pause(temporal_client: Any) -> None:
    settings = Settings(task_queue=f"sched-{uuid.uuid4()}")
    policy = MaintenancePolicy(snapshot_gc_interval_seconds=120, orphan_sweep_interval_seconds=600)
    ids = await ensure_schedules(temporal_client, settings, policy)
    assert ids == [snapshot_gc_schedule_id(settings.task_queue), orphan_sweep_schedule_id(settings.task_queue)]
    try:
        gc = temporal_client.get_schedule_handle(ids[0])
        described = await gc.describe()
        assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert described.schedule.spec.intervals[0].every == timedelta(seconds=120)
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == ("SnapshotGcWorkflow", settings.task_queue)
        sweep = await temporal_client.get_schedule_handle(ids[1]).describe()
        assert sweep.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert isinstance(sweep.schedule.action, ScheduleActionStartWorkflow)
        assert sweep.schedule.action.workflow == "OrphanSweepWorkflow"

        await gc.pause(note="operator")
        # A second worker starting (with a changed interval) updates the schedule, but keeps the pause.
        again = await ensure_schedules(
            temporal_client, settings, policy.model_copy(update={"snapshot_gc_interval_seconds": 60})
        )
        assert again == ids
        described = await gc.describe()
        assert described.schedule.state.paused
        assert described.schedule.spec.intervals[0].every == timedelta(seconds=60)
    finally:
        for schedule_id in ids:
            await temporal_client.get_schedule_handle(schedule_id).delete()


async def test_disabled_schedules_register_nothing(temporal_client: Any) -> None:
    settings = Settings(task_queue=f"sched-off-{uuid.uuid4()}")
    assert await ensure_schedules(temporal_client, settings, MaintenancePolicy(schedules_enabled=False)) == []


def test_policy_reads_the_settings_it_knows() -> None:
    policy = MaintenancePolicy.from_settings(Settings())
    assert policy.schedules_enabled and policy.snapshot_gc_interval_seconds > 0
    assert policy.sweep_input().backends == ["local"]
