"""Hostile requests against the agent's decoder and file operations, without NATS.

A caller that can publish to an agent's subject may send any bytes. Each attack here goes through
:func:`~sandbox.control_protocol.decode_request` (what the daemon runs on every message) or
:meth:`~daemons.agent.operations.AgentOperations.handle` (what it runs on every decoded request) and
must end in a typed refusal, never an untyped exception or a crash of the serve loop. Every attack
has a positive control: the same request made valid, which must decode or succeed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.agent.confinement import MAX_LIST_DEPTH, OpRefused, Root
from daemons.agent.operations import AgentOperations, DisplayAccess
from providers.workspace_archive import tree_fingerprint
from sandbox.control_protocol import (
    MAX_ARGV_CHARS,
    MAX_ARGV_ITEMS,
    MAX_ENV_ENTRIES,
    MAX_SCROLL_STEPS,
    ControlErrorCode,
    ControlRequest,
    ControlResponse,
    DesktopInputOp,
    ExecOp,
    ExecReply,
    FsListReply,
    FsReadReply,
    FsStatReply,
    FsWriteReply,
    PtyOpenOp,
    ScrollEvent,
    decode_request,
    decode_response,
    encode_message,
)
from sandbox.errors import InvalidRequest


def _wire(op: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, "request_id": "r-1", "epoch": 1, "op": op}).encode()


def _decode(op: dict[str, Any]) -> ControlRequest:
    return decode_request(_wire(op))


# --- 1. argv / env / numeric bounds ------------------------------------------------------------

_ARGV_OPS = ["exec", "pty_open"]


@pytest.mark.parametrize("op_type", _ARGV_OPS)
def test_valid_argv_and_env_decode(op_type: str) -> None:
    request = _decode({"type": op_type, "command": ["echo", "héllo", ""], "env": {"A_B": "x=y", "Z": ""}})
    assert isinstance(request.op, (ExecOp, PtyOpenOp))
    assert request.op.command == ["echo", "héllo", ""]
    assert request.op.env == {"A_B": "x=y", "Z": ""}


@pytest.mark.parametrize("op_type", _ARGV_OPS)
@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["echo", "a\0b"], {}),
        (["\0"], {}),
        (["echo"], {"": "v"}),
        (["echo"], {"A=B": "v"}),
        (["echo"], {"A\0B": "v"}),
        (["echo"], {"A": "v\0w"}),
    ],
    ids=["nul-in-arg", "nul-arg", "empty-env-name", "eq-in-env-name", "nul-in-env-name", "nul-in-env-value"],
)
def test_nul_and_bad_env_names_are_protocol_errors(op_type: str, command: list[str], env: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest, match="malformed control request"):
        _decode({"type": op_type, "command": command, "env": env})


@pytest.mark.parametrize("op_type", _ARGV_OPS)
def test_argv_item_count_is_bounded(op_type: str) -> None:
    assert len(_decode({"type": op_type, "command": ["x"] * MAX_ARGV_ITEMS}).op.command) == MAX_ARGV_ITEMS  # type: ignore[union-attr]
    with pytest.raises(InvalidRequest):
        _decode({"type": op_type, "command": ["x"] * (MAX_ARGV_ITEMS + 1)})


@pytest.mark.parametrize("op_type", _ARGV_OPS)
def test_env_entry_count_is_bounded(op_type: str) -> None:
    env = {f"V{i}": "" for i in range(MAX_ENV_ENTRIES)}
    assert len(_decode({"type": op_type, "command": ["x"], "env": env}).op.env) == MAX_ENV_ENTRIES  # type: ignore[union-attr]
    env["ONE_MORE"] = ""
    with pytest.raises(InvalidRequest):
        _decode({"type": op_type, "command": ["x"], "env": env})


def test_argv_and_env_total_size_is_bounded() -> None:
    half = MAX_ARGV_CHARS // 2
    assert _decode({"type": "exec", "command": ["x" * half, "y" * half]})
    with pytest.raises(InvalidRequest):
        _decode({"type": "exec", "command": ["x" * half, "y" * (half + 1)]})
    with pytest.raises(InvalidRequest):
        _decode({"type": "pty_open", "command": ["x"], "env": {"A": "x" * half, "B": "y" * half}})


async def test_argv_over_the_kernel_limit_is_a_typed_os_error(ops: AgentOperations) -> None:
    # 200 KiB is over MAX_ARG_STRLEN (128 KiB): execve fails with E2BIG, which must come back typed.
    response = await _handle(ops, {"type": "exec", "command": ["/bin/echo", "x" * 200_000]})
    assert response.error is not None and response.error.code is ControlErrorCode.OS
    assert response.error.detail["errno"] == "E2BIG"
    # Positive control: the same command with an ordinary argument runs.
    response = await _handle(ops, {"type": "exec", "command": ["/bin/echo", "x" * 1000]})
    assert isinstance(response.result, ExecReply) and response.result.exit_code == 0


@pytest.mark.parametrize("field", ["delta_x", "delta_y"])
def test_scroll_deltas_are_bounded(field: str) -> None:
    for ok in (MAX_SCROLL_STEPS, -MAX_SCROLL_STEPS, 0):
        op = _decode({"type": "desktop_input", "event": {"kind": "scroll", "x": 1, "y": 1, field: ok}}).op
        assert isinstance(op, DesktopInputOp) and isinstance(op.event, ScrollEvent)
        assert getattr(op.event, field) == ok
    for bad in (MAX_SCROLL_STEPS + 1, -MAX_SCROLL_STEPS - 1, 10**30):
        with pytest.raises(InvalidRequest):
            _decode({"type": "desktop_input", "event": {"kind": "scroll", "x": 1, "y": 1, field: bad}})


def test_nul_in_key_text_is_a_protocol_error() -> None:
    assert _decode({"type": "desktop_input", "event": {"kind": "key", "key": "abc", "is_text": True}})
    with pytest.raises(InvalidRequest):
        _decode({"type": "desktop_input", "event": {"kind": "key", "key": "a\0c", "is_text": True}})


@pytest.mark.parametrize(
    ("op", "field"),
    [
        ({"type": "fs_read", "path": "f"}, "offset"),
        ({"type": "fs_read", "path": "f"}, "length"),
        ({"type": "fs_write", "path": "f", "upload_id": "u"}, "upload_offset"),
        ({"type": "exec", "command": ["true"]}, "timeout_ms"),
        ({"type": "pty_read", "pty_id": "pty-1"}, "max_bytes"),
    ],
)
def test_offsets_and_sizes_stay_within_int64(op: dict[str, Any], field: str) -> None:
    # Past int64 os.pread / os.ftruncate raise OverflowError, not a typed OSError: refuse at the door.
    assert _decode({**op, field: 2**63 - 1})
    with pytest.raises(InvalidRequest):
        _decode({**op, field: 2**63})


# --- 2. every OSError is a typed refusal --------------------------------------------------------


@pytest.fixture
def ops(tmp_path: Path) -> AgentOperations:
    root = tmp_path / "root"
    root.mkdir()
    return AgentOperations(workspace_id="ws", agent_id="ag", root=root, display=DisplayAccess(display=None))


async def _handle(ops: AgentOperations, op: dict[str, Any]) -> ControlResponse:
    return await ops.handle(_decode(op))


_LONG_NAME = "n" * 300
"""Longer than NAME_MAX (255): every call on it fails with ENAMETOOLONG."""


@pytest.mark.parametrize(
    "op",
    [
        {"type": "fs_write", "path": _LONG_NAME, "content": base64.b64encode(b"x").decode()},
        {"type": "fs_write", "path": f"sub/{_LONG_NAME}", "content": ""},
        {"type": "fs_stat", "path": _LONG_NAME},
        {"type": "fs_read", "path": _LONG_NAME},
        {"type": "fs_list", "path": _LONG_NAME},
        {"type": "fs_write", "path": _LONG_NAME, "upload_id": "u1", "content": ""},
    ],
    ids=["write", "write-nested", "stat", "read", "list", "upload"],
)
async def test_name_too_long_is_a_typed_os_error(ops: AgentOperations, op: dict[str, Any]) -> None:
    response = await _handle(ops, op)
    assert response.result is None and response.error is not None
    assert response.error.code is ControlErrorCode.OS
    assert response.error.detail["errno"] == "ENAMETOOLONG"


async def test_normal_name_positive_control(ops: AgentOperations) -> None:
    wrote = await _handle(ops, {"type": "fs_write", "path": "n" * 200, "content": base64.b64encode(b"hi").decode()})
    assert isinstance(wrote.result, FsWriteReply) and wrote.result.bytes_written == 2
    stat_reply = await _handle(ops, {"type": "fs_stat", "path": "n" * 200})
    assert isinstance(stat_reply.result, FsStatReply) and stat_reply.result.exists
    read = await _handle(ops, {"type": "fs_read", "path": "n" * 200})
    assert isinstance(read.result, FsReadReply) and read.result.content == b"hi"


# --- 3. no set-id bits from a write -------------------------------------------------------------

_SET_ID = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def _write_op(path: str, **fields: Any) -> dict[str, Any]:
    return {"type": "fs_write", "path": path, "content": base64.b64encode(b"#!/bin/sh\n").decode(), **fields}


@pytest.mark.parametrize(
    "fields",
    [{}, {"append": True}, {"upload_id": "u1"}],
    ids=["atomic", "append", "upload"],
)
async def test_requested_set_id_bits_are_masked(ops: AgentOperations, fields: dict[str, Any]) -> None:
    target = Path(ops.root.real) / "prog"
    response = await _handle(ops, _write_op("prog", mode=0o6777, **fields))
    assert isinstance(response.result, FsWriteReply)
    assert target.stat().st_mode & _SET_ID == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o777
    # Positive control: an ordinary mode is applied exactly.
    response = await _handle(ops, _write_op("prog2", mode=0o755, **fields))
    assert isinstance(response.result, FsWriteReply)
    assert stat.S_IMODE((Path(ops.root.real) / "prog2").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    "fields",
    [{}, {"append": True}, {"upload_id": "u1"}],
    ids=["atomic", "append", "upload"],
)
async def test_rewrite_does_not_keep_set_id_bits(ops: AgentOperations, fields: dict[str, Any]) -> None:
    target = Path(ops.root.real) / "prog"
    target.write_bytes(b"old")
    target.chmod(0o4755)
    assert target.stat().st_mode & stat.S_ISUID, "the host must be able to set setuid for this attack"
    response = await _handle(ops, _write_op("prog", **fields))
    assert isinstance(response.result, FsWriteReply)
    assert target.stat().st_mode & _SET_ID == 0
    # Positive control: the permission bits themselves are kept.
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


# --- 4. deep trees ------------------------------------------------------------------------------

_DEEP = 2000
"""Twice Python's default recursion limit; with one-letter names the path still fits PATH_MAX."""


