"""Stream tokens: upstream conformance, scoped keys, hostile input and round trips."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sandbox.errors import InvalidRequest, SandboxConfigError, StreamTokenError
from sandbox.stream_token import (
    STREAM_TOKEN_DEFAULT_TTL_SECONDS,
    StreamTokenClaims,
    StreamTokenKey,
    _hkdf_sha256,
    derive_lease_key,
    load_or_create_root_secret,
    mint_stream_token,
    mint_stream_token_upstream,
    verify_stream_token,
)
from tests.upstream_vectors import vectors_dir

NOW = 1_700_000_000
WS = "0b3f6a1e-7c2d-4e5f-8a9b-0c1d2e3f4a5b"
SESSION = "1c4e7b2f-8d3e-4f60-9b0c-1d2e3f4a5b6c"
VIEWER = "2d5f8c3a-9e4f-4a71-ac1d-2e3f4a5b6c7d"
FIELDS: dict[str, object] = {"workspace_id": WS, "session_id": SESSION, "viewer_id": VIEWER, "lease_epoch": 4}
ROOT = bytes(range(32))

# --------------------------------------------------------------------------- upstream vectors

VECTOR_FILE = "tokens.json"
EXPECTED_COUNTS = {"mintStreamToken": 37, "verifyStreamToken": 216}

# Vectors upstream accepts only because of JavaScript; we reject them on purpose (README, "Porting notes").
STRICTER_THAN_UPSTREAM = {
    "forged-correct-secret: standard base64 alphabet (+ / and = padding) in payload": (
        "Node's base64url decoder also accepts the standard alphabet; the payload must be base64url"
    ),
    "forged-correct-secret: payload with embedded newline": (
        "Node's base64 decoder skips whitespace; a newline is not base64url"
    ),
    "forged-correct-secret: payload with embedded '!' (skipped by lenient decoder)": (
        "Node's base64 decoder skips invalid characters; '!' is not base64url"
    ),
    "forged-correct-secret: payload containing a '.' (extra dot, signed)": (
        "Node's base64 decoder skips the '.'; it is not base64url"
    ),
    "forged-correct-secret: duplicate exp key (last wins)": (
        "JSON.parse keeps the last duplicate key; duplicate claims are ambiguous, so we reject them"
    ),
    "forged-correct-secret: invalid UTF-8 byte inside subjectId (decoded as U+FFFD)": (
        "Node decodes invalid UTF-8 leniently to U+FFFD; we decode strictly (as the Rust relay's serde_json)"
    ),
}


def load_vectors() -> list[dict[str, Any]]:
    path = vectors_dir() / VECTOR_FILE
    if not path.is_file():
        pytest.fail(
            f"upstream vectors not found: {path} is missing. Point SANDBOX_VECTORS_DIR at the folder "
            "holding the upstream-vectors JSON files."
        )
    return list(json.loads(path.read_text(encoding="utf-8")))


def vector_params() -> list[Any]:
    path = vectors_dir() / VECTOR_FILE
    if not path.is_file():
        return [pytest.param(None, id=f"{VECTOR_FILE}-missing")]
    return [pytest.param(v, id=f"{i:03d}-{v['note'][:70]}") for i, v in enumerate(load_vectors())]


def decode_markers(value: Any) -> Any:
    """Turn the vector markers ($number, $undefined, $bytes) into Python values."""
    if isinstance(value, list):
        return [decode_markers(v) for v in value]
    if isinstance(value, dict):
        if "$number" in value:
            return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "-0": -0.0}[value["$number"]]
        if "$bytes" in value:
            return base64.b64decode(value["$bytes"])
        return {k: decode_markers(v) for k, v in value.items() if v != {"$undefined": True}}
    return value


def run_vector(vector: dict[str, Any]) -> dict[str, Any]:
    """Run one vector through our API and describe the outcome in the vectors' own terms."""
    args = decode_markers(vector["args"])
    try:
        if vector["fn"] == "mintStreamToken":
            secret, fields = args
            return {"ok": mint_stream_token_upstream(secret, fields)}
        secret, token, now = args
        claims = verify_stream_token(token, secret, now=now)
        return {"ok": None if claims is None else claims.to_wire()}
    except StreamTokenError as exc:
        return {"error": exc}


