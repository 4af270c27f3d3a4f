"""Selfhosted liveness and the capability overlay against the upstream vectors (``selfhosted.json``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sandbox.errors import InvalidRequest
from sandbox.liveness import parse_moment, selfhosted_liveness
from sandbox.selfhosted_capabilities import (
    negotiate_selfhosted_capabilities,
    negotiate_selfhosted_capabilities_live,
)
from tests.upstream_vectors import decode_args, load_vectors, vector_params

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
ACTIVE = {
    "status": "active",
    "exposure": "whole-machine",
    "allowScreenControl": True,
    "hasDisplay": True,
    "lastSeenAt": "2025-06-01T11:59:55.000Z",
    "wentOfflineAt": None,
}


def _require(vector: dict[str, Any] | None) -> dict[str, Any]:
    if vector is None:
        load_vectors("selfhosted.json")
        raise AssertionError("unreachable")
    return vector


@pytest.mark.parametrize("vector", vector_params("selfhosted.json", "selfhostedLiveness"))
def test_liveness_vector(vector: dict[str, Any] | None) -> None:
    vector = _require(vector)
    (args,) = decode_args(vector["args"])
    result = selfhosted_liveness(args["enrollment"], args["probeResponded"], args.get("now"))
    assert result.model_dump() == vector["expect"]["ok"]


@pytest.mark.parametrize("vector", vector_params("selfhosted.json", "negotiateSelfhostedCapabilities"))
def test_negotiation_vector(vector: dict[str, Any] | None) -> None:
    vector = _require(vector)
    (args,) = decode_args(vector["args"])
    doc = negotiate_selfhosted_capabilities(args)
    assert doc.model_dump(mode="json") == vector["expect"]["ok"]


def test_every_vector_function_is_covered() -> None:
    assert {v["fn"] for v in load_vectors("selfhosted.json")} == {
        "selfhostedLiveness",
        "negotiateSelfhostedCapabilities",
    }


def test_liveness_never_reads_the_clock_when_the_probe_answered() -> None:
    # A naive "now" would be a bug if read; with a probe answer it must not matter.
    assert selfhosted_liveness(ACTIVE, True, None).state == "online"


def test_reconnect_window_boundaries() -> None:
    def state(seconds_ago: float) -> str:
        seen = {**ACTIVE, "lastSeenAt": NOW - timedelta(seconds=seconds_ago)}
        return selfhosted_liveness(seen, False, NOW).state

    assert state(0) == state(30) == state(-60) == "reconnecting"
    assert state(30.001) == state(3600) == "offline"


def test_revoked_and_goodbye_beat_a_probe_answer() -> None:
    assert selfhosted_liveness({**ACTIVE, "status": "revoked"}, True, NOW).state == "offline"
    gone = selfhosted_liveness({**ACTIVE, "wentOfflineAt": "2025-06-01T11:59:59Z"}, True, NOW)
    assert gone.state == "offline" and gone.consented


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-01T11:59:55Z", datetime(2025, 6, 1, 11, 59, 55, tzinfo=UTC)),
        ("2025-06-01 11:59:55+00", datetime(2025, 6, 1, 11, 59, 55, tzinfo=UTC)),
        ("2025-06-01T13:59:50+02:00", datetime(2025, 6, 1, 11, 59, 50, tzinfo=UTC)),
        ("2025-06-01", datetime(2025, 6, 1, tzinfo=UTC)),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_moment(text: str | None, expected: datetime | None) -> None:
    assert parse_moment(text) == expected


def test_an_empty_os_is_echoed_and_unsupported_not_defaulted_to_linux() -> None:
    ctx = {"sessionId": "s", "leaseEpoch": 1, "enrollment": ACTIVE, "probeResponded": True, "now": NOW}
    doc = negotiate_selfhosted_capabilities({**ctx, "os": ""})
    dumped = doc.model_dump(mode="json")
    assert doc.os == ""
    cells = ("FileSystem", "Terminal", "Git", "DesktopStream", "Recording", "ComputerUse")
    assert {cell: dumped[cell]["reason"] for cell in cells} == dict.fromkeys(cells, "os_unsupported")
    assert not doc.file_system.available and doc.terminal.transport is None
    # Only an absent OS defaults to linux.
    default = negotiate_selfhosted_capabilities(ctx)
    assert default.os == "linux" and default.file_system.available and default.terminal.reason is None


def test_bad_negotiation_context_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        negotiate_selfhosted_capabilities({"sessionId": "s", "leaseEpoch": -1})
    with pytest.raises(InvalidRequest):
        negotiate_selfhosted_capabilities({"sessionId": "s", "leaseEpoch": 0, "surprise": 1})


async def test_live_negotiation_pings_only_without_a_probe_result() -> None:
    class Pinger:
        calls = 0

        async def ping(self) -> bool:
            Pinger.calls += 1
            return True

    ctx = {"sessionId": "s", "leaseEpoch": 1, "enrollment": ACTIVE, "now": NOW}
    doc = await negotiate_selfhosted_capabilities_live(ctx, Pinger())
    assert doc.liveness == "warm" and doc.file_system.available and Pinger.calls == 1
    doc = await negotiate_selfhosted_capabilities_live({**ctx, "probeResponded": False}, Pinger())
    assert doc.file_system.reason == "agent_reconnecting" and Pinger.calls == 1
