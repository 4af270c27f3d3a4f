"""The agent daemon and SelfhostedSession over a real nats-server: every op, failures, fences, drains."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemons.agent.consent import AgentConsent
from providers.selfhosted import NatsControlRpc, RetryPolicy, SelfhostedProvider, probe_agent
from sandbox.box import BoxSpec, Envelope
from sandbox.control_auth import ControlSigningKey
from sandbox.control_protocol import ControlErrorCode, KeyEvent, PointerEvent
from sandbox.errors import (
    AgentOffline,
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    SelfhostedControlError,
)
from tests.conftest import free_port
from tests.integration.selfhosted.conftest import (
    FAST_RETRY,
    Agent,
    NatsServer,
    running_agent,
    session_for,
    wait_until_answers,
)


async def test_every_op_round_trips(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    async with running_agent(nats_url, tmp_path) as agent:
        s = session_for(rpc, agent)
        assert await s.ping()

        # exec: argv, stdin, env, cwd, exit code, binary output
        (agent.root / "sub").mkdir()
        res = await s.exec(
            ["sh", "-c", 'cat; printf "\\000\\377$X"; pwd; exit 7'], workdir="sub", env={"X": "y"}, stdin=b"in"
        )
        assert res.exit_code == 7
        assert res.stdout == b"in\x00\xffy" + str((agent.root / "sub").resolve()).encode() + b"\n"

        # files: 10 MB of random bytes both ways, through the virtual /workspace root too
        big = os.urandom(10 * 1024 * 1024)
        await s.write_file("/workspace/data/big.bin", big)
        assert (agent.root / "data/big.bin").read_bytes() == big
        assert await s.read_file("data/big.bin") == big
        binary = bytes(range(256))
        await s.write_file("bin.dat", binary)
        assert await s.read_file("bin.dat") == binary
        assert [e.name for e in agent.root.iterdir() if e.name.startswith(".")] == []

        # list and stat
        names = {e.name: e for e in await s.list_dir("")}
        assert names["data"].kind == "dir" and names["bin.dat"].size == 256
        assert await s.path_exists("data/big.bin") and not await s.path_exists("data/none")
        st = await s.stat("data/big.bin")
        assert st.entry is not None and st.entry.size == len(big)

        # a missing file is PathNotFound (never BoxNotFound)
        with pytest.raises(PathNotFound):
            await s.read_file("nope.txt")

        # stream_ensure through resolve_exposed_port: the relay URL shape
        endpoint = await s.resolve_exposed_port(7681)
        assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.path) == (
            "relay.example.test",
            443,
            True,
            "/stream",
        )
        assert endpoint.query == (
            f"ws={agent.workspace_id}&agent={agent.agent_id}&port=7681&channel={agent.workspace_id}%3A{agent.agent_id}%3A7681"
        )

        # no display: screenshot and desktop streams are typed refusals
        with pytest.raises(SelfhostedControlError) as shot:
            await s.screenshot()
        assert shot.value.code == ControlErrorCode.UNSUPPORTED.number
        assert shot.value.detail["reason"] == "display_unavailable"


async def test_exec_timeout_and_oversized_output_are_typed(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    async with running_agent(nats_url, tmp_path) as agent:
        s = session_for(rpc, agent)
        started = time.monotonic()
        with pytest.raises(ExecTimeout):
            await s.exec(["sleep", "30"], timeout=0.3)
        assert time.monotonic() - started < 5
        with pytest.raises(SelfhostedControlError) as big:
            await s.exec(["head", "-c", str(3 * 1024 * 1024), "/dev/zero"])
        assert big.value.payload_too_large and not big.value.retryable
        assert "Redirect the command's output to a file" in big.value.message


async def test_path_escape_is_refused_and_nothing_lands_outside(
    nats_url: str, rpc: NatsControlRpc, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    async with running_agent(nats_url, tmp_path) as agent:
        (agent.root / "link").symlink_to(outside)
        s = session_for(rpc, agent)
        for path in ("../outside/x", "link/x", str(outside / "x"), "/etc/x"):
            with pytest.raises(InvalidRequest):
                await s.write_file(path, b"pwned")
            with pytest.raises(InvalidRequest):
                await s.write_file(path, os.urandom(2 * 1024 * 1024))
        with pytest.raises(InvalidRequest):
            await s.exec(["touch", "x"], workdir="link")
    assert list(outside.iterdir()) == []


async def test_stale_epoch_is_fenced_even_after_a_restart(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    async with running_agent(nats_url, tmp_path) as agent:
        newer, older = session_for(rpc, agent, epoch=5), session_for(rpc, agent, epoch=3)
        await newer.write_file("f.txt", b"new")
        with pytest.raises(SelfhostedControlError) as fenced:
            await older.write_file("f.txt", b"old")
        assert fenced.value.fenced and fenced.value.retryable
        assert (agent.root / "f.txt").read_bytes() == b"new"
    # The fence survives the daemon's restart (state kept outside the root).
    async with running_agent(nats_url, tmp_path, agent=agent):
        with pytest.raises(SelfhostedControlError) as again:
            await session_for(rpc, agent, epoch=4).exec(["true"])
        assert again.value.fenced
        assert (await session_for(rpc, agent, epoch=5).exec(["true"])).exit_code == 0


async def test_desktop_input_needs_consent(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    async with running_agent(nats_url, tmp_path, display=":987") as agent:
        with pytest.raises(SelfhostedControlError) as denied:
            await session_for(rpc, agent).desktop_input(KeyEvent(key="Return"))
        assert denied.value.code == ControlErrorCode.CONSENT_REQUIRED.number
        assert denied.value.reason == "consent_required" and not denied.value.retryable


@pytest.mark.skipif(not (shutil.which("Xvfb") and shutil.which("xdotool")), reason="needs Xvfb and xdotool")
async def test_screenshot_and_input_on_a_real_display(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    display_no = 200 + free_port() % 500
    xvfb = subprocess.Popen(
        ["Xvfb", f":{display_no}", "-screen", "0", "640x480x24", "-nolisten", "tcp", "-noreset"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{display_no}").exists():
            assert time.monotonic() < deadline and xvfb.poll() is None, "Xvfb did not start"
            await asyncio.sleep(0.05)
        async with running_agent(
            nats_url, tmp_path, display=f":{display_no}", consent=AgentConsent(screen_control=True)
        ) as agent:
            s = session_for(rpc, agent)
            shot = await s.screenshot()
            assert shot.png.startswith(b"\x89PNG") and (shot.width, shot.height) == (640, 480)
            await s.desktop_input(PointerEvent(x=123, y=45, action="move"))
            where = subprocess.run(
                ["xdotool", "getmouselocation"],
                env={**os.environ, "DISPLAY": f":{display_no}"},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert where.startswith("x:123 y:45")
            endpoint = await s.resolve_exposed_port(6080)
            assert "port=6080" in endpoint.query
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)


async def test_killed_daemon_is_offline_then_back(
    nats_url: str, rpc: NatsControlRpc, agent_process: Callable[..., Agent]
) -> None:
    agent = agent_process(nats_url)
    await wait_until_answers(rpc, agent)
    s = session_for(rpc, agent, timeout=5.0)
    assert (await s.exec(["true"])).exit_code == 0
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(timeout=10)
    started = time.monotonic()
    with pytest.raises(SelfhostedControlError) as offline:
        await s.exec(["true"])
    assert time.monotonic() - started < s.timeout
    assert offline.value.agent_offline and offline.value.reason == "agent_offline"
    assert not isinstance(offline.value, BoxNotFound)
    # Back: the same session works again without being rebuilt.
    agent_process(nats_url, agent)
    await wait_until_answers(rpc, agent)
    assert (await s.exec(["echo", "back"])).stdout == b"back\n"


async def test_sigterm_drains_running_ops(
    nats_url: str, rpc: NatsControlRpc, agent_process: Callable[..., Agent]
) -> None:
    agent = agent_process(nats_url)
    await wait_until_answers(rpc, agent)
    s = session_for(rpc, agent, retry=RetryPolicy(draining=0, draining_exec=0, base_delay=0.01))
    running = asyncio.create_task(s.exec(["sh", "-c", "sleep 1; echo done"]))
    await asyncio.sleep(0.3)
    assert agent.process is not None
    agent.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    with pytest.raises(SelfhostedControlError) as refused:
        await s.exec(["true"])
    assert refused.value.draining and refused.value.retryable
    finished = await running
    assert finished.exit_code == 0 and finished.stdout == b"done\n"
    assert agent.process.wait(timeout=10) == 0


async def test_nats_restart_mid_run_both_sides_recover(own_nats: NatsServer, tmp_path: Path) -> None:
    rpc = own_nats.control_rpc()
    try:
        async with running_agent(own_nats.url, tmp_path) as agent:
            s = session_for(rpc, agent, timeout=2.0)
            assert (await s.exec(["echo", "one"])).stdout == b"one\n"
            own_nats.stop()
            with pytest.raises(SelfhostedControlError) as down:
                await s.exec(["true"])
            assert down.value.agent_offline or down.value.reason == "agent_reconnecting"
            own_nats.start()
            took = await wait_until_answers(rpc, agent, timeout=15)
            assert took < 15
            assert (await s.exec(["echo", "two"])).stdout == b"two\n"
            await s.write_file("after.txt", b"restart")
            assert (agent.root / "after.txt").read_bytes() == b"restart"
    finally:
        await rpc.close()


async def test_rpc_to_nobody_and_to_no_server_are_offline_responses(nats_url: str, rpc: NatsControlRpc) -> None:
    probe = await probe_agent(rpc, "ws-none", "agent-none", timeout=2)
    assert not probe.responded and probe.error is not None
    assert probe.error.agent_offline and probe.error.never_sent and probe.latency_ms < 1000
    # Building a client never dials; a dead server is an AGENT_OFFLINE answer, not an exception.
    dead = NatsControlRpc(
        f"nats://127.0.0.1:{free_port()}", signing_key=ControlSigningKey.generate(), connect_timeout=0.5
    )
    try:
        probe = await probe_agent(dead, "ws", "agent", timeout=1)
        assert not probe.responded and probe.error is not None and probe.error.never_sent
    finally:
        await dead.close()


async def test_provider_binds_without_creating_and_never_reports_not_found(
    nats_url: str, rpc: NatsControlRpc, tmp_path: Path
) -> None:
    provider = SelfhostedProvider(rpc, timeout=5, probe_timeout=1, retry=FAST_RETRY)
    async with running_agent(nats_url, tmp_path) as agent:
        spec = BoxSpec(
            lease_id=f"lease/{agent.workspace_id}/g1", workspace_id=agent.workspace_id, group_id="g1", epoch=2
        )
        provider.default_agent_id = agent.agent_id
        session = await provider.create(spec, "key-1")
        envelope = session.serialize_state()
        assert envelope.state == {"agentId": agent.agent_id}
        assert envelope.instance_id == f"{agent.workspace_id}/{agent.agent_id}@2"
        resumed = await provider.resume(envelope)
        assert (await resumed.exec(["echo", "hi"])).stdout == b"hi\n"
        await provider.terminate(envelope)
        assert await provider.list_owned() == []
        assert (await resumed.exec(["true"])).exit_code == 0  # terminate never touches the machine
    # The agent is gone: create refuses with a retryable AgentOffline; resume still binds (no I/O).
    with pytest.raises(AgentOffline) as offline:
        await provider.create(spec, "key-2")
    assert offline.value.retryable and offline.value.reason == "agent_offline"
    resumed = await provider.resume(envelope)
    with pytest.raises(SelfhostedControlError) as err:
        await resumed.exec(["true"])
    assert err.value.agent_offline and not isinstance(err.value, BoxNotFound)
    with pytest.raises(InvalidRequest):
        await provider.resume(
            Envelope(backend_id="selfhosted", instance_id=envelope.instance_id, state={"agentId": "other"})
        )


async def test_sigterm_stops_an_agent_that_cannot_reach_nats(agent_process: Callable[..., Agent]) -> None:
    """A daemon still dialling an absent server (it retries for ever) exits promptly when told to."""
    agent = agent_process(f"nats://127.0.0.1:{free_port()}")
    assert agent.process is not None
    await asyncio.sleep(2.5)  # let it go through a few dials and back-offs
    assert agent.process.poll() is None
    started = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(agent.process.wait, 15)
    assert code == 0 and time.monotonic() - started < 3
