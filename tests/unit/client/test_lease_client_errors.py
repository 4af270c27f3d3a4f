"""The client's error table: what a Temporal client call raises becomes one typed error (client/lease_client.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NoReturn

import pytest
from temporalio.client import (
    WorkflowFailureError,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ActivityError, ApplicationError, RetryState
from temporalio.service import RPCError, RPCStatusCode

from sandbox import errors
from sandbox.failures import call_workflow, to_application_error, translate


def _rpc(status: RPCStatusCode) -> RPCError:
    return RPCError(f"rpc {status.name}", status, b"")


def _raising(exc: BaseException) -> Callable[[], Awaitable[NoReturn]]:
    async def call() -> NoReturn:
        raise exc

    return call


def _from(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


async def _raised(exc: BaseException) -> BaseException:
    with pytest.raises(BaseException) as info:
        await call_workflow(_raising(exc))
    return info.value


async def test_a_failed_update_raises_the_workflow_error_with_its_attributes() -> None:
    sent = errors.DisplayStackError("x11vnc did not start", stage="x11vnc", retryable=True)
    got = await _raised(WorkflowUpdateFailedError(to_application_error(sent)))
    assert type(got) is errors.DisplayStackError
    assert (got.message, got.stage, got.retryable) == ("x11vnc did not start", "x11vnc", True)
    assert isinstance(got.__cause__, WorkflowUpdateFailedError)  # the transport error stays as the cause


async def test_an_activity_failure_behind_the_update_is_found() -> None:
    activity = ActivityError(
        "activity failed",
        scheduled_event_id=1,
        started_event_id=2,
        identity="w",
        activity_type="exec_in_box",
        activity_id="1",
        retry_state=RetryState.MAXIMUM_ATTEMPTS_REACHED,
    )
    activity.__cause__ = to_application_error(errors.PathNotFound("no such dir", path="/workspace/x"))
    got = await _raised(WorkflowUpdateFailedError(activity))
    assert type(got) is errors.PathNotFound and got.path == "/workspace/x" and not got.retryable


async def test_a_failed_workflow_raises_its_typed_error() -> None:
    app = to_application_error(errors.RecordingError("ffmpeg died", reason="ffmpeg-error"))
    got = translate(WorkflowFailureError(cause=app))
    assert type(got) is errors.RecordingError and got.reason == "ffmpeg-error"


async def test_an_unknown_application_error_type_is_a_sandbox_error() -> None:
    got = await _raised(WorkflowUpdateFailedError(ApplicationError("boom", type="KeyError")))
    assert type(got) is errors.SandboxError and got.message == "boom"


async def test_no_workflow_is_lease_not_found() -> None:
    got = await _raised(_rpc(RPCStatusCode.NOT_FOUND))
    assert type(got) is errors.LeaseNotFound


@pytest.mark.parametrize(
    "exc",
    [
        _rpc(RPCStatusCode.DEADLINE_EXCEEDED),
        _from(WorkflowUpdateRPCTimeoutOrCancelledError(), _rpc(RPCStatusCode.DEADLINE_EXCEEDED)),
        _from(WorkflowUpdateRPCTimeoutOrCancelledError(), _rpc(RPCStatusCode.CANCELLED)),
    ],
    ids=["rpc-deadline", "update-deadline", "update-cancelled-elsewhere"],
)
async def test_a_timed_out_call_is_outcome_unknown(exc: BaseException) -> None:
    got = await _raised(exc)
    assert type(got) is errors.OutcomeUnknown and got.retryable


async def test_cancelling_the_caller_raises_cancelled_error() -> None:
    started = asyncio.Event()

    async def update() -> NoReturn:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as err:  # what the SDK does with the caller's cancellation
            raise WorkflowUpdateRPCTimeoutOrCancelledError() from err
        raise AssertionError("unreachable")

    task = asyncio.create_task(call_workflow(update))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_cancelled_rpc_while_cancelling_is_cancelled_error() -> None:
    started = asyncio.Event()

    async def signal() -> NoReturn:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise _rpc(RPCStatusCode.CANCELLED) from None
        raise AssertionError("unreachable")

    task = asyncio.create_task(call_workflow(signal))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    "exc",
    [_rpc(RPCStatusCode.UNAVAILABLE), WorkflowQueryFailedError("query handler failed")],
    ids=["unavailable", "query-failed"],
)
async def test_anything_else_from_temporal_is_a_sandbox_error(exc: BaseException) -> None:
    got = await _raised(exc)
    assert type(got) is errors.SandboxError and got.message == str(exc)


async def test_typed_errors_of_this_side_pass_and_bugs_are_not_masked() -> None:
    invalid = errors.InvalidRequest("bad id")
    assert await _raised(invalid) is invalid
    with pytest.raises(KeyError):
        await call_workflow(_raising(KeyError("bug")))
