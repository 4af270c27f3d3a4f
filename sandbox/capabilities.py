"""Capability negotiation: which planes a session can use right now, and why not.

:func:`negotiate_capabilities` turns a :class:`NegotiationContext` (backend, OS, lease liveness,
deployment toggles, consent, and any endpoints already minted) into a :class:`SessionCapabilities`
document with every cell present: FileSystem, Terminal, Git, DesktopStream, Recording and
ComputerUse. An unavailable cell carries a typed :class:`CapabilityUnavailableReason`; it is never
omitted. Reasons follow one precedence: ``os_unsupported`` beats the backend's static descriptor
(``backend_unsupported`` / ``tier_headless``), which beats policy and liveness gates
(``disabled_by_policy`` / ``lease_cold``).

The document serialises to the upstream camelCase JSON (``model_dump(mode="json")``),
``negotiatedAt`` as a JavaScript ISO string (``2025-06-01T12:00:00.000Z``) and minted ``expiresAt``
strings exactly as the caller gave them, so a TypeScript client reads it unchanged.

Like upstream, ``os`` and ``liveness`` are echoed even when they are not one of the known values:
an unknown OS is ``os_unsupported`` and an unknown liveness is "not warm". Everything else is
validated; malformed input raises :class:`~sandbox.errors.InvalidRequest`, an unknown backend
:class:`~sandbox.errors.UnknownBackend`.

Later layers refine the base document without re-deriving it: pass ``overlays`` (each a
:data:`CapabilityOverlay`, e.g. the selfhosted agent-liveness overlay) and they are applied in
order to the frozen result, replacing cells with ``model_copy(update=...)``.

**Runtime desktops.** The static descriptor of ``local`` (tier ``dev``) has no desktop, as upstream's
does, and the base document says so (the upstream vectors pin it). This runtime, though, runs a real
desktop in local boxes (Xvfb, x11vnc and the edge from the host, ffmpeg, xdotool). The worker says
what it can run through the context's ``runtime_desktop`` (:class:`RuntimeDesktop`, absent by
default); when present, :func:`runtime_desktop_overlay` — applied by :func:`negotiate_capabilities`
before any caller overlay — re-derives the DesktopStream, Recording and ComputerUse cells as if the
descriptor had a ``vnc-ws`` desktop, under the same OS, policy and liveness gates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import MAXYEAR, MINYEAR, UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PositiveInt,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic.alias_generators import to_camel

from sandbox.descriptors import (
    CapabilityDescriptor,
    CapabilityUnavailableReason,
    DesktopStreamCapability,
    RecordingCapability,
    SandboxBackend,
    backend_supports_os,
    select_backend,
)
from sandbox.errors import InvalidRequest

__all__ = [
    "DEFAULT_DESKTOP_RESOLUTION",
    "RECORDING_CODECS",
    "RECORDING_MODES",
    "TERMINAL_SHELL",
    "VIEWER_HEARTBEAT_INTERVAL_MS",
    "CapabilityOverlay",
    "Liveness",
    "ComputerUseCell",
    "DesktopStreamCell",
    "FileSystemCell",
    "GitCell",
    "MintedDesktopStream",
    "MintedTerminalStream",
    "NegotiationContext",
    "RecordingCell",
    "RuntimeDesktop",
    "SessionCapabilities",
    "TerminalCell",
    "negotiate_capabilities",
    "runtime_desktop_overlay",
    "to_js_iso",
]

Reason = CapabilityUnavailableReason

Liveness = Literal["cold", "warming", "warm", "draining"]
SessionTerminalTransport = Literal["sse-events", "pty-ws", "relay-pty"]
SessionDesktopTransport = Literal["vnc-ws", "rdp-ws", "webrtc", "relay-frames"]
DesktopClient = Literal["novnc", "web-rdp", "frames"]
DesktopMode = Literal["read-only", "interactive"]
RecordingMode = Literal["manual", "on-turn", "on-verify"]
RecordingCodec = Literal["h264-mp4", "vp9-webm"]

VIEWER_HEARTBEAT_INTERVAL_MS: Final = 30_000
DEFAULT_DESKTOP_RESOLUTION: Final[tuple[int, int]] = (1024, 768)
TERMINAL_SHELL: Final = "/bin/bash"
RECORDING_MODES: Final[tuple[RecordingMode, ...]] = ("manual", "on-turn", "on-verify")
RECORDING_CODECS: Final[tuple[RecordingCodec, ...]] = ("h264-mp4", "vp9-webm")


# The Gregorian calendar repeats every 400 years, so shifting by 400 years moves an instant whose
# UTC date falls outside Python's years 1..9999 (year 0 or 10000) into range without changing it.
_GREGORIAN_CYCLE_YEARS: Final = 400


def to_js_iso(moment: datetime) -> str:
    """Format a datetime exactly like JavaScript's ``Date.prototype.toISOString()``.

    UTC, milliseconds truncated, ``Z``; the year has four digits (``0098``, ``0000``) when it is
    0..9999 and the signed six-digit form otherwise: an aware datetime late in year 9999 with a
    negative offset is ``+010000-...`` in UTC. (JavaScript's negative years, ``-000001-...``, are
    out of reach: no Python datetime is earlier than year 0 in UTC.) A naive datetime is read as
    local time.
    """
    if moment.utcoffset() is None:
        moment = moment.astimezone()
    offset = moment.utcoffset() or timedelta(0)
    local = moment.replace(tzinfo=None)
    shift = 0
    if local.year == MINYEAR:
        shift = _GREGORIAN_CYCLE_YEARS
    elif local.year == MAXYEAR:
        shift = -_GREGORIAN_CYCLE_YEARS
    utc = local.replace(year=local.year + shift) - offset
    year = utc.year - shift
    year_text = f"{year:04d}" if 0 <= year <= 9999 else f"{year:+07d}"
    return f"{year_text}-{utc:%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def _check_iso_instant(value: str) -> str:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date-time") from None
    if parsed.utcoffset() is None:
        raise ValueError("must be an ISO 8601 date-time with a UTC offset or Z")
    return value


_T = TypeVar("_T")


def _tuple_as_list(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


# Tuples keep the frozen document immutable; they serialise as the JSON arrays upstream emits.
WireTuple = Annotated[tuple[_T, ...], PlainSerializer(_tuple_as_list)]
Resolution = Annotated[tuple[PositiveInt, PositiveInt], PlainSerializer(_tuple_as_list)]
JsDatetime = Annotated[AwareDatetime, PlainSerializer(to_js_iso, when_used="json")]
IsoInstant = Annotated[StrictStr, AfterValidator(_check_iso_instant)]
"""A caller's ISO date-time string (e.g. a minted ``expiresAt``), checked but kept verbatim, as upstream."""


