"""Signed control messages between the runtime and enrolled agents (Ed25519, ``cryptography``).

NATS permissions decide who may talk on a subject; signatures decide whose words count, even on a
network where NATS itself is open (``SANDBOX_NATS_AUTH=off``) or a credential leaked.

Keys:

- :class:`ControlSigningKey` is the deployment's key. Its public half is pinned by every agent at
  enrollment; it signs every control request and certifies each agent's reply key.
- :class:`AgentCredential` is what ``sandboxctl machine enroll`` hands to a machine once: the
  agent's NATS nkey seed, its own reply-signing key, the runtime's certificate for that key and the
  pinned runtime public key. The runtime keeps only the public halves (in the enrollment row).
  The NATS nkey and the reply key are different keys on purpose: a NATS server makes its clients
  sign a nonce of its choosing, and a hostile server could choose the bytes of a reply.

Wire (NATS headers; the body is the JSON request or response unchanged):

- request: ``Sandbox-Key`` (the runtime key id), ``Sandbox-Sig`` = Ed25519 over
  ``REQUEST_DOMAIN | subject | body``. The body's ``expires_at_ms`` bounds when it may run.
- reply: ``Sandbox-Cert`` (the runtime's certificate binding workspace, agent and reply key) and
  ``Sandbox-Sig`` = Ed25519 over ``REPLY_DOMAIN | subject | sha256(request bytes) | body``: a reply
  counts only for the exact request it answers, from the agent the subject names.

An agent checks, before anything else: the signature verifies under the pinned key, the request
has not expired (``CLOCK_SKEW_SECONDS`` of tolerance either way, and it may not claim to be valid
for longer than ``MAX_REQUEST_VALIDITY_SECONDS``), and its request id was not seen before
(:class:`ReplayGuard`, journaled in the agent's state dir so a restart does not forget). Any
failure is :class:`~sandbox.errors.ControlUnauthenticated`; the agent answers ``UNAUTHENTICATED``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from sandbox.errors import ControlUnauthenticated, SandboxConfigError
from sandbox.secret_files import load_or_create_secret, write_private_file

__all__ = [
    "CLOCK_SKEW_SECONDS",
    "CONTROL_KEY_FILENAME",
    "MAX_REQUEST_VALIDITY_SECONDS",
    "REQUEST_VALIDITY_SECONDS",
    "AgentCredential",
    "ControlSigningKey",
    "ReplayGuard",
    "ReplyVerifier",
    "RequestVerifier",
    "key_id",
    "new_nkey_user_seed",
    "nkey_public_key",
    "sign_reply",
]

REQUEST_DOMAIN: Final = b"sandbox-control-request/v1\n"
REPLY_DOMAIN: Final = b"sandbox-control-reply/v1\n"
CERT_DOMAIN: Final = b"sandbox-agent-certificate/v1\n"
HEADER_KEY: Final = "Sandbox-Key"
HEADER_SIG: Final = "Sandbox-Sig"
HEADER_CERT: Final = "Sandbox-Cert"
REQUEST_VALIDITY_SECONDS: Final = 60.0
"""How long after signing a request may start running on the agent (it may then run for hours)."""
MAX_REQUEST_VALIDITY_SECONDS: Final = 15 * 60.0
"""The longest validity an agent accepts: a request can never be signed to stay valid for good."""
CLOCK_SKEW_SECONDS: Final = 300.0
"""Tolerated difference between the runtime's and a machine's clock (laptops drift)."""
CONTROL_KEY_FILENAME: Final = "control-signing.key"
CREDENTIAL_KIND: Final = "sandbox-agent-credential"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ControlUnauthenticated(f"{what} is not valid base64", reason="malformed") from None


def key_id(public: Ed25519PublicKey) -> str:
    """A short stable name of a public key: 16 hex digits of its SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def new_nkey_user_seed() -> bytes:
    """A fresh NATS nkey user seed (``SU…``), for a role of the embedded server or an agent."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def nkey_public_key(seed: str | bytes) -> str:
    """The public nkey (``U…``) of a user seed, as nats-server's config names the user.

    Raises:
        SandboxConfigError: ``seed`` is not an nkey seed.
    """
    import nkeys

    raw = seed.encode() if isinstance(seed, str) else seed
    try:
        return str(nkeys.from_seed(bytearray(raw.strip())).public_key.decode())
    except Exception as err:  # nkeys raises its own error types for every malformed seed
        raise SandboxConfigError(f"not a NATS nkey seed: {type(err).__name__}") from None


# --- the deployment key ----------------------------------------------------------------------------


class _Certificate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    workspace_id: str
    agent_id: str
    reply_key: str
    issuer: str


@dataclass(frozen=True)
class ControlSigningKey:
    """The runtime's Ed25519 key: signs control requests and certifies agents' reply keys."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> ControlSigningKey:
        """A new random key (tests, and the first start of a data dir)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> ControlSigningKey:
        """The key stored at ``path`` (32 raw seed bytes, base64), created with mode 0600 if missing.

        Raises:
            SandboxConfigError: the file cannot be read or created, or holds no key.
        """
        raw = load_or_create_secret(
            path, what="control signing key", make=lambda: _b64(os.urandom(32)).encode() + b"\n"
        )
        try:
            seed = base64.b64decode(raw.strip(), validate=True)
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        except (binascii.Error, ValueError):
            raise SandboxConfigError(
                f"the control signing key file {path} does not hold a base64 Ed25519 seed; restore it or "
                "delete it (every machine must then be enrolled again)"
            ) from None

    @property
    def public(self) -> Ed25519PublicKey:
        """The half agents pin."""
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        """The pinned key's id (``Sandbox-Key``)."""
        return key_id(self.public)

    def sign_request(self, subject: str, body: bytes) -> dict[str, str]:
        """The NATS headers that authenticate ``body`` sent on ``subject``."""
        signature = self.private.sign(REQUEST_DOMAIN + subject.encode() + b"\n" + body)
        return {HEADER_KEY: self.key_id, HEADER_SIG: _b64(signature)}

    def certify(self, workspace_id: str, agent_id: str, reply_key: Ed25519PublicKey) -> str:
        """A certificate saying ``reply_key`` speaks for ``workspace_id/agent_id``: ``b64(json).b64(sig)``."""
        body = _Certificate(
            workspace_id=workspace_id, agent_id=agent_id, reply_key=_b64(_raw_public(reply_key)), issuer=self.key_id
        ).model_dump_json()
        signature = self.private.sign(CERT_DOMAIN + body.encode())
        return f"{_b64(body.encode())}.{_b64(signature)}"

    def issue_credential(self, workspace_id: str, agent_id: str, *, nats_url: str | None = None) -> AgentCredential:
        """Everything a newly enrolled machine needs, made once (the runtime keeps only public halves)."""
        reply = Ed25519PrivateKey.generate()
        return AgentCredential(
            workspace_id=workspace_id,
            agent_id=agent_id,
            nats_url=nats_url,
            nats_seed=SecretStr(new_nkey_user_seed().decode()),
            reply_key=SecretStr(_b64(_raw_private(reply))),
            certificate=self.certify(workspace_id, agent_id, reply.public_key()),
            runtime_key=_b64(_raw_public(self.public)),
        )


