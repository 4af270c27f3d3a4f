"""A selfhosted lease's capabilities reflect what its agent reported on a ping (sandbox/selfhosted_capabilities.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.capabilities import NegotiationContext, negotiate_capabilities
from sandbox.control_protocol import PingReply
from sandbox.selfhosted_capabilities import agent_report_overlays

CELLS = ("FileSystem", "Terminal", "Git", "DesktopStream", "Recording", "ComputerUse")


def _doc(responded: bool, reply: PingReply | None) -> dict[str, Any]:
    base = NegotiationContext(
        session_id="lease/ws1/g1", backend="selfhosted", os="linux", liveness="warm", lease_epoch=1,
        desktop_enabled=True,
    )  # fmt: skip
    doc = negotiate_capabilities(base, overlays=agent_report_overlays(responded, reply))
    return doc.model_dump(mode="json", by_alias=True)


def _unavailable(cell: dict[str, Any]) -> bool:
    return cell.get("available") is False or ("transport" in cell and cell["transport"] is None)


def test_the_base_document_alone_offers_everything() -> None:
    # What `lease capabilities` said before it asked the agent: the positive control of the rest.
    base = NegotiationContext(
        session_id="lease/ws1/g1", backend="selfhosted", os="linux", liveness="warm", lease_epoch=1,
        desktop_enabled=True,
    )  # fmt: skip
    doc = negotiate_capabilities(base).model_dump(mode="json", by_alias=True)
    assert not any(_unavailable(doc[name]) for name in CELLS)


def test_an_agent_that_does_not_answer_makes_every_cell_agent_offline() -> None:
    doc = _doc(False, None)
    for name in CELLS:
        assert _unavailable(doc[name]) and doc[name]["reason"] == "agent_offline", name


def test_an_agent_with_no_display_offers_files_and_terminal_only() -> None:
    doc = _doc(True, PingReply(has_display=False, consents=["exec", "files", "screen_view", "screen_control"]))
    assert doc["FileSystem"]["available"] is True and doc["Terminal"]["transport"] is not None
    assert doc["Git"]["available"] is True
    for name in ("DesktopStream", "Recording", "ComputerUse"):
        assert _unavailable(doc[name]) and doc[name]["reason"] == "display_unavailable", name


def test_a_display_with_every_consent_offers_everything() -> None:
    doc = _doc(True, PingReply(has_display=True, consents=["exec", "files", "screen_view", "screen_control"]))
    assert not any(_unavailable(doc[name]) for name in CELLS)


@pytest.mark.parametrize(
    ("withheld", "cells"),
    [
        ("files", {"FileSystem", "Git"}),
        ("exec", {"Terminal", "Git"}),
        ("screen_view", {"DesktopStream", "Recording", "ComputerUse"}),
        ("screen_control", {"ComputerUse"}),
    ],
)
def test_a_consent_the_owner_withheld_makes_its_cells_consent_required(withheld: str, cells: set[str]) -> None:
    consents = [c for c in ("exec", "files", "screen_view", "screen_control") if c != withheld]
    doc = _doc(True, PingReply(has_display=True, consents=consents))
    for name in CELLS:
        if name in cells:
            assert _unavailable(doc[name]) and doc[name]["reason"] == "consent_required", name
        else:
            assert not _unavailable(doc[name]), name


def test_an_older_agent_without_consents_is_read_from_screen_control() -> None:
    doc = _doc(True, PingReply(has_display=True, screen_control=False, consents=None))
    assert doc["ComputerUse"]["reason"] == "consent_required" and doc["DesktopStream"]["mode"] == "read-only"
    assert doc["FileSystem"]["available"] is True and doc["Terminal"]["transport"] is not None


def test_an_answer_without_a_report_knows_no_display() -> None:
    doc = _doc(True, None)
    assert doc["FileSystem"]["available"] is True
    assert doc["DesktopStream"]["reason"] == "display_unavailable"
