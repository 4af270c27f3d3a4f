"""The runtime's side of a selfhosted PTY against scripted agents: old, hostile, flaky and vanishing ones."""

from __future__ import annotations

import asyncio

import pytest

from providers.selfhosted import MockAgentResponder, RetryPolicy, SelfhostedSession
from sandbox.channel_a import ChannelA, MemoryEventSink
from sandbox.control_protocol import (
    ControlErrorCode,
    ControlReply,
    ControlRequest,
    ControlResponse,
    ExecReply,
    PtyCloseReply,
    PtyOpenReply,
    PtyReadReply,
    PtyWriteReply,
    decode_response,
    error_response,
)
from sandbox.errors import ChannelAConflict, ChannelAUnsupported

Answer = ControlReply | ControlResponse | bytes


class ScriptedAgent:
    """A ControlRpc answering each op type from a script (the last answer repeats); records requests.

    The directory check Channel-A runs before ``pty_open`` is an exec; it is answered with the
    directory marker the runner looks for.
    """

    def __init__(self, reads: list[Answer], *, writes: list[Answer] | None = None) -> None:
        self.reads = reads
        self.writes = writes or [PtyWriteReply(bytes_written=1)]
        self.requests: list[ControlRequest] = []
        self.read_gate = asyncio.Event()
        self.read_gate.set()

    async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
        del subject, timeout
        self.requests.append(request)
        op = request.op
        answer: Answer
        if op.type == "exec":
            answer = ExecReply(exit_code=0, stdout=b"__CHANNEL_A_DIR__/machine/root\0")
        elif op.type == "pty_open":
            answer = PtyOpenReply(pty_id="pty-remote1", pid=4242)
        elif op.type == "pty_read":
            await self.read_gate.wait()
            answer = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
        elif op.type == "pty_write":
            answer = self.writes.pop(0) if len(self.writes) > 1 else self.writes[0]
        elif op.type == "pty_close":
            answer = PtyCloseReply(exit_code=None, reason="killed")
        else:
            answer = error_response("", ControlErrorCode.UNSUPPORTED, op.type)
        if isinstance(answer, bytes):  # raw bytes on the wire: decoded exactly as a NATS reply would be
            return decode_response(answer, request_id=request.request_id, op_type=op.type)
        if isinstance(answer, ControlResponse):
            return answer.model_copy(update={"request_id": request.request_id})
        return ControlResponse(request_id=request.request_id, result=answer)

    def count(self, op_type: str) -> int:
        return sum(1 for r in self.requests if r.op.type == op_type)


FAST = RetryPolicy(base_delay=0.001, max_delay=0.002)


def channel(rpc: object, sink: MemoryEventSink) -> ChannelA:
    session = SelfhostedSession(rpc, workspace_id="ws1", agent_id="a1", epoch=3, retry=FAST)  # type: ignore[arg-type]
    return ChannelA(session, events=sink, max_reply_bytes=None)


async def exited_event(sink: MemoryEventSink) -> dict[str, object]:
    event = await sink.wait_for(lambda e: e.type == "terminal.pty.exited", timeout=5)
    return dict(event.payload)


class _OldAgent(ScriptedAgent):
    """An agent from before the PTY ops: it cannot even parse them (PROTOCOL), as a real old daemon answers."""

    def __init__(self) -> None:
        super().__init__([])

    async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
        if request.op.type == "pty_open":
            return error_response(request.request_id, ControlErrorCode.PROTOCOL, "malformed control request: op")
        return await super().request(subject, request, timeout=timeout)


async def test_an_agent_without_pty_ops_is_a_typed_refusal_that_says_to_upgrade() -> None:
    with pytest.raises(ChannelAUnsupported, match="upgrade"):
        await channel(_OldAgent(), MemoryEventSink()).pty_open()
    mock = MockAgentResponder()  # answers UNSUPPORTED for ops it does not know
    session = SelfhostedSession(mock, workspace_id="ws1", agent_id="a1", epoch=1, retry=FAST)
    with pytest.raises(ChannelAUnsupported, match="upgrade"):
        await session.open_pty(["/bin/sh"], cwd="", env={}, cols=80, rows=24, on_output=_ignore, on_exit=_ignore_exit)


async def _ignore(_text: str) -> None:
    return None


async def _ignore_exit(_code: int | None, _reason: str) -> None:
    return None


async def test_output_flows_to_readers_and_events_and_the_exit_is_reported_once() -> None:
    reads: list[Answer] = [
        PtyReadReply(data=b"hello "),
        PtyReadReply(data="wörld\r\n".encode()),
        PtyReadReply(data=b"", exited=True, exit_code=3, reason="exit"),
    ]
    agent, sink = ScriptedAgent(reads), MemoryEventSink()
    ca = channel(agent, sink)
    opened = await ca.pty_open()
    assert opened.pty_id == "pty-remote1"
    assert await exited_event(sink) == {
        "ptyId": "pty-remote1",
        "exitCode": 3,
        "reason": "exit",
        "revision": 0,
        "leaseEpoch": 0,
    }
    chunks = "".join(str(e.payload["chunk"]) for e in sink.of_type("terminal.pty.output.delta"))
    assert opened.initial_output + (await ca.pty_read(opened.pty_id)).decode() == "hello wörld\r\n"
    assert chunks == "hello wörld\r\n"
    with pytest.raises(ChannelAConflict, match="session lost"):
        await ca.pty_write(opened.pty_id, "echo again\n")
    closed = await ca.pty_close(opened.pty_id)
    assert (closed.exit_code, closed.reason) == (3, "exit")
    assert agent.count("pty_close") == 0  # nothing left to hang up
    assert len(sink.of_type("terminal.pty.exited")) == 1
    assert {r.epoch for r in agent.requests} == {3}