class _WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
    )


# --- the context --------------------------------------------------------------------------------


class MintedDesktopStream(_WireModel):
    """A desktop endpoint already minted for this viewer: direct URL, stream token, expiry, geometry."""

    url: StrictStr = Field(min_length=1)
    token: StrictStr = Field(min_length=1)
    expires_at: IsoInstant
    resolution: Resolution


class MintedTerminalStream(_WireModel):
    """A terminal endpoint already minted for this viewer; ``transport`` defaults from the descriptor."""

    url: StrictStr = Field(min_length=1)
    token: StrictStr = Field(min_length=1)
    expires_at: IsoInstant
    transport: Literal["pty-ws", "relay-pty"] | None = None


class RuntimeDesktop(_WireModel):
    """What the worker can run on a desktop in this backend's boxes, beyond the static descriptor.

    ``display``: the desktop stack (Xvfb, x11vnc, the stream edge) can come up; ``recording``:
    ffmpeg is there too; ``computer_use``: xdotool and a screenshot tool are there too. The
    recording and computer-use cells need ``display`` as well.
    """

    display: StrictBool
    recording: StrictBool = False
    computer_use: StrictBool = False


class NegotiationContext(_WireModel):
    """Everything negotiation looks at (upstream ``NegotiationContext``; camelCase or snake_case keys).

    ``os`` and ``liveness`` are free strings on purpose: upstream echoes unknown values and treats
    them as an unsupported OS and a not-warm lease. ``now`` pins ``negotiatedAt``; pass
    ``workflow.now()`` when negotiating inside a workflow.
    """

    session_id: StrictStr = Field(min_length=1)
    backend: StrictStr
    os: StrictStr
    liveness: StrictStr
    lease_epoch: StrictInt = Field(ge=0)
    workspace_generation: StrictInt | None = Field(default=None, ge=0)
    archive_generation: StrictInt | None = Field(default=None, ge=0)
    archive_complete: StrictBool = False
    desktop_enabled: StrictBool
    desktop_interactive: StrictBool = True
    computer_use_enabled: StrictBool = True
    computer_use_read_only: StrictBool = False
    stream_token_secret_available: StrictBool = True
    terminal_enabled: StrictBool = True
    desktop_acknowledged: StrictBool = False
    shared: StrictBool = False
    shared_session_ids: WireTuple[StrictStr] = ()
    desktop_stream: MintedDesktopStream | None = None
    terminal_stream: MintedTerminalStream | None = None
    now: AwareDatetime | None = None
    runtime_desktop: RuntimeDesktop | None = None
    """Set by the worker when it runs a desktop in boxes whose descriptor has none (local)."""


