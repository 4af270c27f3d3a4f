"""Scoped stream tokens (``ogs_``): mint, verify, and per-lease key derivation.

A stream token lets one viewer open the desktop (or terminal) stream of one box for a short time.
The wire format is byte-compatible with upstream (``reference/upstream-runtime-contracts.md`` §3)::

    ogs_<b64url(JSON claims)>.<b64url(HMAC-SHA256(key, <b64url(JSON claims)>))>

base64url is unpadded; the claims are compact JSON with the keys in schema order (``workspaceId,
sessionId, viewerId, leaseEpoch, mode, port, exp`` then the optional ``subjectId``,
``authorityEpoch``); the HMAC is taken over the encoded payload string.

Keys are scoped: the root secret never leaves the control plane. :func:`derive_lease_key` turns it
into one key per (lease, epoch), and a box's stream edge is given only its own derived key, so a
token minted for another lease or for an older epoch of the same lease cannot validate there, and
nothing inside one box can mint tokens for another.

Verification is stricter than upstream where upstream is lenient only because of JavaScript: the
payload must be canonical base64url (Node skips invalid characters), the JSON must be valid UTF-8
without duplicate keys (``JSON.parse`` keeps the last one), and strings must be valid Unicode.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

from sandbox.errors import SandboxConfigError, StreamTokenError
from sandbox.secret_files import load_or_create_secret
from sandbox.settings import Settings

__all__ = [
    "DEFAULT_STREAM_PORT",
    "STREAM_TOKEN_DEFAULT_TTL_SECONDS",
    "STREAM_TOKEN_PREFIX",
    "StreamMode",
    "StreamTokenClaims",
    "StreamTokenKey",
    "derive_lease_key",
    "load_or_create_root_secret",
    "mint_stream_token",
    "mint_stream_token_upstream",
    "verify_stream_token",
]

_log = logging.getLogger(__name__)

STREAM_TOKEN_PREFIX: Final = "ogs_"
STREAM_TOKEN_DEFAULT_TTL_SECONDS: Final = 120
DEFAULT_STREAM_PORT: Final = 6080
"""websockify in front of x11vnc; the terminal plane (ttyd) uses 7681."""

StreamMode = Literal["view", "control"]
"""``control`` exists in the upstream schema; v1 only mints ``view``."""

_MAX_SAFE_INT: Final = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER: upstream's integer bound
_SUBJECT_MAX_UTF16_UNITS: Final = 512
_LEASE_KEY_INFO: Final = b"ogs-lease-key/v1|"
_ROOT_SECRET_BYTES: Final = 32
# The largest valid token is under 4.6 KiB (512 escaped control characters in subjectId); refusing
# longer input bounds the HMAC work an unauthenticated caller can cause.
_MAX_TOKEN_LENGTH: Final = 8192

# zod v4's uuid(): RFC 9562 version 1-8 with the RFC variant, plus the nil and max UUIDs. pydantic
# runs it with the Rust regex engine, where "$" only matches at the very end.
_UUID_PATTERN: Final = (
    r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    r"|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff)$"
)
# On the wire every schema claim is required (the model's mode/port defaults are for Python callers).
_REQUIRED_WIRE_KEYS: Final = frozenset(("workspaceId", "sessionId", "viewerId", "leaseEpoch", "mode", "port", "exp"))
_WIRE_KEYS: Final = _REQUIRED_WIRE_KEYS | {"subjectId", "authorityEpoch"}
_FALSY_OMITTED_KEYS: Final = ("subject_id", "subjectId", "authority_epoch", "authorityEpoch")

# Standard base64 -> base64url on encode; on decode map base64url back and poison the standard
# alphabet's '+' and '/' so that strict decoding rejects them.
_B64_TO_URL: Final = bytes.maketrans(b"+/", b"-_")
_URL_TO_B64: Final = bytes.maketrans(b"-_+/", b"+/!!")
_json_string: Final = json.JSONEncoder(ensure_ascii=False).encode


def _check_subject(value: str) -> str:
    # Upstream counts UTF-16 code units (JavaScript string length), not code points.
    units = len(value) if value.isascii() else len(value.encode("utf-16-le", "surrogatepass")) // 2
    if units > _SUBJECT_MAX_UTF16_UNITS:
        raise ValueError(f"subjectId must have at most {_SUBJECT_MAX_UTF16_UNITS} UTF-16 code units")
    return value


_Uuid = Annotated[str, StringConstraints(pattern=_UUID_PATTERN)]
_SafeInt = Annotated[int, Field(ge=0, le=_MAX_SAFE_INT)]
_PositiveSafeInt = Annotated[int, Field(gt=0, le=_MAX_SAFE_INT)]
_Subject = Annotated[str, Field(min_length=1), AfterValidator(_check_subject)]


class StreamTokenClaims(BaseModel):
    """The claims a stream token carries (upstream ``StreamTokenPayload``), camelCase on the wire.

    Validation is strict and follows the upstream schema: the three ids are UUIDs (zod's
    definition, case kept verbatim), ``lease_epoch`` is a safe integer >= 0, ``port``, ``exp`` and
    ``authority_epoch`` are positive safe integers, ``subject_id`` has 1..512 UTF-16 code units and
    no lone surrogate. Integers must be ``int`` (never ``bool`` or ``float``); unknown fields are
    rejected. ``None`` for an optional claim means absent.

    Attributes:
        workspace_id: Workspace the stream belongs to.
        session_id: Session whose box is streamed.
        viewer_id: The ``sandbox_lease_holders`` viewer row the token was minted for.
        lease_epoch: Lease epoch at mint time; the edge compares it with the live epoch.
        mode: ``view`` (v1) or ``control``.
        port: Port inside the box (6080 desktop, 7681 terminal).
        exp: Expiry, unix seconds; the token is valid while ``exp >= now``.
        subject_id: Optional authenticated subject.
        authority_epoch: Optional per-channel floor (selfhosted relay).
    """

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    workspace_id: _Uuid
    session_id: _Uuid
    viewer_id: _Uuid
    lease_epoch: _SafeInt
    mode: StreamMode = "view"
    port: _PositiveSafeInt = DEFAULT_STREAM_PORT
    exp: _PositiveSafeInt
    subject_id: _Subject | None = None
    authority_epoch: _PositiveSafeInt | None = None

    def to_wire(self) -> dict[str, object]:
        """Return the claims as the upstream JSON object: camelCase, schema order, absent optionals omitted."""
        out: dict[str, object] = {
            "workspaceId": self.workspace_id,
            "sessionId": self.session_id,
            "viewerId": self.viewer_id,
            "leaseEpoch": self.lease_epoch,
            "mode": self.mode,
            "port": self.port,
            "exp": self.exp,
        }
        if self.subject_id is not None:
            out["subjectId"] = self.subject_id
        if self.authority_epoch is not None:
            out["authorityEpoch"] = self.authority_epoch
        return out

    def to_json(self) -> str:
        """Return the canonical compact JSON that is base64url-encoded into the token."""
        # Ids are validated UUIDs and mode a fixed literal, so only subjectId needs escaping; json's
        # encoder escapes exactly as JSON.stringify does for valid Unicode.
        text = (
            f'{{"workspaceId":"{self.workspace_id}","sessionId":"{self.session_id}",'
            f'"viewerId":"{self.viewer_id}","leaseEpoch":{self.lease_epoch},"mode":"{self.mode}",'
            f'"port":{self.port},"exp":{self.exp}'
        )
        if self.subject_id is not None:
            text += f',"subjectId":{_json_string(self.subject_id)}'
        if self.authority_epoch is not None:
            text += f',"authorityEpoch":{self.authority_epoch}'
        return text + "}"


# The model's own validator, called directly in the hot paths: same validation as model_validate
# without its Python wrapper.
_validate_claims: Final = StreamTokenClaims.__pydantic_validator__.validate_python


def _b64url(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_B64_TO_URL).rstrip(b"=")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_number(text: str) -> float | int:
    # JSON has one number type: an integral double (1.0, -0, 1.7e9) is that integer, as upstream
    # reads it; anything else stays a float and fails the integer claims.
    value = float(text)
    return int(value) if value.is_integer() else value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


_json_decoder: Final = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_float=_json_number
)
_JSON_WHITESPACE: Final = " \t\n\r"


def _decode_payload(segment: bytes) -> StreamTokenClaims | None:
    """Decode an authenticated payload segment into claims, or ``None`` if it is not valid."""
    stripped = segment.rstrip(b"=")  # the Rust verifier trims padding; so do we
    if len(stripped) % 4 == 1:
        return None
    try:
        raw = binascii.a2b_base64(stripped.translate(_URL_TO_B64) + b"=" * (-len(stripped) % 4), strict_mode=True)
        text = raw.decode("utf-8").strip(_JSON_WHITESPACE)
        obj, end = _json_decoder.raw_decode(text)
        if end != len(text) or type(obj) is not dict:
            return None
        keys = obj.keys()
        if not keys >= _REQUIRED_WIRE_KEYS:
            return None
        # Unknown claims are dropped, as upstream does.
        data = obj if keys <= _WIRE_KEYS else {k: v for k, v in obj.items() if k in _WIRE_KEYS}
        if data.get("subjectId", 0) is None or data.get("authorityEpoch", 0) is None:
            return None  # an optional claim may be absent, never null
        claims: StreamTokenClaims = _validate_claims(data)
        return claims
    except (ValueError, RecursionError):  # binascii.Error and ValidationError are ValueErrors
        return None


def _now_seconds() -> int:
    return int(time.time())


class StreamTokenKey:
    """One HMAC-SHA256 stream-token key: mints and verifies ``ogs_`` tokens.

    Build one per key and reuse it: the HMAC key schedule is computed once. A ``str`` secret is
    used as its UTF-8 bytes (as upstream does); a derived lease key is used as raw bytes.

    Raises:
        StreamTokenError: The secret is empty, not valid Unicode, or neither bytes nor str.
    """

    __slots__ = ("_mac",)

    def __init__(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            try:
                key = secret.encode("utf-8")
            except UnicodeEncodeError:
                raise StreamTokenError("stream token secret is not valid Unicode") from None
        elif isinstance(secret, bytes | bytearray | memoryview):
            key = bytes(secret)
        else:  # bytes(5) would silently be a key of five zero bytes
            raise StreamTokenError(f"stream token secret must be bytes or str, got {type(secret).__name__}")
        if not key:
            raise StreamTokenError("stream token secret is empty; configure a non-empty secret")
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    @classmethod
    def for_lease(cls, root_secret: bytes, lease_id: str, epoch: int) -> StreamTokenKey:
        """Return the key of one (lease, epoch), derived from the root secret by :func:`derive_lease_key`."""
        return cls(derive_lease_key(root_secret, lease_id, epoch))

    def _signature(self, payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(payload)
        return _b64url(mac.digest())

    def mint(self, claims: StreamTokenClaims) -> str:
        """Return the token for already-validated claims (their ``exp`` is used as is)."""
        payload = _b64url(claims.to_json().encode("utf-8"))
        return f"{STREAM_TOKEN_PREFIX}{payload.decode('ascii')}.{self._signature(payload).decode('ascii')}"

    def mint_for(
        self,
        fields: Mapping[str, object],
        *,
        now: float | None = None,
        ttl_seconds: int = STREAM_TOKEN_DEFAULT_TTL_SECONDS,
    ) -> str:
        """Mint a token from claim fields with ``exp = now + ttl_seconds``; see :func:`mint_stream_token`."""
        return self.mint(_claims_from_fields(fields, now, ttl_seconds))

    def verify(self, token: object, *, now: float | None = None) -> StreamTokenClaims | None:
        """Return the claims of a valid, unexpired token signed with this key, else ``None``; never raises."""
        parts = _split_envelope(token)
        return None if parts is None else self._verify_parts(parts[0], parts[1], now)

    def _verify_parts(self, payload: str, signature: str, now: float | None) -> StreamTokenClaims | None:
        # Authenticate before parsing anything; compare the encoded strings so that a
        # non-canonical signature encoding is rejected, in constant time.
        encoded = payload.encode("ascii")
        if not hmac.compare_digest(self._signature(encoded), signature.encode("ascii")):
            return None
        claims = _decode_payload(encoded)
        if claims is None:
            return None
        if claims.exp < (_now_seconds() if now is None else now):
            return None
        return claims


def _split_envelope(token: object) -> tuple[str, str] | None:
    """Split ``ogs_<payload>.<signature>`` on the last dot; ``None`` if it is not that shape."""
    if not isinstance(token, str):
        if not isinstance(token, bytes | bytearray | memoryview):
            return None
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(token) > _MAX_TOKEN_LENGTH or not token.startswith(STREAM_TOKEN_PREFIX) or not token.isascii():
        return None
    dot = token.rfind(".")
    if dot <= len(STREAM_TOKEN_PREFIX):  # no dot, or an empty payload
        return None
    return token[len(STREAM_TOKEN_PREFIX) : dot], token[dot + 1 :]


def _claims_from_fields(fields: Mapping[str, object], now: float | None, ttl_seconds: int) -> StreamTokenClaims:
    if type(fields) is not dict and not isinstance(fields, Mapping):
        raise StreamTokenError(f"stream token fields must be a mapping, got {type(fields).__name__}")
    if "exp" in fields:
        raise StreamTokenError("exp is computed from now + ttl_seconds; do not pass it")
    if type(ttl_seconds) is not int or ttl_seconds < 0:
        raise StreamTokenError(f"ttl_seconds must be a non-negative integer, got {ttl_seconds!r}")
    data = dict(fields)
    for key in _FALSY_OMITTED_KEYS:
        # Upstream omits a falsy optional ("" subject, 0 authority epoch) rather than rejecting it.
        if key in data and not data[key]:
            del data[key]
    exp = (_now_seconds() if now is None else now) + ttl_seconds
    data["exp"] = int(exp) if type(exp) is float and exp.is_integer() else exp
    try:
        claims: StreamTokenClaims = _validate_claims(data)
    except ValidationError as exc:
        raise StreamTokenError(f"invalid stream token claims: {exc}") from None
    return claims


@functools.lru_cache(maxsize=64)  # the module functions reuse the key schedule of recent secrets
def _cached_key(secret: bytes | str) -> StreamTokenKey:
    return StreamTokenKey(secret)


def _key(secret: bytes | str | StreamTokenKey) -> StreamTokenKey:
    if type(secret) is bytes or type(secret) is str:
        return _cached_key(secret)
    if isinstance(secret, StreamTokenKey):
        return secret
    if isinstance(secret, bytearray | memoryview):
        return _cached_key(bytes(secret))
    return StreamTokenKey(secret)  # raises the typed error for anything else


def mint_stream_token(
    claims_or_fields: StreamTokenClaims | Mapping[str, object],
    secret: bytes | str | StreamTokenKey,
    *,
    now: float | None = None,
    ttl_seconds: int = STREAM_TOKEN_DEFAULT_TTL_SECONDS,
) -> str:
    """Mint an ``ogs_`` stream token, byte-identical to upstream's ``mintStreamToken``.

    ``claims_or_fields`` is either a :class:`StreamTokenClaims` (signed as is; ``now`` and
    ``ttl_seconds`` are not used) or a mapping of claim fields in snake_case or camelCase without
    ``exp``: ``workspace_id``, ``session_id``, ``viewer_id``, ``lease_epoch`` and optionally
    ``mode`` (``"view"``), ``port`` (6080), ``subject_id``, ``authority_epoch``. A falsy optional is
    omitted, as upstream does. Then ``exp = now + ttl_seconds``, with ``now`` defaulting to the
    current unix second; a fractional result is rejected. Pass the derived lease key
    (:func:`derive_lease_key`) as ``secret``; a reused :class:`StreamTokenKey` skips the key setup.

    Raises:
        StreamTokenError: The secret is empty, a field is unknown or invalid, or the TTL is negative.
    """
    key = _key(secret)
    if isinstance(claims_or_fields, StreamTokenClaims):
        return key.mint(claims_or_fields)
    return key.mint_for(claims_or_fields, now=now, ttl_seconds=ttl_seconds)


def mint_stream_token_upstream(secret: bytes | str, fields: Mapping[str, object]) -> str:
    """Mint with upstream's argument shape: ``mintStreamToken(secret, {..., ttlSeconds?, nowSeconds?})``.

    ``fields`` holds the camelCase claim fields plus optional ``ttlSeconds`` (default 120) and
    ``nowSeconds`` (default: the current unix second); see :func:`mint_stream_token`.

    Raises:
        StreamTokenError: As :func:`mint_stream_token`.
    """
    if not isinstance(fields, Mapping):
        raise StreamTokenError(f"stream token fields must be a mapping, got {type(fields).__name__}")
    claim_fields = dict(fields)
    ttl = claim_fields.pop("ttlSeconds", STREAM_TOKEN_DEFAULT_TTL_SECONDS)
    now = claim_fields.pop("nowSeconds", None)
    if type(ttl) is not int:
        raise StreamTokenError(f"ttlSeconds must be an integer, got {ttl!r}")
    if now is not None and (isinstance(now, bool) or not isinstance(now, int | float)):
        raise StreamTokenError(f"nowSeconds must be a number, got {now!r}")
    return mint_stream_token(claim_fields, secret, now=now, ttl_seconds=ttl)


def verify_stream_token(
    token: object, secret: bytes | str | StreamTokenKey, *, now: float | None = None
) -> StreamTokenClaims | None:
    """Return the claims of a valid token, or ``None``; never raises on any ``token`` value.

    ``None`` means one of: a prefix other than ``ogs_``; a malformed envelope (no ``.`` or an empty
    payload, splitting on the last ``.``; non-ASCII; longer than 8 KiB); a signature that differs
    from the canonical one (constant-time compare); a payload that is not canonical base64url of
    UTF-8 JSON with unique keys and valid claims; or ``exp < now`` (``exp == now`` is still valid).
    ``now`` defaults to the current unix second. The lease-epoch and route checks are the caller's.

    Raises:
        StreamTokenError: The secret is empty (a configuration error, not a bad token); as upstream,
            only raised once the token has the envelope shape.
    """
    parts = _split_envelope(token)
    if parts is None:
        return None
    return _key(secret)._verify_parts(parts[0], parts[1], now)


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then expand."""
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        okm += block
    return okm[:length]