@pytest.mark.parametrize("vector", vector_params())
def test_stream_token_matches_upstream(vector: dict[str, Any] | None) -> None:
    if vector is None:
        load_vectors()  # fails with the explanation
        return
    got = run_vector(vector)
    expect = decode_markers(vector["expect"])
    if vector["note"] in STRICTER_THAN_UPSTREAM:
        assert expect["ok"] is not None, "vector no longer documents an upstream leniency"
        assert got == {"ok": None}, STRICTER_THAN_UPSTREAM[vector["note"]]
    elif "error" in expect:
        # Upstream throws a ZodError (invalid claims) or a DOMException (empty HMAC key): both are
        # our typed StreamTokenError.
        assert "error" in got, f"expected a StreamTokenError, got {got}"
        assert isinstance(got["error"], InvalidRequest)
    else:
        assert got == expect


def test_vector_file_has_every_token_vector() -> None:
    fns = [v["fn"] for v in load_vectors()]
    assert {fn: fns.count(fn) for fn in EXPECTED_COUNTS} == EXPECTED_COUNTS
    notes = {v["note"] for v in load_vectors()}
    assert set(STRICTER_THAN_UPSTREAM) <= notes


def test_bytes_secret_reproduces_the_string_secret_vectors() -> None:
    # A derived lease key is raw bytes; a str secret is its UTF-8 bytes, so both sign identically.
    for vector in load_vectors():
        if vector["fn"] != "mintStreamToken" or "ok" not in vector["expect"]:
            continue
        secret, fields = vector["args"]
        assert mint_stream_token_upstream(secret.encode("utf-8"), fields) == vector["expect"]["ok"]


# --------------------------------------------------------------------------- claims and mint


def claims(**overrides: Any) -> StreamTokenClaims:
    return StreamTokenClaims(**{**FIELDS, "exp": NOW + 120, **overrides})


def test_claims_serialise_camel_case_in_schema_order_without_spaces() -> None:
    c = claims(subject_id="user 1", authority_epoch=3, port=7681)
    assert c.to_json() == (
        f'{{"workspaceId":"{WS}","sessionId":"{SESSION}","viewerId":"{VIEWER}","leaseEpoch":4,'
        f'"mode":"view","port":7681,"exp":{NOW + 120},"subjectId":"user 1","authorityEpoch":3}}'
    )
    assert list(claims().to_wire()) == [
        "workspaceId",
        "sessionId",
        "viewerId",
        "leaseEpoch",
        "mode",
        "port",
        "exp",
    ]
    assert claims().model_dump(exclude_none=True) == claims().to_wire()


def test_token_is_prefix_payload_dot_hmac_of_the_payload() -> None:
    token = mint_stream_token(FIELDS, "secret", now=NOW)
    prefix, rest = token[:4], token[4:]
    payload, signature = rest.split(".")
    assert prefix == "ogs_"
    assert "=" not in token
    assert base64.urlsafe_b64decode(payload + "==").decode() == claims().to_json()
    mac = hmac.new(b"secret", payload.encode(), hashlib.sha256).digest()
    assert signature == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_mint_accepts_claims_or_fields_in_either_case() -> None:
    by_fields = mint_stream_token(FIELDS, ROOT, now=NOW)
    camel = {"workspaceId": WS, "sessionId": SESSION, "viewerId": VIEWER, "leaseEpoch": 4}
    assert mint_stream_token(camel, ROOT, now=NOW) == by_fields
    assert mint_stream_token(claims(), ROOT) == by_fields
    assert StreamTokenKey(ROOT).mint_for(FIELDS, now=NOW) == by_fields
    assert mint_stream_token(FIELDS, StreamTokenKey(ROOT), now=NOW) == by_fields


def test_mint_omits_falsy_optionals_like_upstream() -> None:
    plain = mint_stream_token(FIELDS, ROOT, now=NOW)
    assert mint_stream_token({**FIELDS, "subject_id": "", "authority_epoch": 0}, ROOT, now=NOW) == plain
    assert mint_stream_token({**FIELDS, "subjectId": None, "authorityEpoch": None}, ROOT, now=NOW) == plain


def test_default_ttl_and_clock() -> None:
    before = int(time.time())
    token = mint_stream_token(FIELDS, ROOT)
    c = verify_stream_token(token, ROOT)
    assert c is not None
    assert before + STREAM_TOKEN_DEFAULT_TTL_SECONDS <= c.exp <= int(time.time()) + STREAM_TOKEN_DEFAULT_TTL_SECONDS
    assert verify_stream_token(token, ROOT, now=c.exp) == c
    assert verify_stream_token(token, ROOT, now=c.exp + 1) is None


