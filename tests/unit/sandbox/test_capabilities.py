"""Capability negotiation against the upstream vectors (``capabilities.json``), plus reason tables.

The vectors fix the whole document for every backend x OS x liveness and the policy combinations;
the tables below state, per backend, which cells carry each reason, so a regression names the
backend and the reason it broke.
"""

from __future__ import annotations

import itertools
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.capabilities import (
    NegotiationContext,
    SessionCapabilities,
    negotiate_capabilities,
    to_js_iso,
)
from sandbox.descriptors import SANDBOX_BACKENDS, SANDBOX_OS, CapabilityUnavailableReason
from sandbox.errors import InvalidRequest, UnknownBackend
from tests.upstream_vectors import VECTORS_ENV, vectors_dir

# --- loading the vectors ------------------------------------------------------------------------


def load_vectors(name: str) -> tuple[list[dict[str, Any]], str | None]:
    """The vectors of one file, or an explanation of why they could not be read."""
    path = vectors_dir() / name
    if not path.is_file():
        return [], (
            f"upstream conformance vectors missing: {path} does not exist. These tests must not be skipped; "
            f"point {VECTORS_ENV} at the folder holding {name} (shared/reference/upstream-vectors)."
        )
    with path.open(encoding="utf-8") as fh:
        return json.load(fh), None


VECTORS, VECTORS_MISSING = load_vectors("capabilities.json")


def decode(value: Any) -> Any:
    """Turn the vector markers used by this file into Python values (``$date`` → aware datetime)."""
    if isinstance(value, dict):
        if "$date" in value:
            assert value["$date"] is not None, "invalid-date vectors are not expected in capabilities.json"
            return datetime.fromisoformat(value["$date"].replace("Z", "+00:00"))
        assert not any(key.startswith("$") for key in value), f"unhandled vector marker in {value}"
        return {key: decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


def vector_params() -> list[Any]:
    if VECTORS_MISSING:
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(v, id=v["note"]) for v in VECTORS]


@pytest.mark.parametrize("vector", vector_params())
def test_upstream_vector(vector: dict[str, Any] | None) -> None:
    if vector is None:
        pytest.fail(VECTORS_MISSING or "no vectors")
    assert vector["fn"] == "negotiateCapabilities"
    (ctx,) = decode(vector["args"])
    expect = vector["expect"]
    if "error" in expect:
        error = expect["error"]
        if error["name"] == "ZodError":
            with pytest.raises(InvalidRequest):
                negotiate_capabilities(ctx)
            return
        assert error["message"] == f'Unknown sandbox backend "{ctx["backend"]}"', f"unmapped upstream error {error}"
        with pytest.raises(UnknownBackend) as err:
            negotiate_capabilities(ctx)
        assert err.value.backend == ctx["backend"]
        return
    document = negotiate_capabilities(ctx)
    assert document.model_dump(mode="json") == expect["ok"]
    # The upstream document parses back into an equal model (the wire format is the schema).
    assert SessionCapabilities.model_validate(expect["ok"]) == document


def test_vector_file_is_complete() -> None:
    if VECTORS_MISSING:
        pytest.fail(VECTORS_MISSING)
    assert len(VECTORS) == 393
    assert {v["args"][0]["backend"] for v in VECTORS} >= set(SANDBOX_BACKENDS)


# --- reason tables: every reason x every backend --------------------------------------------------

FS, T, G, D, R, CU = "FileSystem", "Terminal", "Git", "DesktopStream", "Recording", "ComputerUse"
CELLS = (FS, T, G, D, R, CU)
ALL = frozenset(CELLS)
NONE: frozenset[str] = frozenset()

BASE = {"sessionId": "sess-1", "leaseEpoch": 7, "desktopEnabled": True, "now": "2025-06-01T12:00:00.000Z"}