# --- what a machine holds ---------------------------------------------------------------------------


class AgentCredential(BaseModel):
    """An enrolled machine's credential (a 0600 JSON file on the machine; never stored by the runtime).

    Attributes:
        workspace_id: The workspace the machine serves.
        agent_id: Its agent id.
        nats_url: The NATS server the runtime told it to use (``agent run --nats`` overrides).
        nats_seed: The agent's NATS nkey seed (its NATS identity).
        reply_key: Its Ed25519 reply-signing key (base64 raw seed).
        certificate: The runtime's certificate for the reply key.
        runtime_key: The pinned runtime public key (base64 raw).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["sandbox-agent-credential"] = CREDENTIAL_KIND
    version: Literal[1] = 1
    workspace_id: str
    agent_id: str
    nats_url: str | None = None
    nats_seed: SecretStr
    reply_key: SecretStr
    certificate: str
    runtime_key: str

    @property
    def nats_public_key(self) -> str:
        """The public nkey the NATS server lists for this agent."""
        return nkey_public_key(self.nats_seed.get_secret_value())

    @property
    def reply_key_id(self) -> str:
        """Id of the reply key's public half (kept in the enrollment row)."""
        return key_id(self.reply_private().public_key())

    def reply_private(self) -> Ed25519PrivateKey:
        """The reply-signing key."""
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.reply_key.get_secret_value()))

    def runtime_public(self) -> Ed25519PublicKey:
        """The pinned runtime key."""
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.runtime_key))

    def to_file_bytes(self) -> bytes:
        """The credential as its file holds it (secrets included: write it 0600, show it once)."""
        data = self.model_dump(mode="python")
        data["nats_seed"] = self.nats_seed.get_secret_value()
        data["reply_key"] = self.reply_key.get_secret_value()
        return (json.dumps(data, indent=2) + "\n").encode()

    def write(self, path: Path) -> None:
        """Write the credential to ``path`` with mode 0600."""
        write_private_file(path, self.to_file_bytes())

    @classmethod
    def read(cls, path: Path) -> AgentCredential:
        """The credential in ``path``.

        Raises:
            SandboxConfigError: unreadable, not a credential, or its keys do not parse.
        """
        try:
            raw = Path(path).read_bytes()
        except OSError as err:
            raise SandboxConfigError(f"cannot read the agent credential {path}: {err.strerror}") from None
        try:
            credential = cls.model_validate_json(raw)
            credential.reply_private()
            credential.runtime_public()
            credential.nats_public_key  # noqa: B018 - parses the seed
        except (ValidationError, ValueError, binascii.Error, SandboxConfigError):
            raise SandboxConfigError(
                f"{path} is not a sandbox agent credential; make one with `sandboxctl machine enroll`"
            ) from None
        return credential


