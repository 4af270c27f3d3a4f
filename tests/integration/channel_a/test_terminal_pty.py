"""Terminal exec and real PTYs on every provider: local boxes (both isolation modes), where the
worker holds the PTY, and a selfhosted machine, where the agent holds it (``pty_*`` ops over NATS);
the main ones also on a docker box of the real engine, where the engine holds it (a tty exec).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from providers.local import LocalProvider
from sandbox.box import BoxSpec
from sandbox.channel_a import ChannelA, MemoryEventSink
from sandbox.errors import (
    ChannelAConflict,
    ChannelANotFound,
    ChannelAUnsupported,
    ChannelAValidationError,
    SandboxConfigError,
)
from tests.integration.channel_a.conftest import BOX_ENV, Boxes, CountingSession, TestBox

ON_DOCKER_ENGINE = (
    "test_exec_buffers_output_and_exit_code",
    "test_pty_echo_resize_and_close",
    "test_pty_shell_exit_is_reported_and_writes_after_it_conflict",
)
"""The main terminal and PTY operations, also on a docker box of the real engine (the engine's tty exec)."""


async def test_exec_buffers_output_and_exit_code(ca: ChannelA, box: TestBox, sink: MemoryEventSink) -> None:
    (box.workspace / "sub dir").mkdir()
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


async def test_exec_timeout_returns_early_and_leaves_the_tail_running(ca: ChannelA, box: TestBox) -> None:
    started = time.monotonic()
    result = await ca.terminal_exec("echo begun; sleep 0.8; echo finished > tail.txt", timeout_ms=300)
    assert time.monotonic() - started < 0.8 + 0.5  # answered at the timeout, not at the end
    assert (result.exit_code, result.timed_out, result.wall_time_seconds) == (124, True, 0.3)
    assert result.stdout == "begun\n" and result.stderr.endswith("Terminal command exceeded 300ms")
    deadline = time.monotonic() + 5
    tail = box.workspace / "tail.txt"
    # The shell creates the file before echo writes to it: wait for the content, not the name.
    while not (tail.exists() and tail.read_text()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert tail.read_text() == "finished\n"


async def test_exec_output_is_bounded(ca: ChannelA) -> None:
    result = await ca.terminal_exec("head -c 1100000 /dev/zero | tr '\\0' a; echo done >&2")
    assert result.stdout_truncated and len(result.stdout) == 1024 * 1024 and set(result.stdout) == {"a"}
    assert result.stderr == "done\n" and not result.stderr_truncated and result.exit_code == 0


async def test_exec_refuses_bad_input_before_running(box: TestBox) -> None:
    counting = CountingSession(box.session)
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


async def test_pty_echo_resize_and_close(ca: ChannelA, box: TestBox, sink: MemoryEventSink) -> None:
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
    ca: ChannelA, box: TestBox, sink: MemoryEventSink
) -> None:
    (box.workspace / "start").mkdir()
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


async def test_pty_refusals(ca: ChannelA, box: TestBox) -> None:
    for kwargs in ({"cols": 0}, {"rows": 301}, {"shell": "bash"}, {"shell": "/bin/bash -c x"}, {"cwd": "/etc"}):
        with pytest.raises(ChannelAValidationError):
            await ca.pty_open(**kwargs)
    with pytest.raises(ChannelANotFound):
        await ca.pty_resize("pty-nope", 10, 10)
    with pytest.raises(ChannelAUnsupported):
        await ChannelA(CountingSession(box.session)).pty_open()  # a session type without PTY support


async def test_pty_refuses_a_file_or_missing_directory(ca: ChannelA, box: TestBox) -> None:
    (box.workspace / "file").write_text("x")
    with pytest.raises(ChannelAValidationError, match="not a directory"):
        await ca.pty_open(cwd="file")
    with pytest.raises(ChannelANotFound):
        await ca.pty_open(cwd="missing")


async def shell_says(ca: ChannelA, pty_id: str, command: str) -> str:
    """Run ``command`` in the PTY shell and return what it printed between two markers."""
    await ca.pty_write(pty_id, f"echo B''EGIN; {command}; echo E''ND\n", yield_ms=0)
    out = (await ca.pty_read_until(pty_id, b"END\r\n", timeout=10)).decode(errors="replace")
    return out.split("BEGIN\r\n", 1)[-1].rsplit("END\r\n", 1)[0]


async def test_pty_shell_runs_inside_the_box_and_dies_with_it(provider: Boxes, sink: MemoryEventSink) -> None:
    made = await provider.new()
    ca = ChannelA(made.session, events=sink)
    try:
        opened = await ca.pty_open()
        pty = opened.pty_id
        # A background process started by an exec, and the PID namespace execs run in.
        naps = f"{random.randrange(10**6, 10**7)}.5"
        await made.session.exec(["bash", "-c", f"sleep {naps} >/dev/null 2>&1 &"])
        ns = (await made.session.exec(["readlink", "/proc/self/ns/pid"])).stdout.decode().strip()
        seen = await shell_says(ca, pty, f"readlink /proc/self/ns/pid; ps -eo args | grep -c '^[s]leep {naps}'")
        assert seen.split() == [ns, "1"]
        # The shell gets what an exec gets, plus TERM.
        probe = 'echo "$CHANNEL_A_BOX_VAR/$SANDBOX_BOX_ID"'
        via_exec = (await made.session.exec(["sh", "-c", probe])).stdout.decode().strip()
        assert (await shell_says(ca, pty, probe)).strip() == via_exec
        assert (await shell_says(ca, pty, 'echo "$TERM"')).strip() == "xterm-256color"
        if made.kind != "selfhosted":  # the box environment of the spec (a machine has its own)
            assert via_exec == f"{BOX_ENV['CHANNEL_A_BOX_VAR']}/{made.session.instance_id}"
        if made.kind == "bubblewrap":  # the box's own mounts: /workspace is the workspace
            (made.workspace / "marker.txt").write_text("in the box")
            assert (await shell_says(ca, pty, "cat /workspace/marker.txt")).strip() == "in the box"

        await provider.drop(made)  # terminate the box: the shell dies with it
        exited = await sink.wait_for(lambda e: e.type == "terminal.pty.exited", timeout=10)
        assert exited.payload["ptyId"] == pty and ca.pty_exited(pty)
    finally:
        await ca.aclose()
        await provider.drop(made)


async def test_pty_sandbox_hides_the_boxes_and_hidden_directories(tmp_path: Path) -> None:
    """In bubblewrap isolation the PTY shell sees exactly what an exec sees: no boxes, no hidden paths."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    secret_dir = Path(tempfile.mkdtemp(prefix="channel-a-hidden-", dir="/var/tmp"))
    provider = LocalProvider(tmp_path / "boxes", bubblewrap="always")
    try:
        provider.validate_credentials()
    except SandboxConfigError as err:
        pytest.skip(f"bubblewrap does not work here: {err.message}")
    spec = BoxSpec(lease_id="lease/ws1/g1", workspace_id="ws1", group_id="g1", epoch=1)
    box = await provider.create(spec, f"channel-a-test:{uuid.uuid4()}")
    ca = ChannelA(box)
    try:
        (secret_dir / "secret.txt").write_text("hidden")
        opened = await ca.pty_open()
        seen = await shell_says(ca, opened.pty_id, f"cat {secret_dir}/secret.txt; ls {box.path.parent} | wc -l")
        assert "No such file" in seen and seen.endswith("\r\n0\r\n")
    finally:
        await ca.aclose()
        await provider.terminate(box.serialize_state())
        await provider.aclose()
        shutil.rmtree(secret_dir)
