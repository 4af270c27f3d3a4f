"""The agent's ``pty_*`` ops without NATS: a real shell on a real PTY under the agent's root."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemons.agent.operations import AgentOperations, DisplayAccess
from sandbox.control_protocol import (
    ControlErrorCode,
    ControlOp,
    ControlRequest,
    ControlResponse,
    PtyCloseOp,
    PtyCloseReply,
    PtyOpenOp,
    PtyOpenReply,
    PtyReadOp,
    PtyReadReply,
    PtyResizeOp,
    PtyWriteOp,
    decode_request,
)
from sandbox.errors import InvalidRequest
from tests.conftest import process_alive, wait_until_gone


@pytest.fixture
def root(tmp_path: Path) -> Path:
    made = tmp_path / "root"
    (made / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return made


@pytest.fixture
async def ops(root: Path) -> AgentOperations:
    operations = AgentOperations(workspace_id="ws1", agent_id="a1", root=root, display=DisplayAccess(None))
    yield operations  # type: ignore[misc]
    await operations.terminals.close_all()


async def run(ops: AgentOperations, op: ControlOp) -> ControlResponse:
    return await ops.handle(ControlRequest(request_id="r1", epoch=0, op=op))


async def open_shell(ops: AgentOperations, **kwargs: object) -> str:
    resp = await run(ops, PtyOpenOp(command=["/bin/sh"], **kwargs))  # type: ignore[arg-type]
    assert isinstance(resp.result, PtyOpenReply), resp.error
    assert resp.result.pty_id.startswith("pty-") and resp.result.pid > 0
    return resp.result.pty_id


async def read_until(ops: AgentOperations, pty_id: str, needle: bytes, timeout: float = 5.0) -> PtyReadReply:
    """Poll like the runtime does until ``needle`` showed up (or the shell exited); the last reply, all data."""
    seen = b""
    deadline = time.monotonic() + timeout
    while True:
        resp = await run(ops, PtyReadOp(pty_id=pty_id, wait_ms=500))
        assert isinstance(resp.result, PtyReadReply), resp.error
        seen += resp.result.data
        if needle in seen or resp.result.exited or time.monotonic() > deadline:
            return resp.result.model_copy(update={"data": seen})


async def test_shell_runs_in_the_requested_directory_and_sees_its_size(ops: AgentOperations, root: Path) -> None:
    pty = await open_shell(ops, cwd="sub", cols=100, rows=30, env={"PTY_TEST_VAR": "hello"})
    await run(ops, PtyWriteOp(pty_id=pty, data=b'pwd; stty size; echo "$PTY_TEST_VAR"-$((6*7))\n'))
    out = await read_until(ops, pty, b"hello-42")
    assert f"{root.resolve()}/sub".encode() in out.data and b"30 100" in out.data and not out.exited
    await run(ops, PtyResizeOp(pty_id=pty, cols=132, rows=43))
    await run(ops, PtyWriteOp(pty_id=pty, data=b"stty size\n"))
    assert b"43 132" in (await read_until(ops, pty, b"43 132")).data


async def test_no_command_is_the_login_shell_with_term_and_a_scope_opens_once(ops: AgentOperations) -> None:
    ops.terminals.environment["SHELL"] = "/bin/sh"
    first = await run(ops, PtyOpenOp(scope_id="session-1:terminal", term="vt100"))
    assert isinstance(first.result, PtyOpenReply) and not first.result.reused
    again = await run(ops, PtyOpenOp(scope_id="session-1:terminal"))
    assert isinstance(again.result, PtyOpenReply) and again.result.reused
    assert (again.result.pty_id, again.result.pid) == (first.result.pty_id, first.result.pid)
    pty = first.result.pty_id
    await run(ops, PtyWriteOp(pty_id=pty, data=b'echo "T=$TERM"; stty size\n'))
    out = await read_until(ops, pty, b"24 80")
    assert b"T=vt100" in out.data and b"24 80" in out.data and ops.terminals.running == 1
    await run(ops, PtyWriteOp(pty_id=pty, data=b"exit\n"))
    await read_until(ops, pty, b"\0never")
    fresh = await run(ops, PtyOpenOp(scope_id="session-1:terminal"))  # its shell exited: a new one
    assert isinstance(fresh.result, PtyOpenReply) and not fresh.result.reused and fresh.result.pty_id != pty


async def test_exit_is_reported_after_the_last_output_and_writes_then_refused(ops: AgentOperations) -> None:
    pty = await open_shell(ops)
    await run(ops, PtyWriteOp(pty_id=pty, data=b"echo bye; exit 7\n"))
    out = await read_until(ops, pty, b"\0never")
    assert b"bye" in out.data and (out.exited, out.exit_code, out.reason) == (True, 7, "exit")
    refused = await run(ops, PtyWriteOp(pty_id=pty, data=b"echo again\n"))
    assert refused.error is not None and refused.error.detail["reason"] == "pty_exited"
    closed = await run(ops, PtyCloseOp(pty_id=pty))
    assert isinstance(closed.result, PtyCloseReply) and (closed.result.exit_code, closed.result.reason) == (7, "exit")


async def test_close_kills_the_shell_and_forgets_the_id(ops: AgentOperations) -> None:
    pty = await open_shell(ops)
    resp = await run(ops, PtyOpenOp(command=["/bin/sh", "-c", "echo $$; sleep 60"]))
    assert isinstance(resp.result, PtyOpenReply)
    sleeper = resp.result
    await read_until(ops, sleeper.pty_id, b"\n")
    started = time.monotonic()
    closed = await run(ops, PtyCloseOp(pty_id=sleeper.pty_id, grace_ms=200))
    assert isinstance(closed.result, PtyCloseReply) and closed.result.reason == "killed"
    assert time.monotonic() - started < 3
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper.pid, 0)
    for op in (
        PtyWriteOp(pty_id=sleeper.pty_id, data=b"x"),
        PtyReadOp(pty_id=sleeper.pty_id),
        PtyResizeOp(pty_id=sleeper.pty_id, cols=10, rows=10),
        PtyCloseOp(pty_id=sleeper.pty_id),
    ):
        answer = await run(ops, op)
        assert answer.error is not None and answer.error.code == ControlErrorCode.NOT_FOUND, op
        assert answer.error.detail["reason"] == "pty_not_found"
    assert ops.terminals.running == 1  # the first shell is untouched
    await run(ops, PtyCloseOp(pty_id=pty))


async def test_directory_outside_the_root_or_missing_is_refused(ops: AgentOperations, root: Path) -> None:
    escape = await run(ops, PtyOpenOp(command=["/bin/sh"], cwd=str(root.parent / "outside")))
    assert escape.error is not None and escape.error.detail.get("reason") == "path_escape"
    missing = await run(ops, PtyOpenOp(command=["/bin/sh"], cwd="nope"))
    assert missing.error is not None and missing.error.code == ControlErrorCode.NOT_FOUND
    no_program = await run(ops, PtyOpenOp(command=["/no/such/shell"]))
    assert no_program.error is not None and no_program.error.detail["reason"] == "spawn_failed"
    assert ops.terminals.running == 0


async def test_at_most_max_open_shells_and_draining_closes_them(ops: AgentOperations) -> None:
    ops.terminals.max_open = 2
    first, second = await open_shell(ops), await open_shell(ops)
    third = await run(ops, PtyOpenOp(command=["/bin/sh"]))
    assert third.error is not None and third.error.detail["reason"] == "pty_limit"
    await run(ops, PtyWriteOp(pty_id=first, data=b"exit\n"))
    await read_until(ops, first, b"\0never")
    await open_shell(ops)  # an exited shell does not count
    await ops.terminals.close_all()
    assert ops.terminals.running == 0
    gone = await run(ops, PtyReadOp(pty_id=second))
    assert gone.error is not None and gone.error.code == ControlErrorCode.NOT_FOUND


async def test_a_newer_binding_closes_the_shells_of_older_ones(ops: AgentOperations) -> None:
    async def at_epoch(epoch: int, op: ControlOp) -> ControlResponse:
        return await ops.handle(ControlRequest(request_id="r1", epoch=epoch, op=op))

    old = await at_epoch(1, PtyOpenOp(command=["/bin/sh"]))
    assert isinstance(old.result, PtyOpenReply)
    same = await at_epoch(1, PtyOpenOp(command=["/bin/sh"]))
    assert isinstance(same.result, PtyOpenReply) and ops.terminals.running == 2
    newer = await at_epoch(2, PtyOpenOp(command=["/bin/sh"]))
    assert isinstance(newer.result, PtyOpenReply)
    await wait_until_gone(old.result.pid, same.result.pid)
    assert not process_alive(old.result.pid) and not process_alive(same.result.pid) and process_alive(newer.result.pid)
    assert ops.terminals.running == 1


async def test_a_pty_nobody_touches_is_closed_without_any_other_op(ops: AgentOperations) -> None:
    ops.terminals.idle_seconds = 0.3
    abandoned = await open_shell(ops)
    deadline = time.monotonic() + 5
    while ops.terminals.running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # no op at all: the agent's own reaper closes it
    answer = await run(ops, PtyReadOp(pty_id=abandoned))
    assert answer.error is not None and answer.error.code == ControlErrorCode.NOT_FOUND
    kept = await open_shell(ops)
    for _ in range(8):  # one that is read keeps living
        await run(ops, PtyReadOp(pty_id=kept, wait_ms=100))
    assert ops.terminals.running == 1


async def test_output_nobody_reads_is_bounded_and_counted(ops: AgentOperations) -> None:
    command = "head -c 6000000 /dev/zero | tr '\\0' a; echo; echo END"
    resp = await run(ops, PtyOpenOp(command=["/bin/sh", "-c", command]))
    assert isinstance(resp.result, PtyOpenReply)
    pty = resp.result.pty_id

    async def take(max_bytes: int) -> PtyReadReply:
        answer = await run(ops, PtyReadOp(pty_id=pty, wait_ms=1000, max_bytes=max_bytes))
        assert isinstance(answer.result, PtyReadReply), answer.error
        assert len(answer.result.data) <= max_bytes
        return answer.result

    deadline = time.monotonic() + 30
    reply = await take(4096)
    total = len(reply.data)
    while reply.dropped == 0 and time.monotonic() < deadline:  # nobody reads: the agent's buffer overflows
        await asyncio.sleep(0.2)
        reply = await take(1)
        total += len(reply.data)
    while not reply.exited and time.monotonic() < deadline:
        reply = await take(1 << 20)
        total += len(reply.data)
    assert reply.exited and reply.exit_code == 0 and reply.dropped > 0
    # Every byte the shell wrote ("\n" becomes "\r\n" on a terminal) was either read or counted as dropped.
    assert total + reply.dropped == 6_000_000 + len(b"\r\nEND\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_read","pty_id":"../x"}}',
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_read","pty_id":"pty-1","wait_ms":10001}}',
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_open","command":["/bin/sh"],"term":"x\\ny"}}',
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_open","scope_id":"a b"}}',
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_open","command":["/bin/sh"],"cols":501}}',
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_write","pty_id":"pty-1","data":"not base64!"}}',
        b'{"request_id":"r","epoch":0,"op":{"type":"pty_close","pty_id":"pty-1","signal":9}}',
    ],
)
def test_malformed_pty_requests_are_refused_before_anything_runs(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="malformed control request"):
        decode_request(raw)


def test_pty_ids_are_constrained() -> None:
    with pytest.raises(ValidationError):
        PtyWriteOp(pty_id="pty-a.b", data=b"")