# --- the document -------------------------------------------------------------------------------


class FileSystemCell(_WireModel):
    """The workspace file system: readable/writable, where its root is, how paths are separated."""

    available: bool
    read_only: bool
    root: str
    path_sep: Literal["/", "\\"] = "/"
    tree_mode: Literal["lazy", "snapshot"] = "lazy"
    reason: CapabilityUnavailableReason | None = None


class TerminalCell(_WireModel):
    """The terminal: ``transport`` null means no terminal; ``sse-events`` is the read-only event feed."""

    transport: SessionTerminalTransport | None
    pty_capable: bool
    shell: str = TERMINAL_SHELL
    url: str | None = None
    token: str | None = None
    expires_at: IsoInstant | None = None
    reason: CapabilityUnavailableReason | None = None


class GitCell(_WireModel):
    """Git in the workspace (``repos`` is filled by later discovery, always empty here)."""

    available: bool
    repos: WireTuple[str] = ()
    reason: CapabilityUnavailableReason | None = None


class DesktopStreamCell(_WireModel):
    """The desktop pixel plane; ``url``/``token`` are set only once minted and acknowledged."""

    transport: SessionDesktopTransport | None
    client: DesktopClient | None
    mode: DesktopMode = "read-only"
    url: str | None = None
    token: str | None = None
    expires_at: IsoInstant | None = None
    resolution: Resolution = DEFAULT_DESKTOP_RESOLUTION
    unredacted: bool
    requires_acknowledgment: bool
    acknowledged: bool
    shared: bool = False
    shared_session_ids: WireTuple[str] = ()
    reason: CapabilityUnavailableReason | None = None


class RecordingCell(_WireModel):
    """Desktop recording: the trigger modes and codecs offered (empty when unavailable)."""

    available: bool
    modes: WireTuple[RecordingMode] = ()
    codecs: WireTuple[RecordingCodec] = ()
    reason: CapabilityUnavailableReason | None = None


class ComputerUseCell(_WireModel):
    """Whether the agent may drive the desktop (``read_only`` gates its input to no-ops)."""

    available: bool
    read_only: bool
    reason: CapabilityUnavailableReason | None = None


class SessionCapabilities(_WireModel):
    """The negotiated capabilities of one session (upstream ``SessionCapabilities``); every cell present."""

    session_id: str
    backend: SandboxBackend
    os: str
    liveness: str
    lease_epoch: int = Field(ge=0)
    workspace_generation: int | None = Field(default=None, ge=0)
    archive_generation: int | None = Field(default=None, ge=0)
    archive_complete: bool = False
    viewer_heartbeat_interval_ms: int = VIEWER_HEARTBEAT_INTERVAL_MS
    file_system: FileSystemCell = Field(alias="FileSystem")
    terminal: TerminalCell = Field(alias="Terminal")
    git: GitCell = Field(alias="Git")
    desktop_stream: DesktopStreamCell = Field(alias="DesktopStream")
    recording: RecordingCell = Field(alias="Recording")
    computer_use: ComputerUseCell = Field(alias="ComputerUse")
    negotiated_at: JsDatetime


CapabilityOverlay = Callable[[NegotiationContext, SessionCapabilities], SessionCapabilities]
"""A later refinement of the base document (e.g. selfhosted agent liveness, consent, display)."""


# --- negotiation --------------------------------------------------------------------------------


def _desktop_missing_reason(descriptor: CapabilityDescriptor) -> Reason:
    """Why a backend without a static desktop cannot serve desktop-derived cells."""
    return Reason.TIER_HEADLESS if descriptor.tier == "headless" else Reason.BACKEND_UNSUPPORTED


def _file_system(descriptor: CapabilityDescriptor, os_reason: Reason | None) -> FileSystemCell:
    root = descriptor.workspace_root
    if os_reason is not None:
        return FileSystemCell(available=False, read_only=True, root=root, reason=os_reason)
    static = descriptor.capabilities.file_system
    return FileSystemCell(
        available=static.available,
        read_only=static.read_only,
        root=root,
        reason=None if static.available else Reason.BACKEND_UNSUPPORTED,
    )


