"""Lease ids and settings are validated before anything reaches Temporal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.lease_client import validate_lease_ids
from sandbox.errors import InvalidRequest, SandboxConfigError
from sandbox.settings import Settings
from workflows.models.lease import ID_PATTERN, MAX_ID_LENGTH, lease_workflow_id


@given(st.text(max_size=300), st.text(max_size=300))
def test_any_id_is_accepted_or_refused_with_a_typed_error(workspace: str, group: str) -> None:
    try:
        validate_lease_ids(workspace, group)
    except InvalidRequest as err:
        assert err.message
        return
    # Accepted ids are safe to embed in the workflow id: no separator, bounded, no whitespace.
    for value in (workspace, group):
        assert 0 < len(value) <= MAX_ID_LENGTH
        assert "/" not in value and not any(c.isspace() for c in value)
        assert ID_PATTERN.fullmatch(value)
    assert lease_workflow_id(workspace, group).count("/") == 2


@pytest.mark.parametrize("bad", ["", " ", "a/b", "../x", "x" * (MAX_ID_LENGTH + 1), "-lead", "tab\there", "é"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_lease_ids(bad, "g")
    with pytest.raises(InvalidRequest):
        validate_lease_ids("w", bad)


def test_settings_refuse_contradictions() -> None:
    with pytest.raises(SandboxConfigError):
        Settings(probe_timeout_seconds=200, warming_ttl_seconds=120).check()
    with pytest.raises(SandboxConfigError):
        Settings(holder_ttl_seconds=0).check()
    with pytest.raises(SandboxConfigError):
        Settings(idle_grace_seconds=-1).check()
    assert Settings().check().warming_ttl_seconds == 120


def test_settings_come_from_sandbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_IDLE_GRACE_SECONDS", "42")
    monkeypatch.setenv("SANDBOX_STREAM_TOKEN_SECRET", "s3cret")
    s = Settings()
    assert s.idle_grace_seconds == 42
    assert "s3cret" not in repr(s)