def derive_lease_key(root_secret: bytes, lease_id: str, epoch: int) -> bytes:
    """Derive the 32-byte stream-token key of one (lease, epoch) from the root secret.

    HKDF-SHA256 (RFC 5869) with an empty salt and ``info = "ogs-lease-key/v1|<lease_id>|<epoch>"``
    (UTF-8, epoch in decimal). HKDF is the standard construction for deriving independent keys from
    one secret; the info string is unambiguous because the epoch, the last ``|``-separated part, is
    digits only. Only this key reaches the box's edge, so tokens for another lease or epoch fail
    there, and the root cannot be recovered from it.

    Raises:
        StreamTokenError: The root secret or lease id is empty, or the epoch is not an int >= 0.
    """
    if not isinstance(root_secret, bytes | bytearray) or not root_secret:
        raise StreamTokenError("the stream token root secret must be non-empty bytes")
    if not isinstance(lease_id, str) or not lease_id:
        raise StreamTokenError("lease_id must be a non-empty string")
    if type(epoch) is not int or epoch < 0:
        raise StreamTokenError(f"epoch must be an integer >= 0, got {epoch!r}")
    try:
        info = _LEASE_KEY_INFO + lease_id.encode("utf-8") + b"|" + str(epoch).encode("ascii")
    except UnicodeEncodeError:
        raise StreamTokenError("lease_id must be valid Unicode") from None
    return _hkdf_sha256(bytes(root_secret), b"", info, 32)


