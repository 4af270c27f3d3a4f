"""``sandboxctl fs|git|pty`` end to end: real Temporal, the lease worker, a local box, real NATS.

The CLI runs in a worker thread (its own event loop, as from a terminal) while the lease worker
keeps running on the test's loop; a subprocess would spend most of the test budget importing.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli import main as cli_main
from cli.exits import EXIT_REFUSED
from sandbox.nats_flush import flush_in_order
from tests.conftest import FAST_TIMERS, give_to_box_user, nats_identity_env, nats_server_at
from tests.integration.channel_a.conftest import git


@pytest.fixture
def cli_env(runtime: Any, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    identities = nats_identity_env()
    for name in [k for k in os.environ if k.startswith("SANDBOX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(runtime.settings.data_dir))
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", runtime.client.service_client.config.target_host)
    monkeypatch.setenv("SANDBOX_TASK_QUEUE", runtime.settings.task_queue)
    monkeypatch.setenv("SANDBOX_NATS_URL", nats_url)
    for name, value in identities.items():
        monkeypatch.setenv(name, value)
    for name, value in FAST_TIMERS.items():
        monkeypatch.setenv(f"SANDBOX_{name.upper()}", str(value))
    # Long enough for the box to stay warm between the commands of one test (drained at the end).
    monkeypatch.setenv("SANDBOX_IDLE_GRACE_SECONDS", "60")
    if not cli_main.app.registered_groups:
        cli_main._register()


async def sandboxctl(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    def invoke() -> Any:
        return CliRunner().invoke(cli_main.app, list(args), input=stdin, catch_exceptions=False)

    result = await asyncio.to_thread(invoke)
    return result.exit_code, result.stdout, result.stderr


async def sandboxctl_pty(workspace: str, group: str, *, stdin: bytes) -> tuple[int, bytes]:
    """``sandboxctl pty`` with a real pipe as standard input (it relays a file descriptor)."""
    from cli.channel_a import pty_command

    read_fd, write_fd = os.pipe()
    os.write(write_fd, stdin)
    os.close(write_fd)
    out = io.BytesIO()

    def run() -> int:
        saved = sys.stdin, sys.stdout
        sys.stdin = os.fdopen(read_fd, "rb", buffering=0)
        wrapper = io.TextIOWrapper(out, write_through=True)
        sys.stdout = wrapper
        try:
            pty_command(workspace, group, cwd="", shell=None, data_dir=None)
        except typer.Exit as exit_:
            return int(exit_.exit_code)
        finally:
            sys.stdin.close()
            sys.stdin, sys.stdout = saved
            wrapper.detach()  # keep `out` open for the caller
        return 0

    code = await asyncio.to_thread(run)
    return code, out.getvalue()


async def test_fs_git_and_pty_commands_attach_as_direct_and_release(runtime: Any, nats_url: str, cli_env: None) -> None:
    ws, group = f"ws-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:6]}"
    nc = await nats_server_at(nats_url).connect("events")
    events: list[dict[str, Any]] = []

    async def on_event(msg: Any) -> None:
        events.append(json.loads(msg.data))

    await nc.subscribe(f"session.{ws}.{group}.events", cb=on_event)
    await flush_in_order(nc)
    try:
        code, out, err = await sandboxctl("fs", "put", ws, group, "notes/hello.txt", stdin=b"hello\n")
        assert code == 0, err
        assert "wrote 6 bytes to notes/hello.txt" in out

        view = await runtime.leases().describe(ws, group)
        # The direct holder was released: no holders, the box idles in its grace period.
        assert view.holders == [] and view.liveness == "draining", view.transitions
        workspace = runtime.settings.boxes_dir() / view.instance_id / "data" / "workspace"
        assert (workspace / "notes/hello.txt").read_text() == "hello\n"
        repo = workspace / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        (repo / "a.txt").write_text("a\n")
        give_to_box_user(repo)

        code, out, err = await sandboxctl("fs", "ls", ws, group, "--depth", "2", "--json")
        assert code == 0, err
        listing = json.loads(out)
        assert {c["path"] for c in listing["root"]["children"]} == {"notes", "repo"}
        assert listing["root"]["children"][0]["children"][0]["path"] == "notes/hello.txt"

        code, out, err = await sandboxctl("git", "status", ws, group, "repo", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert (status["isRepo"], status["head"], status["headOid"]) == (True, "main", None)
        assert status["files"] == [
            {"path": "a.txt", "oldPath": None, "index": None, "worktree": "untracked", "isConflicted": False}
        ]

        code, out, err = await sandboxctl("fs", "mv", ws, group, "notes/hello.txt", "repo/hello.txt")
        assert code == 0, err
        code, out, err = await sandboxctl("fs", "cat", ws, group, "repo/hello.txt")
        assert (code, out) == (0, "hello\n"), err
        code, out, err = await sandboxctl("git", "diff", ws, group, "repo", "--untracked")
        assert code == 0, err
        assert "--- untracked a.txt (+1 -0)\n@@ -0,0 +1,1 @@\n+a\n" in out
        code, out, err = await sandboxctl("git", "log", ws, group, "repo", "--json")
        assert (code, json.loads(out)) == (0, {"commits": [], "hasMore": False}), err
        code, out, err = await sandboxctl("fs", "rm", ws, group, "-r", "notes", "repo/hello.txt")
        assert code == 0 and "deleted 2 path(s)" in out, err
        assert not (workspace / "notes").exists() and not (workspace / "repo/hello.txt").exists()

        code, out, err = await sandboxctl("fs", "cat", ws, group, "../etc/passwd")
        assert code == EXIT_REFUSED and "ChannelAValidationError" in err and "path traversal" in err
        assert out == ""

        code, output = await sandboxctl_pty(ws, group, stdin=b"echo $((6*7))\nexit 3\n")
        assert code == 3
        assert b"42\r\n" in output

        view = await runtime.leases().describe(ws, group)
        assert view.holders == [] and view.epoch == 1
        for _ in range(50):
            if any(e["type"] == "terminal.pty.exited" for e in events):
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.drain()
        await runtime.leases().drain(ws, group, wait=True)
    written = [e for e in events if e["type"] == "fs.changed"]
    # Each command is a new service instance on the same box: the revision restarts per attach.
    assert [[c["path"] for c in e["payload"]["changes"]] for e in written] == [
        ["notes/hello.txt"],
        ["notes/hello.txt", "repo/hello.txt"],
        ["notes"],
        ["repo/hello.txt"],
    ]
    assert [e["revision"] for e in written] == [1, 1, 1, 2]
    assert all(e["leaseEpoch"] == 1 for e in written)
    assert {"terminal.pty.started", "terminal.pty.output.delta", "terminal.pty.exited"} <= {e["type"] for e in events}


def test_commands_are_registered() -> None:
    if not cli_main.app.registered_groups:
        cli_main._register()
    result = CliRunner().invoke(cli_main.app, ["fs", "--help"])
    assert result.exit_code == 0 and all(cmd in result.stdout for cmd in ("ls", "cat", "put", "rm", "mv", "mkdir"))
    result = CliRunner().invoke(cli_main.app, ["git", "--help"])
    assert all(cmd in result.stdout for cmd in ("status", "diff", "log", "show"))
    assert CliRunner().invoke(cli_main.app, ["pty", "--help"]).exit_code == 0
    assert Path(cli_main.__file__).name == "main.py"


async def test_fs_cat_cut_by_the_default_limit_exits_4_and_by_max_bytes_exits_0(runtime: Any, cli_env: None) -> None:
    from cli.exits import EXIT_TRUNCATED
    from sandbox.channel_a.models import FS_READ_DEFAULT_BYTES

    ws, group = f"ws-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:6]}"
    try:
        big = b"x" * (FS_READ_DEFAULT_BYTES + 3)
        code, out, err = await sandboxctl("fs", "put", ws, group, "big.txt", stdin=big)
        assert code == 0, err

        # Not the whole file, and the user did not ask for less: the exit code says so.
        code, out, err = await sandboxctl("fs", "cat", ws, group, "big.txt")
        assert code == EXIT_TRUNCATED != 0
        assert len(out) == FS_READ_DEFAULT_BYTES
        assert f"printed the first {FS_READ_DEFAULT_BYTES} of {len(big)} bytes" in err and "--max-bytes" in err
        code, out, err = await sandboxctl("fs", "cat", ws, group, "big.txt", "--json")
        assert code == EXIT_TRUNCATED and json.loads(out)["truncated"] is True

        # A prefix asked for is what the user wanted.
        code, out, err = await sandboxctl("fs", "cat", ws, group, "big.txt", "--max-bytes", "10")
        assert (code, out) == (0, "x" * 10), err
        assert "printed the first 10 of" in err

        # Positive control: a file within the default limit prints whole and exits 0.
        code, out, err = await sandboxctl("fs", "put", ws, group, "small.txt", stdin=b"small\n")
        code, out, err = await sandboxctl("fs", "cat", ws, group, "small.txt")
        assert (code, out, err) == (0, "small\n", "")
    finally:
        await runtime.leases().drain(ws, group, wait=True)