def sign_reply(credential: AgentCredential, subject: str, request: bytes, body: bytes) -> dict[str, str]:
    """The NATS headers of the agent's reply ``body`` to the request bytes ``request`` on ``subject``."""
    digest = hashlib.sha256(request).digest()
    signature = credential.reply_private().sign(REPLY_DOMAIN + subject.encode() + b"\n" + digest + body)
    return {HEADER_CERT: credential.certificate, HEADER_SIG: _b64(signature)}


# --- checking ---------------------------------------------------------------------------------------


def _verify(public: Ed25519PublicKey, signature: bytes, data: bytes, what: str) -> None:
    try:
        public.verify(signature, data)
    except InvalidSignature:
        raise ControlUnauthenticated(f"the {what} signature does not verify", reason="bad_signature") from None


class ReplayGuard:
    """Request ids seen within their validity window, journaled so a restarted agent still refuses replays.

    The journal (one ``<expires_at_ms> <request_id>`` line per request) is compacted at load; an id
    is forgotten only once its request could no longer pass the expiry check anyway.
    """

    def __init__(self, journal: Path | None, *, limit: int = 200_000) -> None:
        self.journal = journal
        self.limit = limit
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        if journal is not None:
            self._load(journal)

    def _load(self, journal: Path) -> None:
        now_ms = int(time.time() * 1000)
        try:
            lines = journal.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            stamp, _, rid = line.partition(" ")
            if stamp.isdigit() and rid and int(stamp) + CLOCK_SKEW_SECONDS * 1000 >= now_ms:
                self._remember(rid, int(stamp))
        write_private_file(journal, "".join(f"{exp} {rid}\n" for rid, exp in self._expiry.items()).encode())

    def _remember(self, rid: str, expires_at_ms: int) -> None:
        self._expiry[rid] = expires_at_ms
        heapq.heappush(self._heap, (expires_at_ms, rid))

    def _forget_expired(self, now_ms: int) -> None:
        horizon = now_ms - int(CLOCK_SKEW_SECONDS * 1000)
        while self._heap and self._heap[0][0] < horizon:
            _, rid = heapq.heappop(self._heap)
            self._expiry.pop(rid, None)

    def check_and_record(self, request_id: str, expires_at_ms: int, *, now_ms: int | None = None) -> None:
        """Record ``request_id``; refuse it if it was seen before.

        Raises:
            ControlUnauthenticated: a replay (reason ``replayed``), or too many live ids (``replay_window_full``).
        """
        now = int(time.time() * 1000) if now_ms is None else now_ms
        self._forget_expired(now)
        if request_id in self._expiry:
            raise ControlUnauthenticated(f"request id {request_id!r} was already used", reason="replayed")
        if len(self._expiry) >= self.limit:
            raise ControlUnauthenticated("too many requests inside the replay window", reason="replay_window_full")
        self._remember(request_id, expires_at_ms)
        if self.journal is not None:
            with self.journal.open("a") as out:
                out.write(f"{expires_at_ms} {request_id}\n")


