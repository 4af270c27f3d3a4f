"""Exec banner parsing: upstream conformance, fuzzing and a format round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from sandbox.exec_banner import (
    MAX_SAFE_INTEGER,
    ExecBanner,
    ExecBannerAbsent,
    ExecBannerExited,
    ExecBannerInvalid,
    ExecBannerRunning,
    is_exec_session_lost_banner,
    parse_exec_banner_exit_code,
    parse_exec_banner_session_id,
    parse_exec_response_banner,
    strip_exec_banner,
)
from tests.upstream_vectors import vectors_dir

# --------------------------------------------------------------------------- upstream vectors

VECTOR_FILE = "paths_banners.json"
EXPECTED_COUNTS = {
    "stripExecBanner": 34,
    "parseExecResponseBanner": 34,
    "parseExecBannerSessionId": 34,
    "parseExecBannerExitCode": 34,
    "isExecSessionLostBanner": 26,
}
BANNER = TypeAdapter[ExecBanner](ExecBanner)
FUNCTIONS: dict[str, Any] = {
    "stripExecBanner": strip_exec_banner,
    "parseExecResponseBanner": lambda raw: BANNER.dump_python(parse_exec_response_banner(raw), mode="json"),
    "parseExecBannerSessionId": parse_exec_banner_session_id,
    "parseExecBannerExitCode": parse_exec_banner_exit_code,
    "isExecSessionLostBanner": is_exec_session_lost_banner,
}


def vector_params(file: str, fns: list[str]) -> list[Any]:
    """One pytest param per vector of ``fns``; a single failing param when the file is missing."""
    path = vectors_dir() / file
    if not path.is_file():
        return [pytest.param(None, id=f"{file}-missing")]
    vectors = [v for v in json.loads(path.read_text(encoding="utf-8")) if v["fn"] in fns]
    return [pytest.param(v, id=f"{i:03d}-{v['note'][:70]}") for i, v in enumerate(vectors)]


def require_vector(vector: dict[str, Any] | None) -> dict[str, Any]:
    if vector is None:
        pytest.fail(
            f"upstream vectors not found: {vectors_dir() / VECTOR_FILE} is missing. Point "
            "SANDBOX_VECTORS_DIR at the folder holding the upstream-vectors JSON files."
        )
    return vector


@pytest.mark.parametrize("vector", vector_params(VECTOR_FILE, list(FUNCTIONS)))
def test_exec_banner_matches_upstream(vector: dict[str, Any] | None) -> None:
    vector = require_vector(vector)
    assert FUNCTIONS[vector["fn"]](*vector["args"]) == vector["expect"]["ok"]


def test_vector_file_has_every_banner_vector() -> None:
    path = vectors_dir() / VECTOR_FILE
    assert path.is_file(), f"{path} is missing; set SANDBOX_VECTORS_DIR"
    fns = [v["fn"] for v in json.loads(path.read_text(encoding="utf-8"))]
    assert {fn: fns.count(fn) for fn in EXPECTED_COUNTS} == EXPECTED_COUNTS


# --------------------------------------------------------------------------- documented behaviour


def test_banner_variants_serialise_to_upstream_shape() -> None:
    assert BANNER.dump_python(ExecBannerRunning(session_id=7)) == {"kind": "running", "sessionId": 7}
    assert BANNER.dump_python(ExecBannerExited(exit_code=-1)) == {"kind": "exited", "exitCode": -1}
    assert BANNER.validate_python({"kind": "absent"}) == ExecBannerAbsent()
    assert BANNER.validate_json('{"kind":"running","sessionId":3}') == ExecBannerRunning(session_id=3)


def test_recording_splits_at_the_last_delimiter() -> None:
    raw = "Chunk ID: a\nProcess exited with code 0\nOutput:\nfirst\nOutput:\nsecond"
    assert strip_exec_banner(raw) == "first\nOutput:\nsecond"
    assert strip_exec_banner(raw, split_at="last") == "second"
    assert strip_exec_banner("Output:\nonly", split_at="last") == "only"


def test_a_later_delimiter_wins_over_a_leading_output_marker() -> None:
    # Upstream looks for "\nOutput:\n" first and only then for a leading "Output:\n".
    assert strip_exec_banner("Output:\nA\nOutput:\nB") == "B"
    assert strip_exec_banner("Output:\nA\nOutput:\nB\nOutput:\nC", split_at="last") == "C"
    assert strip_exec_banner("Output:\nA\r\nOutput:\r\nB") == "A\r\nOutput:\r\nB"


def test_only_the_two_status_prefixes_make_a_status_line() -> None:
    raw = "Process started\nProcess exited with code 0\nOutput:\nx"
    assert parse_exec_response_banner(raw) == ExecBannerExited(exit_code=0)
    assert parse_exec_banner_exit_code(raw) == 0
    assert parse_exec_response_banner("Process 12 ok\nProcess running with session ID 3\nOutput:\n") == (
        ExecBannerRunning(session_id=3)
    )
    # A line that does start like a status line but is malformed still makes the header invalid.
    assert parse_exec_response_banner("Process exited with codes 0\nProcess exited with code 0\nOutput:\n") == (
        ExecBannerInvalid()
    )
    # "Process started" alone is not banner metadata either.
    assert parse_exec_response_banner("Process started") == ExecBannerAbsent()


@pytest.mark.parametrize("terminator", ["\r", "\u2028", "\u2029"])
def test_lines_end_at_every_javascript_line_terminator(terminator: str) -> None:
    # Upstream's multiline regexes start a line after a lone CR, U+2028 or U+2029 as after LF.
    assert parse_exec_response_banner(f"out{terminator}Wall time: 0.1 seconds") == ExecBannerInvalid()
    header = f"Chunk ID: a{terminator}Process exited with code 3{terminator}Wall time: 1 seconds"
    assert parse_exec_response_banner(header + "\nOutput:\nx") == ExecBannerExited(exit_code=3)
    two = f"Process exited with code 3{terminator}Process running with session ID 4\nOutput:\n"
    assert parse_exec_response_banner(two) == ExecBannerInvalid()
    malformed = f"Chunk ID: a{terminator}Process exited with code x\nProcess exited with code 3\nOutput:\n"
    assert parse_exec_response_banner(malformed) == ExecBannerInvalid()


@pytest.mark.parametrize("separator", ["\x85", "\x0b", "\x0c", "\x1c", "\x1e"])
def test_characters_python_splits_lines_on_but_javascript_does_not(separator: str) -> None:
    assert parse_exec_response_banner(f"out{separator}Wall time: 0.1 seconds") == ExecBannerAbsent()
    raw = f"Process exited with code 3{separator}\nOutput:\n"
    assert parse_exec_response_banner(raw) == ExecBannerInvalid()


def test_header_limit_counts_utf16_units_like_upstream() -> None:
    # Each key emoji is 2 UTF-16 units but 1 Python character, so a len()-based cap would be too loose.
    status = "\nProcess exited with code 0"
    padding = "x" * (16384 - 2 * 8000 - len(status))
    header = padding + "🔑" * 8000 + status
    assert parse_exec_response_banner(header + "\nOutput:\nbody") == ExecBannerExited(exit_code=0)
    assert parse_exec_response_banner("x" + header + "\nOutput:\nbody") == ExecBannerInvalid()
    assert strip_exec_banner("x" + header + "\nOutput:\nbody") == "body"


def test_exit_code_limits_are_javascript_safe_integers() -> None:
    def banner(code: int) -> str:
        return f"Chunk ID: a\nProcess exited with code {code}\nOutput:\n"

    assert parse_exec_banner_exit_code(banner(MAX_SAFE_INTEGER)) == MAX_SAFE_INTEGER
    assert parse_exec_banner_exit_code(banner(-MAX_SAFE_INTEGER)) == -MAX_SAFE_INTEGER
    assert parse_exec_banner_exit_code(banner(MAX_SAFE_INTEGER + 1)) is None
    assert parse_exec_banner_exit_code("Process exited with code \u0661\nOutput:\n") is None


@pytest.mark.parametrize("session_id", [True, 1.0, "1", None])
def test_session_lost_needs_a_real_integer_id(session_id: Any) -> None:
    assert is_exec_session_lost_banner("session not found: 1", session_id) is False


@pytest.mark.parametrize("session_id", [MAX_SAFE_INTEGER + 1, MAX_SAFE_INTEGER + 2, 2**64, 10**30])
def test_session_lost_needs_a_javascript_safe_integer_id(session_id: int) -> None:
    # Upstream's Number.isSafeInteger guard: such an id never matches, even with the exact digits.
    assert is_exec_session_lost_banner(f"session not found: {session_id}", session_id) is False
    assert is_exec_session_lost_banner(f"write_stdin failed: session not found: {session_id}", session_id) is False
    assert is_exec_session_lost_banner(f"session not found: {MAX_SAFE_INTEGER}", MAX_SAFE_INTEGER) is True


# --------------------------------------------------------------------------- fuzz

FRAGMENTS = [
    "\n", "\r\n", "\r", "Output:", "Output:\n", "\nOutput:\n", "\r\nOutput:\r\n", "Chunk ID: ",
    "Wall time: ", "Original token count: ", "Process running with session ID ",
    "Process exited with code ", "Process ", "-", "0", "7", "007", "9007199254740993", " ",
    "session not found: ", "write_stdin failed: ", "🔑", "\u0661", "\0",
]  # fmt: skip
noisy_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=30).map("".join),
)


@settings(max_examples=150)
@given(noisy_text)
def test_banner_functions_never_crash_and_agree(raw: str) -> None:
    banner = parse_exec_response_banner(raw)
    session_id = parse_exec_banner_session_id(raw)
    exit_code = parse_exec_banner_exit_code(raw)
    assert session_id == (banner.session_id if isinstance(banner, ExecBannerRunning) else None)
    assert exit_code == (banner.exit_code if isinstance(banner, ExecBannerExited) else None)
    if session_id is not None:
        assert 0 <= session_id <= MAX_SAFE_INTEGER
    if exit_code is not None:
        assert abs(exit_code) <= MAX_SAFE_INTEGER
    stripped = strip_exec_banner(raw)
    assert raw.endswith(stripped)
    assert raw.endswith(strip_exec_banner(raw, split_at="last"))
    if "Output:\n" not in raw:
        assert stripped == raw
    lost = raw in ("session not found: 1", "write_stdin failed: session not found: 1")
    assert is_exec_session_lost_banner(raw, 1) is lost


metadata_value = st.text(st.characters(exclude_characters="\r\n"), max_size=12)
body_text = st.text(max_size=40)


@settings(max_examples=100)
@given(
    chunk_id=metadata_value,
    wall=st.floats(0, 10**4, allow_nan=False).map(lambda s: f"{s:.4f}"),
    status=st.one_of(
        st.integers(0, MAX_SAFE_INTEGER).map(lambda n: ExecBannerRunning(session_id=n)),
        st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER).map(lambda n: ExecBannerExited(exit_code=n)),
    ),
    token_count=st.one_of(st.none(), st.integers(0, 10**6)),
    body=body_text,
)
def test_sdk_banner_round_trip(
    chunk_id: str,
    wall: str,
    status: ExecBannerRunning | ExecBannerExited,
    token_count: int | None,
    body: str,
) -> None:
    if isinstance(status, ExecBannerRunning):
        status_line = f"Process running with session ID {status.session_id}"
    else:
        status_line = f"Process exited with code {status.exit_code}"
    header = [f"Chunk ID: {chunk_id}", f"Wall time: {wall} seconds", status_line]
    if token_count is not None:
        header.append(f"Original token count: {token_count}")
    raw = "\n".join(header) + "\nOutput:\n" + body

    assert strip_exec_banner(raw) == body
    assert parse_exec_response_banner(raw) == status
    crlf = raw.replace("\n", "\r\n", len(header) + 1)
    assert parse_exec_response_banner(crlf) == status  # CRLF banners are understood...
    if "Output:\n" not in body:
        assert strip_exec_banner(crlf) == crlf  # ...but pass through unstripped


@settings(max_examples=50)
@given(st.integers(0, MAX_SAFE_INTEGER), st.booleans(), st.sampled_from(["", " ", "\n", "\r", "x"]))
def test_session_lost_banner_matches_only_the_exact_text(session_id: int, prefixed: bool, suffix: str) -> None:
    text = ("write_stdin failed: " if prefixed else "") + f"session not found: {session_id}"
    assert is_exec_session_lost_banner(text + suffix, session_id) is (suffix == "")
    assert is_exec_session_lost_banner(text, session_id + 1) is False
    leading_zero = text.replace(f": {session_id}", f": 0{session_id}")
    assert is_exec_session_lost_banner(leading_zero, session_id) is False
