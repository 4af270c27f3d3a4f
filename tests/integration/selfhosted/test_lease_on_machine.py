"""A lease whose box is a user's machine: warm when its agent answers, never a rival box when it does not."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from sandbox import errors
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, nats_identity_env, running_runtime
from tests.integration.selfhosted.conftest import running_agent
from tests.integration.test_lease_workflow import record_history


@pytest.fixture
def machine_settings(tmp_path: Path, nats_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        task_queue=f"machine-{uuid.uuid4()}",
        nats_url=nats_url,
        snapshots_enabled=True,  # must be skipped: the machine is the persistence
        selfhosted_rpc_timeout_seconds=2,
        selfhosted_probe_timeout_seconds=1,
        **{**FAST_TIMERS, "warming_ttl_seconds": 6.0, "probe_timeout_seconds": 4.0},
    )


async def test_lease_on_a_machine_runs_there_and_drains_without_a_snapshot(
    temporal_client: Client, nats_url: str, tmp_path: Path, machine_settings: Settings
) -> None:
    async with (
        running_agent(nats_url, tmp_path) as agent,
        running_runtime(temporal_client, machine_settings) as rt,
    ):
        leases: Any = rt.leases()
        ws = agent.workspace_id
        with pytest.raises(errors.InvalidRequest, match="agent id"):
            await leases.acquire(ws, "g1", backend="selfhosted")
        grant = await leases.acquire(ws, "g1", backend="selfhosted", agent_id=agent.agent_id, holder_id="t1")
        assert (grant.liveness, grant.epoch, grant.backend_id) == ("warm", 1, "selfhosted")

        out = await leases.exec(ws, "g1", ["sh", "-c", "echo from-the-lease > made-by-lease.txt && echo ok"])
        assert (out.exit_code, out.stdout) == (0, "ok\n")
        assert (agent.root / "made-by-lease.txt").read_text() == "from-the-lease\n"

        view = await leases.drain(ws, "g1", wait=True)
        assert (view.liveness, view.epoch) == ("cold", 2)
        assert view.archive_current is None  # nothing captured, nothing to restore
        assert (agent.root / "made-by-lease.txt").exists()  # the machine keeps its files
        await record_history(rt, ws, "g1", "selfhosted_acquire_exec_drain")


async def test_offline_agent_never_makes_a_box_anywhere(
    temporal_client: Client, nats_url: str, tmp_path: Path, machine_settings: Settings
) -> None:
    async with running_runtime(temporal_client, machine_settings) as rt:
        # A long warming TTL: only an acquire told at once (no responders) passes the timing check.
        leases: Any = rt.leases(warming_ttl_seconds=60.0)
        started = time.monotonic()
        with pytest.raises(errors.AgentOffline) as info:
            await leases.acquire("ws-offline", "g1", backend="selfhosted", agent_id="nobody-home", holder_id="t1")
        assert time.monotonic() - started < 10
        assert "offline" in info.value.message.lower()
        assert info.value.retryable and info.value.agent_id == "nobody-home"
        view = await leases.describe("ws-offline", "g1")
        assert (view.liveness, view.epoch, view.instance_id) == ("cold", 1, None)
        await record_history(rt, "ws-offline", "g1", "selfhosted_offline_warming_expiry")
        boxes = machine_settings.boxes_dir()
        assert not boxes.exists() or not [p for p in boxes.iterdir() if not p.name.startswith(".")]
        await record_history(rt, "ws-offline", "g1", "offline_agent_fails_warming")


async def test_sandboxctl_pty_is_a_shell_on_the_machine(
    temporal_client: Client,
    nats_url: str,
    tmp_path: Path,
    machine_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.integration.channel_a.test_cli import sandboxctl_pty

    async with (
        running_agent(nats_url, tmp_path) as agent,
        running_runtime(temporal_client, machine_settings) as rt,
    ):
        identities = nats_identity_env()
        for name in [k for k in os.environ if k.startswith("SANDBOX_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("SANDBOX_DATA_DIR", str(machine_settings.data_dir))
        monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", temporal_client.service_client.config.target_host)
        monkeypatch.setenv("SANDBOX_TASK_QUEUE", machine_settings.task_queue)
        monkeypatch.setenv("SANDBOX_NATS_URL", nats_url)
        for name, value in identities.items():
            monkeypatch.setenv(name, value)
        leases: Any = rt.leases()
        ws = agent.workspace_id
        await leases.acquire(ws, "g1", backend="selfhosted", agent_id=agent.agent_id, holder_id="t1")
        code, output = await sandboxctl_pty(ws, "g1", stdin=b"pwd; echo $((6*7))\nexit 3\n")
        assert code == 3, output
        assert b"42\r\n" in output and str(agent.root.resolve()).encode() in output
        await leases.drain(ws, "g1", wait=True)
