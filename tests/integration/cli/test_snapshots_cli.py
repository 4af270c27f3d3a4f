"""``sandboxctl snapshot list|gc`` and ``sandboxctl orphans`` against a real worker, store and Temporal dev server.

The CLI runs in a thread (it calls ``asyncio.run`` itself) so the test loop keeps serving the worker.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import _register, app
from providers.local import LocalProvider
from sandbox.box import BoxSpec
from store.artifacts import FilesystemArtifactStore, artifact_root
from store.snapshots import SnapshotLedger
from tests.integration.snapshots.test_gc_workflow import publish_archives

_register()


@pytest.fixture
def cli_env(runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = runtime.settings
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", runtime.client.service_client.config.target_host)
    monkeypatch.setenv("SANDBOX_TASK_QUEUE", s.task_queue)


async def sandboxctl(*args: str) -> Any:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)


async def test_snapshot_list_and_gc(runtime: Any, cli_env: None) -> None:
    ledger = SnapshotLedger(runtime.db)
    artifacts = FilesystemArtifactStore(artifact_root(runtime.settings))
    ws = f"cli-{secrets.token_hex(4)}"
    records = await publish_archives(ledger, artifacts, ws, "g1", 3)

    res = await sandboxctl("snapshot", "list", ws, "g1", "--json")
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)
    assert [(r["snapshot_id"], r["state"]) for r in listed] == [
        (records[2].snapshot_id, "current"),
        (records[1].snapshot_id, "previous"),
        (records[0].snapshot_id, "delete_pending"),
    ]
    res = await sandboxctl("snapshot", "list", ws, "g1")
    assert res.exit_code == 0 and records[2].snapshot_id in res.stdout and "current" in res.stdout

    res = await sandboxctl("snapshot", "gc", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["states"]["delete_pending"] >= 1

    res = await sandboxctl("snapshot", "gc", "--now", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["deleted"] >= 1
    res = await sandboxctl("snapshot", "list", ws, "g1", "--json")
    assert [r["state"] for r in json.loads(res.stdout)] == ["current", "previous"], "deleted ones are hidden"
    res = await sandboxctl("snapshot", "list", ws, "g1", "--all", "--json")
    assert [r["state"] for r in json.loads(res.stdout)] == ["current", "previous", "deleted"]
    assert not await artifacts.exists(records[0].key)

    res = await sandboxctl("snapshot", "list", "no-such-ws", "g1")
    assert res.exit_code == 0 and "no archives" in res.stdout


async def test_orphans_lists_then_sweeps(runtime: Any, cli_env: None) -> None:
    boxes = LocalProvider(runtime.settings.boxes_dir(), bubblewrap="never")
    ws = f"cli-orphan-{secrets.token_hex(3)}"
    try:
        ghost = await boxes.create(
            BoxSpec(lease_id=f"lease/{ws}/g", workspace_id=ws, group_id="g", epoch=0), f"ghost-{uuid.uuid4()}"
        )
        res = await sandboxctl("orphans", "--grace", "3600", "--json")
        assert res.exit_code == 0, res.output
        assert ghost.instance_id not in {o["instance_id"] for o in json.loads(res.stdout)["orphans"]}

        res = await sandboxctl("orphans", "--grace", "0", "--json")
        assert res.exit_code == 0, res.output
        found = {o["instance_id"]: o for o in json.loads(res.stdout)["orphans"]}
        assert found[ghost.instance_id]["lease_id"] == f"lease/{ws}/g"
        res = await sandboxctl("orphans", "--grace", "0")
        assert res.exit_code == 0 and ghost.instance_id in res.stdout
        assert ghost.path.is_dir(), "listing terminates nothing"

        res = await sandboxctl("orphans", "--sweep", "--grace", "0", "--recheck-delay", "0", "--json")
        assert res.exit_code == 0, res.output
        assert ghost.instance_id in json.loads(res.stdout)["terminated"]
        assert not ghost.path.exists()
    finally:
        await boxes.aclose()


async def test_unreachable_temporal_is_a_clear_error(
    runtime: Any, cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    res = await sandboxctl("snapshot", "gc", "--now")
    assert res.exit_code == 3
    assert "cannot reach Temporal" in res.stderr
