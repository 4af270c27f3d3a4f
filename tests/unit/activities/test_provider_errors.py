"""The activity boundary turns typed sandbox errors into typed, correctly retryable ApplicationErrors."""

from __future__ import annotations

import pytest
from temporalio.exceptions import ApplicationError

from activities.provider_errors import maps_provider_errors
from sandbox import errors


@pytest.mark.parametrize(
    ("err", "retryable"),
    [
        (errors.BoxNotFound("gone"), False),
        (errors.ProviderUnavailable("flaky"), True),
        (errors.ProviderQuotaError("quota"), True),
        (errors.ProviderAuthError("creds"), False),
        (errors.ExecTimeout("slow", timeout=1.0), False),
        (errors.Unsupported("no"), False),
        (errors.InvalidRequest("bad"), False),
        (errors.UnknownBackend("nope"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
async def test_mapping(err: errors.SandboxError, retryable: bool) -> None:
    @maps_provider_errors
    async def activity() -> None:
        raise err

    with pytest.raises(ApplicationError) as info:
        await activity()
    assert info.value.type == err.error_type
    assert info.value.non_retryable is (not retryable)
    assert info.value.message == err.message


async def test_other_exceptions_pass_through_unchanged() -> None:
    @maps_provider_errors
    async def activity() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await activity()
