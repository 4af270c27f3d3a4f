"""The one exception hierarchy of the sandbox runtime.

Every error a caller can see is a subclass of :class:`SandboxError` and carries typed properties
(never parse the message). A class's properties are its *attributes*: each is declared on the
class with its default and documented under ``Attributes:`` in its docstring, and each holds a
JSON value (str, int, float, bool, None, or a str-to-str dict).

Errors that cross the Temporal boundary travel as ``ApplicationError`` (:mod:`sandbox.failures`
does both directions): ``type`` is the class's :attr:`SandboxError.error_type`, ``message`` its
message, ``non_retryable`` the negation of its per-instance ``retryable``, and ``details`` one
dict of its attributes (:meth:`SandboxError.attributes`). :func:`error_from_type` rebuilds the
class from those parts; an ``ApplicationError`` without details (recorded before details were
sent) still rebuilds the right class, with the class defaults.

::

    SandboxError
     ├── SandboxConfigError          settings are missing or contradictory (boot refuses)
     ├── TemporalUnreachable         nothing answers at the configured Temporal address
     │    └── NoRunningStack         no address was set and no ``sandboxctl up`` runs for the data dir
     ├── PayloadCodecError           a payload in Temporal history cannot be decrypted (sandbox/payload_codec.py)
     │    ├── PayloadKeyUnknown      it names a payload key id this process does not hold
     │    └── PayloadTampered        it fails authentication: altered, or another key under its id
     ├── InvalidRequest              malformed input: empty/oversized ids, bad kinds, bad paths
     │    ├── UnknownBackend         a backend name that no descriptor knows
     │    ├── ChannelAValidationError  a Channel-A path or argument refused before anything runs (400)
     │    ├── ControlUnauthenticated  a control message is unsigned, forged, expired or replayed
     │    └── StreamTokenError       a stream token cannot be minted: empty secret, invalid claims
     ├── ProviderError               raised by providers (see sandbox/box.py)
     │    ├── BoxNotFound            typed proof the box is gone (the only licence for cold restore)
     │    ├── ProviderUnavailable    transient; retry
     │    ├── ProviderAuthError      credentials rejected
     │    ├── ProviderQuotaError     quota or rate limit
     │    ├── ExecTimeout            a command ran past its timeout
     │    ├── PathNotFound           a file or directory in the box is missing (never: the box is gone)
     │    ├── Unsupported            the backend cannot do this
     │    │    ├── DisplayStackUnsupported    this box cannot run a desktop (no exec, Xvfb or x11vnc)
     │    │    └── TerminalServerUnsupported  this box cannot run a terminal server (no exec or ttyd)
     │    ├── StreamPortUnavailable  no usable endpoint for the box's stream port
     │    ├── DisplayStackError      a desktop stage (xvfb, x11vnc, websockify, lock, timeout) failed
     │    ├── TerminalServerError    ttyd or its edge did not come up
     │    ├── SelfhostedControlError a selfhosted agent answered an op with an error (never "box gone")
     │    └── AgentOffline           (a ProviderUnavailable) the selfhosted agent does not answer; retry
     ├── ChannelAError               a Channel-A operation failed after it reached the box
     │    ├── ChannelANotFound       the path, ref or pty does not exist (404)
     │    ├── ChannelAConflict       the target already exists or the state forbids it (409)
     │    ├── ChannelAUnavailable    the box gave no usable answer; retry (never a bad path)
     │    ├── ChannelAUnsupported    this box cannot do the operation (no PTY, no exec)
     │    └── ChannelAPartialMutation  a mutation may have partly applied; not retryable
     ├── SnapshotError               a workspace archive could not be stored, found, verified or published
     │    ├── ArtifactNotFound       the archive is not in the artifact store
     │    ├── ArchiveCorrupt         an archive failed verification (SHA-256, size, unreadable stream)
     │    ├── ArtifactStoreUnavailable  the artifact store failed transiently (I/O); retry
     │    ├── SnapshotNotFound       the snapshot ledger has no snapshot with this id
     │    └── SnapshotConflict       the snapshot cannot make this transition (not a candidate, superseded)
     ├── RecordingError              a desktop recording could not be started, found or stored
     │    └── RecordingNotFound      no recording with this id
     ├── ComputerUseError            a computer-use action (screenshot, input) failed in the box
     │    ├── ComputerUseDisabled    computer use is switched off by policy (computer_use_enabled)
     │    └── ComputerUseReadOnly    input refused: computer use is read-only (screenshots allowed)
     ├── RoutingError                a routed session could not complete an op on its active target
     │    ├── RouteUnresolvable      the session pointer names no usable target (stale, offline, ...)
     │    └── MutationOutcomeUnknown a mutation raced a route change; it was not replayed
     └── LeaseError                  raised by the lease workflow and surfaced by the client
          ├── StaleEpoch             the caller's epoch is not the lease's current epoch (fenced)
          ├── HolderNotFound         heartbeat/release of a holder the lease does not have
          ├── LeaseNotWarm           an operation that needs a warm box on a cold/draining lease
          ├── LeaseNotFound          no lease workflow for this workspace/group
          ├── LeaseStopping          the lease is stopping and admits no new holder
          ├── OutcomeUnknown         the call timed out: it may or may not have taken effect
          └── ProvisionFailed        the box could not be created or failed its readiness probe
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar


class SandboxError(Exception):
    """Base of every error raised by the sandbox runtime.

    Attributes:
        message: Human-readable text that says what happened and what to do.
        retryable: Whether repeating the same call later may succeed.
    """

    error_type: ClassVar[str] = "SandboxError"
    default_retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable

    @classmethod
    def attribute_names(cls) -> tuple[str, ...]:
        """The names of the class's attributes: every annotated, non-``ClassVar`` class attribute (MRO order).

        ``message`` and ``retryable`` are not among them: they travel as the ``ApplicationError``'s
        own message and ``non_retryable`` flag.
        """
        return tuple(_attribute_hints(cls))

    def attributes(self) -> dict[str, Any]:
        """This error's attributes as one JSON-safe dict (mutable values copied)."""
        return {name: _copied(getattr(self, name)) for name in self.attribute_names()}


