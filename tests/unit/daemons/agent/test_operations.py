"""The agent's op handlers without NATS: confinement, exec, payload limits, consent and display gates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.agent.consent import AgentConsent
from daemons.agent.operations import AgentOperations, DisplayAccess
from sandbox.control_protocol import (
    ControlErrorCode,
    ControlOp,
    ControlRequest,
    ControlResponse,
    DesktopInputOp,
    ExecOp,
    ExecReply,
    FsListOp,
    FsListReply,
    FsReadOp,
    FsReadReply,
    FsStatOp,
    FsStatReply,
    FsWriteOp,
    KeyEvent,
    PingOp,
    PingReply,
    PtyOpenOp,
    ScreenshotOp,
    StreamEnsureOp,
    StreamEnsureReply,
)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    return root, outside


def ops_for(
    root: Path, *, display: str | None = None, consent: bool = False, max_payload: int = 1 << 20
) -> AgentOperations:
    return AgentOperations(
        workspace_id="ws1",
        agent_id="a1",
        root=root,
        display=DisplayAccess(display),
        consent=AgentConsent(screen_control=consent),
        max_payload=max_payload,
    )


async def run(ops: AgentOperations, op: ControlOp) -> ControlResponse:
    return await ops.handle(ControlRequest(request_id="r1", epoch=0, op=op))


def error_of(resp: ControlResponse) -> tuple[ControlErrorCode, dict[str, str]]:
    assert resp.error is not None, f"expected an error, got {resp.result}"
    return resp.error.code, resp.error.detail


async def test_write_read_round_trip_binary(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    ops = ops_for(root)
    payload = bytes(range(256)) * 10
    resp = await run(ops, FsWriteOp(path="a/b/c.bin", content=payload))
    assert resp.error is None
    assert (root / "a/b/c.bin").read_bytes() == payload
    read = await run(ops, FsReadOp(path="a/b/c.bin", offset=10, length=20))
    assert isinstance(read.result, FsReadReply)
    assert read.result.content == payload[10:30] and read.result.total_size == len(payload)


async def test_absolute_path_inside_the_root_is_accepted(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    ops = ops_for(root)
    assert (await run(ops, FsWriteOp(path=str(root.resolve() / "abs.txt"), content=b"x"))).error is None
    assert (root / "abs.txt").read_bytes() == b"x"


@pytest.mark.parametrize(
    "path",
    ["../outside/x.txt", "a/../../outside/x.txt", "/etc/passwd-copy", "link/x.txt", "dirlink/x.txt", "abslink"],
)
async def test_escapes_are_refused_and_nothing_is_written_outside(layout: tuple[Path, Path], path: str) -> None:
    root, outside = layout
    (root / "link").symlink_to("../outside")
    (root / "dirlink").symlink_to(outside)
    (root / "abslink").symlink_to(outside / "new.txt")
    ops = ops_for(root)
    before = sorted(os.listdir(outside))
    for op in (
        FsWriteOp(path=path, content=b"pwned"),
        FsWriteOp(path=path, content=b"pwned", append=True),
        FsWriteOp(path=path, content=b"pwned", upload_id="u1", upload_offset=0, final=True),
        FsReadOp(path=path),
        FsStatOp(path=path),
        FsListOp(path=path),
    ):
        code, detail = error_of(await run(ops, op))
        assert code is ControlErrorCode.OS and detail["reason"] == "path_escape", op
    assert sorted(os.listdir(outside)) == before
    assert (outside / "secret.txt").read_text() == "top secret"


async def test_reading_through_a_symlink_to_outside_is_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "s").symlink_to(outside / "secret.txt")
    code, detail = error_of(await run(ops_for(root), FsReadOp(path="s")))
    assert detail["reason"] == "path_escape"


async def test_symlinks_inside_the_root_are_followed(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "real").mkdir()
    (root / "real/f.txt").write_text("hello")
    (root / "alias").symlink_to("real")
    resp = await run(ops_for(root), FsReadOp(path="alias/f.txt"))
    assert isinstance(resp.result, FsReadReply) and resp.result.content == b"hello"


async def test_exec_cwd_cannot_escape(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    code, detail = error_of(await run(ops_for(root), ExecOp(command=["pwd"], cwd="..")))
    assert detail["reason"] == "path_escape"


async def test_missing_file_is_not_found_and_stat_says_absent(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    ops = ops_for(root)
    code, _detail = error_of(await run(ops, FsReadOp(path="nope.txt")))
    assert code is ControlErrorCode.NOT_FOUND
    stat = await run(ops, FsStatOp(path="nope/deeper.txt"))
    assert isinstance(stat.result, FsStatReply) and stat.result.exists is False


async def test_list_is_sorted_recursive_and_does_not_follow_symlinks(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "d/e").mkdir(parents=True)
    (root / "d/e/f.txt").write_text("f")
    (root / "top.txt").write_text("t")
    (root / "out").symlink_to(outside)
    resp = await run(ops_for(root), FsListOp(path="", recursive=True))
    assert isinstance(resp.result, FsListReply)
    assert [(e.path, e.kind) for e in resp.result.entries] == [
        ("d", "directory"),
        ("d/e", "directory"),
        ("d/e/f.txt", "file"),
        ("out", "symlink"),
        ("top.txt", "file"),
    ]


async def test_upload_chunks_replace_the_file_only_when_final(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    ops = ops_for(root)
    (root / "f.bin").write_bytes(b"old")
    assert (
        await run(ops, FsWriteOp(path="f.bin", content=b"abc", upload_id="u", upload_offset=0, final=False))
    ).error is None
    assert (root / "f.bin").read_bytes() == b"old"
    # A resent chunk overwrites itself instead of duplicating.
    assert (
        await run(ops, FsWriteOp(path="f.bin", content=b"abc", upload_id="u", upload_offset=0, final=False))
    ).error is None
    code, _ = error_of(await run(ops, FsWriteOp(path="f.bin", content=b"z", upload_id="u", upload_offset=10)))
    assert code is ControlErrorCode.PROTOCOL
    assert (
        await run(ops, FsWriteOp(path="f.bin", content=b"def", upload_id="u", upload_offset=3, final=True))
    ).error is None
    assert (root / "f.bin").read_bytes() == b"abcdef"
    assert sorted(os.listdir(root)) == ["f.bin"]


async def test_exec_runs_in_the_root_with_stdin_env_and_exit_code(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "sub").mkdir()
    resp = await run(
        ops_for(root),
        ExecOp(
            command=['cat; echo "$GREETING"; pwd; exit 3'], shell=True, cwd="sub", env={"GREETING": "hi"}, stdin=b"in\n"
        ),
    )
    assert isinstance(resp.result, ExecReply)
    assert resp.result.exit_code == 3
    assert resp.result.stdout == f"in\nhi\n{(root / 'sub').resolve()}\n".encode()


async def test_exec_deadline_kills_the_process_group(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    resp = await run(ops_for(root), ExecOp(command=["sh", "-c", "sleep 30 & sleep 30"], timeout_ms=200))
    assert isinstance(resp.result, ExecReply)
    assert resp.result.timed_out and resp.result.duration_ms < 5000


async def test_missing_command_is_exit_127(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    resp = await run(ops_for(root), ExecOp(command=["definitely-not-a-command-xyz"]))
    assert isinstance(resp.result, ExecReply) and resp.result.exit_code == 127


async def test_output_over_one_message_is_refused_not_truncated(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    ops = ops_for(root, max_payload=64 * 1024)
    code, detail = error_of(await run(ops, ExecOp(command=["head", "-c", "200000", "/dev/zero"])))
    assert code is ControlErrorCode.PAYLOAD_TOO_LARGE
    assert int(detail["encoded_bytes"]) > int(detail["max_payload"])
    (root / "big").write_bytes(b"x" * 200_000)
    code, _ = error_of(await run(ops, FsReadOp(path="big")))
    assert code is ControlErrorCode.PAYLOAD_TOO_LARGE
    ranged = await run(ops, FsReadOp(path="big", offset=0, length=1000))
    assert isinstance(ranged.result, FsReadReply) and len(ranged.result.content) == 1000


async def test_desktop_input_needs_consent_then_a_display(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    event = DesktopInputOp(event=KeyEvent(key="Return"))
    code, _ = error_of(await run(ops_for(root, display=":99", consent=False), event))
    assert code is ControlErrorCode.CONSENT_REQUIRED
    code, detail = error_of(await run(ops_for(root, display=None, consent=True), event))
    assert code is ControlErrorCode.UNSUPPORTED and detail["reason"] == "display_unavailable"


async def test_screenshot_and_desktop_stream_need_a_display(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    ops = ops_for(root)
    for op in (ScreenshotOp(), StreamEnsureOp(kind="desktop", port=6080)):
        code, detail = error_of(await run(ops, op))
        assert code is ControlErrorCode.UNSUPPORTED and detail["reason"] == "display_unavailable"
    pty = await run(ops, StreamEnsureOp(kind="pty", port=7681))
    assert isinstance(pty.result, StreamEnsureReply) and pty.result.channel is not None
    assert pty.result.channel.channel_id == "ws1:a1:7681"


async def test_ping_reports_identity_and_gates(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    resp = await run(ops_for(root, display=":5", consent=True), PingOp(nonce="42"))
    assert isinstance(resp.result, PingReply)
    assert resp.result.nonce == "42" and resp.result.has_display and resp.result.screen_control


def _consent_cases(root: Path) -> list[tuple[str, ControlOp, Path | None]]:
    """(capability, an op that needs it, a file the op would create if it ran)."""
    return [
        ("exec", ExecOp(command=["touch", str(root / "ran")]), root / "ran"),
        ("exec", PtyOpenOp(command=["touch", str(root / "pty-ran")], cols=80, rows=24), root / "pty-ran"),
        ("exec", StreamEnsureOp(kind="pty", port=7681), None),
        ("files", FsWriteOp(path="written", content=b"x"), root / "written"),
        ("files", FsReadOp(path="present"), None),
        ("files", FsListOp(path="."), None),
        ("files", FsStatOp(path="present"), None),
        ("screen_view", ScreenshotOp(), None),
        ("screen_view", StreamEnsureOp(kind="desktop", port=6080), None),
        ("screen_control", DesktopInputOp(event=KeyEvent(key="Return")), None),
    ]


async def test_each_capability_the_owner_withholds_is_refused_and_nothing_runs(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "present").write_text("p")
    nothing = AgentConsent(exec=False, files=False, screen_view=False, screen_control=False)
    ops = AgentOperations(workspace_id="ws1", agent_id="a1", root=root, display=DisplayAccess(":99"), consent=nothing)
    for capability, op, would_create in _consent_cases(root):
        code, detail = error_of(await run(ops, op))
        assert (code, detail["capability"]) == (ControlErrorCode.CONSENT_REQUIRED, capability), op
        assert detail["flag"].startswith("--")
        if would_create is not None:
            assert not would_create.exists(), op
    ping = await run(ops, PingOp(nonce="n"))  # ping needs no consent and says what is allowed
    assert isinstance(ping.result, PingReply) and ping.result.consents == []


async def test_allowed_capabilities_run(layout: tuple[Path, Path]) -> None:
    """Positive control: the same ops with the defaults (everything but screen control) get past consent."""
    root, _ = layout
    (root / "present").write_text("p")
    ops = AgentOperations(workspace_id="ws1", agent_id="a1", root=root, display=DisplayAccess(None))
    for capability, op, would_create in _consent_cases(root):
        response = await run(ops, op)
        if capability == "screen_control":
            assert response.error is not None and response.error.code is ControlErrorCode.CONSENT_REQUIRED
            continue
        assert response.error is None or response.error.code is not ControlErrorCode.CONSENT_REQUIRED, op
        if would_create is not None and isinstance(op, ExecOp | FsWriteOp):
            assert would_create.exists(), op
    ping = await run(ops, PingOp(nonce="n"))
    assert isinstance(ping.result, PingReply) and ping.result.consents == ["exec", "files", "screen_view"]
    await ops.terminals.close_all()


_segment = st.sampled_from(["..", ".", "", "a", "b", "link", "out", "x.txt", "/"]) | st.text(
    alphabet="ab./", min_size=1, max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_segment, min_size=1, max_size=6), st.booleans())
async def test_no_path_writes_outside_the_root(layout: tuple[Path, Path], segments: list[str], absolute: bool) -> None:
    root, outside = layout
    # An example may have replaced a link by a file it wrote (inside the root): set the links up again.
    for link, target in ((root / "link", Path("../outside")), (root / "a/out", outside)):
        if not link.is_symlink():
            link.parent.mkdir(exist_ok=True)
            if link.exists():
                link.unlink()
            link.symlink_to(target)
    path = "/".join(segments)
    if absolute:
        path = "/" + path
    before = sorted(os.listdir(outside))
    resp = await run(ops_for(root), FsWriteOp(path=path, content=b"pwned"))
    assert sorted(os.listdir(outside)) == before
    if resp.error is None:
        real = os.path.realpath(root)
        written = [
            p for p in Path(real).rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes() == b"pwned"
        ]
        assert written and all(str(p.resolve()).startswith(real + "/") for p in written)
        for p in written:
            p.unlink()
