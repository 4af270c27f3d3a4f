"""The selfhosted control protocol: JSON messages over NATS request/reply between the runtime and an agent.

A request goes to the subject ``agent.<workspace_id>.<agent_id>.rpc`` (:func:`agent_subject`) as a
:class:`ControlRequest` ``{v, request_id, epoch, op}``; the agent answers with one
:class:`ControlResponse` ``{v, request_id, result | error}``. ``op`` and ``result`` are tagged by
``type`` (``exec``, ``fs_read``, ``fs_write``, ``fs_list``, ``fs_stat``, ``ping``, ``screenshot``,
``desktop_input``, ``stream_ensure``, and the PTY ops ``pty_open``, ``pty_write``, ``pty_read``,
``pty_resize``, ``pty_close``), and a result always has the type of its op.

The PTY ops carry upstream's ``PtyOpen``/``PtyWrite``/``PtyResize``/``PtyClose`` fields; the shell
runs on the machine on a pseudo-terminal the agent holds. Upstream streams its output over a relay
channel; here the runtime collects it with ``pty_read`` (ours), a long poll that answers as soon as
output is there (or the shell has exited) and after ``wait_ms`` otherwise. An agent without them
answers ``UNSUPPORTED`` (or ``PROTOCOL``: it cannot parse the op). Binary payloads
(file content, command output, PNGs) travel as standard base64 strings, so any byte survives.

Every request carries the epoch it was resolved under; the agent refuses an epoch older than the
newest it has seen with ``FENCED``. A message never exceeds the link's per-message limit: large
files move in ranged chunks (:func:`max_chunk_bytes`), and a reply that would not fit is refused
with ``PAYLOAD_TOO_LARGE`` instead of being truncated.

Errors are :class:`AgentError` ``{code, message, retryable, detail}``; :func:`agent_error_to_control_error`
maps one to a :class:`~sandbox.errors.SelfhostedControlError` exactly as upstream does
(``reference/upstream-runtime-contracts.md`` §8.2). Decoding a reply never raises: a malformed
reply, a reply for another request or a result of the wrong type becomes a ``PROTOCOL`` error.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.functional_validators import AfterValidator

from sandbox.descriptors import NEVER_SENT_DETAIL_KEY
from sandbox.errors import InvalidRequest, SelfhostedControlError

__all__ = [
    "UPSTREAM_ERROR_CODES",
    "build_op",
    "MAX_ARGV_CHARS",
    "MAX_ARGV_ITEMS",
    "MAX_ENV_ENTRIES",
    "MAX_EPOCH",
    "MAX_SCROLL_STEPS",
    "MAX_WIRE_INT",
    "NATS_DEFAULT_MAX_PAYLOAD",
    "NEVER_SENT_DETAIL_KEY",
    "PROTOCOL_VERSION",
    "PTY_MAX_WAIT_MS",
    "AgentError",
    "ControlErrorCode",
    "ControlOp",
    "ControlReply",
    "ControlRequest",
    "ControlResponse",
    "DesktopInputOp",
    "DesktopInputReply",
    "DisplayInfo",
    "ExecOp",
    "ExecReply",
    "FsEntry",
    "FsListOp",
    "FsListReply",
    "FsReadOp",
    "FsReadReply",
    "FsStatOp",
    "FsStatReply",
    "FsWriteOp",
    "FsWriteReply",
    "KeyEvent",
    "PingOp",
    "PingReply",
    "PointerEvent",
    "PtyCloseOp",
    "PtyCloseReply",
    "PtyOpenOp",
    "PtyOpenReply",
    "PtyReadOp",
    "PtyReadReply",
    "PtyResizeOp",
    "PtyResizeReply",
    "PtyWriteOp",
    "PtyWriteReply",
    "ScreenshotOp",
    "ScreenshotReply",
    "ScrollEvent",
    "StreamChannel",
    "StreamEnsureOp",
    "StreamEnsureReply",
    "agent_error_to_control_error",
    "agent_subject",
    "decode_request",
    "decode_response",
    "draining_message",
    "encode_message",
    "error_response",
    "max_chunk_bytes",
    "parse_agent_subject",
    "payload_too_large_message",
    "payload_too_large_response",
    "salvage_request_id",
    "validate_agent_token",
]

PROTOCOL_VERSION: Final = 1
"""The ``v`` of every message this build sends; a request with another version is refused (PROTOCOL)."""
NATS_DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
"""nats-server's default per-message limit (1 MiB); the live value comes from the server's INFO."""
MAX_EPOCH: Final = 2**32 - 1
"""Epochs are uint32 on the upstream wire; we keep the same range."""
_ENVELOPE_OVERHEAD: Final = 4096
"""Bytes reserved in a message for everything around a base64 payload (ids, field names, sizes)."""
_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_REQUEST_ID_RE: Final = re.compile(r"^[\x21-\x7e]{1,128}$")
_UPLOAD_ID_RE: Final = r"^[A-Za-z0-9_-]{1,64}$"
_PTY_ID_RE: Final = r"^pty-[A-Za-z0-9_-]{1,64}$"
PTY_MAX_WAIT_MS: Final = 10_000
"""The longest a ``pty_read`` may wait for output (its RPC timeout is a little longer)."""
MAX_ARGV_ITEMS: Final = 4096
"""The most elements a ``command`` may have (far above any real argv, far below what could hurt)."""
MAX_ENV_ENTRIES: Final = 4096
"""The most variables an op's ``env`` may add."""
MAX_ARGV_CHARS: Final = 64 * 1024 * 1024
"""The most characters a ``command`` (or an ``env``, keys plus values) may hold in total.

nats-server's hard ceiling on ``max_payload``: a backstop only, so that a request over the link's
live limit is still refused by size (``PAYLOAD_TOO_LARGE``, never sent) rather than by this check;
the kernel's own, lower limits come back from the agent as an ``OS`` error (``E2BIG``).
"""
MAX_SCROLL_STEPS: Final = 1000
"""The largest ``|delta_x|``/``|delta_y|`` of a scroll event (each step is one synthetic click)."""
MAX_WIRE_INT: Final = 2**63 - 1
"""The largest count, offset or size on the wire: beyond int64 the OS calls overflow instead of failing typed."""


