from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.edge import DESKTOP_TOKEN_PORT, TERMINAL_TOKEN_PORT, EdgeGate, EdgeKey, offered_protocols
from sandbox.stream_token import StreamTokenKey, derive_lease_key

ROOT = b"unit-root"
LEASE = "lease/ws/g"


def _mint(lease: str = LEASE, epoch: int = 2, *, port: int = DESKTOP_TOKEN_PORT, now: int | None = None) -> str:
    key = StreamTokenKey(derive_lease_key(ROOT, lease, epoch))
    fields = {
        "workspace_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "viewer_id": str(uuid.uuid4()),
        "lease_epoch": epoch,
        "port": port,
    }
    return key.mint_for(fields, now=now)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_text(derive_lease_key(ROOT, LEASE, 2).hex() + "\n")
    return path


def test_offered_protocols_are_split_and_trimmed() -> None:
    assert offered_protocols(["binary, ogs_a.b", " tty ,,x"]) == ["binary", "ogs_a.b", "tty", "x"]
    assert offered_protocols([]) == []


def test_a_valid_token_is_admitted_and_removed_from_the_protocols(key_file: Path) -> None:
    gate = EdgeGate(EdgeKey(key_file), DESKTOP_TOKEN_PORT)
    verdict = gate.admit([f"binary, {_mint()}"])
    assert verdict.admitted and verdict.reason == "ok"
    assert verdict.protocols == ("binary",)
    assert verdict.claims is not None and verdict.claims.lease_epoch == 2


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        (lambda: ["binary"], "no_token"),
        (list, "no_token"),
        (lambda: [f"binary, {_mint(epoch=1)}"], "invalid_token"),
        (lambda: [f"binary, {_mint(lease='lease/ws/other')}"], "invalid_token"),
        (lambda: [f"binary, {_mint(now=int(time.time()) - 1000)}"], "invalid_token"),
        (lambda: [f"binary, {_mint(port=TERMINAL_TOKEN_PORT)}"], "wrong_plane"),
        (lambda: ["binary, ogs_x.y"], "invalid_token"),
    ],
    ids=["no-token", "nothing", "older-epoch", "other-lease", "expired", "other-plane", "garbage"],
)
def test_bad_offers_are_refused_with_a_reason(key_file: Path, offer: Callable[[], list[str]], reason: str) -> None:
    # Tokens are minted when the test runs, not at collection: a long suite must not expire them.
    verdict = EdgeGate(EdgeKey(key_file), DESKTOP_TOKEN_PORT).admit(offer())
    assert not verdict.admitted and verdict.reason == reason and verdict.claims is None


def test_without_a_usable_key_nothing_is_admitted(tmp_path: Path) -> None:
    path = tmp_path / "key"
    gate = EdgeGate(EdgeKey(path), DESKTOP_TOKEN_PORT)
    assert gate.admit([_mint()]).reason == "no_key"
    for junk in ("", "zz" * 32, "ab" * 31, "ab" * 33):
        path.write_text(junk)
        assert gate.admit([_mint()]).reason == "no_key", junk


def test_a_rewritten_key_file_takes_effect_for_the_next_request(key_file: Path) -> None:
    gate = EdgeGate(EdgeKey(key_file), DESKTOP_TOKEN_PORT)
    old = _mint(epoch=2)
    assert gate.admit([old]).admitted
    tmp = key_file.with_name("key.new")
    tmp.write_text(derive_lease_key(ROOT, LEASE, 3).hex())
    os.replace(tmp, key_file)
    assert gate.admit([old]).reason == "invalid_token"
    assert gate.admit([_mint(epoch=3)]).admitted


@given(st.lists(st.text(max_size=300), max_size=5))
def test_admission_never_raises_on_hostile_headers(values: list[str]) -> None:
    gate = EdgeGate(EdgeKey(Path("/nonexistent/key")), DESKTOP_TOKEN_PORT)
    verdict = gate.admit(values)
    assert not verdict.admitted