def _terminal(ctx: NegotiationContext, descriptor: CapabilityDescriptor, os_reason: Reason | None) -> TerminalCell:
    static = descriptor.capabilities.terminal
    if os_reason is not None or not static.available:
        return TerminalCell(transport=None, pty_capable=False, reason=os_reason or Reason.BACKEND_UNSUPPORTED)
    if not static.pty:
        # Without a real PTY the event feed is the whole terminal: nothing is missing, no reason.
        return TerminalCell(transport="sse-events", pty_capable=False)
    minted = ctx.terminal_stream
    if not ctx.terminal_enabled or not ctx.stream_token_secret_available:
        return TerminalCell(transport="sse-events", pty_capable=True, reason=Reason.DISABLED_BY_POLICY)
    # A minted terminal stream is itself proof that the box is up.
    if ctx.liveness != "warm" and minted is None:
        return TerminalCell(transport="sse-events", pty_capable=True, reason=Reason.LEASE_COLD)
    transport: SessionTerminalTransport
    if minted is not None and minted.transport is not None:
        transport = minted.transport
    else:
        transport = "relay-pty" if static.transport == "relay-pty" else "pty-ws"
    if minted is None:
        return TerminalCell(transport=transport, pty_capable=True)
    return TerminalCell(
        transport=transport,
        pty_capable=True,
        url=minted.url,
        token=minted.token,
        expires_at=minted.expires_at,
    )


def _git(descriptor: CapabilityDescriptor, os_reason: Reason | None) -> GitCell:
    if os_reason is not None:
        return GitCell(available=False, reason=os_reason)
    available = descriptor.capabilities.git.available
    return GitCell(available=available, reason=None if available else Reason.BACKEND_UNSUPPORTED)


def _desktop_reason(
    ctx: NegotiationContext, descriptor: CapabilityDescriptor, os_reason: Reason | None
) -> Reason | None:
    if os_reason is not None:
        return os_reason
    if not descriptor.capabilities.desktop_stream.available:
        return _desktop_missing_reason(descriptor)
    if not ctx.desktop_enabled or not ctx.stream_token_secret_available:
        # Without a stream-token secret nothing can be minted: degrade rather than fail.
        return Reason.DISABLED_BY_POLICY
    if ctx.liveness != "warm" and ctx.desktop_stream is None:
        return Reason.LEASE_COLD
    return None


def _desktop_stream(
    ctx: NegotiationContext, descriptor: CapabilityDescriptor, os_reason: Reason | None
) -> DesktopStreamCell:
    reason = _desktop_reason(ctx, descriptor, os_reason)
    available = reason is None
    acknowledged = available and ctx.desktop_acknowledged
    shared = available and ctx.shared
    selfhosted = descriptor.backend == "selfhosted"
    transport: SessionDesktopTransport | None = None
    client: DesktopClient | None = None
    if available:
        # Selfhosted machines stream frames through the relay rather than VNC over a tunnel.
        transport = "relay-frames" if selfhosted else descriptor.capabilities.desktop_stream.transport
        client = "frames" if selfhosted else "novnc"
    minted = ctx.desktop_stream if acknowledged else None
    return DesktopStreamCell(
        transport=transport,
        client=client,
        mode="interactive" if available and not selfhosted and ctx.desktop_interactive else "read-only",
        url=minted.url if minted else None,
        token=minted.token if minted else None,
        expires_at=minted.expires_at if minted else None,
        resolution=minted.resolution if minted else DEFAULT_DESKTOP_RESOLUTION,
        unredacted=True,
        requires_acknowledgment=available,
        acknowledged=acknowledged,
        shared=shared,
        shared_session_ids=ctx.shared_session_ids if shared else (),
        reason=reason,
    )


def _recording(ctx: NegotiationContext, descriptor: CapabilityDescriptor, os_reason: Reason | None) -> RecordingCell:
    reason: Reason | None
    if os_reason is not None:
        reason = os_reason
    elif not descriptor.capabilities.recording.available:
        reason = _desktop_missing_reason(descriptor)
    elif not ctx.desktop_enabled:
        reason = Reason.DISABLED_BY_POLICY
    else:
        # Liveness is not a gate: a recording can be requested before the box is warm.
        return RecordingCell(available=True, modes=RECORDING_MODES, codecs=RECORDING_CODECS)
    return RecordingCell(available=False, reason=reason)