# --- subjects -----------------------------------------------------------------------------------


def validate_agent_token(value: str, what: str) -> str:
    """Return ``value`` if it can be one token of a NATS subject (letters, digits, ``_``, ``-``; ≤128).

    Raises:
        InvalidRequest: ``value`` is empty, too long or holds ``.``, ``*``, ``>``, spaces or other characters.
    """
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise InvalidRequest(f"{what} must be 1-128 letters, digits, '_' or '-', got {value!r}")
    return value


_OpT = TypeVar("_OpT", bound=BaseModel)


def build_op(op_type: type[_OpT], **fields: Any) -> _OpT:
    """``op_type(**fields)`` for input from a caller: what the protocol refuses is :class:`InvalidRequest`.

    The op models check their bounds (NUL bytes, env names, sizes); a caller passing such input
    gets the runtime's typed error, naming the field but never quoting the value (it may be a
    secret from an environment), instead of pydantic's.

    Raises:
        InvalidRequest: a field is out of the protocol's bounds.
    """
    try:
        return op_type(**fields)
    except ValidationError as err:
        first = err.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "op"
        raise InvalidRequest(f"{op_type.__name__} {where}: {first['msg']}") from None


def agent_subject(workspace_id: str, agent_id: str) -> str:
    """The control subject of an agent: ``agent.<workspace_id>.<agent_id>.rpc``.

    Raises:
        InvalidRequest: an id cannot be a subject token (see :func:`validate_agent_token`).
    """
    ws = validate_agent_token(workspace_id, "workspace id")
    agent = validate_agent_token(agent_id, "agent id")
    return f"agent.{ws}.{agent}.rpc"


def parse_agent_subject(subject: str) -> tuple[str, str]:
    """The ``(workspace_id, agent_id)`` of a control subject.

    Raises:
        InvalidRequest: ``subject`` is not ``agent.<ws>.<agent>.rpc`` with valid tokens.
    """
    parts = subject.split(".") if isinstance(subject, str) else []
    if len(parts) != 4 or parts[0] != "agent" or parts[3] != "rpc":
        raise InvalidRequest(f"not an agent control subject: {subject!r}")
    return validate_agent_token(parts[1], "workspace id"), validate_agent_token(parts[2], "agent id")


# --- error codes --------------------------------------------------------------------------------


