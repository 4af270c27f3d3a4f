"""Routing between two real agents through the store's session pointer, and the machine/session CLI."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.exits import EXIT_FENCED, EXIT_NOT_FOUND, EXIT_REFUSED
from cli.main import _register, app
from providers.selfhosted import NatsControlRpc, SelfhostedProvider
from sandbox.errors import MutationOutcomeUnknown, RouteUnresolvable
from sandbox.routing import RoutingSession, make_backend_resolver
from store.database import Database
from store.machines import EnrollmentRepository, SessionPointerRepository
from tests.integration.selfhosted.conftest import FAST_RETRY, Agent, new_id, running_agent

_register()


async def sandboxctl(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), catch_exceptions=False)


@pytest.fixture
async def db(tmp_path: Path) -> Any:
    database = Database.from_url(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await database.migrate()
    yield database
    await database.dispose()


async def test_swap_mid_sequence_moves_reads_and_never_replays_a_racing_write(
    nats_url: str, rpc: NatsControlRpc, tmp_path: Path, db: Database
) -> None:
    ws = new_id("ws")
    agents = []
    for name in ("a", "b"):
        root = tmp_path / f"root-{name}"
        root.mkdir()
        (root / "who.txt").write_text(name)
        agents.append(Agent(ws, new_id(name), root, tmp_path / f"state-{name}"))
    a, b = agents
    enrollments, pointers = EnrollmentRepository(db), SessionPointerRepository(db)
    for agent in agents:
        await enrollments.enroll(ws, agent.agent_id)

    async def enrolled(agent_id: str) -> bool:
        record = await enrollments.get(ws, agent_id)
        return record is not None and record.status == "active"

    provider = SelfhostedProvider(rpc, timeout=10, retry=FAST_RETRY)
    resolve = make_backend_resolver(workspace_id=ws, selfhosted=provider, is_enrolled=enrolled)
    session = RoutingSession(lambda: pointers.get("s1"), resolve, session_id="s1")

    async with running_agent(nats_url, tmp_path, agent=a), running_agent(nats_url, tmp_path, agent=b):
        await pointers.swap("s1", f"selfhosted:{a.agent_id}", expected_epoch=0)
        assert await session.read_file("who.txt") == b"a"
        assert (await session.exec(["cat", "who.txt"])).stdout == b"a"

        await pointers.swap("s1", f"selfhosted:{b.agent_id}", expected_epoch=1)
        assert await session.read_file("who.txt") == b"b"
        assert [e.name for e in await session.list_dir("")] == ["who.txt"]

        # A write racing a swap: it completes on the old target once, and is reported unknown.
        data = os.urandom(4 * 1024 * 1024)
        write = asyncio.create_task(session.write_file("payload.bin", data))
        while not any(p.name.startswith(".sandbox-upload-") for p in b.root.iterdir()):
            assert not write.done(), "the write finished before the swap could race it"
            await asyncio.sleep(0.002)
        await pointers.swap("s1", f"selfhosted:{a.agent_id}", expected_epoch=2)
        with pytest.raises(MutationOutcomeUnknown):
            await write
        assert (b.root / "payload.bin").read_bytes() == data
        assert not (a.root / "payload.bin").exists()
        assert await session.read_file("who.txt") == b"a"

        # A revoked machine is no longer a route once the route is resolved again (a new epoch).
        await enrollments.revoke(ws, a.agent_id)
        await pointers.swap("s1", f"selfhosted:{a.agent_id}", expected_epoch=3)
        with pytest.raises(RouteUnresolvable) as err:
            await session.path_exists("who.txt")
        assert err.value.code == "offline_enrollment"


async def test_machine_and_session_commands(nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(data_dir))
    monkeypatch.setenv("SANDBOX_NATS_URL", nats_url)
    monkeypatch.setenv("SANDBOX_SELFHOSTED_PROBE_TIMEOUT_SECONDS", "1")
    ws = new_id("ws")
    root = tmp_path / "root"
    root.mkdir()
    online = Agent(ws, new_id("on"), root, tmp_path / "state")

    res = await sandboxctl("machine", "enroll", ws, online.agent_id, "--exposure", "whole-machine", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "active"
    offline_id = new_id("off")
    assert (await sandboxctl("machine", "enroll", ws, offline_id)).exit_code == 0
    bad = await sandboxctl("machine", "enroll", ws, "bad.id")
    assert bad.exit_code == EXIT_REFUSED and "agent id" in bad.stderr
    bad = await sandboxctl("machine", "enroll", ws, "x", "--exposure", "galaxy")
    assert bad.exit_code != 0

    async with running_agent(nats_url, tmp_path, agent=online):
        res = await sandboxctl("machine", "list", ws, "--json")
        assert res.exit_code == 0, res.output
        rows = {row["agent"]: row for row in json.loads(res.stdout)}
        assert rows[online.agent_id]["liveness"] == "online"
        assert rows[online.agent_id]["hostname"]
        assert rows[offline_id]["liveness"] == "offline"

    # Seen a moment ago, not answering now: reconnecting.
    res = await sandboxctl("machine", "list", ws, "--json")
    rows = {row["agent"]: row for row in json.loads(res.stdout)}
    assert rows[online.agent_id]["liveness"] == "reconnecting"

    res = await sandboxctl("machine", "revoke", ws, online.agent_id)
    assert res.exit_code == 0
    rows = {row["agent"]: row for row in json.loads((await sandboxctl("machine", "list", ws, "--json")).stdout)}
    assert (rows[online.agent_id]["status"], rows[online.agent_id]["liveness"]) == ("revoked", "offline")
    assert (await sandboxctl("machine", "revoke", ws, "nobody")).exit_code == EXIT_NOT_FOUND

    res = await sandboxctl("session", "swap", "sess-1", "--to", f"selfhosted:{online.agent_id}", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["active_epoch"] == 1
    stale = await sandboxctl("session", "swap", "sess-1", "--to", "lease:g2", "--expected-epoch", "0")
    assert stale.exit_code == EXIT_FENCED and "StaleEpoch" in stale.stderr
    res = await sandboxctl("session", "swap", "sess-1", "--to", "home", "--json")
    assert json.loads(res.stdout) == {
        "session": "sess-1",
        "active_sandbox_id": None,
        "active_epoch": 2,
        "working_dir": None,
    }
    assert (await sandboxctl("session", "swap", "sess-1", "--to", "nowhere")).exit_code != 0
    shown = json.loads((await sandboxctl("session", "show", "sess-1", "--json")).stdout)
    assert shown["active_epoch"] == 2
