"""The agent's command spawner, every way (posix_spawn, Popen, asyncio): results, pipes, PATH lookup, no leaks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from daemons.agent import spawn
from daemons.agent.operations import AgentOperations, DisplayAccess
from daemons.agent.spawn import RunningCommand, pidfd_supported, start_command
from sandbox.control_protocol import ExecOp

WAYS = ["posix_spawn", "popen", "asyncio"]


@pytest.fixture(autouse=True)
def _working_directory(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # posix_spawn serves only commands started in the process's own directory (the daemon's root).
    callspec = getattr(request.node, "callspec", None)
    way = callspec.params.get("way") if callspec is not None else None
    monkeypatch.chdir(tmp_path if way == "posix_spawn" else "/")


async def run(
    argv: list[str],
    tmp_path: Path,
    way: str,
    *,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    expect: str | None = None,
) -> RunningCommand:
    command = await start_command(
        argv, cwd=str(tmp_path), env=env or {}, stdin=stdin, cap=1 << 20, use_pidfd=way != "asyncio"
    )
    assert command.way == (expect or way)
    try:
        assert await command.wait(10)
        await command.finish_output(1.0)
    finally:
        command.close()
    return command


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_pidfd_is_available_on_this_linux() -> None:
    # The fast path is what the benchmark measures; a Linux test machine must have it.
    assert pidfd_supported()


@pytest.mark.parametrize("way", WAYS)
async def test_output_exit_code_env_and_cwd(tmp_path: Path, way: str) -> None:
    command = await run(
        ["sh", "-c", 'echo "$GREETING"; pwd; echo oops >&2; exit 5'], tmp_path, way, env={"GREETING": "hi"}
    )
    assert command.returncode == 5
    assert bytes(command.stdout.data) == f"hi\n{tmp_path}\n".encode()
    assert bytes(command.stderr.data) == b"oops\n"


@pytest.mark.parametrize("way", WAYS)
async def test_the_base_environment_replaces_this_processs(tmp_path: Path, way: str) -> None:
    command = await start_command(
        ["sh", "-c", 'echo "$ONLY|$X|${HOME:-none}"'],
        cwd=str(tmp_path),
        env={"X": "op"},
        cap=100,
        base_env={b"PATH": b"/usr/bin:/bin", b"ONLY": b"base", b"X": b"base"},
        use_pidfd=way != "asyncio",
    )
    assert await command.wait(10)
    await command.finish_output(1.0)
    command.close()
    assert bytes(command.stdout.data) == b"base|op|none\n"


@pytest.mark.parametrize("way", WAYS)
async def test_stdin_larger_than_a_pipe_buffer_arrives_whole(tmp_path: Path, way: str) -> None:
    data = os.urandom(300_000)
    command = await run(["sha256sum"], tmp_path, way, stdin=data)
    import hashlib

    assert command.returncode == 0
    assert bytes(command.stdout.data).split()[0].decode() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("way", WAYS)
async def test_a_command_that_ignores_its_input_is_not_an_error(tmp_path: Path, way: str) -> None:
    command = await run(["true"], tmp_path, way, stdin=b"x" * 500_000)
    assert command.returncode == 0


@pytest.mark.parametrize("way", WAYS)
async def test_output_over_the_cap_is_counted_not_kept(tmp_path: Path, way: str) -> None:
    command = await start_command(
        ["head", "-c", "100000", "/dev/zero"], cwd=str(tmp_path), env={}, cap=1000, use_pidfd=way != "asyncio"
    )
    assert await command.wait(10)
    await command.finish_output(1.0)
    command.close()
    assert command.stdout.total == 100_000 and len(command.stdout.data) == 1000


@pytest.mark.parametrize("way", WAYS)
async def test_missing_and_unexecutable_commands_raise(tmp_path: Path, way: str) -> None:
    with pytest.raises(FileNotFoundError):
        await start_command(["no-such-command-xyz"], cwd=str(tmp_path), env={}, cap=10, use_pidfd=way != "asyncio")
    plain = tmp_path / "plain"
    plain.write_text("echo no\n")
    with pytest.raises(PermissionError):
        await start_command([str(plain)], cwd=str(tmp_path), env={}, cap=10, use_pidfd=way != "asyncio")


@pytest.mark.parametrize("way", WAYS)
async def test_a_deadline_leaves_it_running_for_the_caller_to_kill(tmp_path: Path, way: str) -> None:
    command = await start_command(["sleep", "30"], cwd=str(tmp_path), env={}, cap=10, use_pidfd=way != "asyncio")
    started = time.monotonic()
    assert not await command.wait(0.2)
    os.killpg(command.pid, signal.SIGKILL)  # its own session: pid == process group
    assert await command.wait(5)
    await command.finish_output(1.0)
    command.close()
    assert command.returncode == -signal.SIGKILL and time.monotonic() - started < 5


@pytest.mark.parametrize("way", WAYS)
async def test_a_background_child_holding_the_pipes_costs_only_the_grace(tmp_path: Path, way: str) -> None:
    command = await start_command(
        ["sh", "-c", "echo before; sleep 30 & exit 0"], cwd=str(tmp_path), env={}, cap=100, use_pidfd=way != "asyncio"
    )
    assert await command.wait(5)
    started = time.monotonic()
    await command.finish_output(0.2)
    command.close()
    os.killpg(command.pid, signal.SIGKILL)
    assert time.monotonic() - started < 2 and bytes(command.stdout.data) == b"before\n"


async def test_path_lookup_is_remembered_but_sees_commands_added_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spawn, "_WHICH_RECHECK_SECONDS", 0.0)  # look at the directories on every call
    zero, first, second = tmp_path / "z", tmp_path / "a", tmp_path / "b"
    for d in (zero, first, second):
        d.mkdir()
    path = f"{zero}:{first}:{second}:/usr/bin:/bin"

    async def tool() -> bytes:
        return bytes((await run(["tool-xyz"], tmp_path, "popen", env={"PATH": path})).stdout.data)

    _script(first / "tool-xyz", "echo first")
    assert await tool() == b"first\n"
    assert await tool() == b"first\n"
    _script(zero / "tool-xyz", "echo zero")  # now earlier in PATH
    assert await tool() == b"zero\n"
    (zero / "tool-xyz").unlink()
    (first / "tool-xyz").unlink()
    _script(second / "tool-xyz", "echo second")
    assert await tool() == b"second\n"


async def test_a_remembered_lookup_is_trusted_for_a_second_then_checked(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    _script(first / "tool-ttl", "echo first")
    path = f"{second}:{first}:/usr/bin:/bin"
    command = await run(["tool-ttl"], tmp_path, "popen", env={"PATH": path})
    assert bytes(command.stdout.data) == b"first\n"
    _script(second / "tool-ttl", "echo second")
    deadline = time.monotonic() + spawn._WHICH_RECHECK_SECONDS + 2
    while bytes((await run(["tool-ttl"], tmp_path, "popen", env={"PATH": path})).stdout.data) != b"second\n":
        assert time.monotonic() < deadline, "the new command earlier in PATH was never picked up"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("way", WAYS)
async def test_a_relative_path_entry_means_the_commands_cwd(tmp_path: Path, way: str) -> None:
    _script(tmp_path / "bin" / "tool-rel", "echo relative")
    # A relative entry is never looked up ahead of time, so posix_spawn (which needs a path) is not used.
    expect = "popen" if way == "posix_spawn" else None
    command = await run(["tool-rel"], tmp_path, way, env={"PATH": "bin:/usr/bin:/bin"}, expect=expect)
    assert bytes(command.stdout.data) == b"relative\n"


@pytest.mark.parametrize("way", ["posix_spawn", "popen"])
async def test_many_commands_leak_no_descriptor_and_no_zombie(tmp_path: Path, way: str) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    pids: list[int] = []

    async def one(i: int) -> None:
        command = await run(["sh", "-c", f"echo {i}"], tmp_path, way, stdin=b"in")
        pids.append(command.pid)
        assert bytes(command.stdout.data) == f"{i}\n".encode()

    await asyncio.gather(*(one(i) for i in range(100)))
    assert len(os.listdir("/proc/self/fd")) <= fds
    for pid in pids:  # every child was reaped (a zombie would still be waitable)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@pytest.mark.parametrize("way", ["posix_spawn", "popen"])
async def test_an_exec_whose_background_child_keeps_the_pipes_returns_at_its_exit(tmp_path: Path, way: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if way == "posix_spawn":
        os.chdir(root)  # the daemon works in its root; the fixture restores the test's directory
    ops = AgentOperations(workspace_id="ws", agent_id="a", root=root, display=DisplayAccess(None))
    started = time.monotonic()
    # The background sleep ends on its own; waiting for it (or the deadline) would take 3 s.
    reply = await ops.exec(ExecOp(command=["sh", "-c", "echo hi; sleep 3 & exit 4"], timeout_ms=20_000))
    assert time.monotonic() - started < 2
    assert reply.exit_code == 4 and not reply.timed_out and reply.stdout == b"hi\n"