class ControlErrorCode(StrEnum):
    """The agent wire protocol's error codes: by name on the wire, :attr:`number` in upstream's proto enum.

    The one enum for the code. Declaration order *is* the number: ``UNSPECIFIED`` (0) to
    ``PAYLOAD_TOO_LARGE`` (11) are upstream's ``ERROR_CODE_*`` one for one
    (:data:`UPSTREAM_ERROR_CODES`); ``UNAUTHENTICATED`` (12) is ours beyond its range (a request or
    reply failed signature, expiry or replay checks). New codes go at the end.
    """

    UNSPECIFIED = "UNSPECIFIED"
    UNSUPPORTED = "UNSUPPORTED"
    OS = "OS"
    NOT_FOUND = "NOT_FOUND"
    CONSENT_REQUIRED = "CONSENT_REQUIRED"
    TIMEOUT = "TIMEOUT"
    DRAINING = "DRAINING"
    PROTOCOL = "PROTOCOL"
    STREAM = "STREAM"
    AGENT_OFFLINE = "AGENT_OFFLINE"
    FENCED = "FENCED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"

    @property
    def number(self) -> int:
        """The code's integer on the wire (its place in the declaration)."""
        return _CODE_NUMBERS[self]

    @classmethod
    def from_wire(cls, value: object) -> ControlErrorCode:
        """A code from its name (with or without ``ERROR_CODE_``) or its number; unknown → ``UNSPECIFIED``.

        An agent newer than this runtime may send a code we do not know: it stays an error (never
        a success) and keeps its ``retryable`` flag, so mapping it to ``UNSPECIFIED`` loses nothing
        the caller could act on.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return _CODES_BY_NUMBER.get(value, cls.UNSPECIFIED)
        if isinstance(value, str):
            name = value.removeprefix("ERROR_CODE_")
            return cls(name) if name in cls.__members__ else cls.UNSPECIFIED
        raise ValueError(f"error code must be a name or a number, not {type(value).__name__}")


_CODE_NUMBERS: Final[dict[ControlErrorCode, int]] = {code: number for number, code in enumerate(ControlErrorCode)}
_CODES_BY_NUMBER: Final[dict[int, ControlErrorCode]] = {number: code for code, number in _CODE_NUMBERS.items()}
UPSTREAM_ERROR_CODES: Final[tuple[ControlErrorCode, ...]] = tuple(ControlErrorCode)[
    : ControlErrorCode.UNAUTHENTICATED.number
]
"""The codes of upstream's proto enum ``ErrorCode`` (``ERROR_CODE_<name>`` = :attr:`ControlErrorCode.number`)."""


_RETRYABLE_BY_DEFAULT: Final = frozenset({ControlErrorCode.TIMEOUT, ControlErrorCode.DRAINING, ControlErrorCode.FENCED})


# --- bytes --------------------------------------------------------------------------------------


def _decode_b64(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid standard base64") from None
    raise ValueError(f"expected base64 text, got {type(value).__name__}")


def _encode_b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


WireBytes = Annotated[
    bytes,
    BeforeValidator(_decode_b64),
    PlainSerializer(_encode_b64, return_type=str, when_used="json"),
]
"""Bytes in Python, standard padded base64 in JSON (strictly validated on the way in)."""

NonNegative = Annotated[StrictInt, Field(ge=0, le=MAX_WIRE_INT)]
WirePath = Annotated[StrictStr, Field(max_length=4096)]


def _check_argv(value: list[str]) -> list[str]:
    # A NUL cannot be passed to execve: the agent would fail with an untyped ValueError, so refuse it here.
    if len(value) > MAX_ARGV_ITEMS:
        raise ValueError(f"a command has at most {MAX_ARGV_ITEMS} elements")
    if sum(len(arg) for arg in value) > MAX_ARGV_CHARS:
        raise ValueError(f"a command holds at most {MAX_ARGV_CHARS} characters")
    if any("\0" in arg for arg in value):
        raise ValueError("a command element contains a NUL character")
    return value


def _check_env(value: dict[str, str]) -> dict[str, str]:
    # An empty name, or one with '=', would be split differently by the child; a NUL cannot be passed at all.
    if len(value) > MAX_ENV_ENTRIES:
        raise ValueError(f"an environment has at most {MAX_ENV_ENTRIES} variables")
    if sum(len(key) + len(val) for key, val in value.items()) > MAX_ARGV_CHARS:
        raise ValueError(f"an environment holds at most {MAX_ARGV_CHARS} characters")
    for key, val in value.items():
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"environment variable name {key[:64]!r} is empty or contains '=' or NUL")
        if "\0" in val:
            raise ValueError(f"environment variable {key[:64]!r} has a NUL character in its value")
    return value


def _check_no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL character")
    return value


