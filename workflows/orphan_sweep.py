"""OrphanSweepWorkflow: terminate boxes the provider says we own but no live lease names.

Started by a Temporal Schedule (:mod:`workflows.schedules`, overlap SKIP) or on demand
(``sandboxctl orphans --sweep``). A scan lists candidates: boxes older than the grace period that
no live lease names (see :mod:`activities.orphans` for what "names" means). The run then waits
``recheck_delay_seconds`` and terminates each candidate through an activity that checks it again
right before terminating, so a box a lease took up meanwhile is spared. A live lease's box is
never touched.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.activity_names import ActivityName
    from workflows.models.maintenance import (
        OrphanScanRequest,
        OrphanScanResult,
        OrphanSweepInput,
        OrphanSweepResult,
        OrphanTerminateRequest,
        OrphanTerminateResult,
    )

_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=30), maximum_attempts=5
)


@workflow.defn(name="OrphanSweepWorkflow")
class OrphanSweepWorkflow:
    """One sweep: scan, wait, re-check and terminate each orphan."""

    @workflow.run
    async def run(self, inp: OrphanSweepInput) -> OrphanSweepResult:
        """Scan for orphans older than the grace, then terminate those still orphaned at re-check."""
        scan = await workflow.execute_activity(
            ActivityName.SCAN_ORPHAN_BOXES,
            OrphanScanRequest(backends=inp.backends, grace_seconds=inp.grace_seconds),
            result_type=OrphanScanResult,
            start_to_close_timeout=timedelta(seconds=120),
            retry_policy=_RETRY,
            summary="scan for orphan boxes",
        )
        result = OrphanSweepResult(scanned=scan.scanned, live=scan.live, young=scan.young, candidates=scan.orphans)
        if scan.orphans and inp.recheck_delay_seconds > 0:
            await workflow.sleep(timedelta(seconds=inp.recheck_delay_seconds), summary="let the projection settle")
        for box in scan.orphans:
            try:
                outcome = await workflow.execute_activity(
                    ActivityName.TERMINATE_ORPHAN_BOX,
                    OrphanTerminateRequest(box=box, grace_seconds=inp.grace_seconds),
                    result_type=OrphanTerminateResult,
                    start_to_close_timeout=timedelta(seconds=120),
                    retry_policy=_RETRY,
                    summary=f"re-check and terminate {box.instance_id}",
                )
            except ActivityError as err:
                # One stubborn box must not stop the sweep; the next run tries it again.
                message = str(err.cause) if err.cause is not None else str(err)
                outcome = OrphanTerminateResult(
                    instance_id=box.instance_id, terminated=False, reason=f"terminate failed: {message}"
                )
            if outcome.terminated:
                result.terminated.append(outcome.instance_id)
            else:
                result.spared.append(outcome)
        workflow.set_current_details(
            f"{len(result.terminated)} terminated · {len(result.spared)} spared · {result.scanned} scanned"
        )
        return result
