"""Typed errors end to end: an activity's error reaches the client with its type and attributes.

Real Temporal dev server (history encrypted), real worker, local provider: the provider raises
in the box activity, the activity encodes, the lease workflow forwards, the client decodes.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sandbox import errors

pytestmark = pytest.mark.timeout(120)


async def test_an_activity_error_reaches_the_client_with_its_attributes(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = f"ws-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:6]}"
    grant = await leases.acquire(ws, g, holder_id="t1", backend="local")
    try:
        with pytest.raises(errors.PathNotFound) as missing:
            await leases.exec(ws, g, ["true"], workdir="no/such/dir", epoch=grant.epoch)
        assert type(missing.value) is errors.PathNotFound
        assert missing.value.path == "/workspace/no/such/dir"
        assert missing.value.retryable is False
        assert "/workspace/no/such/dir" in missing.value.message

        with pytest.raises(errors.ExecTimeout) as slow:
            await leases.exec(ws, g, ["sleep", "30"], timeout_seconds=0.5, epoch=grant.epoch)
        assert slow.value.timeout == 0.5 and slow.value.retryable is False

        # The box is still there: neither error was taken for a lost box.
        view = await leases.describe(ws, g)
        assert (view.liveness, view.epoch, view.instance_id) == ("warm", grant.epoch, grant.instance_id)
    finally:
        await leases.drain(ws, g, wait=True)