def _deep_tree(base: Path, depth: int) -> None:
    # By descriptor, level by level: os.makedirs (and shutil.rmtree on 3.11) recurse themselves.
    base.mkdir()
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def _remove_deep(base: Path) -> None:
    """Remove a tree built by :func:`_deep_tree` (and any files in it) without recursion."""
    fds = [os.open(base, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        while "d" in os.listdir(fds[-1]):
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        while fds:
            fd = fds.pop()
            for name in os.listdir(fd):
                os.unlink(name, dir_fd=fd) if name != "d" else os.rmdir(name, dir_fd=fd)
            os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
    base.rmdir()


@pytest.fixture
def deep_trees() -> Iterator[list[Path]]:
    """Deep trees a test builds, removed at teardown (pytest's own cleanup would hit RecursionError)."""
    built: list[Path] = []
    yield built
    for base in built:
        _remove_deep(base)


def test_recursive_listing_of_a_very_deep_tree_is_a_typed_refusal(tmp_path: Path, deep_trees: list[Path]) -> None:
    deep_trees.append(tmp_path / "deep")
    _deep_tree(tmp_path / "deep", _DEEP)
    root = Root(tmp_path)
    with pytest.raises(OpRefused) as refused:
        root.list_dir("deep", recursive=True)
    assert refused.value.code is ControlErrorCode.PAYLOAD_TOO_LARGE
    assert refused.value.detail["reason"] == "too_deep"
    # Positive control: a tree exactly as deep as the limit is listed whole, in path order.
    _deep_tree(tmp_path / "ok", MAX_LIST_DEPTH)
    entries = root.list_dir("ok", recursive=True)
    assert [e.path for e in entries] == ["/".join(["d"] * n) for n in range(1, MAX_LIST_DEPTH + 1)]


async def test_deep_listing_through_handle_is_one_typed_reply(ops: AgentOperations, deep_trees: list[Path]) -> None:
    deep_trees.append(Path(ops.root.real) / "deep")
    _deep_tree(Path(ops.root.real) / "deep", _DEEP)
    response = await _handle(ops, {"type": "fs_list", "path": "deep", "recursive": True})
    assert response.error is not None and response.error.code is ControlErrorCode.PAYLOAD_TOO_LARGE
    # Positive control: one level of the same tree lists fine.
    response = await _handle(ops, {"type": "fs_list", "path": "deep", "recursive": False})
    assert isinstance(response.result, FsListReply) and [e.name for e in response.result.entries] == ["d"]


def test_fingerprint_of_a_very_deep_tree(tmp_path: Path, deep_trees: list[Path]) -> None:
    deep_trees.append(tmp_path / "deep")
    _deep_tree(tmp_path / "deep", _DEEP)
    first = tree_fingerprint(tmp_path, ["deep"])
    assert tree_fingerprint(tmp_path, ["deep"]) == first
    # Positive control: a change at the very bottom is seen, so the walk really went all the way down.
    fd = os.open(tmp_path.joinpath("deep", *["d"] * _DEEP), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    assert tree_fingerprint(tmp_path, ["deep"]) != first


# --- 5. properties: any text decodes or is refused; any decoded fs op gets one reply --------------

# Every code point, surrogates included (a JSON "\ud800" escape must be refused, not crash the decoder).
_ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
_PATHY = st.one_of(
    _ANY_TEXT,
    st.lists(st.sampled_from(["..", ".", "", "a", "b", "/", "\0", "n" * 300, "ü"]), max_size=6).map("/".join),
)
_B64 = st.binary(max_size=64).map(lambda raw: base64.b64encode(raw).decode())

_EXEC_OPS = st.fixed_dictionaries(
    {"type": st.just("exec"), "command": st.lists(_ANY_TEXT, max_size=5)},
    optional={"env": st.dictionaries(_ANY_TEXT, _ANY_TEXT, max_size=4), "cwd": _PATHY, "shell": st.booleans()},
)
_FS_OPS = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("fs_write"), "path": _PATHY},
        optional={
            "content": st.one_of(_B64, _ANY_TEXT),
            "mode": st.integers(-1, 0o17777),
            "append": st.booleans(),
            "create_parents": st.booleans(),
            "upload_id": st.sampled_from(["u1", "u2", "bad id"]),
            "upload_offset": st.integers(0, 8),
            "final": st.booleans(),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("fs_read"), "path": _PATHY},
        optional={"offset": st.integers(0, 2**64), "length": st.integers(0, 2**64)},
    ),
    st.fixed_dictionaries({"type": st.just("fs_stat"), "path": _PATHY}),
    st.fixed_dictionaries({"type": st.just("fs_list"), "path": _PATHY}, optional={"recursive": st.booleans()}),
)


