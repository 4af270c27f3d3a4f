"""Updates sent without our client, sized or shaped to make the lease's workflow tasks fail.

A lease update that the worker cannot answer within the server's payload limit (2 MiB) fails its
workflow task (PAYLOADS_TOO_LARGE) again and again until the server gives the update up, about
20 s during which the lease answers nothing. Two ways there, both closed where they start:

- an update over the limit: its rejection echoes the request, so the server refuses such an update
  at admission (``history.maxInFlightUpdatePayloads``, set wherever the runtime starts a server);
- a small update whose rejection is large (pydantic lists every bad element of a list): failure
  messages and stack traces are bounded where failures are built (``sandbox/payload_codec.py``).

Real Temporal dev server (as the shared fixtures start it), real worker, local boxes. Each test
sends the hostile update with a raw temporalio client, the way an attacker holding the namespace's
credentials would, then checks the lease answers at once, many times, and its history has no
failed workflow task. The positive controls: a small bad update is refused with a typed error,
and a fitting exec runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from sandbox import errors
from sandbox.failures import call_workflow
from tests.conftest import eventually, ids
from workflows.lease import LeaseWorkflow
from workflows.models.lease import MAX_UPDATE_INPUT_BYTES, ExecRequest
from workflows.server_settings import UPDATE_ADMISSION_LIMIT_BYTES

pytestmark = pytest.mark.timeout(180)

SERVER_PAYLOAD_LIMIT = 2 * 1024 * 1024
"""The dev server's ``limit.blobSize.error``: a workflow task answering with more fails."""


async def _failed_workflow_tasks(handle: WorkflowHandle[Any, Any]) -> int:
    events = [event async for event in handle.fetch_history_events()]
    return sum(1 for event in events if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)


async def _answers_promptly(leases: Any, ws: str, g: str, epoch: int, times: int = 25) -> list[float]:
    """Describe the lease ``times`` times in a row and run a command in it; each within 2 s. Returns the latencies."""
    latencies = []
    for _ in range(times):
        started = time.monotonic()
        view = await asyncio.wait_for(leases.describe(ws, g), timeout=2)
        latencies.append(time.monotonic() - started)
        assert (view.liveness, view.epoch) == ("warm", epoch)
    out = await asyncio.wait_for(leases.exec(ws, g, ["echo", "still here"], epoch=epoch), timeout=10)
    assert (out.exit_code, out.stdout) == (0, "still here\n")
    return latencies


async def _keep_sending(send: Callable[[], Awaitable[Any]]) -> None:
    """An attacker that sends the same update again and again, whatever it is answered."""
    task = asyncio.current_task()
    assert task is not None
    while not task.cancelling():  # the SDK turns a cancelled update call into an ordinary exception
        with contextlib.suppress(Exception):
            await send()
        await asyncio.sleep(0)


async def _raw_client(runtime: Any, **kwargs: Any) -> Client:
    """A temporalio client of the same server and namespace, with the runtime's data converter (so its
    payloads are encrypted like a real caller's), that is not our ``LeaseClient``."""
    ours: Client = runtime.client
    return await Client.connect(
        ours.service_client.config.target_host,
        namespace=ours.namespace,
        data_converter=ours.data_converter,
        **kwargs,
    )


async def _drain(leases: Any, ws: str, g: str) -> None:
    """Clean up: drain the lease, waiting out a wedged one (when a test fails) so its failure shows."""

    async def drained() -> bool:
        try:
            await leases.drain(ws, g, wait=True)
        except errors.SandboxError:
            return False
        return True

    await eventually(drained, timeout=90, interval=1)


async def test_a_raw_update_over_the_server_payload_limit_is_refused_at_admission(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1", backend="local")
    try:
        huge = ExecRequest(cmd=["true", *["a" * 100_000] * 24])
        assert len(huge.model_dump_json()) > SERVER_PAYLOAD_LIMIT

        # Refused by the server itself, at once, naming the limit (one attempt: no client retries).
        once = await _raw_client(runtime, retry_config=RetryConfig(max_retries=1))
        handle = once.get_workflow_handle_for(LeaseWorkflow.run, leases.handle(ws, g).id)
        started = time.monotonic()
        with pytest.raises(RPCError) as refused:
            await handle.execute_update(LeaseWorkflow.exec, huge)
        assert time.monotonic() - started < 5
        assert refused.value.status == RPCStatusCode.RESOURCE_EXHAUSTED
        assert str(UPDATE_ADMISSION_LIMIT_BYTES) in refused.value.message

        # Attackers with a default client (which retries the refusal) keep sending it while the lease
        # is used: it answers every time, at once.
        attacker = (await _raw_client(runtime)).get_workflow_handle_for(LeaseWorkflow.run, handle.id)
        attacks = [
            asyncio.create_task(_keep_sending(lambda: attacker.execute_update(LeaseWorkflow.exec, huge)))
            for _ in range(3)
        ]
        try:
            latencies = await _answers_promptly(leases, ws, g, grant.epoch)
        finally:
            for attack in attacks:
                attack.cancel()
            await asyncio.gather(*attacks, return_exceptions=True)
        print(f"describe under attack (ms): {[round(x * 1000) for x in latencies]}")
        assert await _failed_workflow_tasks(handle) == 0

        # Positive controls: a small bad update is refused with a typed error by the lease's validator,
        # and an exec right at the client's limit still runs.
        with pytest.raises(errors.InvalidRequest) as bad:
            await call_workflow(lambda: handle.execute_update(LeaseWorkflow.exec, ExecRequest(cmd=[])))
        assert "needs a command" in bad.value.message
        fits = ["sh", "-c", 'echo "$#"', "sh", *["a" * 100_000] * 5]
        assert len(ExecRequest(cmd=fits).model_dump_json()) <= MAX_UPDATE_INPUT_BYTES
        out = await leases.exec(ws, g, fits, epoch=grant.epoch)
        assert (out.exit_code, out.stdout) == (0, "5\n")
        assert await _failed_workflow_tasks(handle) == 0
    finally:
        await _drain(leases, ws, g)


async def test_a_small_raw_update_with_a_huge_rejection_never_fails_a_workflow_task(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1", backend="local")
    try:
        handle = (await _raw_client(runtime)).get_workflow_handle_for(LeaseWorkflow.run, leases.handle(ws, g).id)
        # 40 KB that pydantic refuses element by element: its message alone would be about 7 MB.
        amplifier = {"cmd": [1] * 20_000}
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(errors.InvalidRequest) as refused:
                await call_workflow(lambda: handle.execute_update("exec", amplifier))
            assert time.monotonic() - started < 5
            assert "malformed" in refused.value.message and "cmd.0" in refused.value.message
            assert len(refused.value.message) < 64 * 1024
        await _answers_promptly(leases, ws, g, grant.epoch)
        assert await _failed_workflow_tasks(handle) == 0

        # Positive control: the same shape, small, is refused with the same typed error.
        with pytest.raises(errors.InvalidRequest) as small:
            await call_workflow(lambda: handle.execute_update("exec", {"cmd": [1, 2]}))
        assert "cmd.0" in small.value.message and "cmd.1" in small.value.message
    finally:
        await _drain(leases, ws, g)
