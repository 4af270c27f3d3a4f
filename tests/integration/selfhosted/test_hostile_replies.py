"""NatsControlRpc against a hostile responder on a real nats-server: every reply is a typed answer.

The responder is an enrolled machine gone bad: it holds a genuine credential and signs whatever
it sends, so these replies pass authentication and test the decoding behind it (replies that do
not verify are tests/security/test_hostile_nats.py's).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.selfhosted import NatsControlRpc
from sandbox.control_auth import sign_reply
from sandbox.control_protocol import (
    ControlErrorCode,
    ControlRequest,
    ControlResponse,
    ExecOp,
    ExecReply,
    agent_subject,
    encode_message,
)
from sandbox.nats_flush import flush_in_order
from tests.conftest import nats_server_at
from tests.integration.selfhosted.conftest import new_id


class Hostile:
    """Answers every request with whatever ``reply(request_bytes)`` returns."""

    def __init__(self) -> None:
        self.reply: Any = lambda data: b""


@pytest.fixture
async def hostile(nats_url: str) -> AsyncIterator[tuple[Hostile, str, Any]]:
    ws, agent = new_id("ws"), new_id("evil")
    server = nats_server_at(nats_url)
    credential = server.enroll(ws, agent)
    nc = await nats.connect(nats_url, nkeys_seed_str=credential.nats_seed.get_secret_value())
    state = Hostile()
    subject = agent_subject(ws, agent)

    async def answer(msg: Any) -> None:
        try:
            body = state.reply(msg.data)
            await nc.publish(msg.reply, body, headers=sign_reply(credential, subject, msg.data, body))
        except Exception:
            pass  # an oversized reply cannot even be published

    await nc.subscribe(subject, queue=subject, cb=answer)
    await flush_in_order(nc)
    yield state, subject, nc
    await nc.close()
    server.revoke(ws, agent)


def request(rid: str = "req-1") -> ControlRequest:
    return ControlRequest(request_id=rid, epoch=0, op=ExecOp(command=["true"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
async def test_garbage_replies_are_protocol_errors(
    hostile: tuple[Hostile, str, Any], rpc: NatsControlRpc, garbage: bytes
) -> None:
    state, subject, _nc = hostile
    state.reply = lambda _data: garbage
    resp = await rpc.request(subject, request(), timeout=2)
    assert resp.request_id == "req-1"
    assert resp.error is not None and resp.error.code is ControlErrorCode.PROTOCOL


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=40).filter(lambda s: s != "req-1"))
async def test_a_reply_for_another_request_is_refused(
    hostile: tuple[Hostile, str, Any], rpc: NatsControlRpc, other_id: str
) -> None:
    state, subject, _nc = hostile
    state.reply = lambda _data: json.dumps(
        {"v": 1, "request_id": other_id, "result": {"type": "exec", "exit_code": 0}}
    ).encode()
    resp = await rpc.request(subject, request(), timeout=2)
    assert resp.error is not None and resp.error.code is ControlErrorCode.PROTOCOL
    assert "another request id" in resp.error.message


async def test_oversized_and_mistyped_replies(hostile: tuple[Hostile, str, Any], rpc: NatsControlRpc) -> None:
    state, subject, nc = hostile
    # Larger than the server accepts: the responder cannot send it, the caller times out (typed).
    state.reply = lambda _data: b"x" * (nc.max_payload + 1)
    resp = await rpc.request(subject, request(), timeout=0.5)
    assert resp.error is not None and resp.error.code is ControlErrorCode.TIMEOUT and resp.error.retryable
    # Exactly at the limit but not a reply: PROTOCOL.
    state.reply = lambda _data: b"{" * (nc.max_payload - 1024)  # the signature headers take the rest
    resp = await rpc.request(subject, request(), timeout=2)
    assert resp.error is not None and resp.error.code is ControlErrorCode.PROTOCOL
    # A well-formed reply echoing the id: accepted.
    state.reply = lambda data: encode_message(
        ControlResponse(request_id=json.loads(data)["request_id"], result=ExecReply(exit_code=0, stdout=b"ok"))
    )
    resp = await rpc.request(subject, request("req-2"), timeout=2)
    assert isinstance(resp.result, ExecReply) and resp.result.stdout == b"ok"


async def test_a_request_over_the_server_limit_is_refused_before_sending(
    hostile: tuple[Hostile, str, Any], rpc: NatsControlRpc
) -> None:
    state, subject, nc = hostile
    seen: list[bytes] = []

    def record(data: bytes) -> bytes:
        seen.append(data)
        return b""

    state.reply = record
    big = ControlRequest(request_id="big", epoch=0, op=ExecOp(command=["x" * (nc.max_payload + 10)]))
    resp = await rpc.request(subject, big, timeout=1)
    assert resp.error is not None and resp.error.code is ControlErrorCode.PAYLOAD_TOO_LARGE
    assert resp.error.detail["_never_sent"] == "1" and seen == []
