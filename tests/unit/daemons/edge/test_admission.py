from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons.edge import DESKTOP_TOKEN_PORT, TERMINAL_TOKEN_PORT, EdgeGate, EdgeKey, offered_protocols
from sandbox.stream_token import StreamTokenKey, derive_lease_key

ROOT = b"unit-root"
LEASE = "lease/ws/g"


def _mint(
    lease: str = LEASE,
    epoch: int = 2,
    *,
    port: int = DESKTOP_TOKEN_PORT,
    now: int | None = None,
    mode: str = "view",
    claimed_epoch: int | None = None,
) -> str:
    """A token signed with the key of (lease, epoch), claiming ``claimed_epoch`` (default: epoch)."""
    key = StreamTokenKey(derive_lease_key(ROOT, lease, epoch))
    fields = {
        "workspace_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "viewer_id": str(uuid.uuid4()),
        "lease_epoch": epoch if claimed_epoch is None else claimed_epoch,
        "mode": mode,
        "port": port,
    }
    return key.mint_for(fields, now=now)


def _gate(key_file: Path, epoch: int = 2, port: int = DESKTOP_TOKEN_PORT) -> EdgeGate:
    return EdgeGate(EdgeKey(key_file), port, epoch=epoch)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_text(derive_lease_key(ROOT, LEASE, 2).hex() + "\n")
    return path


def test_offered_protocols_are_split_and_trimmed() -> None:
    assert offered_protocols(["binary, ogs_a.b", " tty ,,x"]) == ["binary", "ogs_a.b", "tty", "x"]
    assert offered_protocols([]) == []


def test_a_valid_token_is_admitted_and_removed_from_the_protocols(key_file: Path) -> None:
    gate = _gate(key_file)
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
    verdict = _gate(key_file).admit(offer())
    assert not verdict.admitted and verdict.reason == reason and verdict.claims is None


def test_without_a_usable_key_nothing_is_admitted(tmp_path: Path) -> None:
    path = tmp_path / "key"
    gate = _gate(path)
    assert gate.admit([_mint()]).reason == "no_key"
    for junk in ("", "zz" * 32, "ab" * 31, "ab" * 33):
        path.write_text(junk)
        assert gate.admit([_mint()]).reason == "no_key", junk


def test_a_rewritten_key_file_takes_effect_for_the_next_request(key_file: Path) -> None:
    gate = _gate(key_file)
    old = _mint(epoch=2)
    assert gate.admit([old]).admitted
    tmp = key_file.with_name("key.new")
    tmp.write_text(derive_lease_key(ROOT, LEASE, 3).hex())
    os.replace(tmp, key_file)
    assert gate.admit([old]).reason == "invalid_token"
    # The epoch-3 key validates an epoch-3 token, but this edge serves epoch 2: refused anyway.
    assert gate.admit([_mint(epoch=3)]).reason == "wrong_epoch"
    assert _gate(key_file, epoch=3).admit([_mint(epoch=3)]).admitted


def test_a_token_of_another_epoch_is_refused_even_under_the_right_key(key_file: Path) -> None:
    # Signed with the epoch-2 key (as only the root secret's holder could), claiming another epoch.
    for claimed in (1, 3):
        verdict = _gate(key_file).admit([f"binary, {_mint(epoch=2, claimed_epoch=claimed)}"])
        assert not verdict.admitted and verdict.reason == "wrong_epoch" and verdict.claims is None
    # Positive control: the epoch the edge serves is admitted.
    assert _gate(key_file).admit([f"binary, {_mint(epoch=2, claimed_epoch=2)}"]).admitted


@pytest.mark.parametrize("mode", ["view", "control"])
def test_both_modes_are_admitted_and_the_verdict_says_which(key_file: Path, mode: str) -> None:
    # A view token is not refused: the plane routes it to its view-only server.
    verdict = _gate(key_file).admit([f"binary, {_mint(mode=mode)}"])
    assert verdict.admitted and verdict.reason == "ok"
    assert verdict.mode == mode and verdict.claims is not None and verdict.claims.mode == mode


def test_an_unknown_mode_is_an_invalid_token(key_file: Path) -> None:
    # Correctly signed under the edge's key, but the mode is neither view nor control.
    ids = {name: str(uuid.uuid4()) for name in ("workspaceId", "sessionId", "viewerId")}
    for mode, admitted in (("admin", False), ("control", True)):  # the second is the positive control
        claims = {**ids, "leaseEpoch": 2, "mode": mode, "port": DESKTOP_TOKEN_PORT, "exp": int(time.time()) + 60}
        payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=")
        mac = hmac.new(derive_lease_key(ROOT, LEASE, 2), payload, hashlib.sha256).digest()
        token = f"ogs_{payload.decode()}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
        verdict = _gate(key_file).admit([f"binary, {token}"])
        assert verdict.admitted is admitted, mode
        assert verdict.reason == ("ok" if admitted else "invalid_token")
        assert verdict.mode == (mode if admitted else None)


def test_the_edge_epoch_must_be_a_non_negative_integer(key_file: Path) -> None:
    for bad in (-1, True, "2"):
        with pytest.raises(ValueError):
            EdgeGate(EdgeKey(key_file), DESKTOP_TOKEN_PORT, epoch=bad)  # type: ignore[arg-type]


@given(st.lists(st.text(max_size=300), max_size=5))
def test_admission_never_raises_on_hostile_headers(values: list[str]) -> None:
    gate = _gate(Path("/nonexistent/key"))
    verdict = gate.admit(values)
    assert not verdict.admitted
