"""What a caller passes to ``LeaseClient`` is checked where it enters: a typed ``InvalidRequest`` naming the field.

Nothing malformed reaches Temporal: the client below has a Temporal stand-in that records what it
is sent, so a refused call is proven to have sent nothing and an accepted one to have sent the
value unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from temporalio.client import Client

from client.lease_client import LeaseClient, timers_from_settings
from sandbox.errors import InvalidRequest, SandboxConfigError
from sandbox.settings import Settings
from workflows.models.lease import MAX_EXEC_TIMEOUT_SECONDS, ExecOutcome, HeartbeatCheck, LeaseTimers


class _Handle:
    id = "lease/ws1/g1"

    def __init__(self, sent: list[Any]) -> None:
        self.sent = sent

    async def query(self, _query: Any, arg: Any, **_options: Any) -> Any:
        # A heartbeat check answered as by a lease from before the store path: the update follows.
        return HeartbeatCheck(epoch=arg.epoch, liveness="warm", holder_ttl_seconds=90.0)

    async def execute_update(self, _update: Any, arg: Any) -> Any:
        self.sent.append(arg)
        return ExecOutcome(exit_code=0, stdout="", stderr="", epoch=getattr(arg, "epoch", None) or 0)


class _Temporal:
    """Stands in for the Temporal client: records every update argument sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def get_workflow_handle_for(self, _run: Any, _workflow_id: str) -> _Handle:
        return _Handle(self.sent)


def _leases() -> tuple[LeaseClient, _Temporal]:
    temporal = _Temporal()
    # Nothing is written: the data dir only has to be a path.
    return LeaseClient(cast(Client, temporal), Settings(data_dir=Path("/nonexistent/sandbox-data"))), temporal


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
OUT_OF_RANGE = st.one_of(
    st.floats(max_value=0, allow_nan=False), st.floats(min_value=MAX_EXEC_TIMEOUT_SECONDS, exclude_min=True)
)


@given(timeout=st.one_of(NON_FINITE, OUT_OF_RANGE))
async def test_any_non_finite_or_out_of_range_timeout_is_refused(timeout: float) -> None:
    leases, temporal = _leases()
    with pytest.raises(InvalidRequest, match="timeout_seconds") as info:
        await leases.exec("ws1", "g1", ["true"], timeout_seconds=timeout)
    assert "finite number of seconds" in info.value.message
    assert temporal.sent == []  # NaN would have reached the lease as null: "the default timeout"


@given(timeout=st.floats(min_value=0, max_value=MAX_EXEC_TIMEOUT_SECONDS, exclude_min=True))
async def test_any_valid_timeout_is_sent_unchanged(timeout: float) -> None:
    leases, temporal = _leases()
    await leases.exec("ws1", "g1", ["true"], timeout_seconds=timeout)
    assert [req.timeout_seconds for req in temporal.sent] == [timeout]


@pytest.mark.parametrize("timeout", ["5", True])
async def test_a_timeout_that_is_no_number_is_refused(timeout: Any) -> None:
    leases, temporal = _leases()
    with pytest.raises(InvalidRequest, match="timeout_seconds must be a number"):
        await leases.exec("ws1", "g1", ["true"], timeout_seconds=timeout)
    assert temporal.sent == []


@given(epoch=st.integers(max_value=-1))
async def test_any_negative_epoch_is_invalid_not_stale(epoch: int) -> None:
    leases, temporal = _leases()
    for call in (
        lambda: leases.heartbeat("ws1", "g1", "t1", epoch),
        lambda: leases.exec("ws1", "g1", ["true"], epoch=epoch),
        lambda: leases.report_box_lost("ws1", "g1", epoch, "i-1"),
        lambda: leases.acquire("ws1", "g1", expected_epoch=epoch),
    ):
        with pytest.raises(InvalidRequest, match="epoch must be >= 0") as info:
            await call()
        assert type(info.value) is InvalidRequest
    assert temporal.sent == []


@pytest.mark.parametrize("epoch", ["1", True, 1.0, None])
async def test_an_epoch_that_is_no_int_is_refused(epoch: Any) -> None:
    leases, temporal = _leases()
    with pytest.raises(InvalidRequest, match=r"^epoch must be an int") as info:
        await leases.heartbeat("ws1", "g1", "t1", epoch)
    assert type(epoch).__name__ in info.value.message
    if epoch is not None:
        with pytest.raises(InvalidRequest, match=r"^epoch must be an int"):
            await leases.exec("ws1", "g1", ["true"], epoch=epoch)
        with pytest.raises(InvalidRequest, match=r"^expected_epoch must be an int"):
            await leases.acquire("ws1", "g1", expected_epoch=epoch)
    assert temporal.sent == []


