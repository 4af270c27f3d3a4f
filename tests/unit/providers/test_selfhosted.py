"""SelfhostedSession and SelfhostedProvider over the in-process MockAgentResponder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from providers.registry import RUNNABLE_BACKENDS, ProviderRegistry
from providers.selfhosted import (
    MockAgentResponder,
    NatsControlRpc,
    RelayConfig,
    RetryPolicy,
    SelfhostedProvider,
    SelfhostedSession,
    is_provider_sandbox_not_found,
    parse_instance_id,
    selfhosted_instance_id,
    to_machine_path,
)
from sandbox.box import BoxSession, BoxSpec, Envelope, Provider
from sandbox.control_auth import ControlSigningKey
from sandbox.control_protocol import (
    ControlErrorCode,
    ControlRequest,
    ControlResponse,
    ExecOp,
    ExecReply,
    FsWriteOp,
    KeyEvent,
    error_response,
)
from sandbox.errors import AgentOffline, InvalidRequest, PathNotFound, SelfhostedControlError, Unsupported
from sandbox.settings import Settings


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def session(mock: MockAgentResponder, **kwargs: object) -> tuple[SelfhostedSession, Sleeps]:
    sleeps = Sleeps()
    s = SelfhostedSession(mock, workspace_id="ws1", agent_id="a1", epoch=kwargs.pop("epoch", 1), sleep=sleeps, **kwargs)  # type: ignore[arg-type]
    return s, sleeps


async def test_ops_carry_the_epoch_and_round_trip() -> None:
    mock = MockAgentResponder(files={"docs/readme.md": "hello"})
    s, _ = session(mock, epoch=7)
    assert await s.read_file("/workspace/docs/readme.md") == b"hello"
    await s.write_file("docs/new.bin", b"\x00\x01")
    assert mock.file_bytes("docs/new.bin") == b"\x00\x01"
    assert [e.name for e in await s.list_dir("docs")] == ["new.bin", "readme.md"]
    assert await s.path_exists("docs/new.bin") and not await s.path_exists("nope")
    assert (await s.exec(["hostname"])).stdout == b"mock-machine\n"
    assert {req.epoch for _subject, req in mock.requests} == {7}
    assert {subject for subject, _req in mock.requests} == {"agent.ws1.a1.rpc"}
    assert len({req.request_id for _s, req in mock.requests}) == len(mock.requests)


async def test_large_files_move_in_chunks_and_replace_atomically() -> None:
    mock = MockAgentResponder()
    s, _ = session(mock, chunk_bytes=1000)
    data = bytes(range(256)) * 20
    await s.write_file("big.bin", data)
    writes = [req.op for _s, req in mock.requests if isinstance(req.op, FsWriteOp)]
    assert len(writes) == 6 and all(w.upload_id == writes[0].upload_id for w in writes)
    assert [w.final for w in writes] == [False] * 5 + [True]
    assert mock.file_bytes("big.bin") == data
    assert await s.read_file("big.bin") == data
    assert await s.read_file("big.bin", max_bytes=1500) == data[:1500]


async def test_missing_file_and_escape_are_typed() -> None:
    s, _ = session(MockAgentResponder())
    with pytest.raises(PathNotFound) as missing:
        await s.read_file("nope.txt")
    assert missing.value.path == "nope.txt"
    assert isinstance(missing.value.__cause__, SelfhostedControlError) and missing.value.__cause__.os_not_found
    with pytest.raises(InvalidRequest):
        await s.write_file("../x", b"")


_PTY: dict[str, Any] = {"cwd": "", "env": {}, "cols": 80, "rows": 24, "on_output": None, "on_exit": None}


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.exec(["echo", "a\0b"]), "command"),
        (lambda s: s.exec(["true"], env={"BAD=NAME": "secret-value"}), "env"),
        (lambda s: s.exec(["true"], env={"OK": "nul\0secret-value"}), "env"),
        (lambda s: s.read_file("a\0b"), "path"),
        (lambda s: s.write_file("a\0b", b"x"), "path"),
        (lambda s: s.open_pty(["sh", "-c", "a\0b"], **_PTY), "command"),
    ],
)
async def test_input_the_protocol_refuses_is_invalid_request_and_nothing_is_sent(call: Any, field: str) -> None:
    mock = MockAgentResponder()
    s, _ = session(mock)
    with pytest.raises(InvalidRequest, match=field) as refused:
        await call(s)
    assert "secret-value" not in str(refused.value)  # the message names the field, never the value
    assert mock.requests == []
    await s.exec(["true"])  # positive control: well-formed input is sent
    assert len(mock.requests) == 1


async def test_never_sent_is_retried_three_times_with_backoff_then_offline() -> None:
    mock = MockAgentResponder(online=False)
    s, sleeps = session(mock)
    with pytest.raises(SelfhostedControlError) as err:
        await s.write_file("f", b"x")
    assert err.value.agent_offline and err.value.never_sent and err.value.reason == "agent_offline"
    assert len(mock.requests) == 4 and len(sleeps.delays) == 3
    assert all(0 <= d <= bound for d, bound in zip(sleeps.delays, (0.5, 1.0, 2.0), strict=True))


async def test_draining_retries_exec_ten_times_others_three_and_reports_retries() -> None:
    mock = MockAgentResponder(draining=True)
    s, _ = session(mock)
    with pytest.raises(SelfhostedControlError) as err:
        await s.exec(["true"])
    assert len(mock.requests) == 11 and err.value.draining
    assert err.value.detail["retries"] == "10" and "retried 10 times" in err.value.message
    mock.requests.clear()
    with pytest.raises(SelfhostedControlError):
        await s.path_exists("x")
    assert len(mock.requests) == 4


async def test_exhausted_draining_reports_our_own_retry_count_not_the_agents() -> None:
    class Draining:
        def __init__(self) -> None:
            self.requests: list[ControlRequest] = []

        async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
            self.requests.append(request)
            detail = {"retries": "99", "in_flight": "4"}
            return error_response(request.request_id, ControlErrorCode.DRAINING, "busy", detail=detail)

    rpc = Draining()
    s = SelfhostedSession(rpc, workspace_id="ws1", agent_id="a1", sleep=Sleeps())
    with pytest.raises(SelfhostedControlError) as err:
        await s.path_exists("x")
    assert len(rpc.requests) == 4 and err.value.draining and err.value.retryable
    assert "retried 3 times" in err.value.message and "99" not in err.value.message
    assert err.value.detail == {"retries": "3", "in_flight": "4"}
    assert err.value.control_request_id == rpc.requests[-1].request_id
    # Without any retry of its own (draining budget 0) the zero-retry message stands.
    rpc = Draining()
    s = SelfhostedSession(rpc, workspace_id="ws1", agent_id="a1", sleep=Sleeps(), retry=RetryPolicy(draining=0))
    with pytest.raises(SelfhostedControlError) as err:
        await s.path_exists("x")
    assert len(rpc.requests) == 1 and "retried" not in err.value.message
    assert err.value.detail["retries"] == "99"  # the agent's detail is kept, just never rendered


class Scripted:
    """A ControlRpc that answers from a script of error codes, then succeeds."""

    def __init__(self, codes: list[ControlErrorCode]) -> None:
        self.codes = codes
        self.requests: list[ControlRequest] = []

    async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
        self.requests.append(request)
        if self.codes:
            return error_response(request.request_id, self.codes.pop(0), "scripted")
        if isinstance(request.op, ExecOp):
            return ControlResponse(request_id=request.request_id, result=ExecReply(exit_code=0))
        return await MockAgentResponder().request(subject, request, timeout=timeout)


async def test_timeout_retries_only_read_only_ops_once() -> None:
    rpc = Scripted([ControlErrorCode.TIMEOUT])
    s = SelfhostedSession(rpc, workspace_id="ws1", agent_id="a1", sleep=Sleeps())
    assert await s.path_exists("x") is False
    assert len(rpc.requests) == 2
    rpc = Scripted([ControlErrorCode.TIMEOUT])
    s = SelfhostedSession(rpc, workspace_id="ws1", agent_id="a1", sleep=Sleeps())
    with pytest.raises(SelfhostedControlError) as err:
        await s.exec(["touch", "f"])  # a mutation with an unknown outcome is never repeated
    assert err.value.reason == "agent_reconnecting" and len(rpc.requests) == 1


async def test_a_result_of_the_wrong_type_is_a_protocol_error() -> None:
    class Liar:
        async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
            return ControlResponse(request_id=request.request_id, result=ExecReply(exit_code=0))

    s = SelfhostedSession(Liar(), workspace_id="ws1", agent_id="a1", sleep=Sleeps())
    with pytest.raises(SelfhostedControlError) as err:
        await s.ping_reply()
    assert err.value.code == ControlErrorCode.PROTOCOL.number


async def test_fenced_is_not_retried_by_the_session() -> None:
    mock = MockAgentResponder()
    newer, _ = session(mock, epoch=5)
    older, _ = session(mock, epoch=4)
    await newer.write_file("f", b"new")
    with pytest.raises(SelfhostedControlError) as err:
        await older.write_file("f", b"old")
    assert err.value.fenced and mock.file_bytes("f") == b"new"


async def test_consent_display_and_relay_endpoint() -> None:
    mock = MockAgentResponder(consented=False, has_display=True)
    s, _ = session(mock, relay=RelayConfig.from_url("relay.example.com:8443/r"))
    with pytest.raises(SelfhostedControlError) as err:
        await s.desktop_input(KeyEvent(key="a"))
    assert err.value.reason == "consent_required"
    shot = await s.screenshot()
    assert (shot.native_width, shot.native_height) == (1, 1)
    endpoint = await s.resolve_exposed_port(6080)
    assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.path) == ("relay.example.com", 8443, True, "/r")
    assert endpoint.query == "ws=ws1&agent=a1&port=6080&channel=ws1%3Aa1%3A6080"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, RelayConfig()),
        ("", RelayConfig()),
        ("relay.example.com", RelayConfig("relay.example.com", 443, True, "/stream")),
        ("ws://relay:8080", RelayConfig("relay", 8080, False, "/stream")),
        ("http://relay/", RelayConfig("relay", 80, False, "/stream")),
        ("https://relay/x/y", RelayConfig("relay", 443, True, "/x/y")),
        ("wss://[::1]:9000", RelayConfig("::1", 9000, True, "/stream")),
        ("wss://relay:notaport", RelayConfig("wss://relay:notaport", 443, True, "/stream")),
    ],
)
def test_relay_config_from_url(raw: str | None, expected: RelayConfig) -> None:
    assert RelayConfig.from_url(raw) == expected


@pytest.mark.parametrize(
    ("path", "working_dir", "expected"),
    [
        ("", "", ""),
        ("/workspace", "proj", "proj"),
        ("/workspace/a/b", "", "a/b"),
        ("/workspace/a", "proj", "proj/a"),
        ("a", "proj", "proj/a"),
        ("/etc/hosts", "proj", "/etc/hosts"),
        ("/workspacex", "", "/workspacex"),
    ],
)
def test_to_machine_path(path: str, working_dir: str, expected: str) -> None:
    assert to_machine_path(path, working_dir) == expected


def test_instance_id_round_trip_and_refusals() -> None:
    assert parse_instance_id(selfhosted_instance_id("ws1", "a-1", 12)) == ("ws1", "a-1", 12)
    for bad in ("ws1/a1", "ws1/a.1@2", "/a@1", "ws1/a1@-1", 5):
        with pytest.raises(InvalidRequest):
            parse_instance_id(bad)  # type: ignore[arg-type]


async def test_provider_create_binds_and_resume_never_does_io() -> None:
    mock = MockAgentResponder()
    provider = SelfhostedProvider(mock, default_agent_id="a1", retry=RetryPolicy(base_delay=0))
    assert isinstance(provider, Provider) and provider.backend_id == "selfhosted"
    spec = BoxSpec(lease_id="lease/ws1/g1", workspace_id="ws1", group_id="g1", epoch=3)
    created = await provider.create(spec, "k")
    assert isinstance(created, BoxSession)
    envelope = created.serialize_state()
    assert envelope == Envelope(backend_id="selfhosted", instance_id="ws1/a1@3", state={"agentId": "a1"})
    mock.set_online(False)
    mock.requests.clear()
    resumed = await provider.resume(envelope)
    assert resumed.epoch == 3 and mock.requests == []
    nested = Envelope(backend_id="selfhosted", instance_id="ws1/a1@3", state={"providerState": {"agentId": "a1"}})
    assert (await provider.resume(nested)).agent_id == "a1"
    with pytest.raises(AgentOffline):
        await provider.create(spec, "k")
    with pytest.raises(InvalidRequest):
        await provider.resume(Envelope(backend_id="unix_local", instance_id="box-1"))
    with pytest.raises(InvalidRequest):
        await SelfhostedProvider(mock).create(spec, "k")  # no agent id anywhere
    assert not is_provider_sandbox_not_found(AgentOffline("x"))


def test_registry_builds_selfhosted_without_dialling() -> None:
    assert "selfhosted" in RUNNABLE_BACKENDS
    provider = ProviderRegistry(Settings(nats_url="nats://127.0.0.1:1", selfhosted_relay_url="wss://r.example")).get(
        "selfhosted"
    )
    assert isinstance(provider, SelfhostedProvider) and isinstance(provider.rpc, NatsControlRpc)
    assert provider.relay.host == "r.example"


async def test_nats_rpc_never_raises_when_the_server_is_unreachable() -> None:
    rpc = NatsControlRpc("nats://127.0.0.1:1", signing_key=ControlSigningKey.generate(), connect_timeout=0.3)
    s = SelfhostedSession(rpc, workspace_id="ws1", agent_id="a1", retry=RetryPolicy(never_sent=0))
    with pytest.raises(SelfhostedControlError) as err:
        await s.exec(["true"])
    assert err.value.agent_offline and err.value.never_sent
    await rpc.close()


async def test_mock_refuses_an_upload_gap_and_unknown_subjects() -> None:
    mock = MockAgentResponder()
    req = ControlRequest(request_id="r", epoch=0, op=FsWriteOp(path="f", content=b"x", upload_id="u", upload_offset=5))
    resp = await mock.request("agent.ws1.a1.rpc", req, timeout=1)
    assert resp.error is not None and resp.error.code is ControlErrorCode.PROTOCOL
    with pytest.raises(InvalidRequest):
        await mock.request("not.a.subject", req, timeout=1)


async def test_the_machine_is_the_persistence_nothing_is_archived() -> None:
    provider = SelfhostedProvider(MockAgentResponder(), default_agent_id="a1")
    envelope = Envelope(backend_id="selfhosted", instance_id="ws1/a1@1", state={"agentId": "a1"})
    with pytest.raises(Unsupported):
        async for _chunk in provider.capture_workspace(envelope):
            pass
    with pytest.raises(Unsupported):
        await provider.restore_workspace(envelope, _no_chunks())
    with pytest.raises(Unsupported):
        await provider.delete_snapshot("snap-1")
    assert await provider.workspace_fingerprint(envelope) is None
    assert provider.descriptor.snapshot.kind == "none" and not provider.descriptor.persistable


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""


async def test_an_agent_error_is_raised_without_a_cause_cycle() -> None:
    """``raise err from err`` once made a cycle that Temporal's failure converter recursed on."""
    from temporalio.converter import DataConverter

    s, _ = session(MockAgentResponder(online=False))
    with pytest.raises(SelfhostedControlError) as info:
        await s.exec(["true"])
    seen: list[BaseException] = []
    cause: BaseException | None = info.value
    while cause is not None:
        assert cause not in seen, "the error's cause chain loops"
        seen.append(cause)
        cause = cause.__cause__
    # What the activity worker does with it: it must encode (positive control of the whole chain).
    from temporalio.api.failure.v1 import Failure

    failure = Failure()
    await DataConverter.default.encode_failure(info.value, failure)
    assert "no agent" in failure.message or failure.message
    online, _ = session(MockAgentResponder())
    with pytest.raises(PathNotFound) as missing:
        await online.read_file("no-such-file")
    assert isinstance(missing.value.__cause__, SelfhostedControlError)