@pytest.mark.parametrize("secret", ["", b"", bytearray()])
def test_empty_secret_is_a_typed_error(secret: Any) -> None:
    with pytest.raises(StreamTokenError):
        mint_stream_token(FIELDS, secret, now=NOW)
    with pytest.raises(StreamTokenError):
        StreamTokenKey(secret)
    token = mint_stream_token(FIELDS, ROOT, now=NOW)
    with pytest.raises(StreamTokenError):
        verify_stream_token(token, secret, now=NOW)
    assert verify_stream_token("not-a-token", secret) is None  # as upstream: shape check first


@pytest.mark.parametrize(
    ("fields", "ttl", "now"),
    [
        ({**FIELDS, "lease_epoch": True}, 120, NOW),
        ({**FIELDS, "lease_epoch": 1.0}, 120, NOW),
        ({**FIELDS, "lease_epoch": -1}, 120, NOW),
        ({**FIELDS, "lease_epoch": 2**53}, 120, NOW),
        ({**FIELDS, "workspace_id": WS.replace("4e5f", "0e5f")}, 120, NOW),
        ({**FIELDS, "port": 0}, 120, NOW),
        ({**FIELDS, "port": "6080"}, 120, NOW),
        ({**FIELDS, "mode": "admin"}, 120, NOW),
        ({**FIELDS, "subject_id": "s" * 513}, 120, NOW),
        ({**FIELDS, "subject_id": "🔑" * 257}, 120, NOW),  # 514 UTF-16 units
        ({**FIELDS, "authority_epoch": -2}, 120, NOW),
        ({**FIELDS, "exp": NOW}, 120, NOW),
        ({**FIELDS, "colour": "red"}, 120, NOW),
        ({k: v for k, v in FIELDS.items() if k != "viewer_id"}, 120, NOW),
        (FIELDS, -1, NOW),
        (FIELDS, 120, NOW + 0.5),
    ],
)
def test_invalid_mint_input_is_a_typed_error(fields: dict[str, object], ttl: int, now: float) -> None:
    with pytest.raises(StreamTokenError):
        mint_stream_token(fields, ROOT, now=now, ttl_seconds=ttl)