WireArgv = Annotated[list[StrictStr], AfterValidator(_check_argv)]
"""An argv: at most :data:`MAX_ARGV_ITEMS` elements and :data:`MAX_ARGV_CHARS` characters, no NUL."""
WireEnv = Annotated[dict[StrictStr, StrictStr], AfterValidator(_check_env)]
"""Environment additions: at most :data:`MAX_ENV_ENTRIES`, names non-empty without ``=``, no NUL anywhere."""
ScrollSteps = Annotated[StrictInt, Field(ge=-MAX_SCROLL_STEPS, le=MAX_SCROLL_STEPS)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Reply(BaseModel):
    # Replies tolerate fields a newer agent adds; requests do not (an agent must not ignore intent).
    model_config = ConfigDict(frozen=True, extra="ignore")


# --- ops ----------------------------------------------------------------------------------------


class ExecOp(_Message):
    """Run a command. ``command`` is argv, or one shell string when ``shell``; ``timeout_ms`` 0 = no deadline.

    ``command`` and ``env`` are bounded (:data:`MAX_ARGV_ITEMS`, :data:`MAX_ENV_ENTRIES`,
    :data:`MAX_ARGV_CHARS`) and hold no NUL; an env name is non-empty and has no ``=``. A request
    breaking that does not decode, so the agent answers ``PROTOCOL`` instead of failing in ``execve``.
    """

    type: Literal["exec"] = "exec"
    command: WireArgv = Field(min_length=1)
    shell: StrictBool = False
    cwd: WirePath = ""
    env: WireEnv = Field(default_factory=dict)
    stdin: WireBytes = b""
    timeout_ms: NonNegative = 0


class FsReadOp(_Message):
    """Read ``length`` bytes from ``offset`` (``length`` 0 = to the end of the file)."""

    type: Literal["fs_read"] = "fs_read"
    path: WirePath
    offset: NonNegative = 0
    length: NonNegative = 0


class FsWriteOp(_Message):
    """Write a file: whole (atomically), appended, or one chunk of an upload.

    With ``upload_id`` the content lands at ``upload_offset`` in a staging file next to ``path``
    (a repeated chunk overwrites itself, so resending is harmless) and ``final`` renames the staging
    file onto ``path`` in one step: a reader never sees half a file.

    ``mode`` (0 = keep the existing file's, or the default) accepts ``0o7777`` but the setuid,
    setgid and sticky bits are masked, not refused: the file gets ``mode & 0o777``, and a rewrite
    never keeps the set-id bits of the file it replaces.
    """

    type: Literal["fs_write"] = "fs_write"
    path: WirePath
    content: WireBytes = b""
    create_parents: StrictBool = True
    append: StrictBool = False
    mode: Annotated[StrictInt, Field(ge=0, le=0o7777)] = 0
    upload_id: Annotated[StrictStr, Field(pattern=_UPLOAD_ID_RE)] | None = None
    upload_offset: NonNegative = 0
    final: StrictBool = True

    @model_validator(mode="after")
    def _upload_is_not_append(self) -> FsWriteOp:
        if self.upload_id is not None and self.append:
            raise ValueError("an upload chunk cannot also be an append")
        return self


class FsListOp(_Message):
    """List a directory (one level, or the whole tree when ``recursive``)."""

    type: Literal["fs_list"] = "fs_list"
    path: WirePath = ""
    recursive: StrictBool = False


class FsStatOp(_Message):
    """Whether a path exists, and what it is."""

    type: Literal["fs_stat"] = "fs_stat"
    path: WirePath


class PingOp(_Message):
    """A liveness probe; the agent echoes ``nonce``."""

    type: Literal["ping"] = "ping"
    nonce: Annotated[StrictStr, Field(max_length=64)] = ""


class ScreenshotOp(_Message):
    """One PNG of the machine's display, scaled down to fit ``max_width``/``max_height`` when set."""

    type: Literal["screenshot"] = "screenshot"
    max_width: NonNegative = 0
    max_height: NonNegative = 0


class PointerEvent(_Message):
    """Move or click the pointer at ``(x, y)``."""

    kind: Literal["pointer"] = "pointer"
    x: NonNegative
    y: NonNegative
    action: Literal["move", "down", "up", "click", "double_click"] = "click"
    button: Literal["left", "right", "middle"] = "left"


class KeyEvent(_Message):
    """A key (an X keysym name such as ``Return``, or text to type when ``is_text``)."""

    kind: Literal["key"] = "key"
    key: Annotated[StrictStr, Field(min_length=1, max_length=4096), AfterValidator(_check_no_nul)]
    is_text: StrictBool = False
    action: Literal["down", "up", "press"] = "press"


class ScrollEvent(_Message):
    """Scroll by whole steps at ``(x, y)``; positive ``delta_y`` scrolls down."""

    kind: Literal["scroll"] = "scroll"
    x: NonNegative
    y: NonNegative
    delta_x: ScrollSteps = 0
    delta_y: ScrollSteps = 0


class DesktopInputOp(_Message):
    """Inject one input event into the machine's display (needs the owner's screen-control consent)."""

    type: Literal["desktop_input"] = "desktop_input"
    event: Annotated[PointerEvent | KeyEvent | ScrollEvent, Field(discriminator="kind")]


class StreamEnsureOp(_Message):
    """Make sure a relay stream channel exists for a port (``desktop`` needs a display)."""

    type: Literal["stream_ensure"] = "stream_ensure"
    kind: Literal["pty", "desktop"]
    port: Annotated[StrictInt, Field(ge=1, le=65535)]
    width: NonNegative = 0
    height: NonNegative = 0


class PtyOpenOp(_Message):
    """Start ``command`` (empty: the machine's login shell) on a new ``cols`` x ``rows`` pseudo-terminal
    (0: 80 x 24) in ``cwd`` under the agent's root, with ``TERM=term``.

    A non-empty ``scope_id`` names the PTY: opening the same scope again while its shell runs returns
    that PTY (``reused``) instead of a second shell, so a repeated open is harmless. The fields are
    upstream's ``PtyOpen``; the output comes back through ``pty_read`` instead of a relay stream.
    ``command`` and ``env`` are bounded and checked exactly as :class:`ExecOp`'s.
    """

    type: Literal["pty_open"] = "pty_open"
    command: WireArgv = Field(default_factory=list)
    cwd: WirePath = ""
    env: WireEnv = Field(default_factory=dict)
    cols: Annotated[StrictInt, Field(ge=0, le=500)] = 0
    rows: Annotated[StrictInt, Field(ge=0, le=300)] = 0
    term: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._+-]{1,64}$")] = "xterm-256color"
    scope_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_:.-]{0,128}$")] = ""


