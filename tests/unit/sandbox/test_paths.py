"""Channel-A path safety: upstream conformance, fuzzing, and the confinement scripts run in real bash."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.errors import ChannelAValidationError, InvalidRequest
from sandbox.paths import (
    FS_CONFINED_OK_MARKER,
    FS_ESCAPE_MARKER,
    FS_NOT_FOUND_MARKER,
    FS_SYMLINK_MARKER,
    ConfinedOutput,
    ConfinementOutcome,
    assert_safe_rel_path,
    assert_safe_rel_path_or_root,
    bash_command,
    classify_confinement,
    confined_directory_script,
    confinement_script,
    join_root,
    new_confinement_nonce,
    parse_confined_output,
    shell_quote,
)
from tests.upstream_vectors import vectors_dir

# --------------------------------------------------------------------------- upstream vectors

VECTOR_FILE = "paths_banners.json"
# Stricter than upstream on purpose: upstream accepts a NUL inside a path, but no POSIX path can hold
# one and a shell argument cannot carry it, so we refuse it before anything runs.
INTENTIONAL_DIFFERENCES = {
    'assertSafeRelPath "a\\u0000b"': "NUL is refused (no POSIX path can contain it)",
}


def vector_params(file: str, fn: str) -> list[Any]:
    """One pytest param per vector of ``fn``; a single failing param when the file is missing."""
    path = vectors_dir() / file
    if not path.is_file():
        return [pytest.param(None, id=f"{file}-missing")]
    vectors = [v for v in json.loads(path.read_text(encoding="utf-8")) if v["fn"] == fn]
    return [pytest.param(v, id=f"{i:03d}-{v['note'][:70]}") for i, v in enumerate(vectors)]


def require_vector(vector: dict[str, Any] | None) -> dict[str, Any]:
    if vector is None:
        pytest.fail(
            f"upstream vectors not found: {vectors_dir() / VECTOR_FILE} is missing. Point "
            "SANDBOX_VECTORS_DIR at the folder holding the upstream-vectors JSON files."
        )
    return vector


@pytest.mark.parametrize("vector", vector_params(VECTOR_FILE, "assertSafeRelPath"))
def test_assert_safe_rel_path_matches_upstream(vector: dict[str, Any] | None) -> None:
    vector = require_vector(vector)
    (path,) = vector["args"]
    expect = vector["expect"]
    if vector["note"] in INTENTIONAL_DIFFERENCES:
        with pytest.raises(ChannelAValidationError):
            assert_safe_rel_path(path)
    elif "error" in expect:
        assert expect["error"]["name"] == "ChannelAValidationError"
        with pytest.raises(ChannelAValidationError) as caught:
            assert_safe_rel_path(path)
        assert caught.value.message == expect["error"]["message"]
        assert caught.value.path == path
    else:
        assert assert_safe_rel_path(path) == expect["ok"]


def test_vector_file_has_every_path_vector() -> None:
    path = vectors_dir() / VECTOR_FILE
    assert path.is_file(), f"{path} is missing; set SANDBOX_VECTORS_DIR"
    fns = [v["fn"] for v in json.loads(path.read_text(encoding="utf-8"))]
    assert fns.count("assertSafeRelPath") == 37


# --------------------------------------------------------------------------- lexical checks


def test_root_is_allowed_only_where_the_root_is_meant() -> None:
    assert assert_safe_rel_path_or_root("") == ""
    assert assert_safe_rel_path_or_root("dir/") == "dir"
    with pytest.raises(ChannelAValidationError, match="path is required"):
        assert_safe_rel_path("")
    with pytest.raises(ChannelAValidationError, match="absolute paths are not allowed"):
        assert_safe_rel_path_or_root("/")


def test_validation_error_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        assert_safe_rel_path("../etc")
    assert caught.value.error_type == "ChannelAValidationError"
    assert caught.value.retryable is False


def test_non_string_path_is_a_validation_error() -> None:
    with pytest.raises(ChannelAValidationError, match="must be a string"):
        assert_safe_rel_path(None)  # type: ignore[arg-type]


path_segments = st.one_of(
    st.sampled_from(["", ".", "..", "...", "..a", "a..", "~", " ", "\\..", "..\\"]),
    st.text(st.characters(codec="utf-8"), max_size=6),
)
raw_paths = st.one_of(
    st.lists(path_segments, max_size=6).map("/".join),
    st.text(st.characters(codec="utf-8"), max_size=30),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(raw_paths)
def test_accepted_paths_are_relative_without_traversal_and_stable(path: str) -> None:
    try:
        safe = assert_safe_rel_path(path)
    except ChannelAValidationError:
        assert path == "" or path.startswith("/") or ".." in path.split("/") or "\0" in path
        return
    assert not path.startswith("/")
    assert ".." not in safe.split("/")
    assert not safe.startswith("/") and not safe.endswith("/")
    assert "\0" not in safe
    assert safe != ""
    assert assert_safe_rel_path(safe) == safe
    assert safe == path.strip("/")


@given(st.text(max_size=10), st.text(max_size=10))
def test_traversal_and_absolute_paths_are_always_refused(prefix: str, suffix: str) -> None:
    with pytest.raises(ChannelAValidationError):
        assert_safe_rel_path("/" + prefix)
    with pytest.raises(ChannelAValidationError):
        assert_safe_rel_path_or_root(f"{prefix.replace('/', '')}/../{suffix}".lstrip("/"))
    with pytest.raises(ChannelAValidationError):
        assert_safe_rel_path_or_root(prefix + "\0" + suffix)


@pytest.mark.parametrize(
    ("root", "rel", "joined"),
    [
        ("", "", "."),
        ("", "a/b", "a/b"),
        ("/workspace", "", "/workspace"),
        ("/workspace", "a/b", "/workspace/a/b"),
        ("/workspace/", "a", "/workspace/a"),
        ("/", "a", "/a"),
        (".", "a", "./a"),
    ],
)
def test_join_root(root: str, rel: str, joined: str) -> None:
    assert join_root(root, rel) == joined


# --------------------------------------------------------------------------- shell text


def run_bash(script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash; output is decoded without newline translation so ``\\r`` survives."""
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script],
        capture_output=True,
        cwd=cwd,
        timeout=10,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    )


