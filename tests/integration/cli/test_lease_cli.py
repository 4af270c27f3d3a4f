"""``sandboxctl lease ...`` and ``sandboxctl exec`` against a real worker and Temporal dev server.

The CLI runs in a thread (it calls ``asyncio.run`` itself) so the test loop keeps serving the worker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.exits import EXIT_FENCED, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from cli.main import _register, app
from tests.conftest import eventually

_register()


@pytest.fixture
def cli_env(runtime: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    s = runtime.settings
    env = {
        "SANDBOX_DATA_DIR": str(s.data_dir),
        "SANDBOX_TEMPORAL_ADDRESS": runtime.client.service_client.config.target_host,
        "SANDBOX_TASK_QUEUE": s.task_queue,
        "SANDBOX_IDLE_GRACE_SECONDS": "0.3",
        "SANDBOX_HOLDER_TTL_SECONDS": "30",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


async def sandboxctl(*args: str) -> Any:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)


async def test_acquire_exec_describe_list_drain_json(runtime: Any, cli_env: dict[str, str]) -> None:
    ws, g = f"cli-{uuid.uuid4().hex[:6]}", "g1"
    res = await sandboxctl("lease", "acquire", ws, g, "--holder", "h1", "--json")
    assert res.exit_code == 0, res.output
    grant = json.loads(res.stdout)
    assert {"epoch", "role", "liveness", "instance_id", "backend_id"} <= grant.keys()
    assert (grant["epoch"], grant["role"], grant["liveness"], grant["backend_id"]) == (
        1,
        "spawner",
        "warm",
        "unix_local",
    )

    res = await sandboxctl("exec", ws, g, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert res.exit_code == 7
    assert res.stdout == "out\n"
    assert "err" in res.stderr

    res = await sandboxctl("lease", "describe", ws, g, "--json")
    assert res.exit_code == 0, res.output
    view = json.loads(res.stdout)
    for key in ("workspace_id", "group_id", "backend", "liveness", "epoch", "instance_id", "holders"):
        assert key in view
    assert view["holders"][0]["kind"] == "turn" and view["holders"][0]["holder_id"] == "h1"
    assert "last_heartbeat_at" in view["holders"][0]

    res = await sandboxctl("lease", "heartbeat", ws, g, "--holder", "h1", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["alive"] is True

    async def listed_warm() -> bool:
        res = await sandboxctl("lease", "list", "--liveness", "warm", "--json")
        return any(r["workspace_id"] == ws for r in json.loads(res.stdout))

    for _ in range(100):
        if await listed_warm():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("lease never listed as warm")

    res = await sandboxctl("lease", "drain", ws, g, "--wait", "--json")
    assert res.exit_code == 0, res.output
    drained = json.loads(res.stdout)
    assert (drained["liveness"], drained["epoch"]) == ("cold", 2)


async def test_refusals_are_clear_and_nonzero(runtime: Any, cli_env: dict[str, str]) -> None:
    ws, g = f"cli-{uuid.uuid4().hex[:6]}", "g1"
    res = await sandboxctl("lease", "acquire", ws, g, "--backend", "nope")
    assert res.exit_code == EXIT_REFUSED
    assert "unknown sandbox backend 'nope'" in res.stderr

    res = await sandboxctl("lease", "describe", ws, g)
    assert res.exit_code == EXIT_NOT_FOUND and "acquire it first" in res.stderr

    res = await sandboxctl("lease", "acquire", ws, g, "--holder", "h1", "--json")
    epoch = json.loads(res.stdout)["epoch"]
    res = await sandboxctl("lease", "heartbeat", ws, g, "--holder", "h1", "--epoch", str(epoch + 3))
    assert res.exit_code == EXIT_FENCED and "StaleEpoch" in res.stderr
    res = await sandboxctl("lease", "release", ws, g, "--holder", "ghost")
    assert res.exit_code == EXIT_NOT_FOUND and "HolderNotFound" in res.stderr
    res = await sandboxctl("exec", ws, g)
    assert res.exit_code == EXIT_USAGE == 2 and "no command given" in res.stderr

    res = await sandboxctl("lease", "release", ws, g, "--holder", "h1")
    assert res.exit_code == 0, res.output
    res = await sandboxctl("lease", "drain", ws, g, "--wait")
    assert res.exit_code == 0
    res = await sandboxctl("exec", ws, g, "--", "true")
    assert res.exit_code == EXIT_REFUSED and "LeaseNotWarm" in res.stderr and "sandboxctl lease acquire" in res.stderr


async def test_unreachable_temporal_says_what_to_do(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    res = await sandboxctl("lease", "describe", "ws", "g")
    assert res.exit_code == EXIT_UNREACHABLE == 3
    assert "sandboxctl up" in res.stderr


async def describe_json(ws: str, g: str) -> dict[str, Any]:
    res = await sandboxctl("lease", "describe", ws, g, "--json")
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


async def test_hold_keeps_an_idle_box_and_unhold_lets_it_go(runtime: Any, cli_env: dict[str, str]) -> None:
    ws, g = f"cli-{uuid.uuid4().hex[:6]}", "g1"
    assert (await sandboxctl("lease", "acquire", ws, g, "--holder", "h1")).exit_code == 0
    res = await sandboxctl("lease", "hold", ws, g, "--minutes", "10", "--reason", "debugging", "--json")
    assert res.exit_code == 0, res.output
    held = json.loads(res.stdout)
    assert held["reason"] == "debugging" and held["held_until"]

    async def hold_seen() -> dict[str, Any] | None:
        view = await describe_json(ws, g)
        return view if view["hold_until"] and view["hold_reason"] == "debugging" else None

    await eventually(hold_seen)
    assert (await sandboxctl("lease", "release", ws, g, "--holder", "h1")).exit_code == 0
    # The idle grace is 0.3 s here: held, the box outlives it many times over.
    await asyncio.sleep(1.5)
    assert (await describe_json(ws, g))["liveness"] != "cold"

    res = await sandboxctl("lease", "unhold", ws, g, "--json")
    assert res.exit_code == 0, res.output and json.loads(res.stdout)["held_until"] is None

    async def cold() -> bool:
        return (await describe_json(ws, g))["liveness"] == "cold"

    await eventually(cold)
    res = await sandboxctl("lease", "stop", ws, g, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["stop"] == "requested"
    res = await sandboxctl("lease", "hold", "nobody-" + ws, g)
    assert res.exit_code == EXIT_NOT_FOUND, res.output


async def test_exec_in_the_idle_grace_rearms_it_like_fs(
    runtime: Any, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    monkeypatch.setenv("SANDBOX_IDLE_GRACE_SECONDS", "2")
    ws, g = f"cli-{uuid.uuid4().hex[:6]}", "g1"
    assert (await sandboxctl("lease", "acquire", ws, g, "--holder", "h1")).exit_code == 0
    assert (await sandboxctl("lease", "release", ws, g, "--holder", "h1")).exit_code == 0

    async def in_grace() -> bool:
        return (await describe_json(ws, g))["liveness"] == "draining"

    await eventually(in_grace)
    res = await sandboxctl("exec", ws, g, "--", "sh", "-c", "sleep 2.5; echo done")
    assert res.exit_code == 0 and res.stdout == "done\n", res.output
    finished = datetime.now(UTC)
    view = await describe_json(ws, g)
    # Without the re-arm the grace ran out during the command and the box is torn down now.
    assert view["liveness"] in ("warm", "draining"), view["liveness"]
    if view["liveness"] == "draining":
        assert datetime.fromisoformat(view["drain_deadline"]) > finished