PtyId = Annotated[StrictStr, Field(pattern=_PTY_ID_RE)]


class PtyWriteOp(_Message):
    """Type ``data`` into a PTY (``NOT_FOUND`` with reason ``pty_exited`` once its shell has exited)."""

    type: Literal["pty_write"] = "pty_write"
    pty_id: PtyId
    data: WireBytes


class PtyReadOp(_Message):
    """Take a PTY's unread output (at most ``max_bytes``, 0 = what fits one reply), waiting up to
    ``wait_ms`` for some when there is none."""

    type: Literal["pty_read"] = "pty_read"
    pty_id: PtyId
    max_bytes: NonNegative = 0
    wait_ms: Annotated[StrictInt, Field(ge=0, le=PTY_MAX_WAIT_MS)] = 0


class PtyResizeOp(_Message):
    """Set a PTY's size (its foreground program gets ``SIGWINCH``)."""

    type: Literal["pty_resize"] = "pty_resize"
    pty_id: PtyId
    cols: Annotated[StrictInt, Field(ge=1, le=500)]
    rows: Annotated[StrictInt, Field(ge=1, le=300)]


class PtyCloseOp(_Message):
    """Hang up a PTY (``SIGKILL`` after ``grace_ms``) and forget it; closing an unknown id is ``NOT_FOUND``."""

    type: Literal["pty_close"] = "pty_close"
    pty_id: PtyId
    grace_ms: Annotated[StrictInt, Field(ge=0, le=60_000)] = 1000


ControlOp = Annotated[
    ExecOp
    | FsReadOp
    | FsWriteOp
    | FsListOp
    | FsStatOp
    | PingOp
    | ScreenshotOp
    | DesktopInputOp
    | StreamEnsureOp
    | PtyOpenOp
    | PtyWriteOp
    | PtyReadOp
    | PtyResizeOp
    | PtyCloseOp,
    Field(discriminator="type"),
]


# --- replies ------------------------------------------------------------------------------------


class ExecReply(_Reply):
    """A finished command: exit code, both streams in full, and whether the deadline killed it."""

    type: Literal["exec"] = "exec"
    exit_code: StrictInt
    stdout: WireBytes = b""
    stderr: WireBytes = b""
    timed_out: StrictBool = False
    duration_ms: NonNegative = 0


class FsReadReply(_Reply):
    """The bytes read and the file's whole size (so a reader knows when it is done)."""

    type: Literal["fs_read"] = "fs_read"
    content: WireBytes = b""
    total_size: NonNegative


class FsWriteReply(_Reply):
    """How many bytes this request wrote."""

    type: Literal["fs_write"] = "fs_write"
    bytes_written: NonNegative