@settings(max_examples=300, deadline=None)
@given(op=st.one_of(_EXEC_OPS, _FS_OPS))
def test_any_text_decodes_or_is_invalid(op: dict[str, Any]) -> None:
    try:
        request = _decode(op)
    except InvalidRequest:
        return
    # Positive side of the property: what decodes is the op that was sent.
    assert request.op.type == op["type"]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_decode_or_are_invalid(data: bytes) -> None:
    with contextlib.suppress(InvalidRequest):
        decode_request(data)
    # Positive control for the generator: a valid request still decodes.
    assert decode_request(_wire({"type": "ping"})).op.type == "ping"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=_FS_OPS)
def test_any_decoded_fs_op_gets_exactly_one_reply(ops: AgentOperations, op: dict[str, Any]) -> None:
    try:
        request = _decode(op)
    except InvalidRequest:
        return
    response = asyncio.run(ops.handle(request))
    assert isinstance(response, ControlResponse)
    assert response.request_id == request.request_id
    assert (response.result is None) != (response.error is None)
    if response.result is not None:
        assert response.result.type == request.op.type
    # The reply must also travel: it encodes and decodes back as the answer to this request.
    wire = encode_message(response)
    assert decode_response(wire, request_id=request.request_id, op_type=request.op.type) == response
    # Nothing landed outside the root (it is the only entry of its parent, the test's tmp_path).
    assert os.listdir(Path(ops.root.real).parent) == ["root"]
