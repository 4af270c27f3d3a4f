"""PTYs on a selfhosted machine over a real nats-server: the agent killed, the binding fenced, SIGTERM.

The happy paths (echo, resize, job control, exit, close, cwd checks) run for every provider in
``tests/integration/channel_a/test_terminal_pty.py``; these are the ways a remote PTY ends badly.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from providers.selfhosted import NatsControlRpc
from sandbox.channel_a import ChannelA, MemoryEventSink
from sandbox.errors import ChannelAConflict
from tests.conftest import process_alive, wait_until_gone
from tests.integration.selfhosted.conftest import Agent, running_agent, session_for, wait_until_answers


async def shell_pid(ca: ChannelA, pty_id: str) -> int:
    await ca.pty_write(pty_id, "echo P''ID=$$\n", yield_ms=0)
    out = (await ca.pty_read_until(pty_id, b"\r\n", timeout=5)).decode()
    while "PID=" not in out:
        out += (await ca.pty_read_until(pty_id, b"\r\n", timeout=5)).decode()
    return int(out.split("PID=", 1)[1].split()[0])


async def test_a_killed_agent_loses_the_pty_and_takes_the_shell_with_it(
    nats_url: str, rpc: NatsControlRpc, agent_process: Callable[..., Agent]
) -> None:
    agent = agent_process(nats_url)
    await wait_until_answers(rpc, agent)
    sink = MemoryEventSink()
    ca = ChannelA(session_for(rpc, agent, timeout=3.0), events=sink)
    opened = await ca.pty_open()
    pid = await shell_pid(ca, opened.pty_id)
    assert agent.process is not None and process_alive(pid)
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(timeout=10)
    exited = await sink.wait_for(lambda e: e.type == "terminal.pty.exited", timeout=15)
    assert (exited.payload["exitCode"], exited.payload["reason"]) == (None, "lost")
    assert ca.pty_exited(opened.pty_id)
    # The master end died with the agent: the shell got its hang-up instead of lingering.
    await wait_until_gone(pid)
    assert not process_alive(pid)
    assert (await ca.pty_close(opened.pty_id)).reason == "lost"


async def test_a_newer_binding_fences_the_old_pty(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    async with running_agent(nats_url, tmp_path) as agent:
        sink = MemoryEventSink()
        ca = ChannelA(session_for(rpc, agent, epoch=1), events=sink)
        opened = await ca.pty_open()
        pid = await shell_pid(ca, opened.pty_id)
        # The lease moved on: a session of epoch 2 talks to the machine.
        newer = session_for(rpc, agent, epoch=2)
        assert (await newer.exec(["true"])).exit_code == 0
        exited = await sink.wait_for(lambda e: e.type == "terminal.pty.exited", timeout=15)
        # "killed" when an output poll saw the agent close it, "lost" when the next poll was fenced.
        assert exited.payload["reason"] in ("killed", "lost")
        await wait_until_gone(pid)  # the old binding's shell does not linger
        assert not process_alive(pid)
        with pytest.raises(ChannelAConflict, match="session lost"):
            await ca.pty_write(opened.pty_id, "echo stale\n", yield_ms=0)
        await ca.pty_close(opened.pty_id)
        # The newer binding can open its own.
        ca2 = ChannelA(newer, events=MemoryEventSink())
        fresh = await ca2.pty_open()
        await ca2.pty_write(fresh.pty_id, "echo fresh\n", yield_ms=0)
        assert b"fresh" in await ca2.pty_read_until(fresh.pty_id, b"fresh\r\n", timeout=5)
        await ca2.aclose()


async def test_draining_the_agent_ends_its_shells(nats_url: str, rpc: NatsControlRpc, tmp_path: Path) -> None:
    sink = MemoryEventSink()
    async with running_agent(nats_url, tmp_path) as agent:
        ca = ChannelA(session_for(rpc, agent), events=sink)
        opened = await ca.pty_open()
        pid = await shell_pid(ca, opened.pty_id)
    exited = await sink.wait_for(lambda e: e.type == "terminal.pty.exited", timeout=15)
    # "killed" when an output poll was waiting at the agent as it closed the PTY, else "lost" (the
    # next poll found the agent draining, then gone): either way the end is reported, once.
    assert exited.payload["ptyId"] == opened.pty_id and exited.payload["reason"] in ("killed", "lost")
    assert not process_alive(pid)
    await ca.aclose()
    assert len(sink.of_type("terminal.pty.exited")) == 1
