"""The selfhosted control protocol: upstream error mapping vectors, wire form, hostile replies."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.control_protocol import (
    UPSTREAM_ERROR_CODES,
    AgentError,
    ControlErrorCode,
    ControlRequest,
    ControlResponse,
    ExecOp,
    ExecReply,
    FsReadOp,
    FsReadReply,
    FsWriteOp,
    PingReply,
    agent_error_to_control_error,
    agent_subject,
    decode_request,
    decode_response,
    draining_message,
    encode_message,
    error_response,
    max_chunk_bytes,
    parse_agent_subject,
    payload_too_large_message,
    salvage_request_id,
)
from sandbox.errors import InvalidRequest, SelfhostedControlError
from tests.upstream_vectors import decode_args, load_vectors, vector_params

# --- upstream vectors ---------------------------------------------------------------------------

_FIELDS = {
    "message": "message",
    "code": "code",
    "reason": "reason",
    "retryable": "retryable",
    "fenced": "fenced",
    "draining": "draining",
    "agentOffline": "agent_offline",
    "osNotFound": "os_not_found",
    "payloadTooLarge": "payload_too_large",
    "neverSent": "never_sent",
    "controlRequestId": "control_request_id",
    "detail": "detail",
}


def _require(vector: dict[str, Any] | None) -> dict[str, Any]:
    if vector is None:
        load_vectors("control_errors.json")  # fails with the explanation
        raise AssertionError("unreachable")
    return vector


@pytest.mark.parametrize("vector", vector_params("control_errors.json", "agentErrorToControlError"))
def test_agent_error_to_control_error_vector(vector: dict[str, Any] | None) -> None:
    vector = _require(vector)
    args = decode_args(vector["args"])
    err = agent_error_to_control_error(*args)
    expected = vector["expect"]["ok"]["$error"]
    assert isinstance(err, SelfhostedControlError)
    assert expected["class"] == "SelfhostedControlError"
    got = {wire: getattr(err, attr) for wire, attr in _FIELDS.items()}
    assert got == {wire: expected[wire] for wire in _FIELDS}


@pytest.mark.parametrize("vector", vector_params("control_errors.json", "drainingMessage"))
def test_draining_message_vector(vector: dict[str, Any] | None) -> None:
    vector = _require(vector)
    assert draining_message(*vector["args"]) == vector["expect"]["ok"]


@pytest.mark.parametrize("vector", vector_params("control_errors.json", "payloadTooLargeMessage"))
def test_payload_too_large_message_vector(vector: dict[str, Any] | None) -> None:
    vector = _require(vector)
    assert payload_too_large_message(*vector["args"]) == vector["expect"]["ok"]


def test_every_vector_function_is_covered() -> None:
    fns = {v["fn"] for v in load_vectors("control_errors.json")}
    assert fns == {"agentErrorToControlError", "drainingMessage", "payloadTooLargeMessage"}


def test_mapping_accepts_our_wire_error_model() -> None:
    err = agent_error_to_control_error(
        AgentError(code=ControlErrorCode.FENCED, message="epoch 3 < 5", retryable=False), "r-1"
    )
    assert (err.code, err.fenced, err.retryable, err.control_request_id) == (10, True, True, "r-1")
    offline = agent_error_to_control_error(
        AgentError(code=ControlErrorCode.AGENT_OFFLINE, detail={"_never_sent": "1"}), None
    )
    assert offline.agent_offline and offline.never_sent and offline.reason == "agent_offline"
    assert not isinstance(offline, InvalidRequest)


def test_draining_mapping_ignores_an_agent_supplied_retry_count() -> None:
    # Upstream's mapping always renders the zero-retry text; only its retry loop counts retries.
    err = agent_error_to_control_error(
        {"code": 6, "message": "busy", "retryable": False, "detail": {"retries": "7"}}, "req-1"
    )
    assert err.message == draining_message(0)
    assert "retried" not in err.message
    assert err.draining and err.retryable and err.detail == {"retries": "7"}


def test_an_empty_request_id_is_kept_not_nulled() -> None:
    err = agent_error_to_control_error({"code": 2, "message": "EIO", "retryable": False, "detail": {}}, "")
    assert err.control_request_id == ""
    assert agent_error_to_control_error({"code": 2, "message": "EIO"}).control_request_id is None


def test_codes_match_the_upstream_enum() -> None:
    # Upstream's codes one for one, plus ours beyond its range (UNAUTHENTICATED, 12).
    assert [c.number for c in UPSTREAM_ERROR_CODES] == list(range(12))
    assert UPSTREAM_ERROR_CODES[-1] is ControlErrorCode.PAYLOAD_TOO_LARGE
    assert ControlErrorCode.from_wire(12) is ControlErrorCode.UNAUTHENTICATED
    assert ControlErrorCode.UNAUTHENTICATED not in UPSTREAM_ERROR_CODES
    assert ControlErrorCode.from_wire(10) is ControlErrorCode.FENCED
    assert ControlErrorCode.from_wire("ERROR_CODE_DRAINING") is ControlErrorCode.DRAINING
    # A code from a newer agent is still an error, never a success.
    assert ControlErrorCode.from_wire(99) is ControlErrorCode.UNSPECIFIED
    assert ControlErrorCode.from_wire("SOMETHING_NEW") is ControlErrorCode.UNSPECIFIED


# --- subjects -----------------------------------------------------------------------------------


def test_subject_shape_and_round_trip() -> None:
    assert agent_subject("ws-1", "laptop_2") == "agent.ws-1.laptop_2.rpc"
    assert parse_agent_subject("agent.ws-1.laptop_2.rpc") == ("ws-1", "laptop_2")


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "a b", "x" * 129, "é"])
def test_ids_that_would_break_the_subject_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        agent_subject(bad, "agent")
    with pytest.raises(InvalidRequest):
        agent_subject("ws", bad)


# --- wire form ----------------------------------------------------------------------------------


def test_request_wire_form_is_versioned_json_with_base64_bytes() -> None:
    payload = bytes(range(256))
    req = ControlRequest(request_id="r1", epoch=7, op=FsWriteOp(path="a/b.bin", content=payload))
    wire = json.loads(encode_message(req))
    assert wire["v"] == 1 and wire["request_id"] == "r1" and wire["epoch"] == 7
    assert wire["op"]["type"] == "fs_write"
    assert base64.b64decode(wire["op"]["content"]) == payload
    assert decode_request(encode_message(req)) == req


def test_request_with_another_version_or_unknown_op_is_refused() -> None:
    good = json.loads(encode_message(ControlRequest(request_id="r", epoch=0, op=FsReadOp(path="x"))))
    mutations: list[tuple[str, str, object]] = [
        ("", "v", 2),
        ("op", "type", "fs_delete"),
        ("op", "surprise", True),
        ("", "epoch", -1),
        ("", "epoch", 2**32),
        ("", "request_id", ""),
        ("", "request_id", "has space"),
    ]
    for where, key, value in mutations:
        doc = json.loads(json.dumps(good))
        (doc[where] if where else doc)[key] = value
        with pytest.raises(InvalidRequest):
            decode_request(json.dumps(doc).encode())


def test_base64_must_be_strict() -> None:
    doc = {"v": 1, "request_id": "r", "epoch": 0, "op": {"type": "fs_write", "path": "x", "content": "!!notb64"}}
    with pytest.raises(InvalidRequest):
        decode_request(json.dumps(doc).encode())


def test_salvage_request_id_only_returns_a_plausible_id() -> None:
    assert salvage_request_id(b'{"request_id": "abc", "op": 5}') == "abc"
    assert salvage_request_id(b"\xff\x00garbage") == ""
    assert salvage_request_id(b'{"request_id": 12}') == ""
    assert salvage_request_id(b"[1,2]") == ""


def test_max_chunk_fits_under_the_payload_after_base64() -> None:
    limit = 1024 * 1024
    chunk = max_chunk_bytes(limit)
    reply = ControlResponse(request_id="r" * 128, result=FsReadReply(content=b"\xff" * chunk, total_size=10**12))
    assert len(encode_message(reply)) <= limit


# --- decoding replies ---------------------------------------------------------------------------


def _reply(result: Any = None, error: Any = None, request_id: str = "req-1") -> bytes:
    return encode_message(ControlResponse(request_id=request_id, result=result, error=error))


def test_a_good_reply_decodes() -> None:
    resp = decode_response(_reply(ExecReply(exit_code=0, stdout=b"\x00hi")), request_id="req-1", op_type="exec")
    assert resp.error is None
    assert isinstance(resp.result, ExecReply) and resp.result.stdout == b"\x00hi"


def test_an_error_reply_passes_through() -> None:
    err = AgentError(code=ControlErrorCode.NOT_FOUND, message="no such file: x")
    resp = decode_response(_reply(error=err), request_id="req-1", op_type="fs_read")
    assert resp.error == err


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_reply(ExecReply(exit_code=0), request_id="other"), "another request id"),
        (_reply(PingReply(nonce="1")), "'ping', the op was 'exec'"),
        (b'{"v":1,"request_id":"req-1"}', "neither a result nor an error"),
        (b"\x00\xff", "not a JSON document"),
        (b"[]", "schema violation"),
        (b'{"v":1,"request_id":"req-1","result":{"type":"exec","exit_code":0},"error":{"code":"OS"}}', "schema"),
        (b'{"v":1,"request_id":"req-1","result":{"type":"exec","exit_code":"0"}}', "schema"),
        (b'{"v":1,"request_id":"req-1","result":{"type":"exec","exit_code":0,"stdout":"@@"}}', "schema"),
    ],
)
def test_bad_replies_become_protocol_errors(data: bytes, why: str) -> None:
    resp = decode_response(data, request_id="req-1", op_type="exec")
    assert resp.request_id == "req-1"
    assert resp.error is not None and resp.error.code is ControlErrorCode.PROTOCOL
    assert why in resp.error.message
    assert not resp.error.retryable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_bytes_never_raise(data: bytes) -> None:
    resp = decode_response(data, request_id="req-1", op_type="fs_read")
    assert resp.request_id == "req-1"
    assert (resp.error is not None) != (resp.result is not None)
    if resp.result is not None:
        assert resp.result.type == "fs_read"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": _json,
            "request_id": st.sampled_from(["req-1", "req-2", ""]) | _json,
            "result": st.fixed_dictionaries({"type": st.sampled_from(["exec", "fs_read", "ping", "x"])}) | _json,
            "error": st.fixed_dictionaries({"code": _json}) | _json,
        },
    )
)
def test_hostile_json_replies_never_raise_and_never_mismatch(doc: dict[str, Any]) -> None:
    resp = decode_response(json.dumps(doc).encode(), request_id="req-1", op_type="exec")
    assert resp.request_id == "req-1"
    if resp.result is not None:
        assert resp.result.type == "exec" and resp.error is None
    else:
        assert resp.error is not None


def test_error_response_defaults_retryable_per_code() -> None:
    assert error_response("r", ControlErrorCode.FENCED, "x").error.retryable  # type: ignore[union-attr]
    assert not error_response("r", ControlErrorCode.OS, "x").error.retryable  # type: ignore[union-attr]


def test_exec_op_needs_a_command() -> None:
    with pytest.raises(ValueError):
        ExecOp(command=[])
