"""The runtime-desktop overlay: `local` offers DesktopStream, Recording and ComputerUse when the worker runs one.

The base document keeps upstream's answer for ``local`` (no desktop: ``backend_unsupported``), which
the vectors pin; with the context's ``runtime_desktop`` the three cells must come out exactly as
upstream negotiates them for a ``vnc-ws`` desktop backend (``modal``, also Linux-only) under the
same OS, liveness and policy: the modal vectors are the oracle.
"""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.capabilities import (
    NegotiationContext,
    RuntimeDesktop,
    SessionCapabilities,
    negotiate_capabilities,
    runtime_desktop_overlay,
)
from sandbox.errors import InvalidRequest
from tests.unit.sandbox.test_capabilities import VECTORS, VECTORS_MISSING, decode

DESKTOP_CELLS = ("DesktopStream", "Recording", "ComputerUse")
FULL = {"display": True, "recording": True, "computer_use": True}


def context(**fields: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "session_id": "s1",
        "backend": "local",
        "os": "linux",
        "liveness": "warm",
        "lease_epoch": 3,
        "desktop_enabled": True,
    }
    return {**ctx, **fields}


def cells(document: SessionCapabilities) -> dict[str, Any]:
    wire: dict[str, Any] = document.model_dump(mode="json")
    return {name: wire[name] for name in DESKTOP_CELLS}


def modal_vectors() -> list[Any]:
    if VECTORS_MISSING:
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(v, id=v["note"]) for v in VECTORS if v["args"][0].get("backend") == "modal"]


@pytest.mark.parametrize("vector", modal_vectors())
def test_local_with_a_runtime_desktop_negotiates_like_a_vnc_desktop_backend(vector: dict[str, Any] | None) -> None:
    assert vector is not None, VECTORS_MISSING
    ctx = {**decode(vector["args"][0]), "backend": "local", "runtimeDesktop": FULL}
    expected = vector["expect"]["ok"]
    assert cells(negotiate_capabilities(ctx)) == {name: expected[name] for name in DESKTOP_CELLS}


def local_vectors() -> list[Any]:
    if VECTORS_MISSING:
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(v, id=v["note"]) for v in VECTORS if v["args"][0].get("backend") == "local"]


@pytest.mark.parametrize("vector", local_vectors())
def test_without_a_runtime_desktop_local_keeps_the_upstream_answer(vector: dict[str, Any] | None) -> None:
    assert vector is not None, VECTORS_MISSING
    ctx = decode(vector["args"][0])
    expected = vector["expect"]["ok"]
    for runtime in (None, {"display": False, "recording": True, "computer_use": True}):
        document = negotiate_capabilities({**ctx, "runtimeDesktop": runtime})
        assert document.model_dump(mode="json") == expected
        # And the static cells never change, whatever the runtime says.
        full = negotiate_capabilities({**ctx, "runtimeDesktop": FULL}).model_dump(mode="json")
        static = {k: v for k, v in expected.items() if k not in DESKTOP_CELLS}
        assert {k: v for k, v in full.items() if k not in DESKTOP_CELLS} == static


def test_a_warm_local_lease_offers_the_desktop_recording_and_computer_use() -> None:
    doc = negotiate_capabilities(context(runtime_desktop=RuntimeDesktop(**FULL)))
    assert doc.desktop_stream.reason is None
    assert (doc.desktop_stream.transport, doc.desktop_stream.client, doc.desktop_stream.mode) == (
        "vnc-ws",
        "novnc",
        "interactive",
    )
    assert doc.desktop_stream.requires_acknowledgment
    assert doc.recording.available and doc.recording.modes and doc.recording.codecs == ("h264-mp4", "vp9-webm")
    assert doc.computer_use.available and doc.computer_use.reason is None


def test_cold_local_lease_can_record_and_use_the_computer_but_not_stream_yet() -> None:
    doc = negotiate_capabilities(context(liveness="cold", runtime_desktop=RuntimeDesktop(**FULL)))
    assert doc.desktop_stream.reason == "lease_cold"
    assert doc.recording.available
    assert doc.computer_use.available


