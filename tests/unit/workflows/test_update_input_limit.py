"""The bound on what one lease update carries: measured in UTF-8 bytes of its JSON, refused past the limit."""

from __future__ import annotations

import pytest

from client.lease_client import check_update_input
from sandbox import errors
from workflows.models.lease import MAX_UPDATE_INPUT_BYTES, ExecRequest, oversized_update_input


def _exec_of(size: int, char: str = "a") -> ExecRequest:
    base = len(ExecRequest(cmd=["echo", ""]).model_dump_json().encode())
    return ExecRequest(cmd=["echo", char * ((size - base) // len(char.encode()))])


def test_an_input_at_the_limit_fits_and_one_byte_more_is_refused_naming_the_limit() -> None:
    at = _exec_of(MAX_UPDATE_INPUT_BYTES)
    assert len(at.model_dump_json().encode()) == MAX_UPDATE_INPUT_BYTES
    assert oversized_update_input("exec", at) is None
    check_update_input("exec", at)

    over = ExecRequest(cmd=[*at.cmd[:-1], at.cmd[-1] + "a"])
    problem = oversized_update_input("exec", over)
    assert problem is not None and "MAX_UPDATE_INPUT_BYTES" in problem and str(MAX_UPDATE_INPUT_BYTES) in problem
    with pytest.raises(errors.InvalidRequest, match="MAX_UPDATE_INPUT_BYTES"):
        check_update_input("exec", over)


def test_the_size_is_counted_in_bytes_not_characters() -> None:
    # 3 bytes per character: a third of the limit in characters is already at the limit in bytes.
    wide = ExecRequest(cmd=["echo", "€" * (MAX_UPDATE_INPUT_BYTES // 3)])
    assert oversized_update_input("exec", wide) is not None
