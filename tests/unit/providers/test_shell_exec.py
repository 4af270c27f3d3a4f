"""The exec wrapper script and its report, run with the local ``sh``; directory listings."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.shell_exec import (
    LIST_DIR_SCRIPT,
    MARKER,
    NO_WORKDIR,
    ExecReport,
    Spilled,
    check_env_names,
    dir_listing,
    exec_script,
    parse_dir_listing,
    parse_exec_report,
    stage_stdin,
)
from sandbox.box import ExecResult
from sandbox.errors import InvalidRequest, PathNotFound, ProviderError

# Prints its first file to stdout, its second to stderr, and exits with its third argument.
_EMIT = ["sh", "-c", 'cat -- "$1"; cat -- "$2" >&2; exit "$3"', "sh"]


def _run(script: str, *, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], input=stdin.decode(), capture_output=True, text=True, timeout=60)


async def _read_local(path: str) -> bytes:
    return pathlib.Path(path).read_bytes()


def _report(script: str) -> ExecReport:
    done = _run(script)
    assert done.returncode == 0, done.stderr
    report = parse_exec_report(done.stdout)
    assert report is not None, done.stdout
    return report


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out=st.binary(max_size=3000), err=st.binary(max_size=3000), code=st.integers(0, 255), spill=st.booleans())
def test_any_bytes_and_exit_code_survive_the_round_trip(out: bytes, err: bytes, code: int, spill: bool) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        files = [os.path.join(scratch, "out"), os.path.join(scratch, "err")]
        pathlib.Path(files[0]).write_bytes(out)
        pathlib.Path(files[1]).write_bytes(err)
        report = _report(exec_script([*_EMIT, *files, str(code)], workdir=scratch, spill_over=1000 if spill else None))
        result = asyncio.run(report.result(_read_local))
        assert result == ExecResult(exit_code=code, stdout=out, stderr=err)
        cleanup = report.cleanup_command()
        assert (cleanup is not None) == (spill and (len(out) > 1000 or len(err) > 1000))
        if cleanup is not None:
            _run(cleanup)
            assert not any(os.path.exists(s.path) for s in (report.stdout, report.stderr) if isinstance(s, Spilled))


@settings(max_examples=30, deadline=None)
@given(
    argv=st.lists(
        st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=20), min_size=1, max_size=5
    )
)
def test_argv_and_env_reach_the_command_unchanged(argv: list[str]) -> None:
    value = "$HOME 'quoted' \"double\" `tick` \n;"
    command = ["sh", "-c", 'printf "%s\\0" "$@"; printf "%s" "$SBX_VALUE" >&2', "sh", *argv]
    script = exec_script(command, env={"SBX_VALUE": value})
    result = asyncio.run(_report(script).result())
    assert result.stdout.split(b"\0")[:-1] == [a.encode() for a in argv]
    assert result.stderr == value.encode()


def test_stdin_comes_from_the_scratch_file_which_is_removed(tmp_path: pathlib.Path) -> None:
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"\x00input\xff")
    result = asyncio.run(_report(exec_script(["cat"], stdin_file=str(stdin))).result())
    assert result.stdout == b"\x00input\xff" and not stdin.exists()


def test_without_stdin_the_command_reads_nothing_unless_it_inherits_the_scripts() -> None:
    assert asyncio.run(_report(exec_script(["cat"])).result()).stdout == b""
    done = _run(exec_script(["cat"], inherit_stdin=True), stdin=b"from the api")
    report = parse_exec_report(done.stdout)
    assert report is not None and asyncio.run(report.result()).stdout == b"from the api"


def test_a_missing_workdir_exits_without_a_report_and_removes_stdin(tmp_path: pathlib.Path) -> None:
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"x")
    done = _run(exec_script(["true"], workdir=str(tmp_path / "nope"), stdin_file=str(stdin)))
    assert done.returncode == NO_WORKDIR and parse_exec_report(done.stdout) is None and not stdin.exists()


def test_a_missing_workdir_can_be_the_commands_own_failure(tmp_path: pathlib.Path) -> None:
    result = asyncio.run(
        _report(exec_script(["true"], workdir=str(tmp_path / "nope"), missing_workdir_is_result=True)).result()
    )
    assert result.exit_code != 0 and b"nope" in result.stderr


def test_the_command_runs_in_the_workdir(tmp_path: pathlib.Path) -> None:
    for is_result in (False, True):
        result = asyncio.run(
            _report(exec_script(["pwd"], workdir=str(tmp_path), missing_workdir_is_result=is_result)).result()
        )
        assert result.stdout.decode().strip() == str(tmp_path)


def test_the_kill_guard_kills_a_command_past_it() -> None:
    result = asyncio.run(_report(exec_script(["sleep", "30"], kill_after=1)).result())
    assert result.exit_code == 137


def test_no_scratch_files_are_left_behind(tmp_path: pathlib.Path) -> None:
    before = set(pathlib.Path("/tmp").glob(".sandbox-exec.*"))
    _report(exec_script(["echo", "hi"], spill_over=100))
    _report(exec_script(["echo", "hi"]))
    assert set(pathlib.Path("/tmp").glob(".sandbox-exec.*")) == before


def test_empty_argv_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        exec_script([])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{MARKER} 0 aGk= \n", ExecReport(0, b"hi", b"")),
        (f"login noise\n{MARKER} 9 aA== aQ==\n{MARKER} 3  aGk=\ntrailer", ExecReport(3, b"", b"hi")),
        (f"{MARKER} 1 @/tmp/.sandbox-exec.x/o aGk=\n", ExecReport(1, Spilled("/tmp/.sandbox-exec.x/o"), b"hi")),
        ("no report at all\n", None),
        (f"{MARKER} 0 aGk=\n", None),  # a field is missing
        (f"{MARKER} zero aGk= aGk=\n", None),
        (f"{MARKER} 0 aGk aGk=\n", None),  # not base64
        (f"{MARKER} 0 aGk=! \n", None),  # base64 failed in the box
        (f"{MARKER} 0 @relative \n", None),
    ],
)
def test_the_parser_accepts_reports_and_refuses_anything_else(text: str, expected: ExecReport | None) -> None:
    assert parse_exec_report(text) == expected


def test_a_spilled_stream_needs_a_reader() -> None:
    report = ExecReport(0, Spilled("/tmp/.sandbox-exec.x/o"), b"")
    with pytest.raises(ProviderError, match="nothing can read it"):
        asyncio.run(report.result())


def test_a_failing_base64_is_reported_not_taken_for_empty_output(tmp_path: pathlib.Path) -> None:
    fake = tmp_path / "base64"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run(
        ["sh", "-c", exec_script(["echo", "hi"])],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        timeout=60,
    )
    assert done.returncode == 0 and parse_exec_report(done.stdout) is None


async def test_stdin_is_staged_in_a_fresh_scratch_file() -> None:
    written: dict[str, bytes] = {}

    async def write(path: str, data: bytes) -> None:
        written[path] = data

    assert await stage_stdin(None, write) is None and not written
    first, second = await stage_stdin(b"a", write), await stage_stdin(b"b", write)
    assert first != second and first is not None and first.startswith("/tmp/") and written[first] == b"a"


def _listing(directory: str) -> ExecResult:
    done = subprocess.run(["sh", "-c", LIST_DIR_SCRIPT, "sh", directory], capture_output=True, timeout=60)
    return ExecResult(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr)


def test_a_listing_shows_names_kinds_sizes_and_modes(tmp_path: pathlib.Path) -> None:
    (tmp_path / "b file").write_bytes(b"12345")
    (tmp_path / "b file").chmod(0o640)
    (tmp_path / "a dir").mkdir()
    (tmp_path / "link").symlink_to("nowhere")
    (tmp_path / b"\xff".decode(errors="surrogateescape")).write_bytes(b"")
    entries = dir_listing(_listing(str(tmp_path)), "x", backend="test")
    assert [e.name for e in entries] == sorted(["a dir", "b file", "link", "\udcff"])
    by_name = {e.name: e for e in entries}
    assert by_name["a dir"].kind == "dir" and by_name["link"].kind == "symlink"
    assert (by_name["b file"].kind, by_name["b file"].size, by_name["b file"].mode) == ("file", 5, 0o640)


def test_listing_errors_are_typed(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(PathNotFound):
        dir_listing(_listing(str(tmp_path / "missing")), "missing", backend="test")
    with pytest.raises(InvalidRequest):
        dir_listing(_listing(str(tmp_path / "file")), "file", backend="test")
    with pytest.raises(ProviderError, match="test: listing x failed: boom"):
        dir_listing(ExecResult(exit_code=1, stdout=b"", stderr=b"boom"), "x", backend="test")
    with pytest.raises(ProviderError, match="malformed"):
        parse_dir_listing(b"name\0f\0size\x000644\0", backend="test")


@pytest.mark.parametrize("name", ["", "1ABC", "A=B", "A B", "A-B", "Ä"])
def test_environment_names_a_shell_cannot_carry_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid environment variable name"):
        check_env_names(["OK", name])
    with pytest.raises(InvalidRequest):
        exec_script(["true"], env={name: "x"})
    check_env_names(["_a", "A1", "PATH"])