class FsEntry(_Reply):
    """One file system entry; ``path`` is relative to the listed directory."""

    name: StrictStr
    path: StrictStr
    kind: Literal["file", "directory", "symlink", "other"]
    size: NonNegative = 0
    modified_ms: StrictInt = 0
    mode: NonNegative = 0


class FsListReply(_Reply):
    """The entries of a directory, sorted by path."""

    type: Literal["fs_list"] = "fs_list"
    entries: list[FsEntry] = Field(default_factory=list)


class FsStatReply(_Reply):
    """Whether the path exists; ``entry`` describes it when it does."""

    type: Literal["fs_stat"] = "fs_stat"
    exists: StrictBool
    entry: FsEntry | None = None


class PingReply(_Reply):
    """The echoed nonce plus what the agent can do right now."""

    type: Literal["ping"] = "ping"
    nonce: StrictStr = ""
    agent_monotonic_ms: NonNegative = 0
    protocol_version: StrictInt = PROTOCOL_VERSION
    hostname: StrictStr = ""
    os: StrictStr = ""
    has_display: StrictBool = False
    screen_control: StrictBool = False
    # What the owner allows (exec, files, screen_view, screen_control); None from an older agent.
    consents: list[StrictStr] | None = None
    newest_epoch: NonNegative = 0


class ScreenshotReply(_Reply):
    """A PNG and its size; ``native_*`` is the display's own size (0 = same as encoded)."""

    type: Literal["screenshot"] = "screenshot"
    png: WireBytes
    width: NonNegative
    height: NonNegative
    native_width: NonNegative = 0
    native_height: NonNegative = 0


class DesktopInputReply(_Reply):
    """The event was injected."""

    type: Literal["desktop_input"] = "desktop_input"


class StreamChannel(_Reply):
    """A relay channel a viewer can dial for one port of the machine."""

    channel_id: StrictStr
    workspace_id: StrictStr
    agent_id: StrictStr
    kind: Literal["pty", "desktop"]
    port: StrictInt


class DisplayInfo(_Reply):
    """The display a desktop channel shows."""

    id: StrictStr
    width: NonNegative
    height: NonNegative
    virtual: StrictBool = False


class StreamEnsureReply(_Reply):
    """The channel (and, for a desktop, the display behind it)."""

    type: Literal["stream_ensure"] = "stream_ensure"
    channel: StreamChannel | None = None
    display: DisplayInfo | None = None


class PtyOpenReply(_Reply):
    """The PTY's id (``pty-...``), the pid of its process on the machine, and whether it already ran (same scope)."""

    type: Literal["pty_open"] = "pty_open"
    pty_id: StrictStr
    pid: NonNegative = 0
    reused: StrictBool = False


class PtyWriteReply(_Reply):
    """How many bytes were typed."""

    type: Literal["pty_write"] = "pty_write"
    bytes_written: NonNegative


class PtyReadReply(_Reply):
    """Output taken from the PTY; once ``exited`` (and nothing is left unread) the exit status.

    ``dropped`` counts bytes the agent discarded because nobody read them in time (its buffer is bounded).
    """

    type: Literal["pty_read"] = "pty_read"
    data: WireBytes = b""
    exited: StrictBool = False
    exit_code: StrictInt | None = None
    reason: Literal["exit", "killed"] | None = None
    dropped: NonNegative = 0


class PtyResizeReply(_Reply):
    """The PTY has its new size."""

    type: Literal["pty_resize"] = "pty_resize"


class PtyCloseReply(_Reply):
    """The PTY is gone; how its process ended."""

    type: Literal["pty_close"] = "pty_close"
    exit_code: StrictInt | None = None
    reason: Literal["exit", "killed"] = "killed"


ControlReply = Annotated[
    ExecReply
    | FsReadReply
    | FsWriteReply
    | FsListReply
    | FsStatReply
    | PingReply
    | ScreenshotReply
    | DesktopInputReply
    | StreamEnsureReply
    | PtyOpenReply
    | PtyWriteReply
    | PtyReadReply
    | PtyResizeReply
    | PtyCloseReply,
    Field(discriminator="type"),
]


# --- envelopes ----------------------------------------------------------------------------------


def _code_from_wire(value: object) -> ControlErrorCode:
    return ControlErrorCode.from_wire(value)


class AgentError(_Reply):
    """An error answer: code, human message, whether retrying may help, and string details."""

    code: Annotated[ControlErrorCode, BeforeValidator(_code_from_wire)]
    message: StrictStr = ""
    retryable: StrictBool = False
    detail: dict[StrictStr, StrictStr] = Field(default_factory=dict)