# Each reason has one scenario; the table says which cells carry that reason, per backend. It is
# written from the upstream descriptor table (reference §1.1), not computed from our registry.
SCENARIOS: dict[str, dict[str, Any]] = {
    "os_unsupported": {"os": "windows", "liveness": "warm"},
    "backend_unsupported": {"os": "linux", "liveness": "warm"},
    "tier_headless": {"os": "linux", "liveness": "warm"},
    "disabled_by_policy": {"os": "linux", "liveness": "warm", "desktopEnabled": False, "terminalEnabled": False},
    "lease_cold": {"os": "linux", "liveness": "cold"},
}
EXPECTED: dict[str, dict[str, frozenset[str]]] = {
    "os_unsupported": {b: (NONE if b == "selfhosted" else ALL) for b in SANDBOX_BACKENDS},
    "backend_unsupported": {
        **dict.fromkeys(SANDBOX_BACKENDS, NONE),
        "none": ALL,
        "docker": frozenset({D, R, CU}),
        "local": frozenset({D, R, CU}),
    },
    "tier_headless": {
        **dict.fromkeys(SANDBOX_BACKENDS, NONE),
        "cloudflare": frozenset({D, R, CU}),
        "vercel": frozenset({D, R, CU}),
    },
    "disabled_by_policy": {
        "docker": frozenset({T}),
        "modal": frozenset({T, D, R, CU}),
        "local": frozenset({T}),
        "none": NONE,
        "daytona": frozenset({T, D, R, CU}),
        "runloop": frozenset({D, R, CU}),
        "e2b": frozenset({D, R, CU}),
        "blaxel": frozenset({D, R, CU}),
        "cloudflare": frozenset({T}),
        "vercel": NONE,
        "selfhosted": frozenset({T, D, R, CU}),
        "opensandbox": frozenset({T, D, R, CU}),
    },
    "lease_cold": {
        "docker": frozenset({T}),
        "modal": frozenset({T, D}),
        "local": frozenset({T}),
        "none": NONE,
        "daytona": frozenset({T, D}),
        "runloop": frozenset({D}),
        "e2b": frozenset({D}),
        "blaxel": frozenset({D}),
        "cloudflare": frozenset({T}),
        "vercel": NONE,
        "selfhosted": frozenset({T, D}),
        "opensandbox": frozenset({T, D}),
    },
}

# Reasons the base negotiator never emits: not_provisioned is unused upstream, the others belong to
# the selfhosted overlay. They are checked over a sweep of contexts for every backend.
OVERLAY_ONLY = ("not_provisioned", "agent_offline", "agent_reconnecting", "consent_required", "display_unavailable")


def sweep_contexts(backend: str) -> list[dict[str, Any]]:
    contexts = []
    for os_name, liveness, desktop, terminal, secret in itertools.product(
        ("linux", "macos", "windows", "plan9"),
        ("cold", "warming", "warm", "draining"),
        (True, False),
        (True, False),
        (True, False),
    ):
        contexts.append(
            {
                **BASE,
                "backend": backend,
                "os": os_name,
                "liveness": liveness,
                "desktopEnabled": desktop,
                "terminalEnabled": terminal,
                "streamTokenSecretAvailable": secret,
                "computerUseEnabled": terminal,
            }
        )
    return contexts


def cells_with_reason(document: SessionCapabilities, reason: str) -> frozenset[str]:
    dumped = document.model_dump(mode="json")
    return frozenset(cell for cell in CELLS if dumped[cell]["reason"] == reason)


def test_tables_cover_every_reason() -> None:
    assert set(EXPECTED) | set(OVERLAY_ONLY) == {r.value for r in CapabilityUnavailableReason}


@pytest.mark.parametrize("backend", SANDBOX_BACKENDS)
@pytest.mark.parametrize("reason", [r.value for r in CapabilityUnavailableReason])
def test_reason_table(reason: str, backend: str) -> None:
    if reason in OVERLAY_ONLY:
        for ctx in sweep_contexts(backend):
            assert cells_with_reason(negotiate_capabilities(ctx), reason) == NONE, ctx
        return
    document = negotiate_capabilities({**BASE, **SCENARIOS[reason], "backend": backend})
    assert cells_with_reason(document, reason) == EXPECTED[reason][backend]


def test_os_unsupported_dominates_every_other_reason() -> None:
    # Everything else would be gated too (cold, desktop off, no secret), yet the OS wins everywhere.
    for backend in SANDBOX_BACKENDS:
        ctx = {
            **BASE,
            "backend": backend,
            "os": "plan9",
            "liveness": "cold",
            "desktopEnabled": False,
            "terminalEnabled": False,
            "streamTokenSecretAvailable": False,
        }
        assert cells_with_reason(negotiate_capabilities(ctx), "os_unsupported") == ALL