@pytest.mark.parametrize("os_name", ["macos", "windows", "plan9"])
def test_os_unsupported_still_dominates(os_name: str) -> None:
    doc = negotiate_capabilities(context(os=os_name, runtime_desktop=RuntimeDesktop(**FULL)))
    assert {doc.desktop_stream.reason, doc.recording.reason, doc.computer_use.reason} == {"os_unsupported"}


def test_policy_toggles_still_gate_the_cells() -> None:
    off = negotiate_capabilities(context(desktop_enabled=False, runtime_desktop=RuntimeDesktop(**FULL)))
    assert {off.desktop_stream.reason, off.recording.reason, off.computer_use.reason} == {"disabled_by_policy"}
    no_cu = negotiate_capabilities(context(computer_use_enabled=False, runtime_desktop=RuntimeDesktop(**FULL)))
    assert no_cu.desktop_stream.reason is None and no_cu.recording.available
    assert (no_cu.computer_use.available, no_cu.computer_use.reason) == (False, "disabled_by_policy")
    read_only = negotiate_capabilities(context(computer_use_read_only=True, runtime_desktop=RuntimeDesktop(**FULL)))
    assert read_only.computer_use.available and read_only.computer_use.read_only


def test_a_cell_whose_tools_are_missing_keeps_its_base_reason() -> None:
    doc = negotiate_capabilities(context(runtime_desktop=RuntimeDesktop(display=True, computer_use=True)))
    assert doc.desktop_stream.reason is None and doc.computer_use.available
    assert (doc.recording.available, doc.recording.reason) == (False, "backend_unsupported")
    doc = negotiate_capabilities(context(runtime_desktop=RuntimeDesktop(display=True, recording=True)))
    assert doc.recording.available
    assert (doc.computer_use.available, doc.computer_use.reason) == (False, "backend_unsupported")


@pytest.mark.parametrize("backend", ["modal", "daytona", "selfhosted"])
def test_a_static_desktop_backend_is_left_to_its_descriptor(backend: str) -> None:
    # A descriptor with a desktop already says everything: the runtime fact changes nothing.
    base = negotiate_capabilities(context(backend=backend, now="2025-06-01T12:00:00Z"))
    with_runtime = negotiate_capabilities(
        context(backend=backend, now="2025-06-01T12:00:00Z", runtime_desktop=RuntimeDesktop(**FULL))
    )
    assert with_runtime == base


def test_the_overlay_alone_is_a_no_op_without_a_runtime_desktop() -> None:
    base = negotiate_capabilities(context())
    assert runtime_desktop_overlay(NegotiationContext.model_validate(context()), base) is base


def test_caller_overlays_run_after_the_runtime_desktop() -> None:
    seen: list[bool] = []

    def observe(ctx: Any, doc: SessionCapabilities) -> SessionCapabilities:
        seen.append(doc.computer_use.available)
        return doc

    negotiate_capabilities(context(runtime_desktop=RuntimeDesktop(**FULL)), overlays=[observe])
    assert seen == [True]


@pytest.mark.parametrize(
    "runtime",
    [{"display": "yes"}, {"recording": True}, {"display": True, "gpu": True}, "full"],
)
def test_a_malformed_runtime_desktop_is_an_invalid_request(runtime: Any) -> None:
    with pytest.raises(InvalidRequest, match="runtime"):
        negotiate_capabilities(context(runtimeDesktop=runtime))


def test_runtime_desktop_is_not_echoed_in_the_document() -> None:
    # The document's wire shape stays upstream's: the runtime fact changes cells, not keys.
    plain = negotiate_capabilities(context(now="2025-06-01T12:00:00Z")).model_dump(mode="json")
    runtime = negotiate_capabilities(
        context(now="2025-06-01T12:00:00Z", runtime_desktop=RuntimeDesktop(**FULL))
    ).model_dump(mode="json")
    assert set(plain) == set(runtime)