class ControlRequest(_Message):
    """One request to an agent: ``request_id`` correlates the reply, ``epoch`` fences stale callers."""

    v: Literal[1] = PROTOCOL_VERSION
    request_id: Annotated[StrictStr, Field(pattern=_REQUEST_ID_RE.pattern)]
    epoch: Annotated[StrictInt, Field(ge=0, le=MAX_EPOCH)]
    op: ControlOp
    # Unix ms after which the agent refuses to start it (signed with the rest: sandbox.control_auth).
    expires_at_ms: Annotated[StrictInt, Field(ge=0)] | None = None


class ControlResponse(_Reply):
    """The answer to one request: exactly one of ``result`` and ``error`` (an empty answer is a PROTOCOL error)."""

    v: StrictInt = PROTOCOL_VERSION
    request_id: StrictStr
    result: ControlReply | None = None
    error: AgentError | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> ControlResponse:
        if self.result is not None and self.error is not None:
            raise ValueError("a response carries a result or an error, not both")
        return self


def encode_message(message: ControlRequest | ControlResponse) -> bytes:
    """The wire form of a message (compact JSON, UTF-8)."""
    return message.model_dump_json().encode()


def salvage_request_id(data: bytes) -> str:
    """The ``request_id`` of a possibly malformed request, for addressing the error reply ("" if none)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    value = raw.get("request_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value) else ""


def decode_request(data: bytes) -> ControlRequest:
    """Parse a request as the agent receives it.

    Raises:
        InvalidRequest: the bytes are not a valid request of this protocol version (the agent
            answers ``PROTOCOL``).
    """
    try:
        return ControlRequest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(part) for part in first["loc"]) or "<request>"
        raise InvalidRequest(f"malformed control request: {where}: {first['msg']}") from None
    except RecursionError:
        raise InvalidRequest("malformed control request: nested too deeply") from None


def error_response(
    request_id: str,
    code: ControlErrorCode,
    message: str,
    *,
    retryable: bool | None = None,
    detail: Mapping[str, str] | None = None,
) -> ControlResponse:
    """A response carrying an :class:`AgentError`; ``retryable`` defaults per code (TIMEOUT, DRAINING, FENCED)."""
    return ControlResponse(
        request_id=request_id,
        error=AgentError(
            code=code,
            message=message,
            retryable=code in _RETRYABLE_BY_DEFAULT if retryable is None else retryable,
            detail=dict(detail or {}),
        ),
    )


def payload_too_large_response(request_id: str, encoded_bytes: int, max_payload: int) -> ControlResponse:
    """The typed refusal of a message that would exceed the link's per-message limit."""
    return error_response(
        request_id,
        ControlErrorCode.PAYLOAD_TOO_LARGE,
        f"encoded {encoded_bytes} bytes > max payload {max_payload}",
        detail={"encoded_bytes": str(encoded_bytes), "max_payload": str(max_payload)},
    )


def _protocol_error(request_id: str, why: str) -> ControlResponse:
    return error_response(request_id, ControlErrorCode.PROTOCOL, f"malformed agent reply: {why}", detail={"why": why})


def decode_response(data: bytes, *, request_id: str, op_type: str) -> ControlResponse:
    """Parse an agent's reply to the request ``request_id`` whose op had type ``op_type``; never raises.

    Anything but a well-formed reply to exactly this request (bad JSON, a schema violation, another
    request's id, no result and no error, a result of another op type) becomes a ``PROTOCOL`` error
    response addressed to ``request_id``.
    """
    try:
        response = ControlResponse.model_validate_json(data)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] in ("json_invalid", "json_type"):
            return _protocol_error(request_id, "not a JSON document")
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else ""
        return _protocol_error(request_id, f"schema violation at {where or '<reply>'}")
    except (RecursionError, ValueError):
        return _protocol_error(request_id, "not a JSON document")
    if response.request_id != request_id:
        return _protocol_error(request_id, "reply is for another request id")
    if response.error is not None:
        return response
    if response.result is None:
        return _protocol_error(request_id, "reply has neither a result nor an error")
    if response.result.type != op_type:
        return _protocol_error(request_id, f"reply result is {response.result.type!r}, the op was {op_type!r}")
    return response