def test_missing_stream_token_secret_degrades_only_the_streamed_planes() -> None:
    document = negotiate_capabilities(
        {**BASE, "backend": "modal", "os": "linux", "liveness": "warm", "streamTokenSecretAvailable": False}
    )
    assert cells_with_reason(document, "disabled_by_policy") == {T, D}
    assert document.terminal.transport == "sse-events"
    assert document.desktop_stream.transport is None
    assert document.recording.available and document.computer_use.available


# --- the minted endpoints -----------------------------------------------------------------------

DESKTOP = {
    "url": "wss://box.example:443/",
    "token": "ogs_abc.def",
    "expiresAt": "2025-06-01T12:02:00.000Z",
    "resolution": [1280, 800],
}
TERMINAL = {"url": "wss://box.example:444/", "token": "ogs_ghi.jkl", "expiresAt": "2025-06-01T12:02:00.000Z"}


def test_minted_desktop_is_handed_out_only_after_acknowledgment() -> None:
    ctx = {**BASE, "backend": "modal", "os": "linux", "liveness": "cold", "desktopStream": DESKTOP}
    unacknowledged = negotiate_capabilities(ctx).desktop_stream
    # The minted stream proves the box is up, but un-redacted pixels need consent first.
    assert unacknowledged.reason is None and unacknowledged.requires_acknowledgment
    assert (unacknowledged.url, unacknowledged.token, unacknowledged.resolution) == (None, None, (1024, 768))
    acknowledged = negotiate_capabilities({**ctx, "desktopAcknowledged": True}).desktop_stream
    assert acknowledged.url == DESKTOP["url"] and acknowledged.token == DESKTOP["token"]
    assert acknowledged.resolution == (1280, 800)
    assert acknowledged.model_dump(mode="json")["expiresAt"] == DESKTOP["expiresAt"]


@pytest.mark.parametrize(
    "expires_at",
    ["2025-06-01T12:02:00Z", "2025-06-01T12:02:00.123456Z", "2025-06-01T14:02:00+02:00", "2025-06-01T12:02:00.000Z"],
)
def test_minted_expiry_strings_pass_through_unchanged(expires_at: str) -> None:
    # Upstream copies the caller's expiresAt string; it is never re-rendered as toISOString.
    desktop = {**DESKTOP, "expiresAt": expires_at}
    terminal = {**TERMINAL, "expiresAt": expires_at}
    ctx = {**BASE, "backend": "modal", "os": "linux", "liveness": "warm", "desktopAcknowledged": True}
    document = negotiate_capabilities({**ctx, "desktopStream": desktop, "terminalStream": terminal})
    dumped = document.model_dump(mode="json")
    assert dumped["DesktopStream"]["expiresAt"] == expires_at
    assert dumped["Terminal"]["expiresAt"] == expires_at
    assert document.desktop_stream.expires_at == expires_at
    assert SessionCapabilities.model_validate(dumped) == document


@pytest.mark.parametrize("expires_at", ["soon", "2025-06-01T12:02:00", "", 1748779320])
def test_minted_expiry_must_be_an_iso_instant(expires_at: object) -> None:
    with pytest.raises(InvalidRequest, match="expiresAt"):
        negotiate_capabilities({**VALID, "terminalStream": {**TERMINAL, "expiresAt": expires_at}})


def test_minted_terminal_is_dropped_when_policy_disables_the_pty() -> None:
    ctx = {**BASE, "backend": "local", "os": "linux", "liveness": "warm", "terminalStream": TERMINAL}
    live = negotiate_capabilities(ctx).terminal
    assert (live.transport, live.url, live.token) == ("pty-ws", TERMINAL["url"], TERMINAL["token"])
    disabled = negotiate_capabilities({**ctx, "terminalEnabled": False}).terminal
    assert (disabled.transport, disabled.url, disabled.token, disabled.reason) == (
        "sse-events",
        None,
        None,
        "disabled_by_policy",
    )


# --- input validation ---------------------------------------------------------------------------

