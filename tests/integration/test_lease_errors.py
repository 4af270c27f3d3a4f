"""Typed errors end to end: an activity's error reaches the client with its type and attributes.

Real Temporal dev server (history encrypted), real worker, local provider: the provider raises
in the box activity, the activity encodes, the lease workflow forwards, the client decodes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from sandbox import errors
from sandbox.failures import call_workflow
from workflows.lease import LeaseWorkflow
from workflows.models.lease import MAX_UPDATE_INPUT_BYTES, ExecRequest

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


def _exec_request_of(total_bytes: int) -> ExecRequest:
    """An exec whose input JSON is exactly ``total_bytes``: ``sh`` counting its arguments, each under
    the kernel's 128 KiB limit on one argument."""
    cmd = ["sh", "-c", 'echo "$#"', "sh"]
    while True:
        room = total_bytes - len(ExecRequest(cmd=[*cmd, ""]).model_dump_json().encode())
        if room <= 60_000:
            cmd.append("a" * room)
            break
        cmd.append("a" * 60_000)
    req = ExecRequest(cmd=cmd)
    assert len(req.model_dump_json().encode()) == total_bytes
    return req


async def test_an_oversized_update_is_refused_and_the_lease_keeps_answering(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = f"ws-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:6]}"
    await leases.acquire(ws, g, holder_id="t1", backend="local")
    try:
        # The client refuses before sending.
        too_big = _exec_request_of(MAX_UPDATE_INPUT_BYTES + 1)
        with pytest.raises(errors.InvalidRequest) as sent:
            await leases.exec(ws, g, too_big.cmd)
        assert "MAX_UPDATE_INPUT_BYTES" in sent.value.message and str(MAX_UPDATE_INPUT_BYTES) in sent.value.message

        # A caller that skips the client meets the validator. (Over the server's 2 MiB payload limit
        # not even a rejection, which carries the request, can be sent back: the server refuses such an
        # update at admission, tests/security/test_hostile_update_inputs.py.)
        handle = leases.handle(ws, g)
        huge = ExecRequest(cmd=["true", *["a" * 100_000] * 12])
        for _ in range(2):  # repeating it wedges nothing either
            with pytest.raises(errors.InvalidRequest) as raw:
                await call_workflow(lambda: handle.execute_update(LeaseWorkflow.exec, huge))
            assert "MAX_UPDATE_INPUT_BYTES" in raw.value.message
            # Answered right after, every time (not after the server gave up on failing tasks).
            for _ in range(5):
                view = await asyncio.wait_for(leases.describe(ws, g), timeout=5)
                assert view.liveness == "warm"

        # Positive control: an exec right at the limit runs.
        fits = _exec_request_of(MAX_UPDATE_INPUT_BYTES)
        out = await leases.exec(ws, g, fits.cmd)
        assert (out.exit_code, out.stdout) == (0, f"{len(fits.cmd) - 4}\n")
    finally:
        await leases.drain(ws, g, wait=True)