@settings(max_examples=20, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20))
def test_shell_quote_survives_bash_unchanged(value: str) -> None:
    result = run_bash(f"printf '%s' {shell_quote(value)}")
    assert result.stdout == value


def test_shell_quote_refuses_nul() -> None:
    with pytest.raises(ChannelAValidationError):
        shell_quote("a\0b")


def test_bash_command_runs_the_script_without_profile_or_bash_env(tmp_path: Path) -> None:
    rc_file = tmp_path / "rc"
    rc_file.write_text("echo LEAKED\n")
    result = subprocess.run(
        bash_command("printf '%s' \"it's $((6 * 7))\""),
        shell=True,
        capture_output=True,
        text=True,
        env={**os.environ, "BASH_ENV": str(rc_file)},
        timeout=10,
        check=False,
    )
    assert result.stdout == "it's 42"


# --------------------------------------------------------------------------- confinement in real bash


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace with a file, a dir, an inner symlink, an escaping symlink and a dangling one."""
    root = tmp_path / "ws"
    (root / "sub").mkdir(parents=True)
    (root / "file.txt").write_text("x")
    (root / "trailing-newline\n").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "escape").symlink_to(outside)
    (root / "inner-link").symlink_to("sub")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "ws-sibling").mkdir()
    (root / "prefix-trick").symlink_to(tmp_path / "ws-sibling")
    # `$(dirname ...)` would turn "trap\n/x" into "trap", checking the harmless twin instead.
    (root / "trap").mkdir()
    (root / "trap\n").symlink_to(outside)
    return root


CONFINEMENT_CASES = [
    ("", {}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    ("file.txt", {}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    ("sub/", {}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    ("inner-link", {}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    ("trailing-newline\n", {}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    ("missing", {}, ConfinementOutcome.NOT_FOUND, FS_NOT_FOUND_MARKER, 66),
    ("escape", {}, ConfinementOutcome.ESCAPE, FS_ESCAPE_MARKER, 67),
    ("escape/secret", {}, ConfinementOutcome.ESCAPE, FS_ESCAPE_MARKER, 67),
    ("dangling", {}, ConfinementOutcome.ESCAPE, FS_ESCAPE_MARKER, 67),
    ("prefix-trick", {}, ConfinementOutcome.ESCAPE, FS_ESCAPE_MARKER, 67),
    ("inner-link", {"reject_symlink": True}, ConfinementOutcome.SYMLINK, FS_SYMLINK_MARKER, 68),
    ("new/file", {"parent": True}, ConfinementOutcome.NOT_FOUND, FS_NOT_FOUND_MARKER, 66),
    ("sub/new-file", {"parent": True}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    ("trap\n/new-file", {"parent": True}, ConfinementOutcome.ESCAPE, FS_ESCAPE_MARKER, 67),
    ("trap\n/a/b", {"parent": True, "allow_missing_parents": True}, ConfinementOutcome.ESCAPE, FS_ESCAPE_MARKER, 67),
    ("./x", {"parent": True}, ConfinementOutcome.CONFINED, FS_CONFINED_OK_MARKER, 0),
    (
        "a/b/c/new-file",
        {"parent": True, "allow_missing_parents": True},
        ConfinementOutcome.CONFINED,
        FS_CONFINED_OK_MARKER,
        0,
    ),
    (
        "escape/a/new-file",
        {"parent": True, "allow_missing_parents": True},
        ConfinementOutcome.ESCAPE,
        FS_ESCAPE_MARKER,
        67,
    ),
]


@pytest.mark.parametrize(
    ("rel", "options", "outcome", "marker", "code"),
    CONFINEMENT_CASES,
    ids=[f"{case[0]!r}{sorted(case[1]) if case[1] else ''}" for case in CONFINEMENT_CASES],
)
def test_confinement_script_in_bash(
    workspace: Path,
    rel: str,
    options: dict[str, bool],
    outcome: ConfinementOutcome,
    marker: str,
    code: int,
) -> None:
    result = run_bash(confinement_script(str(workspace), rel, **options))
    assert result.returncode == code, result.stderr
    assert result.stdout == marker + "\n"
    assert classify_confinement(result.returncode, result.stdout) is outcome
    assert classify_confinement(None, result.stdout) is outcome


def test_confinement_with_relative_or_empty_root(workspace: Path) -> None:
    assert run_bash(confinement_script("", "sub"), cwd=workspace).returncode == 0
    assert run_bash(confinement_script(".", "escape"), cwd=workspace).returncode == 67


def test_confinement_script_validates_before_generating() -> None:
    with pytest.raises(ChannelAValidationError, match="path traversal"):
        confinement_script("/workspace", "a/../../etc")
    with pytest.raises(ChannelAValidationError, match="absolute"):
        confined_directory_script("/workspace", "/etc", "ls", "abc")


def test_confined_directory_script_runs_inside_and_frames_the_payload(workspace: Path) -> None:
    nonce = new_confinement_nonce()
    command = "pwd -P; printf 'tail without newline'; exit 3"
    result = run_bash(confined_directory_script(str(workspace), "inner-link", command, nonce))
    assert result.returncode == 0, result.stderr
    framed = parse_confined_output(result.stdout, nonce)
    assert framed == ConfinedOutput(payload=f"{workspace / 'sub'}\ntail without newline", status=3)
    assert parse_confined_output(result.stdout, new_confinement_nonce()) is None


@pytest.mark.parametrize(
    ("rel", "code", "marker"),
    [
        ("escape", 67, FS_ESCAPE_MARKER),
        ("file.txt", 66, FS_NOT_FOUND_MARKER),
        ("gone", 66, FS_NOT_FOUND_MARKER),
    ],
)
def test_confined_directory_script_refuses_before_running(workspace: Path, rel: str, code: int, marker: str) -> None:
    nonce = new_confinement_nonce()
    result = run_bash(confined_directory_script(str(workspace), rel, "echo RAN", nonce))
    assert result.returncode == code
    assert result.stdout == marker + "\n"
    assert "RAN" not in result.stdout
    assert parse_confined_output(result.stdout, nonce) is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "__OPENGENI_FS_CONFINED_n1_OK__\nhello__OPENGENI_FS_CONFINED_n1_END__:0__",
            ConfinedOutput("hello", 0),
        ),
        ("__OPENGENI_FS_CONFINED_n1_OK__\n__OPENGENI_FS_CONFINED_n1_END__:-1__\n", ConfinedOutput("", -1)),
        (
            "noise\n__OPENGENI_FS_CONFINED_n1_OK__\na__OPENGENI_FS_CONFINED_n1_END__:1__b"
            "__OPENGENI_FS_CONFINED_n1_END__:2__",
            ConfinedOutput("a__OPENGENI_FS_CONFINED_n1_END__:1__b", 2),
        ),
        ("__OPENGENI_FS_CONFINED_n1_OK__\ncut off", None),
        ("__OPENGENI_FS_CONFINED_n1_OK__\nx__OPENGENI_FS_CONFINED_n1_END__:0__ trailing", None),
        ("__OPENGENI_FS_CONFINED_n2_OK__\nx__OPENGENI_FS_CONFINED_n2_END__:0__", None),
        ("__OPENGENI_FS_CONFINED_n1_END__:0____OPENGENI_FS_CONFINED_n1_OK__\n", None),
    ],
)
def test_parse_confined_output(output: str, expected: ConfinedOutput | None) -> None:
    assert parse_confined_output(output, "n1") == expected


@pytest.mark.parametrize("nonce", ["", "has space", "a_b", "x" * 65, "ünï"])
def test_nonce_must_be_plain_alphanumeric(nonce: str) -> None:
    with pytest.raises(ValueError):
        parse_confined_output("", nonce)


@pytest.mark.parametrize(
    ("exit_code", "output", "outcome"),
    [
        (0, FS_CONFINED_OK_MARKER + "\n", ConfinementOutcome.CONFINED),
        (0, "", ConfinementOutcome.UNKNOWN),
        (66, "", ConfinementOutcome.NOT_FOUND),
        (67, FS_CONFINED_OK_MARKER, ConfinementOutcome.ESCAPE),
        (68, "", ConfinementOutcome.SYMLINK),
        (1, FS_ESCAPE_MARKER, ConfinementOutcome.UNKNOWN),
        (None, "noise\n" + FS_SYMLINK_MARKER + "\n", ConfinementOutcome.SYMLINK),
        (None, "prefix" + FS_ESCAPE_MARKER, ConfinementOutcome.UNKNOWN),
        (None, "", ConfinementOutcome.UNKNOWN),
    ],
)
def test_classify_confinement(exit_code: int | None, output: str, outcome: ConfinementOutcome) -> None:
    assert classify_confinement(exit_code, output) is outcome


def test_outcome_maps_to_channel_a_http_status() -> None:
    assert ConfinementOutcome.NOT_FOUND.http_status == 404
    assert ConfinementOutcome.ESCAPE.http_status == 400
    assert ConfinementOutcome.SYMLINK.http_status == 400
    assert ConfinementOutcome.ESCAPE.message == "path resolves outside workspace"
    assert ConfinementOutcome.CONFINED.http_status is None