@pytest.mark.parametrize(
    "hostile",
    [
        b"not json",
        b'{"v":1,"request_id":"someone-else","result":{"type":"pty_read"}}',
        b'{"v":1,"request_id":"RID","result":{"type":"exec","exit_code":0}}',
        b'{"v":1,"request_id":"RID","result":{"type":"pty_read","data":"@@@"}}',
    ],
    ids=["not-json", "other-request", "wrong-type", "bad-base64"],
)
async def test_a_malformed_output_reply_ends_the_pty_as_lost_never_as_output(hostile: bytes) -> None:
    class Hostile(ScriptedAgent):
        async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
            if request.op.type == "pty_read":
                self.requests.append(request)
                raw = hostile.replace(b"RID", request.request_id.encode())
                return decode_response(raw, request_id=request.request_id, op_type="pty_read")
            return await super().request(subject, request, timeout=timeout)

    agent, sink = Hostile([]), MemoryEventSink()
    ca = channel(agent, sink)
    opened = await ca.pty_open()
    assert (await exited_event(sink))["reason"] == "lost"
    assert sink.of_type("terminal.pty.output.delta") == [] and ca.pty_exited(opened.pty_id)
    with pytest.raises(ChannelAConflict):
        await ca.pty_write(opened.pty_id, "x")
    assert (await ca.pty_close(opened.pty_id)).reason == "lost"


async def test_a_reconnecting_agent_is_waited_for_and_a_vanished_pty_is_lost() -> None:
    reconnecting = error_response("", ControlErrorCode.TIMEOUT, "agent reconnecting")
    reads: list[Answer] = [
        reconnecting,
        PtyReadReply(data=b"still here\r\n"),
        error_response("", ControlErrorCode.NOT_FOUND, "no PTY", detail={"reason": "pty_not_found"}),
    ]
    agent, sink = ScriptedAgent(reads), MemoryEventSink()
    ca = channel(agent, sink)
    opened = await ca.pty_open()
    exited = await exited_event(sink)
    assert (exited["exitCode"], exited["reason"]) == (None, "lost")
    assert b"still here" in (opened.initial_output.encode() + await ca.pty_read(opened.pty_id))


async def test_a_poll_failing_three_times_in_a_row_loses_the_pty_after_backing_off() -> None:
    # pty_read is not read-only for the session's retry policy: each poll is one request.
    reconnecting = error_response("", ControlErrorCode.TIMEOUT, "agent reconnecting")
    agent, sink = ScriptedAgent([reconnecting]), MemoryEventSink()
    ca = channel(agent, sink)
    started = asyncio.get_running_loop().time()
    await ca.pty_open()
    exited = await exited_event(sink)
    assert (exited["exitCode"], exited["reason"]) == (None, "lost")
    assert agent.count("pty_read") == 3
    assert asyncio.get_running_loop().time() - started >= 0.5 + 1.0  # the backoff between the three polls


async def test_typed_input_goes_in_pieces_that_fit_a_message_in_order() -> None:
    agent, sink = ScriptedAgent([PtyReadReply()]), MemoryEventSink()
    session = SelfhostedSession(agent, workspace_id="ws1", agent_id="a1", epoch=1, retry=FAST, chunk_bytes=7)  # type: ignore[arg-type]
    ca = ChannelA(session, events=sink, max_reply_bytes=None)
    agent.read_gate.clear()  # keep the output poll waiting
    opened = await ca.pty_open()
    text = "echo 'a line longer than one piece'\n"
    await ca.pty_write(opened.pty_id, text, yield_ms=0)
    pieces = [r.op.data for r in agent.requests if r.op.type == "pty_write"]  # type: ignore[union-attr]
    assert b"".join(pieces) == text.encode() and max(map(len, pieces)) == 7
    agent.read_gate.set()
    await ca.pty_close(opened.pty_id)


async def test_a_failed_write_is_not_repeated() -> None:
    refused = error_response("", ControlErrorCode.OS, "exited", detail={"reason": "pty_exited"})
    agent, sink = ScriptedAgent([PtyReadReply()], writes=[refused]), MemoryEventSink()
    ca = channel(agent, sink)
    agent.read_gate.clear()
    opened = await ca.pty_open()
    with pytest.raises(ChannelAConflict, match="session lost"):
        await ca.pty_write(opened.pty_id, "rm -rf build\n")
    assert agent.count("pty_write") == 1
    agent.read_gate.set()
    await ca.pty_close(opened.pty_id)


async def test_keystrokes_sent_at_once_arrive_in_order() -> None:
    """The agent serves requests concurrently: without one write at a time, a slow one is overtaken."""
    typed: list[bytes] = []
    entered: list[bytes] = []

    class SlowFirst(ScriptedAgent):
        async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
            if request.op.type == "pty_write":
                entered.append(request.op.data)
                await asyncio.sleep(0.05 if len(entered) == 1 else 0.0)
                typed.append(request.op.data)
            return await super().request(subject, request, timeout=timeout)

    agent, sink = SlowFirst([PtyReadReply()]), MemoryEventSink()
    ca = channel(agent, sink)
    agent.read_gate.clear()
    opened = await ca.pty_open()
    await asyncio.gather(*(ca.pty_write(opened.pty_id, ch, yield_ms=0) for ch in "ls -la\n"))
    assert b"".join(typed) == b"ls -la\n"
    agent.read_gate.set()
    await ca.pty_close(opened.pty_id)