def test_claims_model_is_strict() -> None:
    for bad in ({"lease_epoch": True}, {"port": 6080.0}, {"workspace_id": WS + "\n"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            claims(**bad)
    assert claims(subject_id="🔑" * 256).subject_id == "🔑" * 256  # 512 UTF-16 units: the maximum


# --------------------------------------------------------------------------- verify


def test_verify_accepts_bytes_and_rejects_non_tokens() -> None:
    token = mint_stream_token(FIELDS, ROOT, now=NOW)
    assert verify_stream_token(token.encode(), ROOT, now=NOW) == claims()
    assert verify_stream_token(bytearray(token.encode()), ROOT, now=NOW) == claims()
    for junk in (None, 0, 1.5, [], {}, object(), b"\xff\xfe", "ogs_", "ogs_.", token + "\x00", "ogs_é.x"):
        assert verify_stream_token(junk, ROOT, now=NOW) is None


def test_largest_valid_token_verifies_and_longer_input_is_refused_unread() -> None:
    # 512 control characters each escape to 6 JSON bytes: the largest payload the schema allows.
    biggest = claims(subject_id="\x01" * 512, authority_epoch=2**53 - 1, lease_epoch=2**53 - 1)
    token = mint_stream_token(biggest, ROOT)
    assert verify_stream_token(token, ROOT, now=NOW) == biggest
    key = StreamTokenKey(ROOT)
    assert verify_forged_text(key, biggest.to_json() + " " * (8192 - len(token))) is None


@pytest.mark.parametrize("secret", [None, 5, ["k"], "\ud800"])
def test_secret_of_the_wrong_type_is_a_typed_error(secret: Any) -> None:
    with pytest.raises(StreamTokenError):
        StreamTokenKey(secret)


@pytest.mark.parametrize("fields", [None, [("workspace_id", WS)], "workspace_id"])
def test_fields_must_be_a_mapping(fields: Any) -> None:
    with pytest.raises(StreamTokenError):
        mint_stream_token(fields, ROOT, now=NOW)


def test_verify_ignores_unknown_claims_but_requires_every_schema_claim() -> None:
    key = StreamTokenKey(ROOT)
    wire = claims().to_wire()
    assert verify_forged(key, {"zzz": 1, **wire}) == claims()
    for name in wire:
        assert verify_forged(key, {k: v for k, v in wire.items() if k != name}) is None
    assert verify_forged(key, {**wire, "subjectId": None}) is None
    assert verify_forged(key, {**wire, "leaseEpoch": 4.0}) == claims()  # one JSON number type
    assert verify_forged(key, {**wire, "leaseEpoch": 4.5}) is None
    assert verify_forged_text(key, json.dumps(wire).replace('"exp": ', '"exp": NaN, "x": ')) is None


def verify_forged_text(key: StreamTokenKey, text: str | bytes) -> StreamTokenClaims | None:
    """Sign an arbitrary payload with the right key, as an attacker holding the key could."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    payload = base64.urlsafe_b64encode(raw).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(ROOT, payload, hashlib.sha256).digest()).rstrip(b"=")
    return key.verify(b"ogs_" + payload + b"." + signature, now=NOW)


def verify_forged(key: StreamTokenKey, obj: object) -> StreamTokenClaims | None:
    return verify_forged_text(key, json.dumps(obj))


# --------------------------------------------------------------------------- scoped keys


def test_hkdf_matches_rfc5869_test_cases() -> None:
    ikm = bytes([0x0B] * 22)
    okm1 = _hkdf_sha256(ikm, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm1.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    okm3 = _hkdf_sha256(ikm, b"", b"", 42)
    assert okm3.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_lease_key_is_hkdf_with_the_documented_info_string() -> None:
    key = derive_lease_key(ROOT, "lease-7", 3)
    assert len(key) == 32
    assert key == _hkdf_sha256(ROOT, b"", b"ogs-lease-key/v1|lease-7|3", 32)
    # Pinned: an edge built elsewhere must derive the same key.
    assert key.hex() == "9c91f3b346bc0ffca43b2674ce8911a6947a84a73c0c0eaa17f75d1d6b05cfff"
    assert key != derive_lease_key(ROOT, "lease-7", 4) != derive_lease_key(ROOT, "lease-8", 3)


def test_edge_with_its_lease_key_accepts_only_its_own_tokens() -> None:
    edge = StreamTokenKey.for_lease(ROOT, "lease-a", 2)
    own = mint_stream_token(FIELDS, derive_lease_key(ROOT, "lease-a", 2), now=NOW)
    assert edge.verify(own, now=NOW) == claims()
    assert edge.verify(mint_stream_token(FIELDS, derive_lease_key(ROOT, "lease-a", 1), now=NOW), now=NOW) is None
    assert edge.verify(mint_stream_token(FIELDS, derive_lease_key(ROOT, "lease-b", 2), now=NOW), now=NOW) is None
    assert edge.verify(mint_stream_token(FIELDS, ROOT, now=NOW), now=NOW) is None  # the root itself


@pytest.mark.parametrize(
    ("root", "lease", "epoch"),
    [(b"", "l", 0), ("root", "l", 0), (ROOT, "", 0), (ROOT, "l", -1), (ROOT, "l", True), (ROOT, "l", 1.0)],
)
def test_invalid_lease_key_input_is_a_typed_error(root: Any, lease: Any, epoch: Any) -> None:
    with pytest.raises(StreamTokenError):
        derive_lease_key(root, lease, epoch)


# --------------------------------------------------------------------------- root secret file


def test_root_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "stream-root"
    first = load_or_create_root_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_root_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["stream-root"]  # no temporary file left


def test_concurrent_first_starts_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "stream-root"
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_root_secret(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


def test_empty_root_secret_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "stream-root"
    path.write_bytes(b"")
    with pytest.raises(SandboxConfigError):
        load_or_create_root_secret(path)
    with pytest.raises(SandboxConfigError):
        load_or_create_root_secret(tmp_path)  # a directory


# --------------------------------------------------------------------------- properties

uuids = st.one_of(
    st.uuids(version=1), st.uuids(version=4), st.uuids(version=5), st.just("00000000-0000-0000-0000-000000000000")
).map(str)
safe_ints = st.integers(min_value=0, max_value=2**53 - 1)
positive_safe_ints = st.integers(min_value=1, max_value=2**53 - 1)
valid_claims = st.builds(
    dict,
    workspace_id=uuids,
    session_id=uuids.map(str.upper),
    viewer_id=uuids,
    lease_epoch=safe_ints,
    mode=st.sampled_from(["view", "control"]),
    port=st.integers(min_value=1, max_value=65535),
    exp=positive_safe_ints,
    subject_id=st.none() | st.text(min_size=1, max_size=40),
    authority_epoch=st.none() | positive_safe_ints,
).map(StreamTokenClaims.model_validate)
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(c=valid_claims)
def test_round_trip_of_valid_claims(c: StreamTokenClaims) -> None:
    token = mint_stream_token(c, ROOT)
    assert verify_stream_token(token, ROOT, now=c.exp) == c
    assert c.to_json() == json.dumps(c.to_wire(), separators=(",", ":"), ensure_ascii=False)


def test_no_single_character_mutation_verifies() -> None:
    # Exhaustive over positions: replacing, deleting or doubling any one character breaks the token.
    token = mint_stream_token({**FIELDS, "subject_id": "ü"}, ROOT, now=NOW)
    key = StreamTokenKey(ROOT)
    assert key.verify(token, now=NOW) is not None
    for i, ch in enumerate(token):
        for other in {"A", "_", "-", ".", "=", "0"} - {ch}:
            assert key.verify(token[:i] + other + token[i + 1 :], now=NOW) is None, (i, other)
        assert key.verify(token[:i] + token[i + 1 :], now=NOW) is None, i
        assert key.verify(token[: i + 1] + token[i:], now=NOW) is None, i


# A few fixed claim sets keep the mutation and forgery properties cheap; the round trip covers variety.
some_claims = st.sampled_from(
    [
        claims(),
        claims(exp=NOW, mode="control", port=7681, subject_id="🔑 ü\n"),
        claims(exp=2**53 - 1, authority_epoch=9, subject_id="s" * 512),
    ]
)


@FAST
@given(c=some_claims, data=st.data())
def test_no_random_byte_mutation_verifies(c: StreamTokenClaims, data: st.DataObject) -> None:
    token = mint_stream_token(c, ROOT).encode()
    i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    b = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != token[i]))
    assert verify_stream_token(token[:i] + bytes([b]) + token[i + 1 :], ROOT, now=0) is None


lease_ids = st.text(min_size=1, max_size=20)
epochs = st.integers(min_value=0, max_value=2**40)


@FAST
@given(lease_a=lease_ids, lease_b=lease_ids, n=epochs, m=epochs)
def test_a_token_only_verifies_under_its_own_lease_and_epoch(lease_a: str, lease_b: str, n: int, m: int) -> None:
    assume(lease_a != lease_b or n != m)
    token = mint_stream_token(FIELDS, derive_lease_key(ROOT, lease_a, n), now=NOW)
    assert verify_stream_token(token, derive_lease_key(ROOT, lease_a, n), now=NOW) == claims()
    assert verify_stream_token(token, derive_lease_key(ROOT, lease_b, m), now=NOW) is None


@FAST
@given(junk=st.text() | st.binary() | st.builds(lambda a, b: f"ogs_{a}.{b}", st.text(), st.text()))
def test_verify_never_raises_on_arbitrary_input(junk: str | bytes) -> None:
    assert verify_stream_token(junk, ROOT, now=NOW) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
wire_keys = st.sampled_from(
    ["workspaceId", "sessionId", "viewerId", "leaseEpoch", "mode", "port", "exp", "subjectId", "authorityEpoch"]
)


@FAST
@given(
    base=some_claims,
    changes=st.dictionaries(wire_keys, json_values, max_size=3),
    payload_bytes=st.binary(max_size=64),
)
def test_correctly_signed_garbage_never_raises(
    base: StreamTokenClaims, changes: dict[str, Any], payload_bytes: bytes
) -> None:
    # The signature check passes here, so this reaches the base64, JSON and claims validation.
    key = StreamTokenKey(ROOT)
    forged = verify_forged(key, {**base.to_wire(), **changes})
    if forged is not None:
        assert verify_stream_token(mint_stream_token(forged, ROOT), ROOT, now=NOW) == forged
    assert verify_forged_text(key, payload_bytes) is None
