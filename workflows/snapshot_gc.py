"""SnapshotGcWorkflow: delete the archives the ledger no longer needs, batch by batch.

Started by a Temporal Schedule (:mod:`workflows.schedules`, overlap SKIP) or on demand
(``sandboxctl snapshot gc --now``). Each batch: claim eligible ledger rows (``deleting`` with a
claim token), delete their objects (artifact store, or the provider for native snapshots;
deletes are idempotent), settle each row as ``deleted`` or ``delete_failed`` with backoff. A row
that is ``current`` or ``previous`` is never claimed. A run that dies part way leaves claims that
expire and are claimed again by a later run.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.activity_names import ActivityName
    from workflows.models.maintenance import (
        GcBatch,
        GcClaimRequest,
        GcDeleteResult,
        GcSettleRequest,
        GcSettleResult,
        SnapshotGcInput,
        SnapshotGcResult,
    )

_ERRORS_KEPT = 10
_STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=30), maximum_attempts=10
)


@workflow.defn(name="SnapshotGcWorkflow")
class SnapshotGcWorkflow:
    """One GC pass over the snapshot ledger (at most ``max_batches`` batches)."""

    @workflow.run
    async def run(self, inp: SnapshotGcInput) -> SnapshotGcResult:
        """Claim, delete and settle until nothing is eligible or the batch budget is spent."""
        result = SnapshotGcResult()
        while result.batches < inp.max_batches:
            batch = await workflow.execute_activity(
                ActivityName.CLAIM_SNAPSHOT_GC,
                GcClaimRequest(settings=inp.settings),
                result_type=GcBatch,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_STORE_RETRY,
                summary="claim eligible snapshots",
            )
            result.pruned += batch.pruned
            if not batch.items:
                break
            result.batches += 1
            result.claimed += len(batch.items)
            deleted = await workflow.execute_activity(
                ActivityName.DELETE_SNAPSHOT_OBJECTS,
                batch,
                result_type=GcDeleteResult,
                # Well inside the claim TTL, so a settle never races another run's claim of the same rows.
                start_to_close_timeout=timedelta(seconds=max(30.0, inp.settings.claim_ttl_seconds / 2)),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=10)),
                summary=f"delete {len(batch.items)} snapshot object(s)",
            )
            settled = await workflow.execute_activity(
                ActivityName.SETTLE_SNAPSHOT_GC,
                GcSettleRequest(outcomes=deleted.outcomes, settings=inp.settings),
                result_type=GcSettleResult,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_STORE_RETRY,
                summary="settle deleted / delete_failed",
            )
            result.deleted += settled.deleted
            result.failed += settled.failed
            result.lost += settled.lost
            for outcome in deleted.outcomes:
                if outcome.error is not None and len(result.errors) < _ERRORS_KEPT:
                    result.errors.append(f"{outcome.item.snapshot_id}: {outcome.error}")
        workflow.set_current_details(f"{result.deleted} deleted · {result.failed} failed · {result.batches} batch(es)")
        return result