def max_chunk_bytes(max_payload: int) -> int:
    """The largest raw byte count whose base64 form fits in one message under ``max_payload``."""
    return max(1, (max_payload - _ENVELOPE_OVERHEAD) // 4 * 3)


# --- mapping to the runtime error ----------------------------------------------------------------

_DRAINING_HEAD: Final = "The machine is at its concurrent-work capacity and could not accept this command."
_DRAINING_TAIL: Final = "Try again shortly, or reduce the number of commands you run in parallel."
_TOO_LARGE_HINT: Final = (
    "Redirect the command's output to a file (for example `<command> > /tmp/out.log 2>&1`) and then "
    "read that file back in ranges or chunks instead of returning it all at once."
)


def draining_message(retries: int) -> str:
    """What to tell the user when the machine refused an op at capacity, after ``retries`` retries."""
    if retries <= 0:
        return f"{_DRAINING_HEAD} {_DRAINING_TAIL}"
    times = "time" if retries == 1 else "times"
    return f"{_DRAINING_HEAD} It was retried {retries} {times} first. {_DRAINING_TAIL}"


def payload_too_large_message(detail: Mapping[str, str]) -> str:
    """What to tell the user when a result exceeded the link's per-message limit (sizes when both known)."""
    encoded = detail.get("encoded_bytes") or ""
    limit = detail.get("max_payload") or ""
    if encoded and limit:
        return (
            f"The result was {encoded} bytes, over the machine link's {limit}-byte per-message limit. {_TOO_LARGE_HINT}"
        )
    return f"The result was larger than the machine link can deliver in a single message. {_TOO_LARGE_HINT}"


def _raw_code(err: AgentError | Mapping[str, Any]) -> int:
    if isinstance(err, AgentError):
        return err.code.number
    code = err.get("code", 0)
    if isinstance(code, bool):
        return 0
    if isinstance(code, int):
        return code
    return ControlErrorCode.from_wire(code).number


def agent_error_to_control_error(
    err: AgentError | Mapping[str, Any], request_id: str | None = None
) -> SelfhostedControlError:
    """Map an agent's error to the runtime's :class:`SelfhostedControlError` (upstream §8.2 table).

    ``AGENT_OFFLINE`` → reason ``agent_offline``, never retryable, ``never_sent`` iff
    ``detail._never_sent == "1"``; ``TIMEOUT`` → ``agent_reconnecting``, retryable;
    ``CONSENT_REQUIRED`` → ``consent_required``; ``DRAINING`` and ``FENCED`` are retryable and
    flagged; ``PAYLOAD_TOO_LARGE`` is flagged with a redirect-to-file message; ``NOT_FOUND`` is a
    missing file (``os_not_found``), never a missing machine. Other codes keep the agent's
    ``retryable``. ``err`` is an :class:`AgentError` or a mapping whose ``code`` is the upstream
    number (unknown numbers are kept as they are). ``DRAINING`` always reads as not yet retried
    (the exhausted message is the retry loop's to build); ``request_id`` is kept as given.
    """
    code = _raw_code(err)
    if isinstance(err, AgentError):
        message, agent_retryable, detail = err.message, err.retryable, dict(err.detail)
    else:
        message = str(err.get("message") or "")
        agent_retryable = bool(err.get("retryable", False))
        detail = {str(k): str(v) for k, v in (err.get("detail") or {}).items()}
    text = message or f"agent error ({code})"
    reason: str | None = None
    retryable = agent_retryable
    flags: dict[str, bool] = {}
    known = _CODES_BY_NUMBER.get(code)
    if known is ControlErrorCode.AGENT_OFFLINE:
        reason, retryable = "agent_offline", False
        flags = {"agent_offline": True, "never_sent": detail.get(NEVER_SENT_DETAIL_KEY) == "1"}
    elif known is ControlErrorCode.TIMEOUT:
        reason, retryable = "agent_reconnecting", True
    elif known is ControlErrorCode.CONSENT_REQUIRED:
        reason, retryable = "consent_required", False
    elif known is ControlErrorCode.DRAINING:
        # Always the zero-retry text: only the caller's retry loop knows how often it retried.
        text = draining_message(0)
        retryable = True
        flags = {"draining": True}
    elif known is ControlErrorCode.PAYLOAD_TOO_LARGE:
        text, retryable = payload_too_large_message(detail), False
        flags = {"payload_too_large": True}
    elif known is ControlErrorCode.FENCED:
        retryable = True
        flags = {"fenced": True}
    elif known is ControlErrorCode.NOT_FOUND:
        flags = {"os_not_found": True}
    elif known is ControlErrorCode.UNAUTHENTICATED:
        # A signature, expiry or replay check failed: repeating the same bytes cannot help.
        reason, retryable = "unauthenticated", False
    return SelfhostedControlError(
        text,
        code=code,
        reason=reason,
        retryable=retryable,
        control_request_id=request_id,
        detail=detail,
        **flags,
    )
