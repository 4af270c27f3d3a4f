"""``lease capabilities`` of a lease on a user's machine says what its agent reports, not the descriptor's best case."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from sandbox import errors
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, running_runtime
from tests.integration.selfhosted.conftest import running_agent

pytestmark = pytest.mark.timeout(120)

DISPLAY_CELLS = ("DesktopStream", "Recording", "ComputerUse")


async def test_capabilities_follow_the_agent_display_and_liveness(
    temporal_client: Client, nats_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        task_queue=f"machine-caps-{uuid.uuid4()}",
        nats_url=nats_url,
        selfhosted_rpc_timeout_seconds=2,
        selfhosted_probe_timeout_seconds=1,
        **{**FAST_TIMERS, "warming_ttl_seconds": 6.0, "probe_timeout_seconds": 4.0},
    )
    async with running_runtime(temporal_client, settings) as rt:
        leases: Any = rt.leases()
        async with running_agent(nats_url, tmp_path, display=None) as agent:
            ws = agent.workspace_id
            await leases.acquire(ws, "g1", backend="selfhosted", agent_id=agent.agent_id, holder_id="t1")
            doc = (await leases.capabilities(ws, "g1")).model_dump(mode="json", by_alias=True)
            # Online: the workspace and a terminal are there (positive control) ...
            assert doc["FileSystem"]["available"] is True and doc["Terminal"]["transport"] is not None
            # ... but the machine has no display: nothing that needs one is offered.
            for name in DISPLAY_CELLS:
                assert doc[name]["reason"] == "display_unavailable", (name, doc[name])
        # The agent is gone while the lease is still warm: every cell says so.
        assert (await leases.describe(ws, "g1")).liveness == "warm"
        doc = (await leases.capabilities(ws, "g1")).model_dump(mode="json", by_alias=True)
        for name in ("FileSystem", "Terminal", "Git", *DISPLAY_CELLS):
            assert doc[name]["reason"] == "agent_offline", (name, doc[name])
        assert doc["FileSystem"]["available"] is False and doc["Terminal"]["transport"] is None
        with contextlib.suppress(errors.SandboxError):
            await leases.drain(ws, "g1")
        await leases.stop(ws, "g1")