@given(epoch=st.integers(min_value=0, max_value=2**62))
async def test_any_non_negative_epoch_is_sent_unchanged(epoch: int) -> None:
    leases, temporal = _leases()
    await leases.heartbeat("ws1", "g1", "t1", epoch)
    await leases.exec("ws1", "g1", ["true"], epoch=epoch)
    assert [req.epoch for req in temporal.sent] == [epoch, epoch]


async def test_an_int_workspace_id_is_an_invalid_request_naming_it() -> None:
    leases, temporal = _leases()
    with pytest.raises(InvalidRequest, match="workspace id must be a string, not int 42"):
        await leases.describe(cast(str, 42), "g1")
    with pytest.raises(InvalidRequest, match="group id must be a string, not int 7"):
        await leases.acquire("ws1", cast(str, 7))
    assert temporal.sent == []


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        ("echo hi", r"cmd must be a list of strings \(argv\), e.g. \['sh', '-c', 'echo hi'\], not a str"),
        (["echo", 1], "cmd must be a list of strings"),
        ([], "cmd must name a program first"),
        ([""], "cmd must name a program first"),
    ],
)
async def test_a_malformed_cmd_is_an_invalid_request_naming_it(cmd: Any, expected: str) -> None:
    leases, temporal = _leases()
    with pytest.raises(InvalidRequest, match=expected):
        await leases.exec("ws1", "g1", cmd)
    assert temporal.sent == []


async def test_other_fields_of_the_wrong_type_name_their_field() -> None:
    leases, temporal = _leases()
    with pytest.raises(InvalidRequest, match=r"invalid ExecRequest: env\.A: Input should be a valid string"):
        await leases.exec("ws1", "g1", ["true"], env=cast(dict[str, str], {"A": 1}))
    with pytest.raises(InvalidRequest, match=r"invalid HeartbeatRequest: holder_id: Input should be a valid string"):
        await leases.heartbeat("ws1", "g1", cast(str, 5), 1)
    assert temporal.sent == []


# --------------------------------------------------------------------------- timers and settings

TIMERS = [name for name in LeaseTimers.model_fields if name.endswith("_seconds")]
STRICTLY_POSITIVE = {
    "holder_ttl_seconds",
    "warming_ttl_seconds",
    "probe_timeout_seconds",
    "exec_timeout_seconds",
    "activity_heartbeat_seconds",
    "capture_timeout_seconds",
    "teardown_retry_seconds",
    "hard_lifetime_seconds",
}


def test_a_negative_holder_ttl_in_the_environment_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_HOLDER_TTL_SECONDS", "-5")
    with pytest.raises(SandboxConfigError, match="SANDBOX_HOLDER_TTL_SECONDS: Input should be greater than 0"):
        Settings()


def test_the_client_refuses_settings_that_skipped_their_bounds(tmp_path: Path) -> None:
    # model_copy does not validate: the client path checks the timers it will send itself.
    bad = Settings(data_dir=tmp_path).model_copy(update={"holder_ttl_seconds": -5.0})
    with pytest.raises(SandboxConfigError, match=r"SANDBOX_HOLDER_TTL_SECONDS must be a finite number > 0, not -5.0"):
        LeaseClient(cast(Client, _Temporal()), bad)
    contradictory = Settings(data_dir=tmp_path).model_copy(update={"probe_timeout_seconds": 500.0})
    with pytest.raises(SandboxConfigError, match="SANDBOX_PROBE_TIMEOUT_SECONDS"):
        LeaseClient(cast(Client, _Temporal()), contradictory)


@given(
    name=st.sampled_from(TIMERS),
    value=st.one_of(NON_FINITE, st.floats(max_value=0, allow_nan=False, exclude_max=True)),
)
def test_any_non_finite_or_negative_timer_is_refused_by_settings_and_timers(name: str, value: float) -> None:
    with pytest.raises(SandboxConfigError, match=f"SANDBOX_{name.upper()}"):
        Settings(**{name: value})
    assert [field for field, _ in LeaseTimers(**{name: value}).violations()] == [name]


@given(name=st.sampled_from(TIMERS), value=st.floats(min_value=0, max_value=1e9))
def test_any_finite_timer_in_bounds_is_accepted_by_settings_and_timers(name: str, value: float) -> None:
    refused = value == 0 and name in STRICTLY_POSITIVE
    settings: Settings | None
    try:
        settings = Settings(**{name: value})
    except SandboxConfigError:
        settings = None
    assert (settings is None) == refused
    assert bool(LeaseTimers(**{name: value}).violations()) == refused
    if settings is not None and name not in ("warming_ttl_seconds", "probe_timeout_seconds"):
        # (those two must also not contradict each other: Settings.check, tested elsewhere)
        assert getattr(timers_from_settings(settings), name) == value