class SandboxConfigError(SandboxError):
    """Settings are missing, malformed or contradictory."""

    error_type = "SandboxConfigError"


class TemporalUnreachable(SandboxError):
    """Nothing answers at the configured Temporal address (the stack is not running, or elsewhere).

    Attributes:
        address: The ``host:port`` that was dialled.
    """

    error_type = "TemporalUnreachable"
    default_retryable = True
    address: str = ""

    def __init__(self, message: str, *, address: str, retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.address = address


class NoRunningStack(TemporalUnreachable):
    """No ``sandboxctl up`` runs for the data dir and no Temporal address was set explicitly.

    Raised instead of quietly dialling the default ``127.0.0.1:7233``, which may be another stack.
    """

    error_type = "NoRunningStack"
    default_retryable = False


class PayloadCodecError(SandboxError):
    """A payload in Temporal history cannot be decrypted."""

    error_type = "PayloadCodecError"


class PayloadKeyUnknown(PayloadCodecError):
    """The payload was encrypted with a key id this process does not hold; add that key."""

    error_type = "PayloadKeyUnknown"


class PayloadTampered(PayloadCodecError):
    """The payload failed AES-GCM authentication: it was altered, or the key under its id differs."""

    error_type = "PayloadTampered"


class InvalidRequest(SandboxError):
    """The request is malformed; fix the input, retrying will not help."""

    error_type = "InvalidRequest"


class UnknownBackend(InvalidRequest):
    """The backend name is not one of the known backends.

    Attributes:
        backend: The backend name as the caller gave it.
    """

    error_type = "UnknownBackend"
    backend: str = ""

    def __init__(self, backend: str, known: list[str] | None = None) -> None:
        hint = f" Known backends: {', '.join(known)}." if known else ""
        super().__init__(f"unknown sandbox backend {backend!r}.{hint}")
        self.backend = backend


class ChannelAValidationError(InvalidRequest):
    """A Channel-A request was refused before anything ran: an absolute path, a ``..`` segment, a NUL.

    Attributes:
        path: The offending path as the caller sent it, when the error is about a path.
    """

    error_type = "ChannelAValidationError"
    path: str | None = None

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ControlUnauthenticated(InvalidRequest):
    """A control request or reply failed authentication: unsigned, wrong key, forged, expired or replayed.

    The agent answers such a request with ``UNAUTHENTICATED`` and does nothing else (no fence
    move, no side effect); the runtime drops such a reply and keeps waiting for a genuine one.

    Attributes:
        reason: ``unsigned``, ``wrong_key``, ``bad_signature``, ``malformed``, ``no_expiry``,
            ``expired``, ``too_long``, ``replayed``, ``replay_window_full`` or ``wrong_agent``.
    """

    error_type = "ControlUnauthenticated"
    reason: str = "unsigned"

    def __init__(self, message: str, *, reason: str = "unsigned") -> None:
        super().__init__(message)
        self.reason = reason


class StreamTokenError(InvalidRequest):
    """A stream token or lease key cannot be made: empty secret, invalid claims or lease id."""

    error_type = "StreamTokenError"


class ProviderError(SandboxError):
    """A provider (local, modal, selfhosted, ...) failed an operation."""

    error_type = "ProviderError"


class BoxNotFound(ProviderError):
    """The provider proved the box does not exist (typed, never inferred from message text)."""

    error_type = "BoxNotFound"


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or answered with a transient failure."""

    error_type = "ProviderUnavailable"
    default_retryable = True


class ProviderAuthError(ProviderError):
    """The provider rejected our credentials."""

    error_type = "ProviderAuthError"


class ProviderQuotaError(ProviderError):
    """The provider refused because of a quota or rate limit."""

    error_type = "ProviderQuotaError"
    default_retryable = True


class ExecTimeout(ProviderError):
    """A command inside the box ran longer than its timeout and was killed.

    Attributes:
        timeout: The timeout in seconds that the command ran past (0.0 when unknown).
    """

    error_type = "ExecTimeout"
    timeout: float = 0.0

    def __init__(self, message: str, *, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


class PathNotFound(ProviderError):
    """A file or directory inside the box does not exist. Never evidence that the box itself is gone.

    Attributes:
        path: The path as the caller sent it.
    """

    error_type = "PathNotFound"
    path: str | None = None

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class Unsupported(ProviderError):
    """The backend does not support this operation."""

    error_type = "Unsupported"


class StreamPortUnavailable(ProviderError):
    """The provider gave no usable endpoint for the stream port (missing, or a malformed endpoint)."""

    error_type = "StreamPortUnavailable"


class DisplayStackUnsupported(Unsupported):
    """The box cannot run the desktop plane: the backend has no exec, or Xvfb/x11vnc are missing."""

    error_type = "DisplayStackUnsupported"


class TerminalServerUnsupported(Unsupported):
    """The box cannot run the terminal plane: the backend has no exec, or there is no ttyd."""

    error_type = "TerminalServerUnsupported"


class DisplayStackError(ProviderError):
    """A stage of the desktop stack failed to come up in the box.

    Attributes:
        stage: ``xvfb``, ``x11vnc``, ``websockify``, ``lock`` (a concurrent bring-up held the lock
            too long), ``timeout`` (the whole script ran too long) or ``unknown``.
    """

    error_type = "DisplayStackError"
    stage: str = "unknown"

    def __init__(self, message: str, *, stage: str = "unknown", retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.stage = stage


class TerminalServerError(ProviderError):
    """The terminal plane failed to come up in the box.

    Attributes:
        stage: ``ttyd`` (ttyd or its edge failed), ``lock``, ``timeout`` or ``unknown``.
    """

    error_type = "TerminalServerError"
    stage: str = "unknown"

    def __init__(self, message: str, *, stage: str = "unknown", retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.stage = stage


class SelfhostedControlError(ProviderError):
    """A selfhosted agent (or the control plane in its name) answered an op with an ``AgentError``.

    Built by :func:`sandbox.control_protocol.agent_error_to_control_error`; never means that a box
    is gone (a user's machine cannot be recreated), so it is never a :class:`BoxNotFound`.

    Attributes:
        code: The wire error code as its integer value (``ControlErrorCode.number``; unknown codes kept as is).
        reason: ``agent_offline`` / ``agent_reconnecting`` / ``consent_required``, or None.
        fenced: The op carried an epoch older than the newest the agent has seen.
        draining: The agent is draining or at capacity.
        agent_offline: No agent answered.
        os_not_found: A file or path on the machine is missing (never the machine itself).
        payload_too_large: The request or its reply exceeded the link's per-message limit.
        never_sent: The request provably never reached the agent, so repeating it is safe.
        control_request_id: The request id of the failed attempt, when known.
        detail: The agent's string detail map.
    """

    error_type = "SelfhostedControlError"
    # Class defaults keep an instance rebuilt by error_from_type (message only) well formed.
    code: int = 0
    reason: str | None = None
    fenced: bool = False
    draining: bool = False
    agent_offline: bool = False
    os_not_found: bool = False
    payload_too_large: bool = False
    never_sent: bool = False
    control_request_id: str | None = None
    detail: dict[str, str] = {}  # read-only default, replaced per instance

    def __init__(
        self,
        message: str,
        *,
        code: int,
        reason: str | None = None,
        retryable: bool = False,
        fenced: bool = False,
        draining: bool = False,
        agent_offline: bool = False,
        os_not_found: bool = False,
        payload_too_large: bool = False,
        never_sent: bool = False,
        control_request_id: str | None = None,
        detail: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code
        self.reason = reason
        self.fenced = fenced
        self.draining = draining
        self.agent_offline = agent_offline
        self.os_not_found = os_not_found
        self.payload_too_large = payload_too_large
        self.never_sent = never_sent
        self.control_request_id = control_request_id
        self.detail = dict(detail or {})


class AgentOffline(ProviderUnavailable):
    """The selfhosted agent did not answer (offline or reconnecting); retry later, never recreate.

    Attributes:
        agent_id: The agent that did not answer.
        reason: ``agent_offline`` or ``agent_reconnecting``.
    """

    error_type = "AgentOffline"
    agent_id: str | None = None
    reason: str = "agent_offline"

    def __init__(self, message: str, *, agent_id: str | None = None, reason: str = "agent_offline") -> None:
        super().__init__(message)
        self.agent_id = agent_id
        self.reason = reason


class ChannelAError(SandboxError):
    """A Channel-A operation (files, git, terminal, PTY) failed after it reached the box.

    Attributes:
        path: The workspace-relative path the error is about, when there is one.
    """

    error_type = "ChannelAError"
    path: str | None = None

    def __init__(self, message: str, *, path: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.path = path


class ChannelANotFound(ChannelAError):
    """The path, git object or PTY named by a Channel-A request does not exist (HTTP 404)."""

    error_type = "ChannelANotFound"


class ChannelAConflict(ChannelAError):
    """The request conflicts with what is in the box: the target exists, a directory is not empty (409)."""

    error_type = "ChannelAConflict"


class ChannelAUnavailable(ChannelAError):
    """The box could not answer usably (timeout, lost frame, transport failure); retry later."""

    error_type = "ChannelAUnavailable"
    default_retryable = True


class ChannelAUnsupported(ChannelAError):
    """The box cannot do this Channel-A operation (for example a PTY on a backend without one)."""

    error_type = "ChannelAUnsupported"


class ChannelAPartialMutation(ChannelAError):
    """A mutation failed part way and may have changed the workspace; repeating it is unsafe."""

    error_type = "ChannelAPartialMutation"


class SnapshotError(SandboxError):
    """A workspace archive could not be captured, stored, found, verified or published."""

    error_type = "SnapshotError"


class ArtifactNotFound(SnapshotError):
    """The artifact store has no object under the key (never written, or already deleted).

    Attributes:
        key: The artifact key that was looked up.
    """

    error_type = "ArtifactNotFound"
    key: str | None = None

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ArchiveCorrupt(SnapshotError):
    """An archive failed verification: its SHA-256 or size differs from the record, or it cannot be decoded."""

    error_type = "ArchiveCorrupt"


class ArtifactStoreUnavailable(SnapshotError):
    """The artifact store failed with an I/O error that may pass (disk full, permissions, network); retry."""

    error_type = "ArtifactStoreUnavailable"
    default_retryable = True


class SnapshotNotFound(SnapshotError):
    """The snapshot ledger has no snapshot with this id (or it belongs to another lease)."""

    error_type = "SnapshotNotFound"


class SnapshotConflict(SnapshotError):
    """The snapshot cannot make the requested transition: it is no longer a candidate, or a newer one is current."""

    error_type = "SnapshotConflict"


class RecordingError(SandboxError):
    """A desktop recording could not be started, found or stored.

    Attributes:
        reason: The recording failure reason when there is one (``ffmpeg-error``, ``box-death``,
            ``max-bytes-exceeded``, ``display-unavailable``, ``upload-failed``).
    """

    error_type = "RecordingError"
    reason: str | None = None

    def __init__(self, message: str, *, reason: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.reason = reason


class RecordingNotFound(RecordingError):
    """No recording with this id (never started, or its row and workflow are gone)."""

    error_type = "RecordingNotFound"


class ComputerUseError(SandboxError):
    """A computer-use action (screenshot, pointer or keyboard input) failed in the box."""

    error_type = "ComputerUseError"


class ComputerUseDisabled(ComputerUseError):
    """Computer use is switched off by policy (``SANDBOX_COMPUTER_USE_ENABLED=false``)."""

    error_type = "ComputerUseDisabled"


class ComputerUseReadOnly(ComputerUseError):
    """Desktop input was refused because computer use is read-only; screenshots are still allowed."""

    error_type = "ComputerUseReadOnly"


class RoutingError(SandboxError):
    """A routed session (one session moved between boxes under an epoch fence) could not complete an op."""

    error_type = "RoutingError"


class RouteUnresolvable(RoutingError):
    """The session's active pointer names no usable target.

    Attributes:
        code: ``stale_pointer``, ``offline_enrollment``, ``unsupported_backend_context``,
            ``transient_establishment`` or ``home_unavailable_this_turn``.
    """

    error_type = "RouteUnresolvable"
    code: str = "stale_pointer"

    def __init__(self, message: str, *, code: str = "stale_pointer", retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code


class MutationOutcomeUnknown(RoutingError):
    """A mutation was fenced or its route changed while it ran; it was not replayed, its effect is unknown.

    Attributes:
        op: The operation (``exec``, ``write_file``, ...).
    """

    error_type = "MutationOutcomeUnknown"
    op: str = ""

    def __init__(self, message: str, *, op: str = "") -> None:
        super().__init__(message)
        self.op = op


class LeaseError(SandboxError):
    """A lease operation was refused by the lease workflow."""

    error_type = "LeaseError"


class StaleEpoch(LeaseError):
    """The caller presented an epoch that is not the lease's current one: it is fenced."""

    error_type = "StaleEpoch"


class HolderNotFound(LeaseError):
    """The lease has no holder with this kind and id (expired, released, or never acquired)."""

    error_type = "HolderNotFound"


class LeaseNotWarm(LeaseError):
    """The operation needs a warm box but the lease is cold, warming or draining."""

    error_type = "LeaseNotWarm"


class LeaseNotFound(LeaseError):
    """No lease workflow exists for this workspace and group."""

    error_type = "LeaseNotFound"


class LeaseStopping(LeaseError):
    """The lease was asked to stop and admits no new holders."""

    error_type = "LeaseStopping"


class OutcomeUnknown(LeaseError):
    """The lease did not answer in time; the request may or may not have been applied."""

    error_type = "OutcomeUnknown"
    default_retryable = True


class ProvisionFailed(LeaseError):
    """The box could not be created or did not pass its readiness probe."""

    error_type = "ProvisionFailed"
    default_retryable = True


def _all_subclasses(cls: type[SandboxError]) -> list[type[SandboxError]]:
    out: list[type[SandboxError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_HINTS: dict[type[SandboxError], dict[str, Any]] = {}


def _attribute_hints(cls: type[SandboxError]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        # This module's own namespace: inside Temporal's workflow sandbox ``sys.modules`` is another one.
        every = typing.get_type_hints(cls, globalns=globals())
        hints = _HINTS[cls] = {name: hint for name, hint in every.items() if typing.get_origin(hint) is not ClassVar}
    return hints


def _copied(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _conforming(value: object, hint: Any) -> tuple[bool, Any]:
    """Whether a decoded JSON ``value`` fits the attribute's type ``hint``, and the value to keep."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(hint):
            fits, kept = _conforming(value, arg)
            if fits:
                return True, kept
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            return False, None
        kept_map: dict[Any, Any] = {}
        for key, item in value.items():
            key_fits, key_kept = _conforming(key, key_hint)
            item_fits, item_kept = _conforming(item, value_hint)
            if not (key_fits and item_fits):
                return False, None
            kept_map[key_kept] = item_kept
        return True, kept_map
    if hint is float:  # JSON may carry 30.0 as 30
        fits = isinstance(value, int | float) and not isinstance(value, bool)
        return fits, float(value) if fits else None  # type: ignore[arg-type]
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (str, bool):
        return isinstance(value, hint), value
    return False, None


def error_class_for(error_type: str | None) -> type[SandboxError] | None:
    """The class whose :attr:`SandboxError.error_type` is ``error_type``, or None."""
    for cls in _all_subclasses(SandboxError):
        if cls.error_type == error_type:
            return cls
    return None


def error_from_type(
    error_type: str | None,
    message: str,
    attributes: Mapping[str, object] | None = None,
    *,
    retryable: bool | None = None,
) -> SandboxError:
    """Rebuild a typed error from an ``ApplicationError``'s type, message, details dict and retryability.

    Unknown types become a plain :class:`SandboxError` so callers always get one hierarchy. Each
    attribute missing from ``attributes`` (or not of its declared type) keeps the class default,
    names the class does not declare are ignored, and ``retryable=None`` means the class default.
    The constructor is bypassed (constructors differ per class, some build their message).
    """
    cls = error_class_for(error_type) or SandboxError
    err = SandboxError.__new__(cls)
    SandboxError.__init__(err, message, retryable=retryable)
    given = attributes or {}
    for name, hint in _attribute_hints(cls).items():
        if name in given:
            fits, value = _conforming(given[name], hint)
            if fits:
                setattr(err, name, value)
                continue
        setattr(err, name, _copied(getattr(cls, name)))
    return err
