"""The negotiated capability document of a lease: what the agent turn is told it can do, and why not."""

from __future__ import annotations

import uuid
from typing import Any

from activities.planes import runtime_desktop


async def test_a_warm_local_lease_offers_desktop_recording_and_computer_use(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = f"caps-{uuid.uuid4().hex[:8]}", "g1"
    await leases.acquire(ws, g, holder_id="t1", backend="local")
    try:
        host = runtime_desktop("local")
        assert host is not None and host.computer_use and host.recording, "scripts/install provides the tools"
        doc = (await leases.capabilities(ws, g, runtime_desktop=host)).model_dump(mode="json", by_alias=True)
        assert doc["ComputerUse"]["available"] is True and doc["ComputerUse"]["readOnly"] is False
        assert doc["Recording"]["available"] is True
        # The root secret for stream tokens exists (env or data dir), so the desktop can be streamed.
        assert doc["DesktopStream"]["transport"] == "vnc-ws" and doc["DesktopStream"]["reason"] is None
        assert doc["Terminal"]["reason"] is None
        assert doc["FileSystem"]["available"] is True

        # The static descriptor alone (a worker that cannot run a desktop) says why not.
        bare = (await leases.capabilities(ws, g)).model_dump(mode="json", by_alias=True)
        assert bare["ComputerUse"]["available"] is False and bare["ComputerUse"]["reason"]

        # Policy is reflected: read-only computer use.
        read_only = runtime.leases()
        read_only.settings = read_only.settings.model_copy(update={"computer_use_read_only": True})
        doc = (await read_only.capabilities(ws, g, runtime_desktop=host)).model_dump(mode="json", by_alias=True)
        assert doc["ComputerUse"]["available"] is True and doc["ComputerUse"]["readOnly"] is True
    finally:
        await leases.drain(ws, g, wait=True)
