"""A hostile NATS peer against the control plane: a real nats-server with the generated authorization.

The attacker has read our source. Each attack has a positive control: the same move made with
the right identity or the right key works, so a refusal that would happen anyway does not pass
for a defence. Requests the attacker sends go through :func:`send_raw`, which signs them (or
not) exactly as told.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from providers.selfhosted import NatsControlRpc, SelfhostedSession
from sandbox.control_auth import AgentCredential, ControlSigningKey, ReplyVerifier, sign_reply
from sandbox.control_protocol import ControlErrorCode, ControlRequest, PingOp, agent_subject
from sandbox.errors import SandboxConfigError, SelfhostedControlError
from sandbox.nats_auth import NatsAuth
from sandbox.nats_flush import flush_in_order
from sandbox.settings import Settings
from tests.conftest import REPO, AuthenticatedNats, find_binary, free_port, nats_server_at, wait_for_port
from tests.integration.selfhosted.conftest import FAST_RETRY, Agent, new_id, running_agent
from tests.security.test_hostile_agent_inputs import _deep_tree, deep_trees  # noqa: F401 - a fixture

MAX_EPOCH = 2**32 - 1


def raw_request(op: dict[str, Any], *, epoch: int = 1, expires_in: float = 60.0, rid: str | None = None) -> dict:
    """A request body as the runtime would send it (the caller may spoil any field)."""
    return {
        "v": 1,
        "request_id": rid or uuid.uuid4().hex,
        "epoch": epoch,
        "op": op,
        "expires_at_ms": int((time.time() + expires_in) * 1000),
    }


async def send_raw(
    nc: Any,
    subject: str,
    request: dict[str, Any] | bytes,
    *,
    key: ControlSigningKey | None,
    timeout: float = 1.0,
    tamper: bool = False,
) -> dict[str, Any]:
    """Send one request (signed with ``key``, or unsigned when None) and return the decoded reply.

    ``tamper`` signs the body, then changes it: the signature no longer covers what arrives.
    """
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    headers = key.sign_request(subject, body) if key is not None else None
    if tamper:
        body = body.replace(b'"epoch": 1', b'"epoch": 2')
    # A connection made before an enrollment reload can briefly find no responder for an agent that
    # connected after it (nats-server rebinds older connections to the reloaded account). Nothing
    # was delivered then, so sending again is safe: the runtime retries never-sent requests too.
    deadline = time.monotonic() + 5
    while True:
        try:
            msg = await nc.request(subject, body, timeout=timeout, headers=headers)
            break
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)
    reply: dict[str, Any] = json.loads(msg.data)
    reply["_headers"] = msg.headers or {}
    reply["_request"] = body
    reply["_raw"] = msg.data
    return reply


def write_op(path: str, content: bytes = b"pwned", mode: int = 0) -> dict[str, Any]:
    import base64

    return {"type": "fs_write", "path": path, "content": base64.b64encode(content).decode(), "mode": mode}


@pytest.fixture
async def runtime_nc(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats_server_at(nats_url).connect("runtime")
    yield nc
    await nc.close()


@pytest.fixture
async def agent(nats_url: str, tmp_path: Path) -> AsyncIterator[Agent]:
    async with running_agent(nats_url, tmp_path) as running:
        yield running


async def refused_connect(url: str, **options: Any) -> Exception:
    """The error a connection attempt ends with (the test fails if it connects)."""
    try:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **options)
    except Exception as err:  # nats-py raises its own Error for an authorization violation
        return err
    await nc.close()
    raise AssertionError(f"connected to {url} with {sorted(options)}")


async def permission_errors(nc_errors: list[Exception], nc: Any) -> list[str]:
    await flush_in_order(nc)
    await asyncio.sleep(0.2)  # the server reports a violation asynchronously, after the flush's PONG
    return [str(err) for err in nc_errors]


# --- who may connect and what they may touch --------------------------------------------------------


async def test_unauthenticated_and_unknown_identities_are_refused(nats_server: AuthenticatedNats) -> None:
    anonymous = await refused_connect(nats_server.url)
    assert "Authorization Violation" in str(anonymous)
    from sandbox.control_auth import new_nkey_user_seed

    stranger = await refused_connect(nats_server.url, nkeys_seed_str=new_nkey_user_seed().decode())
    assert "Authorization Violation" in str(stranger)
    # Positive control: the runtime's identity connects.
    nc = await nats_server.connect("runtime")
    assert nc.is_connected
    await nc.close()


async def test_an_agent_reaches_only_its_own_subject_and_queue(
    nats_server: AuthenticatedNats, agent: Agent, runtime_nc: Any
) -> None:
    other_ws, other_agent = new_id("ws"), new_id("agent")
    credential = nats_server.enroll(other_ws, other_agent)
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    nc = await nats.connect(nats_server.url, nkeys_seed_str=credential.nats_seed.get_secret_value(), error_cb=on_error)
    try:
        victim = agent_subject(agent.workspace_id, agent.agent_id)
        own = agent_subject(other_ws, other_agent)
        got: list[bytes] = []

        async def sniff(msg: Any) -> None:
            got.append(msg.data)

        await nc.subscribe(victim, queue=victim, cb=sniff)
        await nc.subscribe(victim, cb=sniff)
        await nc.subscribe(">", cb=sniff)
        await nc.subscribe("session.>", cb=sniff)
        await nc.subscribe(own, queue="another-group", cb=sniff)
        await nc.publish(victim, b"{}")
        violations = await permission_errors(errors, nc)
        assert len(violations) == 6, violations
        assert all("Permissions Violation" in v or "permissions violation" in v for v in violations)
        # Nothing the victim receives leaks to the attacker.
        await send_raw(runtime_nc, victim, raw_request({"type": "ping", "nonce": "1"}), key=nats_server.signing_key)
        assert got == []
        # Positive control: its own subject in its own queue group does receive (a clean connection,
        # so that no refused subscription of the attack above is in the way).
        ok = await nats.connect(nats_server.url, nkeys_seed_str=credential.nats_seed.get_secret_value())
        heard: list[bytes] = []

        async def hear(msg: Any) -> None:
            heard.append(msg.data)

        await ok.subscribe(own, queue=own, cb=hear)
        await flush_in_order(ok)
        for _ in range(100):
            await runtime_nc.publish(own, b"hello")
            await flush_in_order(runtime_nc)
            await asyncio.sleep(0.05)
            if heard:
                break
        await ok.close()
        assert heard and set(heard) == {b"hello"} and got == []
        assert len(await permission_errors(errors, nc)) == 6
    finally:
        await nc.close()
        nats_server.revoke(other_ws, other_agent)


async def test_event_readers_read_events_only(nats_server: AuthenticatedNats, runtime_nc: Any) -> None:
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    reader = await nats_server.connect("events", error_cb=on_error)
    try:
        seen: list[bytes] = []

        async def on_event(msg: Any) -> None:
            seen.append(msg.data)

        await reader.subscribe("session.ws1.g1.events", cb=on_event)
        await reader.subscribe("agent.*.*.rpc", cb=on_event)
        await reader.publish("session.ws1.g1.events", b"forged")
        assert len(await permission_errors(errors, reader)) == 2
        await runtime_nc.publish("session.ws1.g1.events", b"real")  # positive control
        await flush_in_order(runtime_nc)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [b"real"]
    finally:
        await reader.close()


async def test_revocation_cuts_the_agent_off_without_restarting_nats(
    nats_server: AuthenticatedNats, nats_url: str, tmp_path: Path
) -> None:
    rpc = nats_server.control_rpc()
    pid = nats_server.proc.pid if nats_server.proc else None
    try:
        async with running_agent(nats_url, tmp_path) as agent:
            session = SelfhostedSession(rpc, workspace_id=agent.workspace_id, agent_id=agent.agent_id, epoch=1)
            assert (await session.exec(["echo", "before"])).stdout == b"before\n"  # positive control
            nats_server.revoke(agent.workspace_id, agent.agent_id)
            for _ in range(200):
                ping = ControlRequest(request_id=uuid.uuid4().hex, epoch=1, op=PingOp(nonce="1"))
                probe = await rpc.request(session.subject, ping, timeout=0.5)
                if probe.error is not None and probe.error.code is ControlErrorCode.AGENT_OFFLINE:
                    break
                await asyncio.sleep(0.05)
            assert probe.error is not None and probe.error.code is ControlErrorCode.AGENT_OFFLINE
            # Its credential no longer opens a connection at all.
            assert agent.credential is not None
            err = await refused_connect(nats_url, nkeys_seed_str=agent.credential.nats_seed.get_secret_value())
            assert "Authorization Violation" in str(err)
            assert nats_server.proc is not None and nats_server.proc.pid == pid and nats_server.proc.poll() is None
    finally:
        await rpc.close()


# --- what a request must prove before the agent acts -------------------------------------------------


async def test_forged_unsigned_replayed_and_expired_requests_change_nothing(
    nats_server: AuthenticatedNats, agent: Agent, runtime_nc: Any
) -> None:
    subject = agent_subject(agent.workspace_id, agent.agent_id)
    assert agent.daemon is not None
    fence_before = agent.daemon.newest_epoch
    key = nats_server.signing_key
    attacks: dict[str, dict[str, Any]] = {
        "unsigned": await send_raw(
            runtime_nc, subject, raw_request(write_op("unsigned.txt"), epoch=MAX_EPOCH), key=None
        ),
        "wrong_key": await send_raw(
            runtime_nc, subject, raw_request(write_op("wrong.txt"), epoch=MAX_EPOCH), key=ControlSigningKey.generate()
        ),
        "tampered": await send_raw(runtime_nc, subject, raw_request(write_op("tampered.txt")), key=key, tamper=True),
        "expired": await send_raw(
            runtime_nc, subject, raw_request(write_op("expired.txt"), epoch=MAX_EPOCH, expires_in=-3600), key=key
        ),
        "forever": await send_raw(
            runtime_nc, subject, raw_request(write_op("forever.txt"), epoch=MAX_EPOCH, expires_in=86400), key=key
        ),
    }
    missing_expiry = raw_request(write_op("noexp.txt"), epoch=MAX_EPOCH)
    del missing_expiry["expires_at_ms"]
    attacks["no_expiry"] = await send_raw(runtime_nc, subject, missing_expiry, key=key)
    reasons = {}
    for name, reply in attacks.items():
        assert reply["error"]["code"] == "UNAUTHENTICATED", (name, reply)
        assert reply["error"]["retryable"] is False
        reasons[name] = reply["error"]["detail"]["reason"]
    assert reasons == {
        "unsigned": "unsigned",
        "wrong_key": "wrong_key",
        "tampered": "bad_signature",
        "expired": "expired",
        "forever": "too_long",
        "no_expiry": "no_expiry",
    }
    assert sorted(os.listdir(agent.root)) == []  # nothing written
    assert agent.daemon.newest_epoch == fence_before  # the fence did not move
    # Even a refusal is signed by the agent: the runtime can tell it from an impostor's.
    verifier = ReplyVerifier(key.public)
    reply = attacks["unsigned"]
    verifier.verify(subject, agent.workspace_id, agent.agent_id, reply["_request"], reply["_raw"], reply["_headers"])

    # Positive control and replay: a genuine request acts once; the same bytes again act never.
    genuine = raw_request(write_op("genuine.txt"), epoch=7)
    first = await send_raw(runtime_nc, subject, genuine, key=key)
    assert first.get("error") is None and (agent.root / "genuine.txt").read_bytes() == b"pwned"
    assert agent.daemon.newest_epoch == 7
    (agent.root / "genuine.txt").unlink()
    again = await send_raw(runtime_nc, subject, genuine, key=key)
    assert again["error"]["code"] == "UNAUTHENTICATED" and again["error"]["detail"]["reason"] == "replayed"
    assert not (agent.root / "genuine.txt").exists()


async def test_a_replay_is_refused_after_the_agent_restarts(
    nats_server: AuthenticatedNats, nats_url: str, tmp_path: Path, runtime_nc: Any
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    agent = Agent(new_id("ws"), new_id("agent"), root, tmp_path / "state")
    subject = agent_subject(agent.workspace_id, agent.agent_id)
    genuine = raw_request(write_op("once.txt"), epoch=3)
    async with running_agent(nats_url, tmp_path, agent=agent):
        assert (await send_raw(runtime_nc, subject, genuine, key=nats_server.signing_key)).get("error") is None
    (root / "once.txt").unlink()
    async with running_agent(nats_url, tmp_path, agent=agent):
        again = await send_raw(runtime_nc, subject, genuine, key=nats_server.signing_key)
        assert again["error"]["detail"]["reason"] == "replayed"
        assert not (root / "once.txt").exists()
        # Positive control: a fresh request after the restart works.
        fresh = await send_raw(
            runtime_nc, subject, raw_request(write_op("fresh.txt"), epoch=3), key=nats_server.signing_key
        )
        assert fresh.get("error") is None and (root / "fresh.txt").exists()


# --- an impostor on the subject ------------------------------------------------------------------------


@pytest.fixture
async def open_nats(nats_identities: Path) -> AsyncIterator[str]:
    """A nats-server without authorization: ``SANDBOX_NATS_AUTH=off``, where only signatures protect."""
    port = free_port()
    proc = subprocess.Popen(
        [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_an_impostor_never_gets_a_reply_accepted(open_nats: str, tmp_path: Path) -> None:
    """On an open server the impostor hears every request the agent hears and races it; 0 of N count."""
    key = ControlSigningKey.load(Path(os.environ["SANDBOX_CONTROL_KEY_FILE"]))
    rpc = NatsControlRpc(open_nats, signing_key=key)
    root = tmp_path / "root"
    root.mkdir()
    agent = Agent(new_id("ws"), new_id("agent"), root, tmp_path / "state")
    agent.credential = key.issue_credential(agent.workspace_id, agent.agent_id)
    subject = agent_subject(agent.workspace_id, agent.agent_id)
    # A real, enrolled machine of the same deployment answering for another: its certificate is genuine.
    other = key.issue_credential(agent.workspace_id, new_id("other"))
    answered = 0

    async def forge(msg: Any) -> None:
        nonlocal answered
        answered += 1
        rid = json.loads(msg.data)["request_id"]
        body = json.dumps(
            {"v": 1, "request_id": rid, "result": {"type": "exec", "exit_code": 0, "stdout": "Zm9yZ2Vk"}}
        ).encode()
        if answered % 3 == 0:
            await impostor.publish(msg.reply, body)  # unsigned
        elif answered % 3 == 1:
            await impostor.publish(msg.reply, body, headers=sign_reply(other, subject, msg.data, body))
        else:  # a certificate of its own making
            fake = ControlSigningKey.generate().issue_credential(agent.workspace_id, agent.agent_id)
            await impostor.publish(msg.reply, body, headers=sign_reply(fake, subject, msg.data, body))

    impostor = await nats.connect(open_nats)
    try:
        # Outside the queue group: every request reaches both, and the impostor's answer is the
        # first to arrive as often as not (it does no work before answering).
        await impostor.subscribe(subject, cb=forge)
        await flush_in_order(impostor)
        # Alone on the subject, the impostor's answers are refused (UNAUTHENTICATED, not its output).
        session = SelfhostedSession(
            rpc, workspace_id=agent.workspace_id, agent_id=agent.agent_id, epoch=1, retry=FAST_RETRY, timeout=1
        )
        with pytest.raises(SelfhostedControlError) as refused:
            await session.ping_reply(timeout=1)
        assert refused.value.reason == "unauthenticated"
        assert answered >= 1
        async with running_agent(open_nats, tmp_path, agent=agent, nats_auth=NatsAuth()):
            outputs = [(await session.exec(["echo", f"real-{i}"])).stdout for i in range(12)]
        assert outputs == [f"real-{i}\n".encode() for i in range(12)]  # positive control: the real agent is heard
        assert answered > 1  # the impostor did answer some of them first, and was ignored
    finally:
        await impostor.close()
        await rpc.close()


# --- settings: auth cannot be switched off by accident ------------------------------------------------


def test_auth_is_on_by_default_and_off_only_when_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path, nats_creds=None, nats_events_creds=None)
    assert settings.nats_auth == "on"
    with pytest.raises(SandboxConfigError, match="SANDBOX_NATS_AUTH=off"):
        NatsAuth.for_role(settings, "runtime")
    import sandbox.nats_auth as nats_auth

    nats_auth._warned_off = False
    with caplog.at_level(logging.WARNING, logger="sandbox.nats_auth"):
        off = NatsAuth.for_role(Settings(data_dir=tmp_path, nats_auth="off"), "runtime")
    assert off.anonymous and "SANDBOX_NATS_AUTH=off" in caplog.text
    # Positive control: with the role key there, auth is on and carries an identity (never printed).
    seed = tmp_path / "secrets" / "nats" / "runtime.nk"
    from sandbox.control_auth import new_nkey_user_seed

    seed.parent.mkdir(parents=True)
    seed.write_bytes(new_nkey_user_seed())
    auth = NatsAuth.for_role(settings, "runtime")
    assert not auth.anonymous and seed.read_text() not in repr(auth)


def test_a_credential_file_is_private_and_round_trips(tmp_path: Path) -> None:
    key = ControlSigningKey.generate()
    credential = key.issue_credential("ws1", "a1")
    path = tmp_path / "a1.credential"
    credential.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = AgentCredential.read(path)
    assert again.nats_public_key == credential.nats_public_key and again.reply_key_id == credential.reply_key_id
    assert credential.nats_seed.get_secret_value() not in repr(credential)
    path.write_text("{}")
    with pytest.raises(SandboxConfigError, match="machine enroll"):
        AgentCredential.read(path)


# --- inputs that once got no reply at all ----------------------------------------------------------


NO_REPLY_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "nul_in_argv": ({"type": "exec", "command": ["echo", "a\x00b"]}, "PROTOCOL"),
    "nul_in_shell": ({"type": "exec", "command": ["echo a\x00b"], "shell": True}, "PROTOCOL"),
    "env_key_with_equals": ({"type": "exec", "command": ["true"], "env": {"A=B": "1"}}, "PROTOCOL"),
    "empty_env_key": ({"type": "exec", "command": ["true"], "env": {"": "1"}}, "PROTOCOL"),
    "nul_in_env_key": ({"type": "exec", "command": ["true"], "env": {"A\x00": "1"}}, "PROTOCOL"),
    "nul_in_env_value": ({"type": "exec", "command": ["true"], "env": {"A": "x\x00y"}}, "PROTOCOL"),
    "long_file_name": (write_op("n" * 300), "OS"),
    "deep_tree_listing": ({"type": "fs_list", "path": "deep", "recursive": True}, "PAYLOAD_TOO_LARGE"),
}


@pytest.mark.parametrize("name", list(NO_REPLY_INPUTS))
async def test_each_former_no_reply_input_gets_a_typed_reply_within_a_second(
    nats_server: AuthenticatedNats,
    agent: Agent,
    runtime_nc: Any,
    name: str,
    deep_trees: list[Path],  # noqa: F811
) -> None:
    op, code = NO_REPLY_INPUTS[name]
    if name == "deep_tree_listing":
        deep_trees.append(agent.root / "deep")
        _deep_tree(agent.root / "deep", 2000)
    subject = agent_subject(agent.workspace_id, agent.agent_id)
    started = time.monotonic()
    reply = await send_raw(runtime_nc, subject, raw_request(op), key=nats_server.signing_key, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert reply["error"]["code"] == code, reply["error"]
    # Positive control: the agent is still there and a well-formed request of the same kind works.
    fine = {"type": "exec", "command": ["true"], "env": {"A": "1"}} if op["type"] == "exec" else write_op("ok.txt")
    assert (await send_raw(runtime_nc, subject, raw_request(fine), key=nats_server.signing_key)).get("error") is None


async def test_fs_write_never_creates_a_setuid_file(
    nats_server: AuthenticatedNats, agent: Agent, runtime_nc: Any
) -> None:
    subject = agent_subject(agent.workspace_id, agent.agent_id)
    key = nats_server.signing_key
    assert (await send_raw(runtime_nc, subject, raw_request(write_op("s.sh", mode=0o6777)), key=key)).get(
        "error"
    ) is None
    mode = (agent.root / "s.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID) and stat.S_IMODE(mode) == 0o777
    # Positive control: an ordinary mode is applied exactly as asked.
    assert (await send_raw(runtime_nc, subject, raw_request(write_op("x.sh", mode=0o750)), key=key)).get(
        "error"
    ) is None
    assert stat.S_IMODE((agent.root / "x.sh").stat().st_mode) == 0o750


def _agent_run_notes(tmp_path: Path, as_uid: int | None) -> str:
    """The first status lines of a real `sandboxctl agent run` (stopped once it has said them)."""
    credential = tmp_path / f"cred-{as_uid}"
    ControlSigningKey.generate().issue_credential("ws1", "a1").write(credential)
    root = tmp_path / f"root-{as_uid}"
    root.mkdir()
    prefix: list[str] = []
    if as_uid is not None:
        os.chown(credential, as_uid, as_uid)
        os.chown(root, as_uid, as_uid)
        prefix = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"]
    argv = [*prefix, sys.executable, "-m", "cli.main", "agent", "run", "--credential", str(credential)]
    argv += ["--root", str(root), "--nats", f"nats://127.0.0.1:{free_port()}", "--state-dir", str(root / ".state")]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO), "HOME": str(root)},
    )
    assert proc.stderr is not None
    lines = []
    for _ in range(4):
        line = proc.stderr.readline().decode()
        lines.append(line)
        if "serving" in line:
            break
    proc.terminate()
    proc.wait(timeout=15)
    return "".join(lines)


def test_agent_run_warns_when_run_as_root(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the tests run as root (the local provider needs it)"
    assert "running as root" in _agent_run_notes(tmp_path, None)
    # Positive control: an ordinary user gets no such warning (and the agent does start).
    tmp_path.chmod(0o755)
    quiet = _agent_run_notes(tmp_path, 61000)
    assert "serving" in quiet and "running as root" not in quiet