VALID = {**BASE, "backend": "local", "os": "linux", "liveness": "warm"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"desktopEnabled": None}, "desktopEnabled", id="desktopEnabled-null"),
        pytest.param({"desktopEnabled": "yes"}, "desktopEnabled", id="desktopEnabled-string"),
        pytest.param({"leaseEpoch": -1}, "leaseEpoch", id="negative-epoch"),
        pytest.param({"leaseEpoch": "7"}, "leaseEpoch", id="epoch-as-string"),
        pytest.param({"leaseEpoch": True}, "leaseEpoch", id="epoch-as-bool"),
        pytest.param({"sessionId": ""}, "sessionId", id="empty-session-id"),
        pytest.param({"backend": 3}, "backend", id="backend-not-a-string"),
        pytest.param({"workspaceGeneration": -2}, "workspaceGeneration", id="negative-generation"),
        pytest.param({"sharedSessionIds": "sess-b"}, "sharedSessionIds", id="shared-ids-not-a-list"),
        pytest.param({"now": "2025-06-01T12:00:00"}, "now", id="naive-now"),
        pytest.param({"now": "yesterday"}, "now", id="unparseable-now"),
        pytest.param({"desktopEnable": True}, "desktopEnable", id="misspelt-toggle"),
        pytest.param(
            {"terminalStream": {"url": "wss://x/", "expiresAt": "2025-06-01T12:02:00Z"}}, "token", id="no-token"
        ),
        pytest.param({"terminalStream": {**TERMINAL, "transport": "sse-events"}}, "transport", id="bad-pty-transport"),
        pytest.param({"desktopStream": {**DESKTOP, "resolution": [1280]}}, "resolution", id="short-resolution"),
        pytest.param({"desktopStream": {**DESKTOP, "resolution": [0, 800]}}, "resolution", id="zero-resolution"),
    ],
)
def test_malformed_context_is_an_invalid_request(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        negotiate_capabilities({**VALID, **change})
    assert not isinstance(err.value, UnknownBackend)
    assert field in err.value.message


def test_missing_required_toggle_is_an_invalid_request() -> None:
    ctx = {key: value for key, value in VALID.items() if key != "desktopEnabled"}
    with pytest.raises(InvalidRequest, match="desktopEnabled"):
        negotiate_capabilities(ctx)


@pytest.mark.parametrize("ctx", [None, ["backend", "local"], "local"])
def test_non_mapping_context_is_an_invalid_request(ctx: Any) -> None:
    with pytest.raises(InvalidRequest):
        negotiate_capabilities(ctx)


def test_snake_case_and_model_inputs_are_equivalent() -> None:
    camel = {**VALID, "terminalStream": TERMINAL, "desktopAcknowledged": True}
    snake = {
        "session_id": "sess-1",
        "lease_epoch": 7,
        "desktop_enabled": True,
        "now": "2025-06-01T12:00:00.000Z",
        "backend": "local",
        "os": "linux",
        "liveness": "warm",
        "terminal_stream": TERMINAL,
        "desktop_acknowledged": True,
    }
    expected = negotiate_capabilities(camel)
    assert negotiate_capabilities(snake) == expected
    assert negotiate_capabilities(NegotiationContext.model_validate(camel)) == expected


# --- the document -------------------------------------------------------------------------------


def test_negotiated_at_defaults_to_now_in_javascript_iso_form() -> None:
    before = datetime.now(UTC)
    document = negotiate_capabilities({key: value for key, value in VALID.items() if key != "now"})
    assert before <= document.negotiated_at <= datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", document.model_dump(mode="json")["negotiatedAt"])


def test_js_iso_is_utc_with_truncated_milliseconds() -> None:
    moment = datetime(2025, 6, 1, 14, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert to_js_iso(moment) == "2025-06-01T12:00:00.999Z"


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(98, 4, 2, 3, 4, 5, 6_000, tzinfo=UTC), "0098-04-02T03:04:05.006Z"),
        (datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC), "0999-12-31T23:59:59.000Z"),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
        # Aware datetimes whose UTC instant leaves Python's year range: JavaScript's extended years.
        (datetime(1, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), "0000-12-31T23:30:00.000Z"),
        (datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-2))), "+010000-01-01T01:00:00.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "9999-12-31T23:59:59.999Z"),
        (datetime(1, 3, 1, tzinfo=timezone(timedelta(hours=1))), "0001-02-28T23:00:00.000Z"),
    ],
)
def test_js_iso_pads_and_extends_years_like_to_iso_string(moment: datetime, expected: str) -> None:
    assert to_js_iso(moment) == expected


@settings(max_examples=200)
@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])))
def test_js_iso_agrees_with_python_inside_the_four_digit_years(moment: datetime) -> None:
    utc = moment.astimezone(UTC) if 1 < moment.year < 9999 else None
    if utc is not None:
        expected = f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"
        assert to_js_iso(moment) == expected
    assert re.fullmatch(r"(\d{4}|[+-]\d{6})-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", to_js_iso(moment))


