"""The worker's Prometheus endpoint, scraped by a real Prometheus and queried as a dashboard would.

The worker runs as ``python -m worker`` runs it (:func:`worker.run_worker`, with
``SANDBOX_METRICS_ADDRESS`` set) against the shared Temporal dev server; a lease is acquired,
used and drained on the local backend, and each kind of metric is read back through
Prometheus's HTTP API: a histogram, a counter, a gauge, and the Temporal SDK's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from sandbox import errors
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, Runtime, eventually, free_port, prometheus_scraping
from tests.unit.deploy.test_observability import shipped_metric_names
from worker import run_worker


@contextlib.asynccontextmanager
async def worker_with_metrics(client: Client, data_dir: Path) -> AsyncIterator[Runtime]:
    """``run_worker`` in this process, serving metrics on a free port, until the block ends."""
    from store.database import Database

    settings = Settings(
        data_dir=data_dir,
        task_queue=f"metrics-{uuid.uuid4()}",
        temporal_address=client.service_client.config.target_host,
        metrics_address=f"127.0.0.1:{free_port()}",
        metrics_census_seconds=0.2,
        maintenance_schedules_enabled=False,
        **FAST_TIMERS,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop))

    def scrape() -> bool:
        with urllib.request.urlopen(f"http://{settings.metrics_address}/metrics", timeout=2) as reply:
            return reply.status == 200

    async def serving() -> bool:
        assert not task.done(), task.exception()
        try:
            return await asyncio.to_thread(scrape)
        except OSError:
            return False

    await eventually(serving, timeout=30)
    db = Database.for_settings(settings)
    try:
        yield Runtime(client, settings, db)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await db.dispose()


async def test_a_dashboard_sees_box_operations_leases_and_the_sdk(temporal_client: Client, tmp_path: Path) -> None:
    async with worker_with_metrics(temporal_client, tmp_path / "data") as rt:
        assert rt.settings.metrics_address is not None
        with prometheus_scraping(tmp_path / "prometheus", [rt.settings.metrics_address]) as prom:
            leases = rt.leases()
            ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
            grant = await leases.acquire(ws, g, holder_id="t1", backend="local")
            await leases.exec(ws, g, ["sh", "-c", "echo hi > note.txt"], epoch=grant.epoch)
            with pytest.raises(errors.ExecTimeout):
                await leases.exec(ws, g, ["sleep", "30"], timeout_seconds=0.5, epoch=grant.epoch)

            # A gauge: the census counts the warm lease and its holder.
            async def warm() -> bool:
                found = await prom.query('sandbox_leases{backend="local",liveness="warm"}')
                holders = await prom.query('sandbox_lease_holders{kind="turn"}')
                return list(found.values()) == [1.0] and list(holders.values()) == [1.0]

            await eventually(warm, timeout=20)

            # Histograms: provision and exec latency, split by outcome.
            async def measured() -> bool:
                provisions = await prom.query('sandbox_provision_duration_seconds_count{backend="local",outcome="ok"}')
                execs = await prom.query('sandbox_exec_duration_seconds_count{backend="local",outcome="ok"}')
                slow = await prom.query('sandbox_exec_duration_seconds_count{backend="local",outcome="ExecTimeout"}')
                return sum(provisions.values()) >= 1 and sum(execs.values()) >= 1 and sum(slow.values()) >= 1

            await eventually(measured, timeout=20)

            # A counter: the timed-out exec is a failure of its type.
            failures = await prom.query(
                'sandbox_operation_failures_total{operation="exec",backend="local",error_type="ExecTimeout"}'
            )
            assert sum(failures.values()) == 1.0

            view = await leases.drain(ws, g, wait=True)
            assert view.liveness == "cold"

            # The gauge follows the lease to cold; the drain's capture is measured with its size.
            async def cold() -> bool:
                warm_now = await prom.query('sandbox_leases{backend="local",liveness="warm"}')
                cold_now = await prom.query('sandbox_leases{backend="local",liveness="cold"}')
                captures = await prom.query('sandbox_capture_duration_seconds_count{backend="local",outcome="ok"}')
                sizes = await prom.query('sandbox_archive_size_bytes_sum{backend="local"}')
                return (
                    list(warm_now.values()) == [0.0]
                    and list(cold_now.values()) == [1.0]
                    and sum(captures.values()) >= 1
                    and sum(sizes.values()) > 0
                )

            await eventually(cold, timeout=20)

            # The SDK's own metrics are on the same target.
            names = await prom.names()
            assert any(n.startswith("temporal_activity_execution_latency") for n in names), names
            assert any(n.startswith("temporal_workflow_task_execution_latency") for n in names), names
            # Every SDK metric the shipped dashboard and alerts read is really served.
            for name in shipped_metric_names("temporal_"):
                assert any(n == name or n.startswith(f"{name}_") for n in names), (name, names)
            # No label value is a command, a path or an id.
            everything = await prom.query('{__name__=~"sandbox_.*"}')
            for labels in everything:
                for key, value in labels:
                    assert "echo" not in value and ws not in value and "/" not in value, (key, value)


def test_a_malformed_metrics_address_is_a_config_error() -> None:
    with pytest.raises(errors.SandboxConfigError, match="host:port"):
        Settings(metrics_address="9464").check()
    assert Settings(metrics_address="127.0.0.1:9464").check().metrics_bind_address() == "127.0.0.1:9464"
