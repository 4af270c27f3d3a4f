"""Channel-A's pure pieces: frames, listing/untracked/log/terminal parsers, diff pairing, validation.

Parsers are fuzzed with hypothesis (they may only raise ``ChannelAUnavailable`` on garbage) and
round-tripped where a writer exists. Shell framing is checked by running the generated bash.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sandbox.box import BoxSession, ExecResult
from sandbox.channel_a.fs import ListedEntries, build_tree, list_command, normalise_rel_path, parse_list_output
from sandbox.channel_a.git import (
    assemble_tracked,
    parse_log,
    parse_untracked,
    untracked_file,
    validate_ref,
)
from sandbox.channel_a.models import FsNode
from sandbox.channel_a.runner import BoxRunner, capture_script, parse_captures
from sandbox.channel_a.service import _encode_content
from sandbox.channel_a.terminal import parse_terminal_output, terminal_command
from sandbox.errors import ChannelAUnavailable, ChannelAValidationError
from sandbox.git_parsers import parse_numstat_z

FUZZ = settings(max_examples=60, deadline=None)


def bash(script: str, cwd: Path | None = None) -> bytes:
    return subprocess.run(["bash", "--noprofile", "--norc", "-c", script], capture_output=True, cwd=cwd).stdout


# --------------------------------------------------------------------------- capture frames


def test_capture_script_frames_binary_output_and_statuses() -> None:
    out = bash(capture_script([("first", "printf 'a\\0b\\n'"), ("second", "printf x; exit 3"), ("empty", "true")]))
    caps = parse_captures(out)
    assert list(caps) == ["first", "second", "empty"]
    assert (caps["first"].status, caps["first"].data) == (0, b"a\0b\n")
    assert (caps["second"].status, caps["second"].data) == (3, b"x")
    assert (caps["empty"].status, caps["empty"].data) == (0, b"")
    with pytest.raises(ValueError):
        capture_script([("Bad-Name", "true")])


@given(
    st.lists(
        st.tuples(st.text(alphabet="ab_z", min_size=1, max_size=8), st.integers(0, 255), st.binary(max_size=64)),
        max_size=6,
    )
)
@FUZZ
def test_capture_frames_round_trip(frames: list[tuple[str, int, bytes]]) -> None:
    wire = b"".join(
        b"__CHANNEL_A_CAPTURE_V1__\t%s\t%d\t%d\n%s" % (name.encode(), status, len(data), data)
        for name, status, data in frames
    )
    parsed = parse_captures(wire)
    expected = {name: (status, data) for name, status, data in frames}
    assert {name: (c.status, c.data) for name, c in parsed.items()} == expected


@given(st.binary())
@FUZZ
def test_capture_parser_never_crashes(data: bytes) -> None:
    try:
        parse_captures(b"__CHANNEL_A_CAPTURE_V1__\t" + data)
    except ChannelAUnavailable:
        pass


# --------------------------------------------------------------------------- spilled exec (capped links)


class CappedBox:
    """A box whose every exec may carry at most ``cap`` bytes each way, like a NATS link."""

    def __init__(self, cap: int, tmp: Path) -> None:
        self.cap = cap
        self.tmp = tmp
        self.calls = 0
        self.biggest = 0
        self.instance_id = "capped"

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        assert len(stdin or b"") <= self.cap, "request over the cap"
        self.calls += 1
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=workdir,
            env={"PATH": os.environ["PATH"], "TMPDIR": str(self.tmp)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin or b"")
        self.biggest = max(self.biggest, len(out) + len(err))
        assert len(out) + len(err) <= self.cap, "reply over the cap"
        assert proc.returncode is not None
        return ExecResult(exit_code=proc.returncode, stdout=out, stderr=err)


@pytest.mark.parametrize("size", [0, 10, 40_000, 300_001])
async def test_spilled_runs_move_big_input_and_output_in_pieces_and_run_once(tmp_path: Path, size: int) -> None:
    spills = tmp_path / "tmp"
    spills.mkdir()
    box = CappedBox(32 * 1024, spills)
    runner = BoxRunner(cast(BoxSession, box), str(tmp_path), reply_budget=box.cap)
    data = os.urandom(size)
    # Echo the input back, count the runs in a file, complain on stderr, exit 7.
    result = await runner.run("cat; echo run >>runs; echo warn >&2; exit 7", stdin=data)
    assert (result.exit_code, result.stdout, result.stderr) == (7, data, b"warn\n")
    assert (tmp_path / "runs").read_text() == "run\n"  # the script ran exactly once
    assert list(spills.iterdir()) == []  # every temp dir is gone
    if size > box.cap:
        assert box.calls > 2 and box.biggest <= box.cap


async def test_spilled_runs_report_a_box_that_cannot_run_the_wrapper(tmp_path: Path) -> None:
    class Broken(CappedBox):
        async def exec(self, cmd: Sequence[str], **kwargs: object) -> ExecResult:
            return ExecResult(exit_code=127, stdout=b"", stderr=b"bash: not found")

    runner = BoxRunner(cast(BoxSession, Broken(32 * 1024, tmp_path)), str(tmp_path), reply_budget=32 * 1024)
    with pytest.raises(ChannelAUnavailable, match="exit 127"):
        await runner.run("true")
    with pytest.raises(ValueError):
        BoxRunner(cast(BoxSession, Broken(1, tmp_path)), str(tmp_path), reply_budget=100)


# --------------------------------------------------------------------------- listing


def test_list_parser_flags_truncation_and_cut_records() -> None:
    rec = b"f\x003\x001700000000.5\x00644\x00a.txt\x00d\x004096\x001700000001.25\x00755\x00sub\x00"
    parsed = parse_list_output(rec, 10, 1000)
    assert parsed.records == [("file", 3, 1700000000500, 0o644, "a.txt"), ("dir", 4096, 1700000001250, 0o755, "sub")]
    assert not parsed.truncated
    assert parse_list_output(rec, 1, 1000).truncated and len(parse_list_output(rec, 1, 1000).records) == 1
    cut = parse_list_output(rec[:-3], 10, 1000)  # the byte cap cut the last record
    assert cut.truncated and len(cut.records) == 1
    cut_at_field = parse_list_output(rec[: rec.index(b"755") + 4], 10, 1000)  # cut between two fields
    assert cut_at_field.truncated and len(cut_at_field.records) == 1
    assert parse_list_output(rec, 10, 10).truncated
    odd = parse_list_output(
        b"l\x009\x00x\x00zz\x00name\twith\ttabs\nand lines\x00p\x000\x001.0\x00600\x00fifo\x00", 10, 1000
    )
    assert odd.records == [("symlink", 0, None, None, "name\twith\ttabs\nand lines"), ("other", 0, 1000, 0o600, "fifo")]
    assert parse_list_output(b"f\x001\x001.0\x00644\x00\x00", 10, 1000).records == []  # no name: skipped


def test_list_command_output_parses_back(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "in.txt").write_text("x")
    (tmp_path / "tab\tname").write_text("abc")
    (tmp_path / ".hidden").write_text("h")
    os.chmod(tmp_path / "tab\tname", 0o640)
    out = bash(list_command(2, 100, 10_000, include_hidden=False), cwd=tmp_path)
    parsed = parse_list_output(out, 100, 10_000)
    by_path = {r[4]: r for r in parsed.records}
    assert set(by_path) == {"sub", "sub/in.txt", "tab\tname"} and not parsed.truncated
    kind, size, mtime, mode, _ = by_path["tab\tname"]
    assert (kind, size, mode) == ("file", 3, 0o640)
    assert mtime == round((tmp_path / "tab\tname").stat().st_mtime * 1000)
    capped = parse_list_output(bash(list_command(2, 1, 10_000, include_hidden=True), cwd=tmp_path), 1, 10_000)
    assert capped.truncated and len(capped.records) == 1


def test_trusted_nodes_behave_like_validated_ones() -> None:
    entries = ListedEntries.from_records(
        [("dir", 0, 5, 0o755, "d"), ("file", 3, 7, 0o644, "d/f"), ("symlink", 9, None, None, "l")], False
    )
    fast = build_tree("top", 3, entries)
    slow = FsNode.model_validate(fast.model_dump())
    assert fast == slow and hash(fast) == hash(slow)
    assert fast.model_dump() == slow.model_dump() and fast.model_dump_json() == slow.model_dump_json()
    assert repr(fast) == repr(slow) and fast.model_fields_set == slow.model_fields_set
    assert fast.model_copy(update={"name": "x"}).name == "x"
    with pytest.raises(ValidationError):
        fast.name = "changed"  # still frozen


@given(st.binary(max_size=400), st.integers(1, 50), st.integers(1, 500), st.integers(1, 8))
@FUZZ
def test_list_parser_and_tree_never_crash(data: bytes, entries: int, cap: int, depth: int) -> None:
    parsed = parse_list_output(data, entries, cap)
    assert len(parsed.records) <= entries
    tree = build_tree("x", depth, parsed)
    assert tree.path == "x"


def test_tree_nests_by_path_sorts_and_marks_the_depth_limit() -> None:
    entries = ListedEntries.from_records(
        [
            ("dir", 0, 1, 0o755, "b"),
            ("file", 5, 1, 0o644, "b/z.txt"),
            ("dir", 0, 1, 0o755, "b/deep"),
            ("file", 1, 1, 0o644, "B.txt"),
            ("file", 1, 1, 0o644, "a.txt"),
            ("dir", 0, 1, 0o755, "A"),
        ],
        False,
    )
    tree = build_tree("", 2, entries)
    assert [c.name for c in tree.children or ()] == ["A", "b", "a.txt", "B.txt"]
    b = (tree.children or ())[1]
    assert [c.path for c in b.children or ()] == ["b/deep", "b/z.txt"]
    assert (b.children or ())[0].children is None  # at depth 2 of 2: not listed
    assert (tree.children or ())[0].children == ()  # listed and empty
    assert tree.model_dump()["children"][2]["sizeBytes"] == 1


# --------------------------------------------------------------------------- untracked snapshot


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1),
            st.booleans(),
            st.binary(),
        ),
        max_size=5,
    )
)
@FUZZ
def test_untracked_snapshot_round_trip(items: list[tuple[str, bool, bytes]]) -> None:
    wire = b""
    for path, is_link, body in items:
        if is_link:
            wire += b"L\0" + path.encode() + b"\0" + body.replace(b"\0", b"") + b"\0"
        else:
            wire += b"F\0" + path.encode() + b"\0%d\0%d\0" % (len(body), len(body)) + body
    files, complete = parse_untracked(wire + b"E\0")
    assert complete
    assert [(f.path, f.is_link) for f in files] == [(p, link) for p, link, _ in items]
    assert [f.body for f in files] == [b.replace(b"\0", b"") if link else b for _, link, b in items]
    assert parse_untracked(wire)[1] is False or not items  # no terminator: incomplete


@given(st.binary(max_size=300))
@FUZZ
def test_untracked_parser_never_crashes(data: bytes) -> None:
    try:
        parse_untracked(data)
    except ChannelAUnavailable:
        pass


def test_untracked_file_becomes_one_added_hunk() -> None:
    files, _ = parse_untracked(b"F\0a.txt\x005\x005\0x\ny\nzE\0")
    diff = untracked_file(files[0], max_bytes_per_file=100)
    assert (diff.status, diff.additions, diff.hunks[0].header) == ("untracked", 3, "@@ -0,0 +1,3 @@")
    assert [(ln.type, ln.new_no, ln.text) for ln in diff.hunks[0].lines] == [
        ("add", 1, "x"),
        ("add", 2, "y"),
        ("add", 3, "z"),
    ]
    big = untracked_file(files[0], max_bytes_per_file=2)
    assert big.truncated and big.hunks == ()


# --------------------------------------------------------------------------- log, terminal, refs


@given(st.binary(max_size=300))
@FUZZ
def test_log_parser_never_crashes(data: bytes) -> None:
    for commit in parse_log(data):
        assert commit.hash


def test_log_parser_reads_git_format() -> None:
    record = "\x1f".join(
        ["a" * 40, "aaaaaaa", "b" * 40 + " " + "c" * 40, "N", "n@x", "10", "C", "c@x", "20", "s", "b\n"]
    )
    (commit,) = parse_log(("\n" + record + "\x1e\n").encode())
    assert commit.parents == ("b" * 40, "c" * 40) and commit.author_time_ms == 10_000 and commit.body == "b"


def test_terminal_command_frames_real_output() -> None:
    out = bash(terminal_command("printf 'a\\0b'; printf err >&2; exit 4", timeout_seconds=5, max_output_bytes=2))
    parsed = parse_terminal_output(out)
    assert (parsed.timed_out, parsed.exit_code, parsed.stdout, parsed.stderr) == (False, 4, b"a\0", b"er")
    assert parsed.stdout_truncated and parsed.stderr_truncated
    late = parse_terminal_output(bash(terminal_command("sleep 5", timeout_seconds=0.1, max_output_bytes=10)))
    assert late.timed_out and late.exit_code == 124


@given(st.binary(max_size=200))
@FUZZ
def test_terminal_parser_never_crashes(data: bytes) -> None:
    try:
        parse_terminal_output(data)
    except ChannelAUnavailable:
        pass


@given(st.text(max_size=30))
@FUZZ
def test_refs_never_look_like_options(ref: str) -> None:
    try:
        assert validate_ref(ref) == ref
    except ChannelAValidationError:
        return
    assert ref and not ref.startswith("-") and not any(ch.isspace() or ch in ";$`'\"\\\0" for ch in ref)


def test_paths_are_normalised_or_refused() -> None:
    assert normalise_rel_path("a/./b//c/") == "a/b/c"
    assert normalise_rel_path("", allow_root=True) == ""
    assert normalise_rel_path("./", allow_root=True) == ""
    for bad in ("", ".", "./", "/x", "../x", "a/../b", "a\0b"):
        with pytest.raises(ChannelAValidationError):
            normalise_rel_path(bad)


def test_content_encoding_rules() -> None:
    assert _encode_content("é".encode(), "utf8", False) == ("utf8", "é", False)
    assert _encode_content("é".encode()[:1], "utf8", True) == ("utf8", "", False)  # cut mid-character
    assert _encode_content("é".encode()[:1], "utf8", False)[0] == "base64"  # invalid UTF-8
    assert _encode_content(b"a\0b", "utf8", False) == ("base64", "YQBi", True)
    assert _encode_content(b"abc", "base64", False) == ("base64", "YWJj", False)


# --------------------------------------------------------------------------- pairing numstat with patches


def test_type_changes_and_odd_names_pair_with_their_sections(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@x",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@x",
    }

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-c", "core.quotePath=false", *args], cwd=tmp_path, env=env, check=True, capture_output=True
        ).stdout

    git("init", "-q")
    (tmp_path / "t").write_text("file\n")
    (tmp_path / 'q"uote\\.txt').write_text("1\n")
    (tmp_path / "ctl\x01.txt").write_text("1\n")
    git("add", "-A")
    git("commit", "-qm", "x")
    (tmp_path / "t").unlink()
    (tmp_path / "t").symlink_to("target")  # file -> symlink: two patch sections, one numstat entry
    (tmp_path / 'q"uote\\.txt').write_text("2\n")
    (tmp_path / "ctl\x01.txt").write_text("2\n")
    numstat = parse_numstat_z(git("diff", "-M", "-C", "-z", "--numstat").decode())
    patch = git("diff", "--no-color", "-M", "-C")
    files, truncated = assemble_tracked(numstat, patch, max_bytes_per_file=10_000)
    by = {f.path: f for f in files}
    assert not truncated and set(by) == {"t", 'q"uote\\.txt', "ctl\x01.txt"}
    assert by["t"].status == "typechange" and (by["t"].old_mode, by["t"].new_mode) == ("100644", "120000")
    assert [(ln.type, ln.text) for h in by["t"].hunks for ln in h.lines] == [("del", "file"), ("add", "target")]
    for name in ('q"uote\\.txt', "ctl\x01.txt"):
        assert not by[name].truncated
        assert [(ln.type, ln.text) for h in by[name].hunks for ln in h.lines] == [("del", "1"), ("add", "2")]
    # A missing section (the combined patch hit its cap) is marked, never mis-paired.
    files, _ = assemble_tracked(numstat, b"", max_bytes_per_file=10_000)
    assert all(f.truncated and f.hunks == () for f in files)