@dataclass
class RequestVerifier:
    """The agent's check of every request: pinned key, expiry, replay (see the module docstring)."""

    runtime_key: Ed25519PublicKey
    replays: ReplayGuard
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def verify_signature(self, subject: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        """Check the request's signature before it is even parsed.

        Raises:
            ControlUnauthenticated: unsigned, signed by another key, or a signature that does not verify.
        """
        headers = headers or {}
        sig = headers.get(HEADER_SIG)
        if not sig:
            raise ControlUnauthenticated("the request is not signed", reason="unsigned")
        if headers.get(HEADER_KEY) != key_id(self.runtime_key):
            raise ControlUnauthenticated(
                "the request is signed by a key this machine did not pin at enrollment", reason="wrong_key"
            )
        _verify(self.runtime_key, _unb64(sig, "signature"), REQUEST_DOMAIN + subject.encode() + b"\n" + body, "request")

    def admit(self, request_id: str, expires_at_ms: int | None) -> None:
        """Check the parsed request's expiry and id (after :meth:`verify_signature`).

        Raises:
            ControlUnauthenticated: no expiry, expired, valid for too long, or a replayed id.
        """
        if expires_at_ms is None:
            raise ControlUnauthenticated("the request carries no expiry", reason="no_expiry")
        now_ms = int(self.clock() * 1000)
        skew_ms = int(CLOCK_SKEW_SECONDS * 1000)
        if expires_at_ms + skew_ms < now_ms:
            raise ControlUnauthenticated("the request has expired", reason="expired")
        if expires_at_ms > now_ms + int(MAX_REQUEST_VALIDITY_SECONDS * 1000) + skew_ms:
            raise ControlUnauthenticated("the request claims to stay valid for too long", reason="too_long")
        self.replays.check_and_record(request_id, expires_at_ms, now_ms=now_ms)


class ReplyVerifier:
    """The runtime's check of every reply: certified by our key, for the subject's agent, over our request."""

    def __init__(self, runtime_key: Ed25519PublicKey) -> None:
        self.runtime_key = runtime_key
        self._issuer = key_id(runtime_key)
        self._certified: dict[str, tuple[str, str, Ed25519PublicKey]] = {}

    def _reply_key(self, certificate: str) -> tuple[str, str, Ed25519PublicKey]:
        known = self._certified.get(certificate)
        if known is not None:
            return known
        body_b64, _, sig_b64 = certificate.partition(".")
        body = _unb64(body_b64, "certificate")
        _verify(self.runtime_key, _unb64(sig_b64, "certificate signature"), CERT_DOMAIN + body, "certificate")
        try:
            cert = _Certificate.model_validate_json(body)
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(cert.reply_key))
        except (ValidationError, ValueError, binascii.Error):
            raise ControlUnauthenticated("the reply certificate is malformed", reason="malformed") from None
        if cert.issuer != self._issuer:
            raise ControlUnauthenticated("the reply certificate names another issuer", reason="wrong_key")
        known = (cert.workspace_id, cert.agent_id, key)
        if len(self._certified) > 4096:
            self._certified.clear()
        self._certified[certificate] = known
        return known

    def verify(
        self, subject: str, workspace_id: str, agent_id: str, request: bytes, body: bytes, headers: Mapping[str, str]
    ) -> None:
        """Check one reply to ``request`` sent on ``subject`` to ``workspace_id/agent_id``.

        Raises:
            ControlUnauthenticated: unsigned, uncertified, certified for another agent, or not over this request.
        """
        cert, sig = headers.get(HEADER_CERT), headers.get(HEADER_SIG)
        if not cert or not sig:
            raise ControlUnauthenticated("the reply is not signed", reason="unsigned")
        ws, agent, key = self._reply_key(cert)
        if (ws, agent) != (workspace_id, agent_id):
            raise ControlUnauthenticated("the reply is signed by another machine", reason="wrong_agent")
        digest = hashlib.sha256(request).digest()
        _verify(key, _unb64(sig, "signature"), REPLY_DOMAIN + subject.encode() + b"\n" + digest + body, "reply")
