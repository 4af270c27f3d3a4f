"""Terminal exec and real PTYs in local boxes (both isolation modes)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from providers.local import LocalBoxSession, LocalProvider
from sandbox.channel_a import ChannelA, LocalPtyLauncher, MemoryEventSink
from sandbox.errors import ChannelAConflict, ChannelANotFound, ChannelAUnsupported, ChannelAValidationError
from tests.integration.channel_a.conftest import CountingSession


async def test_exec_buffers_output_and_exit_code(ca: ChannelA, box: LocalBoxSession, sink: MemoryEventSink) -> None:
    (box.workspace_path / "sub dir").mkdir()
    result = await ca.terminal_exec("echo out; echo err >&2; pwd; printf 'ü'; exit 3", cwd="sub dir")
    assert (result.exit_code, result.stderr, result.timed_out, result.running) == (3, "err\n", False, False)
    lines = result.stdout.split("\n")
    assert lines[0] == "out" and lines[1].endswith("/sub dir") and lines[2] == "ü"
    assert 0 < result.wall_time_seconds < 10
    deltas = sink.of_type("sandbox.command.output.delta")
    assert [(e.payload["stream"], e.payload["seq"], e.payload["commandId"]) for e in deltas] == [
        ("stdout", 0, result.command_id),
        ("stderr", 1, result.command_id),
    ]
    assert deltas[0].payload["chunk"] == result.stdout
    quiet = await ca.terminal_exec("true", emit_stream=False, cwd="/workspace/sub dir")
    assert quiet.exit_code == 0 and quiet.stdout == "" and len(sink.of_type("sandbox.command.output.delta")) == 2
    assert ca.revision == 0  # a terminal command is not a tracked mutation


async def test_exec_timeout_returns_early_and_leaves_the_tail_running(ca: ChannelA, box: LocalBoxSession) -> None:
    started = time.monotonic()
    result = await ca.terminal_exec("echo begun; sleep 0.8; echo finished > tail.txt", timeout_ms=300)
    assert time.monotonic() - started < 0.8 + 0.5  # answered at the timeout, not at the end
    assert (result.exit_code, result.timed_out, result.wall_time_seconds) == (124, True, 0.3)
    assert result.stdout == "begun\n" and result.stderr.endswith("Terminal command exceeded 300ms")
    deadline = time.monotonic() + 5
    while not (box.workspace_path / "tail.txt").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (box.workspace_path / "tail.txt").read_text() == "finished\n"


async def test_exec_output_is_bounded(ca: ChannelA) -> None:
    result = await ca.terminal_exec("head -c 1100000 /dev/zero | tr '\\0' a; echo done >&2")
    assert result.stdout_truncated and len(result.stdout) == 1024 * 1024 and set(result.stdout) == {"a"}
    assert result.stderr == "done\n" and not result.stderr_truncated and result.exit_code == 0


async def test_exec_refuses_bad_input_before_running(box: LocalBoxSession) -> None:
    counting = CountingSession(box)
    ca = ChannelA(counting)
    for kwargs in ({"timeout_ms": 0}, {"timeout_ms": 120_001}, {"cwd": "/etc"}, {"cwd": "../x"}):
        with pytest.raises(ChannelAValidationError):
            await ca.terminal_exec("true", **kwargs)
    for command in ("", "   ", "a\0b"):
        with pytest.raises(ChannelAValidationError):
            await ca.terminal_exec(command)
    assert counting.calls == 0
    with pytest.raises(ChannelANotFound):
        await ca.terminal_exec("true", cwd="missing")


async def test_pty_echo_resize_and_close(ca: ChannelA, box: LocalBoxSession, sink: MemoryEventSink) -> None:
    opened = await ca.pty_open(cols=80, rows=24)
    assert (opened.cols, opened.rows, opened.shell, opened.cwd) == (80, 24, "/bin/bash", "")
    pty = opened.pty_id

    await ca.pty_write(pty, "echo $((6*7))\n", yield_ms=0)
    assert b"42\r\n" in await ca.pty_read_until(pty, b"42\r\n", timeout=5)

    await ca.pty_write(pty, "stty size; tty >/dev/null && echo has-tty; pwd\n", yield_ms=0)
    assert b"24 80" in await ca.pty_read_until(pty, b"24 80", timeout=5)
    await ca.pty_resize(pty, 132, 43)
    await ca.pty_write(pty, "stty size\n", yield_ms=0)
    assert b"43 132" in await ca.pty_read_until(pty, b"43 132", timeout=5)

    # Job control works: the shell owns the terminal (it is its controlling terminal).
    written = await ca.pty_write(pty, "sleep 30 & jobs; echo jobs-done\n", yield_ms=0)
    assert written.output == ""
    assert b"jobs-done" in await ca.pty_read_until(pty, b"jobs-done", timeout=5)

    closed = await ca.pty_close(pty)
    assert closed.pty_id == pty and closed.reason == "killed"
    started = sink.of_type("terminal.pty.started")
    assert [e.payload["ptyId"] for e in started] == [pty]
    assert started[0].payload | {} == {"ptyId": pty, "cols": 80, "rows": 24, "shell": "/bin/bash", "cwd": ""} | {
        "revision": 0,
        "leaseEpoch": 7,
    }
    deltas = sink.of_type("terminal.pty.output.delta")
    assert [e.payload["seq"] for e in deltas] == list(range(len(deltas)))
    assert "42" in "".join(e.payload["chunk"] for e in deltas)
    (exited,) = sink.of_type("terminal.pty.exited")
    assert exited.payload["ptyId"] == pty and exited.payload["reason"] == "killed"
    with pytest.raises(ChannelANotFound):
        await ca.pty_write(pty, "x")


async def test_pty_shell_exit_is_reported_and_writes_after_it_conflict(
    ca: ChannelA, box: LocalBoxSession, sink: MemoryEventSink
) -> None:
    (box.workspace_path / "start").mkdir()
    opened = await ca.pty_open(cwd="start", rows=10, cols=20)
    await ca.pty_write(opened.pty_id, "pwd; exit 5\n", yield_ms=0)
    exited = await sink.wait_for(lambda e: e.type == "terminal.pty.exited", timeout=5)
    assert exited.payload == {"ptyId": opened.pty_id, "exitCode": 5, "reason": "exit", "revision": 0, "leaseEpoch": 7}
    output = "".join(e.payload["chunk"] for e in sink.of_type("terminal.pty.output.delta"))
    assert "/start" in output
    assert ca.pty_exited(opened.pty_id)
    with pytest.raises(ChannelAConflict, match="session lost"):
        await ca.pty_write(opened.pty_id, "echo again\n")
    closed = await ca.pty_close(opened.pty_id)
    assert (closed.exit_code, closed.reason) == (5, "exit")


async def test_pty_refusals(ca: ChannelA, box: LocalBoxSession) -> None:
    for kwargs in ({"cols": 0}, {"rows": 301}, {"shell": "bash"}, {"shell": "/bin/bash -c x"}, {"cwd": "/etc"}):
        with pytest.raises(ChannelAValidationError):
            await ca.pty_open(**kwargs)
    (box.workspace_path / "file").write_text("x")
    with pytest.raises(ChannelAValidationError, match="not a directory"):
        await ca.pty_open(cwd="file")
    with pytest.raises(ChannelANotFound):
        await ca.pty_resize("pty-nope", 10, 10)
    with pytest.raises(ChannelAUnsupported):
        await ChannelA(CountingSession(box)).pty_open()  # a session type without PTY support


async def test_pty_sandbox_hides_the_boxes_and_hidden_directories(
    provider: LocalProvider, box: LocalBoxSession
) -> None:
    if provider.isolation != "bubblewrap":
        pytest.skip("process isolation has no sandbox to hide directories from")
    secret_dir = Path(tempfile.mkdtemp(prefix="channel-a-hidden-", dir="/var/tmp"))
    try:
        (secret_dir / "secret.txt").write_text("hidden")
        ca = ChannelA(box, pty_launcher=LocalPtyLauncher(box, hidden_paths=[secret_dir]))
        opened = await ca.pty_open()
        await ca.pty_write(
            opened.pty_id, f"cat {secret_dir}/secret.txt; ls {box.path.parent} | wc -l; echo E''ND\n", yield_ms=0
        )
        output = await ca.pty_read_until(opened.pty_id, b"END\r\n", timeout=5)
        await ca.pty_close(opened.pty_id)
        assert b"No such file" in output and b"\r\n0\r\nEND" in output
    finally:
        shutil.rmtree(secret_dir)