def _computer_use(
    ctx: NegotiationContext, descriptor: CapabilityDescriptor, os_reason: Reason | None
) -> ComputerUseCell:
    reason: Reason | None = None
    if os_reason is not None:
        reason = os_reason
    elif not descriptor.capabilities.desktop_stream.available:
        reason = _desktop_missing_reason(descriptor)
    elif not ctx.desktop_enabled or not ctx.computer_use_enabled:
        reason = Reason.DISABLED_BY_POLICY
    return ComputerUseCell(available=reason is None, read_only=ctx.computer_use_read_only, reason=reason)


_RUNTIME_DESKTOP_STREAM: Final = DesktopStreamCapability(available=True, transport="vnc-ws")


def runtime_desktop_overlay(ctx: NegotiationContext, document: SessionCapabilities) -> SessionCapabilities:
    """Make the desktop cells available where the worker itself runs the desktop (``ctx.runtime_desktop``).

    A no-op without ``runtime_desktop``, or for a backend whose descriptor already has a desktop
    (the static table decides there). Otherwise each cell the runtime can serve is re-derived as for
    a ``vnc-ws`` desktop backend, so the OS, policy toggles and liveness still gate it; a cell the
    runtime cannot serve keeps its base reason.
    """
    runtime = ctx.runtime_desktop
    descriptor = select_backend(ctx.backend)
    if runtime is None or not runtime.display or descriptor.capabilities.desktop_stream.available:
        return document
    capable = descriptor.model_copy(
        update={
            "capabilities": descriptor.capabilities.model_copy(
                update={"desktop_stream": _RUNTIME_DESKTOP_STREAM, "recording": RecordingCapability(available=True)}
            )
        }
    )
    os_reason = None if backend_supports_os(descriptor, ctx.os) else Reason.OS_UNSUPPORTED
    cells: dict[str, Any] = {"desktop_stream": _desktop_stream(ctx, capable, os_reason)}
    if runtime.recording:
        cells["recording"] = _recording(ctx, capable, os_reason)
    if runtime.computer_use:
        cells["computer_use"] = _computer_use(ctx, capable, os_reason)
    return document.model_copy(update=cells)


def _parse_context(ctx: NegotiationContext | Mapping[str, Any]) -> NegotiationContext:
    if isinstance(ctx, NegotiationContext):
        return ctx
    if not isinstance(ctx, Mapping):
        raise InvalidRequest(
            f"capability negotiation needs a NegotiationContext or a mapping, not {type(ctx).__name__}"
        )
    try:
        return NegotiationContext.model_validate(ctx)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '<context>'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequest(f"invalid capability negotiation context: {problems}") from exc


def negotiate_capabilities(
    ctx: NegotiationContext | Mapping[str, Any],
    *,
    overlays: Sequence[CapabilityOverlay] = (),
) -> SessionCapabilities:
    """Negotiate the capability document of a session: every cell present, a reason when unavailable.

    ``ctx`` is a :class:`NegotiationContext` or a mapping with its camelCase (wire) or snake_case
    keys. The backend's static descriptor decides what is feasible at all; the OS, then the
    descriptor, then policy toggles and lease liveness decide each cell's reason, in that order.
    ``overlays`` are applied in order to the base document, so a caller with live knowledge (e.g.
    the selfhosted agent's state) can refine it without re-deriving it; when the context carries
    ``runtime_desktop``, :func:`runtime_desktop_overlay` is applied first.

    Raises:
        InvalidRequest: the context is malformed (missing ``desktopEnabled``, a negative epoch,
            a non-boolean toggle, a naive ``now``, unknown keys, ...).
        UnknownBackend: ``backend`` is not one of the backend names (SDK ids such as
            ``unix_local`` are not accepted here).
    """
    context = _parse_context(ctx)
    descriptor = select_backend(context.backend)
    os_reason = None if backend_supports_os(descriptor, context.os) else Reason.OS_UNSUPPORTED
    now = context.now if context.now is not None else datetime.now(UTC)
    document = SessionCapabilities(
        session_id=context.session_id,
        backend=descriptor.backend,
        os=context.os,
        liveness=context.liveness,
        lease_epoch=context.lease_epoch,
        workspace_generation=context.workspace_generation,
        archive_generation=context.archive_generation,
        archive_complete=context.archive_complete,
        file_system=_file_system(descriptor, os_reason),
        terminal=_terminal(context, descriptor, os_reason),
        git=_git(descriptor, os_reason),
        desktop_stream=_desktop_stream(context, descriptor, os_reason),
        recording=_recording(context, descriptor, os_reason),
        computer_use=_computer_use(context, descriptor, os_reason),
        negotiated_at=now,
    )
    if context.runtime_desktop is not None:
        document = runtime_desktop_overlay(context, document)
    for overlay in overlays:
        document = overlay(context, document)
    return document
