"""``sandboxctl snapshot list|gc`` and ``sandboxctl orphans``: workspace archives and stray boxes.

``snapshot list`` and ``orphans`` (without ``--sweep``) read the store and the provider directly;
``snapshot gc --now`` and ``orphans --sweep`` run one pass of the maintenance workflow on the
running stack's worker and wait for it. Every command takes ``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from temporalio.client import Client

from cli.exits import load_settings, with_store, with_temporal
from cli.output import emit, note, progress
from store.database import Database
from store.snapshots import SnapshotLedger, SnapshotRecord
from workflows.models.maintenance import OrphanScanResult, OrphanSweepResult, SnapshotGcResult

snapshot_app = typer.Typer(
    help="Workspace snapshots: list a group's archives, run the snapshot GC.", no_args_is_help=True
)

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")


def register(app: typer.Typer) -> None:
    """Attach ``snapshot`` and ``orphans`` to the root app."""
    app.add_typer(snapshot_app, name="snapshot")
    app.command("orphans")(orphans)


def _short(value: str | None, n: int = 12) -> str | None:
    return None if value is None else value[:n]


@snapshot_app.command("list")
def list_snapshots(
    workspace: str = typer.Argument(..., help="Workspace id."),
    group: str = typer.Argument(..., help="Sandbox group id."),
    include_deleted: bool = typer.Option(False, "--all", help="Also show deleted archives (tombstones)."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """List a sandbox group's workspace archives, newest first (current and previous are kept)."""
    settings = load_settings(data_dir)

    async def stored(db: Database) -> list[SnapshotRecord]:
        return await SnapshotLedger(db).list(workspace, group, include_deleted=include_deleted)

    records = with_store(settings, stored, read_only=True)
    if json_out:
        emit(records, True)
        return
    if not records:
        emit(f"no archives for {workspace}/{group}", False)
        return
    for r in records:
        size = "-" if r.size_bytes is None else _size(r.size_bytes)
        line = (
            f"{r.snapshot_id}  {r.state:<14} epoch {r.epoch:<4} {r.kind:<8} {size:>10}  "
            f"sha256 {_short(r.sha256) or '-'}  captured {r.created_at.isoformat(timespec='seconds')}"
        )
        if r.last_delete_error:
            line += f"  last error: {r.last_delete_error}"
        emit(line, False)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@snapshot_app.command("gc")
def gc(
    now: bool = typer.Option(False, "--now", help="Run one GC pass now on the stack's worker and wait for it."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show the snapshot ledger's state counts; with --now, collect what is eligible right away."""
    settings = load_settings(data_dir)
    if now:
        from workflows.schedules import run_snapshot_gc_now

        async def collect(client: Client) -> SnapshotGcResult:
            with progress("collecting snapshots"):
                return await run_snapshot_gc_now(client, settings)

        result = with_temporal(settings, collect)
        if json_out:
            emit(result, True)
            return
        emit(
            f"deleted {result.deleted}, failed {result.failed} (retried later with backoff), "
            f"{result.batches} batch(es), {result.pruned} tombstone(s) pruned",
            False,
        )
        for line in result.errors:
            note(line)
        return

    async def counts(db: Database) -> dict[str, int]:
        return await SnapshotLedger(db).counts()

    by_state = with_store(settings, counts, read_only=True)
    if json_out:
        emit({"states": by_state}, True)
        return
    emit({state: by_state.get(state, 0) for state in _STATE_ORDER}, False)
    from workflows.schedules import snapshot_gc_schedule_id

    note(f"the worker collects on schedule {snapshot_gc_schedule_id(settings.task_queue)}; --now runs a pass now")


_STATE_ORDER = ("candidate", "current", "previous", "delete_pending", "deleting", "delete_failed", "deleted")


def orphans(
    sweep: bool = typer.Option(False, "--sweep", help="Terminate the orphans now (through the stack's worker)."),
    grace: float | None = typer.Option(
        None, "--grace", min=0, help="Only boxes older than this many seconds (default: the sweep's grace)."
    ),
    recheck_delay: float | None = typer.Option(
        None, "--recheck-delay", min=0, help="With --sweep: wait between finding and re-checking (seconds)."
    ),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """List boxes the provider says are ours that no live lease names; --sweep terminates them."""
    from workflows.schedules import MaintenancePolicy

    settings = load_settings(data_dir)
    policy = MaintenancePolicy.from_settings(settings)
    updates: dict[str, Any] = {}
    if grace is not None:
        updates["orphan_grace_seconds"] = grace
    if recheck_delay is not None:
        updates["orphan_recheck_delay_seconds"] = recheck_delay
    policy = policy.model_copy(update=updates)

    if sweep:
        from workflows.schedules import run_orphan_sweep_now

        async def run_sweep(client: Client) -> OrphanSweepResult:
            with progress("sweeping orphan boxes"):
                return await run_orphan_sweep_now(client, settings, policy)

        result = with_temporal(settings, run_sweep)
        if json_out:
            emit(result, True)
            return
        emit(
            f"terminated {len(result.terminated)} of {len(result.candidates)} orphan(s); "
            f"{result.scanned} box(es) scanned, {result.live} live, {result.young} within the grace",
            False,
        )
        for spared in result.spared:
            note(f"spared {spared.instance_id}: {spared.reason}")
        return

    async def scan(db: Database) -> OrphanScanResult:
        # Runs the sweep's finder here, so it needs the providers' credentials (see --sweep for the worker's).
        from activities.orphans import OrphanActivities
        from providers.registry import ProviderRegistry
        from store.leases import LeaseRepository

        providers = ProviderRegistry(settings)
        try:
            finder = OrphanActivities(providers, LeaseRepository(db))
            return await finder.find_orphans(policy.orphan_backends, policy.orphan_grace_seconds)
        finally:
            await providers.aclose()

    found = with_store(settings, scan)
    if json_out:
        emit(found, True)
        return
    if not found.orphans:
        emit(f"no orphans ({found.scanned} box(es), {found.live} live, {found.young} within the grace)", False)
        return
    for o in found.orphans:
        age = "?" if o.age_seconds is None else f"{o.age_seconds:.0f}s"
        emit(f"{o.instance_id}  {o.backend}  {o.lease_id or '-'}  epoch {o.epoch}  age {age}  {o.reason}", False)
    note("sandboxctl orphans --sweep terminates them (each is checked again right before)")
