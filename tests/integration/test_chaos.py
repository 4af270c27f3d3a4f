"""Chaos: random lease lifecycles while the worker is SIGKILLed and restarted at random moments.

Afterwards: no leaked box, never two boxes for one lease, no file lost relative to each lease's
last completed capture, and every lease workflow still makes progress. The figures are printed
(run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.testing import WorkflowEnvironment

from client import LeaseClient
from sandbox import errors
from sandbox.settings import Settings
from tests.integration.test_worker_restart import WorkerProcess

LEASES = 8
LIFECYCLES = 50
KILLS = 4
CALL_TIMEOUT = 90.0


@dataclass
class Ledger:
    """What one lease must still hold: files whose capture completed, and files written since."""

    committed: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)


def boxes_by_lease(boxes: Path) -> Counter[str]:
    owners: Counter[str] = Counter()
    if not boxes.exists():
        return owners
    for box in boxes.iterdir():
        meta = box / "box.json"
        if box.name.startswith("box-") and meta.exists():
            owners[json.loads(meta.read_text())["lease_id"]] += 1
    return owners


async def patiently(make: Any) -> Any:
    """Retry a call through worker restarts: only transport-level failures are retried, never a typed refusal."""
    deadline = time.monotonic() + CALL_TIMEOUT
    while True:
        try:
            return await asyncio.wait_for(make(), timeout=CALL_TIMEOUT)
        except errors.OutcomeUnknown:
            if time.monotonic() > deadline:
                raise
        except errors.LeaseError:
            raise
        except (errors.SandboxError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def drained(leases: LeaseClient, ws: str) -> Any:
    """Drain once; if the call's outcome is unknown (worker killed), wait for cold instead of draining again.

    A second drain could land after the next acquire and tear down a box someone just got.
    """
    try:
        return await asyncio.wait_for(leases.drain(ws, "g1", wait=True), timeout=CALL_TIMEOUT)
    except errors.OutcomeUnknown:
        pass
    except errors.LeaseError:
        raise
    except (errors.SandboxError, TimeoutError):
        pass
    deadline = time.monotonic() + CALL_TIMEOUT
    while time.monotonic() < deadline:
        try:
            view = await leases.describe(ws, "g1")
            if view.liveness == "cold":
                return view
        except errors.SandboxError:
            pass
        await asyncio.sleep(0.3)
    raise TimeoutError(f"{ws} never went cold")


async def test_chaos_lifecycles_with_worker_kills(temporal_env: WorkflowEnvironment, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("SANDBOX_CHAOS_SEED", "20261126")))
    target = temporal_env.client.service_client.config.target_host
    settings = Settings(
        data_dir=tmp_path / "data",
        temporal_address=target,
        task_queue=f"chaos-{uuid.uuid4()}",
        holder_ttl_seconds=60,
        warming_ttl_seconds=60,
        probe_timeout_seconds=20,
        idle_grace_seconds=0.2,
        activity_heartbeat_seconds=1.5,
        teardown_retry_seconds=0.5,
        snapshot_interval_seconds=0,
    )
    env = {
        **os.environ,
        "SANDBOX_DATA_DIR": str(settings.data_dir),
        "SANDBOX_TEMPORAL_ADDRESS": target,
        "SANDBOX_TASK_QUEUE": settings.task_queue,
        "SANDBOX_MAINTENANCE_SCHEDULES_ENABLED": "false",
    }
    boxes = settings.boxes_dir()
    leases = LeaseClient(temporal_env.client, settings)
    ledgers = {f"chaos-{i}": Ledger() for i in range(LEASES)}
    figures: Counter[str] = Counter()
    two_boxes_seen = 0
    worker = WorkerProcess(env, tmp_path / "worker-0.log")
    worker.wait_ready()
    started = time.monotonic()

    async def lifecycle(ws: str, n: int) -> None:
        nonlocal two_boxes_seen
        ledger = ledgers[ws]
        grant = await patiently(lambda: leases.acquire(ws, "g1", holder_id=f"h{n}"))
        name = f"f-{n}.txt"
        out = await patiently(lambda: leases.exec(ws, "g1", ["sh", "-c", f"echo {n} > {name} && ls"]))
        if out.exit_code == 0:
            ledger.pending.add(name)
        if max(boxes_by_lease(boxes).values(), default=0) > 1:
            two_boxes_seen += 1
        if rng.random() < 0.2:  # the box dies under the lease: what was not captured is gone
            shutil.rmtree(boxes / grant.instance_id, ignore_errors=True)
            figures["box kills"] += 1
            ledger.pending.clear()
            try:
                await patiently(lambda: leases.exec(ws, "g1", ["true"]))
            except errors.BoxNotFound:
                figures["box losses noticed"] += 1
            return
        try:
            await patiently(lambda: leases.release(ws, "g1", f"h{n}"))
        except errors.HolderNotFound:
            pass  # a retried release whose first attempt went through
        view = await drained(leases, ws)
        if view.liveness == "cold" and view.archive_current is not None and view.archive_current.epoch == grant.epoch:
            ledger.committed |= ledger.pending  # the drain captured this tenure's files
            ledger.pending.clear()
            figures["completed captures"] += 1

    async def run_lease(ws: str, count: int) -> None:
        for n in range(count):
            try:
                await lifecycle(ws, n)
                figures["lifecycles"] += 1
            except errors.BoxNotFound:
                ledgers[ws].pending.clear()
                figures["box losses noticed"] += 1
            except (errors.LeaseNotWarm, errors.HolderNotFound, errors.StaleEpoch):
                # A call whose first attempt's outcome was unknown raced the lifecycle; files of this
                # tenure cannot be claimed as captured, but what was committed must still be there.
                ledgers[ws].pending.clear()
                figures["interrupted lifecycles"] += 1

    async def killer() -> None:
        nonlocal worker
        for k in range(KILLS):
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            worker.kill()
            figures["worker kills"] += 1
            worker = WorkerProcess(env, tmp_path / f"worker-{k + 1}.log")
            await asyncio.to_thread(worker.wait_ready)

    per_lease = [LIFECYCLES // LEASES + (1 if i < LIFECYCLES % LEASES else 0) for i in range(LEASES)]
    try:
        await asyncio.gather(killer(), *(run_lease(ws, per_lease[i]) for i, ws in enumerate(ledgers)))

        # Every workflow still progresses: acquire again, and no committed file is missing.
        lost = 0
        for ws, ledger in ledgers.items():
            await patiently(lambda ws=ws: leases.acquire(ws, "g1", holder_id="final"))
            out = await patiently(lambda ws=ws: leases.exec(ws, "g1", ["ls"]))
            present = set(out.stdout.split())
            lost += len(ledger.committed - present)
            assert max(boxes_by_lease(boxes).values(), default=0) <= 1
            await patiently(lambda ws=ws: leases.drain(ws, "g1", wait=True))
        leaked = sum(boxes_by_lease(boxes).values())
    finally:
        assert worker.terminate() == 0
    elapsed = time.monotonic() - started
    print(
        f"\nchaos: {figures['lifecycles']} lifecycles on {LEASES} leases in {elapsed:.1f}s; "
        f"{figures['worker kills']} worker kills, {figures['box kills']} box kills, "
        f"{figures['completed captures']} completed captures, {figures['interrupted lifecycles']} interrupted; "
        f"leaked boxes={leaked}, "
        f"two-box observations={two_boxes_seen}, lost files={lost}"
    )
    assert figures["lifecycles"] + figures["box losses noticed"] + figures["interrupted lifecycles"] >= LIFECYCLES
    assert figures["worker kills"] == KILLS
    assert (leaked, two_boxes_seen, lost) == (0, 0, 0)