def test_document_is_frozen_and_serialises_camel_case_by_default() -> None:
    document = negotiate_capabilities(VALID)
    with pytest.raises(ValueError, match="frozen"):
        document.backend = "modal"  # type: ignore[misc]
    as_json = json.loads(document.model_dump_json())
    assert {"sessionId", "leaseEpoch", "FileSystem", "ComputerUse", "negotiatedAt"} <= set(as_json)
    assert as_json["Terminal"]["ptyCapable"] is True


def test_overlays_refine_the_base_document_in_order() -> None:
    seen: list[str] = []

    def offline(ctx: NegotiationContext, doc: SessionCapabilities) -> SessionCapabilities:
        seen.append("offline")
        cell = doc.computer_use.model_copy(update={"available": False, "reason": "agent_offline"})
        return doc.model_copy(update={"computer_use": cell})

    def stamp(ctx: NegotiationContext, doc: SessionCapabilities) -> SessionCapabilities:
        seen.append(f"stamp:{ctx.backend}:{doc.computer_use.reason}")
        return doc

    ctx = {**VALID, "backend": "selfhosted"}
    document = negotiate_capabilities(ctx, overlays=[offline, stamp])
    assert seen == ["offline", "stamp:selfhosted:agent_offline"]
    assert document.computer_use.reason == "agent_offline"
    assert negotiate_capabilities(ctx).computer_use.available is True


# --- properties over arbitrary contexts ---------------------------------------------------------

contexts = st.fixed_dictionaries(
    {
        "sessionId": st.just("sess-1"),
        "backend": st.sampled_from(SANDBOX_BACKENDS),
        "os": st.sampled_from([*SANDBOX_OS, "LINUX", "beos"]),
        "liveness": st.sampled_from(["cold", "warming", "warm", "draining", "hot"]),
        "leaseEpoch": st.integers(min_value=0, max_value=2**40),
        "desktopEnabled": st.booleans(),
        "now": st.just("2025-06-01T12:00:00.000Z"),
    },
    optional={
        "desktopInteractive": st.booleans(),
        "computerUseEnabled": st.booleans(),
        "computerUseReadOnly": st.booleans(),
        "streamTokenSecretAvailable": st.booleans(),
        "terminalEnabled": st.booleans(),
        "desktopAcknowledged": st.booleans(),
        "shared": st.booleans(),
        "sharedSessionIds": st.lists(st.text(min_size=1, max_size=8), max_size=3),
        "desktopStream": st.just(DESKTOP),
        "terminalStream": st.sampled_from([TERMINAL, {**TERMINAL, "transport": "relay-pty"}]),
    },
)


@settings(max_examples=150, deadline=None)
@given(contexts)
def test_every_cell_is_present_and_coherent(ctx: dict[str, Any]) -> None:
    document = negotiate_capabilities(ctx)
    dumped = document.model_dump(mode="json")
    base_reasons = {"backend_unsupported", "os_unsupported", "disabled_by_policy", "lease_cold", "tier_headless"}
    for cell in CELLS:
        reason = dumped[cell]["reason"]
        assert reason is None or reason in base_reasons
        if cell not in (T, D):
            assert dumped[cell]["available"] is (reason is None), cell
    assert (dumped[D]["transport"] is None) is (dumped[D]["reason"] is not None)
    assert (dumped[T]["transport"] is None) <= (dumped[T]["reason"] is not None)
    if dumped[T]["url"] is not None:
        assert dumped[T]["transport"] in ("pty-ws", "relay-pty")
    desktop = dumped[D]
    if desktop["url"] is not None:
        assert desktop["acknowledged"] and desktop["reason"] is None
    if desktop["shared"] or desktop["sharedSessionIds"]:
        assert desktop["reason"] is None
    assert bool(dumped[R]["modes"]) is dumped[R]["available"]
    if dumped["os"] not in ("linux", "macos", "windows") or (
        dumped["os"] != "linux" and ctx["backend"] != "selfhosted"
    ):
        assert all(dumped[cell]["reason"] == "os_unsupported" for cell in CELLS)
    assert SessionCapabilities.model_validate_json(document.model_dump_json()) == document
