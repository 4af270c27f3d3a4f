"""Fixtures for selfhosted tests against a real nats-server: in-process agents and agent processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemons.agent import AgentConfig, AgentDaemon
from providers.selfhosted import NatsControlRpc, RelayConfig, RetryPolicy, SelfhostedSession, probe_agent
from sandbox.control_auth import AgentCredential
from tests.conftest import REPO, AuthenticatedNats, agent_credential, nats_server_at

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Agent:
    """An agent under test: its ids, root and state dir."""

    workspace_id: str
    agent_id: str
    root: Path
    state_dir: Path
    daemon: AgentDaemon | None = None
    process: subprocess.Popen[bytes] | None = None
    credential: AgentCredential | None = None


@pytest.fixture
async def rpc(nats_url: str) -> AsyncIterator[NatsControlRpc]:
    client: NatsControlRpc = nats_server_at(nats_url).control_rpc()
    yield client
    await client.close()


def session_for(rpc: NatsControlRpc, agent: Agent, epoch: int = 1, **kwargs: Any) -> SelfhostedSession:
    return SelfhostedSession(
        rpc,
        workspace_id=agent.workspace_id,
        agent_id=agent.agent_id,
        epoch=epoch,
        relay=RelayConfig.from_url("wss://relay.example.test"),
        retry=kwargs.pop("retry", FAST_RETRY),
        **kwargs,
    )


@asynccontextmanager
async def running_agent(
    nats_url: str, tmp_path: Path, *, agent: Agent | None = None, **config: Any
) -> AsyncIterator[Agent]:
    """An in-process daemon serving a fresh root until the block ends (then drained)."""
    if agent is None:
        root = tmp_path / new_id("root")
        root.mkdir()
        agent = Agent(new_id("ws"), new_id("agent"), root, tmp_path / new_id("state"))
    if agent.credential is None:
        agent.credential = agent_credential(nats_url, agent.workspace_id, agent.agent_id)
    daemon = AgentDaemon(
        AgentConfig(
            workspace_id=agent.workspace_id,
            agent_id=agent.agent_id,
            root=agent.root,
            credential=agent.credential,
            nats_url=nats_url,
            state_dir=agent.state_dir,
            **config,
        )
    )
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 10)
    agent.daemon = daemon
    try:
        yield agent
    finally:
        await daemon.drain()
        await asyncio.wait_for(task, 10)
        agent.daemon = None


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start ``sandboxctl agent run`` as a real process (stopped at teardown)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(nats_url: str, agent: Agent | None = None, *extra: str) -> Agent:
        if agent is None:
            root = tmp_path / new_id("root")
            root.mkdir()
            agent = Agent(new_id("ws"), new_id("agent"), root, tmp_path / new_id("state"))
        if agent.credential is None:
            agent.credential = agent_credential(nats_url, agent.workspace_id, agent.agent_id)
        credential_file = tmp_path / f"{agent.agent_id}.credential"
        agent.credential.write(credential_file)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "agent",
                "run",
                "--credential",
                str(credential_file),
                "--workspace",
                agent.workspace_id,
                "--agent-id",
                agent.agent_id,
                "--root",
                str(agent.root),
                "--nats",
                nats_url,
                "--state-dir",
                str(agent.state_dir),
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        started.append(proc)
        agent.process = proc
        return agent

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


async def wait_until_answers(rpc: NatsControlRpc, agent: Agent, timeout: float = 15.0) -> float:
    """Poll until the agent answers a ping; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        probe = await probe_agent(rpc, agent.workspace_id, agent.agent_id, timeout=0.5)
        if probe.responded:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent {agent.agent_id} did not answer within {timeout}s")


NatsServer = AuthenticatedNats
"""A nats-server of the test's own on a fixed port, so it can be stopped and started again."""


@pytest.fixture
def own_nats(nats_identities: Path) -> Iterator[AuthenticatedNats]:
    server = AuthenticatedNats(nats_identities)
    server.start()
    try:
        yield server
    finally:
        server.stop()
