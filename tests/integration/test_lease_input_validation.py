"""The lease workflow's update validators refuse malformed input sent past the Python client.

A scheduler in another language talks to the workflow directly, so the workflow checks what it
can see itself: a negative epoch is malformed (``InvalidRequest``), never merely stale, and a lease
started with timers out of bounds admits no holder.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sandbox import errors
from sandbox.failures import call_workflow
from workflows.lease import LeaseWorkflow
from workflows.models.lease import AcquireRequest, BoxLostReport, ExecRequest, HeartbeatRequest, LeaseTimers

pytestmark = pytest.mark.timeout(120)


async def test_a_negative_epoch_is_an_invalid_request_and_a_wrong_one_stays_stale(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
    grant = await leases.acquire(ws, g, holder_id="t1", backend="local")
    h = leases.handle(ws, g)
    try:
        for update, arg in (
            (LeaseWorkflow.heartbeat, HeartbeatRequest(holder_id="t1", epoch=-1)),
            (LeaseWorkflow.exec, ExecRequest(cmd=["true"], epoch=-1)),
            (LeaseWorkflow.report_box_lost, BoxLostReport(epoch=-1, instance_id=grant.instance_id)),
            (LeaseWorkflow.acquire, AcquireRequest(holder_id="t2", expected_epoch=-1)),
        ):
            with pytest.raises(errors.InvalidRequest, match="epoch must be >= 0") as info:
                await call_workflow(lambda u=update, a=arg: h.execute_update(u, a))
            assert type(info.value) is errors.InvalidRequest, update
        # Positive control: an epoch the lease never had (but could have) is still fenced as stale.
        with pytest.raises(errors.StaleEpoch):
            await call_workflow(
                lambda: h.execute_update(
                    LeaseWorkflow.heartbeat, HeartbeatRequest(holder_id="t1", epoch=grant.epoch + 1)
                )
            )
        # Nothing of it was applied: still one holder on the same box.
        view = await leases.describe(ws, g)
        assert (view.liveness, view.epoch, [x.holder_id for x in view.holders]) == ("warm", grant.epoch, ["t1"])
    finally:
        await leases.drain(ws, g, wait=True)


async def test_an_epoch_sent_as_text_is_an_invalid_request_naming_the_field(runtime: Any) -> None:
    """A foreign caller's ``"epoch": "1"`` is refused, not coerced; the same request with 1 works."""
    leases = runtime.leases()
    ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
    grant = await leases.acquire(ws, g, holder_id="t1", backend="local")
    h = leases.handle(ws, g)
    try:
        for update, body in (
            ("heartbeat", {"holder_id": "t1", "epoch": str(grant.epoch)}),
            ("exec", {"cmd": ["true"], "epoch": str(grant.epoch), "env": {"TOKEN": "hunter2"}}),
            ("acquire", {"holder_id": "t2", "expected_epoch": str(grant.epoch)}),
        ):
            with pytest.raises(errors.InvalidRequest, match=r"epoch: Input should be a valid integer") as info:
                await call_workflow(lambda u=update, b=body: h.execute_update(u, b))  # type: ignore[misc]
            assert "hunter2" not in info.value.message and "input_value" not in info.value.message
        # Positive control: the same raw heartbeat with an integer epoch is accepted.
        alive = await call_workflow(lambda: h.execute_update("heartbeat", {"holder_id": "t1", "epoch": grant.epoch}))
        assert alive["alive"] is True
        view = await leases.describe(ws, g)
        assert [x.holder_id for x in view.holders] == ["t1"]
    finally:
        await leases.drain(ws, g, wait=True)


async def test_a_lease_started_with_a_negative_holder_ttl_admits_no_holder(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
    spec = leases._spec(ws, g, "local", None, None)
    spec = spec.model_copy(update={"timers": LeaseTimers(holder_ttl_seconds=-5)})
    try:
        with pytest.raises(errors.InvalidRequest, match=r"timers\.holder_ttl_seconds must be a finite number > 0"):
            await call_workflow(
                lambda: leases.client.execute_update_with_start_workflow(
                    LeaseWorkflow.acquire,
                    AcquireRequest(holder_id="t1"),
                    start_workflow_operation=leases._start_operation(spec),
                )
            )
        view = await leases.describe(ws, g)
        assert (view.liveness, view.holders) == ("cold", [])
    finally:
        await leases.stop(ws, g)