def load_or_create_root_secret(path: Path) -> bytes:
    """Return the root stream-token secret stored at ``path``, creating it first if missing.

    A new secret is 32 random bytes in a private file (mode 0600) made by
    :func:`sandbox.secret_files.load_or_create_secret`, so concurrent first starts agree on one
    secret; a file readable by group or others is refused.

    Raises:
        SandboxConfigError: The file exists but is empty, or cannot be read or created.
    """
    return load_or_create_secret(path, what="stream token root secret", size=_ROOT_SECRET_BYTES)


ROOT_SECRET_FILENAME: Final = "stream-token.secret"
_CLAIM_ID_NAMESPACE: Final = uuid.UUID("6b3f6c1e-6f0b-4a59-9a44-2a3f0d5b7c11")


def root_secret_for(settings: Settings) -> bytes:
    """The root secret: ``SANDBOX_STREAM_TOKEN_SECRET`` if set, else the file in the data dir (created once)."""
    if settings.stream_token_secret is not None:
        value = settings.stream_token_secret.get_secret_value()
        if not value:
            raise SandboxConfigError("SANDBOX_STREAM_TOKEN_SECRET is set but empty")
        return value.encode("utf-8")
    return load_or_create_root_secret(settings.data_dir / ROOT_SECRET_FILENAME)


def claim_id(value: str) -> str:
    """A claim id in the upstream UUID shape: ``value`` itself if it is a UUID, else a stable UUIDv5 of it.

    Workspace, group and viewer ids are free-form strings here, while the token schema requires
    UUIDs; the edge binds a token to its lease through the derived key, not through these ids.
    """
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return str(uuid.uuid5(_CLAIM_ID_NAMESPACE, value))
