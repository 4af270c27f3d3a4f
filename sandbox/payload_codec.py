"""Encryption of everything the runtime writes into Temporal history (AES-256-GCM payload codec).

Exec commands, their environments (often secrets) and their output travel as Temporal payloads:
workflow and activity inputs and results, update arguments and results, signals, queries, memos
and failure details. Without a codec they sit in plain text in Temporal's database and Web UI.
:class:`PayloadEncryptionCodec` encrypts each payload (its serialized protobuf, metadata included)
with AES-256-GCM under the current key of a :class:`PayloadKeys` ring and records the key id in
the outer payload's metadata, so keys rotate: new payloads use the current key, old ones decrypt
with whichever known key their id names. The key id is bound into the GCM associated data, so a
payload whose ciphertext or key id was altered fails authentication instead of decrypting to
garbage. Payloads that are not ours (no encrypted encoding and key id, e.g. the unencrypted
histories recorded before this codec) pass through unchanged.

:func:`data_converter` is the ONE place the runtime's converter is built (pydantic JSON plus this
codec, failure messages and stack traces moved into the encrypted attributes): ``worker.connect``,
the Replayer, the test fixtures, the codec server and the benchmarks all use it. Keys come from
``SANDBOX_PAYLOAD_KEYS`` or, when that is unset, from ``<data_dir>/secrets/payload-keys.json``
(mode 0600). Only the worker side creates that file (:func:`ensure_payload_keys`: the worker,
``sandboxctl up``); a client only reads it (:func:`load_payload_keys`) and, when it is missing, is
refused with an error that says to start the stack or set ``SANDBOX_PAYLOAD_KEYS``: a ring a client
made up would hold a key the worker does not have. See README "Security model" for what this does
and does not protect against. Search attributes are indexed in clear by Temporal and never go through a codec:
nothing secret may be put in one.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec

from sandbox.errors import PayloadKeyUnknown, PayloadTampered, SandboxConfigError
from sandbox.failures import BoundedFailureConverter, EncryptedBoundedFailureConverter
from sandbox.secret_files import load_or_create_secret, read_secret

if TYPE_CHECKING:
    from pathlib import Path

    from sandbox.settings import Settings

#: The outer payload's encoding: what Temporal tooling shows for an encrypted payload.
ENCODING = b"binary/encrypted"
#: Metadata key naming the key a payload was encrypted with; its presence marks the payload as ours.
KEY_ID_METADATA = "sandbox-payload-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12
#: Prefix of the GCM associated data (versioned, so a future format cannot be confused with this one).
_AAD_PREFIX = b"sandbox-payload-v1:"
_SETTING = "SANDBOX_PAYLOAD_KEYS"


@dataclasses.dataclass(frozen=True, repr=False)
class PayloadKeys:
    """A key ring: the id of the key new payloads are encrypted with, and every key that may decrypt.

    The repr names the key ids only, never key material, so a ring can appear in a log line.
    """

    current: str
    keys: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if not self.keys:
            raise SandboxConfigError(f"{_SETTING}: the key ring holds no key")
        if self.current not in self.keys:
            raise SandboxConfigError(f"{_SETTING}: the current key id {self.current!r} is not among the keys")
        for key_id, key in self.keys.items():
            if not key_id or not key_id.isascii() or not key_id.isprintable():
                raise SandboxConfigError(f"{_SETTING}: key id {key_id!r} must be non-empty printable ASCII")
            if len(key) != KEY_BYTES:
                raise SandboxConfigError(
                    f"{_SETTING}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES} "
                    "(generate one: `python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'`)"
                )

    def __repr__(self) -> str:
        return f"PayloadKeys(current={self.current!r}, ids={sorted(self.keys)!r})"

    @classmethod
    def generate(cls, key_id: str | None = None) -> PayloadKeys:
        """A new ring with one random key (id ``k-<8 hex>`` unless given)."""
        key_id = key_id or f"k-{secrets.token_hex(4)}"
        return cls(current=key_id, keys={key_id: AESGCM.generate_key(bit_length=KEY_BYTES * 8)})

    def rotated(self, key_id: str | None = None) -> PayloadKeys:
        """This ring plus a new random key that becomes current; the old keys still decrypt."""
        fresh = PayloadKeys.generate(key_id)
        if fresh.current in self.keys:
            raise SandboxConfigError(f"{_SETTING}: key id {fresh.current!r} is already in the ring")
        return PayloadKeys(current=fresh.current, keys={**self.keys, **fresh.keys})

    @classmethod
    def from_json(cls, text: str, *, source: str = _SETTING) -> PayloadKeys:
        """Parse ``{"current": id, "keys": {id: base64 key}}``; ``source`` names the setting or file in errors."""
        try:
            raw = json.loads(text)
            current = raw["current"]
            encoded = raw["keys"]
            if not isinstance(current, str) or not isinstance(encoded, dict):
                raise TypeError
            keys = {str(key_id): base64.b64decode(value, validate=True) for key_id, value in encoded.items()}
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise SandboxConfigError(
                f'{source} is not valid payload keys: expected {{"current": "<id>", "keys": {{"<id>": '
                f'"<base64 of 32 bytes>"}}}} ({type(exc).__name__})'
            ) from None  # never chain: the exception text could quote key material
        try:
            return cls(current=current, keys=keys)
        except SandboxConfigError as exc:
            raise SandboxConfigError(exc.message.replace(_SETTING, source, 1)) from None

    def to_json(self) -> str:
        """The ring in the format :meth:`from_json` reads (contains key material: store it 0600)."""
        keys = {key_id: base64.b64encode(key).decode("ascii") for key_id, key in sorted(self.keys.items())}
        return json.dumps({"current": self.current, "keys": keys}, indent=2) + "\n"


class PayloadEncryptionCodec(PayloadCodec):
    """AES-256-GCM over each whole payload, key id in the metadata; payloads not ours pass through."""

    def __init__(self, keys: PayloadKeys) -> None:
        self.keys = keys
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.keys.items()}
        self._current_id = keys.current.encode("ascii")
        self._current = self._ciphers[keys.current]

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt every payload with the current key."""
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt our payloads with the key their id names; return the others unchanged.

        Raises:
            PayloadKeyUnknown: a payload names a key id this ring does not hold.
            PayloadTampered: a payload fails authentication (altered, or a different key under that id).
        """
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        """One payload encrypted with the current key (synchronous: the codec server and bench use it)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, payload.SerializeToString(), _AAD_PREFIX + self._current_id)
        return Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: self._current_id}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        """One payload decrypted (or returned as is when it is not ours); raises as :meth:`decode`."""
        if payload.metadata.get("encoding") != ENCODING or KEY_ID_METADATA not in payload.metadata:
            return payload
        raw_id = payload.metadata[KEY_ID_METADATA]
        key_id = raw_id.decode("ascii", errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadKeyUnknown(
                f"a payload in Temporal is encrypted with payload key {key_id!r}, which this process does not "
                f"hold (it holds {sorted(self._ciphers)}); add that key to {_SETTING} or the payload keys file "
                "(keep retired keys for as long as histories that use them exist)"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _AAD_PREFIX + raw_id)
        except (InvalidTag, ValueError):
            raise PayloadTampered(
                f"a payload encrypted with payload key {key_id!r} failed authentication: it was altered, or "
                "the key under that id is not the one it was encrypted with"
            ) from None
        inner = Payload()
        inner.ParseFromString(plain)
        return inner


def load_payload_keys(settings: Settings) -> PayloadKeys:
    """The key ring: ``SANDBOX_PAYLOAD_KEYS`` when set, else the data dir's keys file; never creates anything.

    What a client (the CLI, ``LeaseClient``, the codec server) uses: the keys are the worker's, made
    by :func:`ensure_payload_keys` on the worker side, so a key a client made up would be one the
    worker does not have.

    Raises:
        SandboxConfigError: the setting or file is malformed, unreadable, or readable by others; or
            the setting is unset and the file does not exist (the message names both and says how
            to get them).
    """
    if settings.payload_keys is not None:
        return PayloadKeys.from_json(settings.payload_keys.get_secret_value())
    path = settings.payload_keys_file()
    raw = read_secret(path, what="payload keys")
    if raw is None:
        raise SandboxConfigError(
            f"no payload keys: {_SETTING} is unset and the payload keys file {path} does not exist. The "
            "worker side makes that file: start the stack first (`sandboxctl up`) or the worker "
            f"(`python -m worker`) with this data dir, or set {_SETTING} to the worker's keys"
        )
    return _parse_file(raw, path)


def ensure_payload_keys(settings: Settings) -> PayloadKeys:
    """The key ring, making the data dir's keys file (mode 0600) first when there is none: the worker side.

    The one place payload keys are created: the worker (:func:`worker.run_worker`), ``sandboxctl
    up`` and whatever else starts a worker call it before anything connects; concurrent first calls
    agree on one ring. With ``SANDBOX_PAYLOAD_KEYS`` set it is :func:`load_payload_keys`.

    Raises:
        SandboxConfigError: as :func:`load_payload_keys`, or the file cannot be created.
    """
    if settings.payload_keys is not None:
        return load_payload_keys(settings)
    path = settings.payload_keys_file()
    raw = load_or_create_secret(path, what="payload keys", make=lambda: PayloadKeys.generate().to_json().encode())
    return _parse_file(raw, path)


def _parse_file(raw: bytes, path: Path) -> PayloadKeys:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise SandboxConfigError(
            f"the payload keys file {path} is not UTF-8 JSON; restore it or set {_SETTING}"
        ) from None
    return PayloadKeys.from_json(text, source=f"the payload keys file {path}")


def data_converter_for(keys: PayloadKeys | None) -> DataConverter:
    """Pydantic JSON and bounded failures plus, when ``keys`` is given, the encryption codec and
    encrypted failure attributes."""
    if keys is None:
        return dataclasses.replace(pydantic_data_converter, failure_converter_class=BoundedFailureConverter)
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=PayloadEncryptionCodec(keys),
        # Failure messages and stack traces (which can quote a command or its output) are moved into
        # the encoded attributes, so the codec encrypts them too.
        failure_converter_class=EncryptedBoundedFailureConverter,
    )


def data_converter(settings: Settings) -> DataConverter:
    """The runtime's data converter for these settings (encryption unless ``SANDBOX_PAYLOAD_ENCRYPTION=false``)."""
    return data_converter_for(load_payload_keys(settings) if settings.payload_encryption else None)
