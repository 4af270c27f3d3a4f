"""Capability negotiation for selfhosted machines: the base document refined by agent liveness.

:func:`negotiate_selfhosted_capabilities` negotiates with ``backend="selfhosted"`` (lease liveness
``warm`` when the agent is online, else ``cold``) and applies :func:`selfhosted_overlay`
(``reference/upstream-runtime-contracts.md`` §2.3):

- **not online**: every cell is unavailable with ``agent_offline`` or ``agent_reconnecting`` (FS
  read-only, no terminal transport, no desktop transport or acknowledgment, no recording modes);
- **online, no display**: ``display_unavailable`` on the cells the base left available (a desktop
  with a transport, recording, computer use);
- **online, display, no screen-control consent**: the desktop stays view-only and computer use is
  ``consent_required``.

Reasons the base negotiation already gave (policy, OS) are kept once the agent is online.
:func:`negotiate_selfhosted_capabilities_live` pings the agent when no probe result is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.alias_generators import to_camel

from sandbox.capabilities import (
    CapabilityOverlay,
    MintedDesktopStream,
    MintedTerminalStream,
    NegotiationContext,
    SessionCapabilities,
    negotiate_capabilities,
)
from sandbox.control_protocol import PingReply
from sandbox.descriptors import CapabilityUnavailableReason
from sandbox.errors import InvalidRequest
from sandbox.liveness import EnrollmentView, SelfhostedLiveness, selfhosted_liveness

__all__ = [
    "SelfhostedNegotiationContext",
    "agent_report_overlays",
    "negotiate_selfhosted_capabilities",
    "negotiate_selfhosted_capabilities_live",
    "selfhosted_overlay",
]

Reason = CapabilityUnavailableReason


class SelfhostedNegotiationContext(BaseModel):
    """Inputs of selfhosted negotiation (camelCase or snake_case keys); toggles default as upstream."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")

    session_id: StrictStr = Field(min_length=1)
    lease_epoch: StrictInt = Field(ge=0)
    enrollment: EnrollmentView | None = None
    probe_responded: StrictBool | None = None
    os: StrictStr | None = None
    desktop_enabled: StrictBool = True
    desktop_interactive: StrictBool = True
    computer_use_enabled: StrictBool = True
    computer_use_read_only: StrictBool = False
    stream_token_secret_available: StrictBool = True
    terminal_enabled: StrictBool = True
    desktop_acknowledged: StrictBool = False
    shared: StrictBool = False
    shared_session_ids: tuple[StrictStr, ...] = ()
    desktop_stream: MintedDesktopStream | None = None
    terminal_stream: MintedTerminalStream | None = None
    workspace_generation: StrictInt | None = Field(default=None, ge=0)
    archive_generation: StrictInt | None = Field(default=None, ge=0)
    archive_complete: StrictBool = False
    now: AwareDatetime | None = None


def selfhosted_overlay(liveness: SelfhostedLiveness) -> CapabilityOverlay:
    """The overlay that stamps agent liveness, display and consent onto a base document."""

    def overlay(_ctx: NegotiationContext, doc: SessionCapabilities) -> SessionCapabilities:
        if liveness.state != "online":
            reason = Reason.AGENT_OFFLINE if liveness.state == "offline" else Reason.AGENT_RECONNECTING
            return doc.model_copy(
                update={
                    "file_system": doc.file_system.model_copy(
                        update={"available": False, "read_only": True, "reason": reason}
                    ),
                    "terminal": doc.terminal.model_copy(
                        update={"transport": None, "url": None, "token": None, "expires_at": None, "reason": reason}
                    ),
                    "git": doc.git.model_copy(update={"available": False, "reason": reason}),
                    "desktop_stream": _desktop_off(doc, reason),
                    "recording": doc.recording.model_copy(
                        update={"available": False, "modes": (), "codecs": (), "reason": reason}
                    ),
                    "computer_use": doc.computer_use.model_copy(update={"available": False, "reason": reason}),
                }
            )
        if not liveness.has_display:
            update: dict[str, Any] = {}
            if doc.desktop_stream.transport is not None:
                update["desktop_stream"] = _desktop_off(doc, Reason.DISPLAY_UNAVAILABLE)
            if doc.recording.available:
                update["recording"] = doc.recording.model_copy(
                    update={"available": False, "modes": (), "codecs": (), "reason": Reason.DISPLAY_UNAVAILABLE}
                )
            if doc.computer_use.available:
                update["computer_use"] = doc.computer_use.model_copy(
                    update={"available": False, "reason": Reason.DISPLAY_UNAVAILABLE}
                )
            return doc.model_copy(update=update)
        if not liveness.consented:
            update = {"desktop_stream": doc.desktop_stream.model_copy(update={"mode": "read-only"})}
            if doc.computer_use.available:
                update["computer_use"] = doc.computer_use.model_copy(
                    update={"available": False, "reason": Reason.CONSENT_REQUIRED}
                )
            return doc.model_copy(update=update)
        return doc

    return overlay


def agent_report_overlays(responded: bool, reply: PingReply | None) -> list[CapabilityOverlay]:
    """The overlays of what one ping of the agent found, for a lease's base document.

    - no answer: :func:`selfhosted_overlay` offline, every cell ``agent_offline``;
    - an answer without a report (the agent refused the ping): online, but nothing it can do is
      known, so no display and no screen-control consent;
    - a report (:class:`~sandbox.control_protocol.PingReply`): its display, then its
      ``consents`` (an older agent without them allows exec, files and screen view, and screen
      control when ``screen_control`` says so): a capability its owner did not allow makes the
      cells that need it ``consent_required`` (files: file system and git; exec: terminal and
      git; screen view: desktop, recording and computer use; screen control: computer use).
    """
    if not responded:
        return [selfhosted_overlay(SelfhostedLiveness(state="offline", consented=False, has_display=False))]
    if reply is None:
        return [selfhosted_overlay(SelfhostedLiveness(state="online", consented=False, has_display=False))]
    if reply.consents is None:
        consents = {"exec", "files", "screen_view"} | ({"screen_control"} if reply.screen_control else set())
    else:
        consents = set(reply.consents)
    liveness = SelfhostedLiveness(state="online", consented="screen_control" in consents, has_display=reply.has_display)
    return [selfhosted_overlay(liveness), _consent_overlay(frozenset(consents))]


def _consent_overlay(consents: frozenset[str]) -> CapabilityOverlay:
    """Cells the owner's consents rule out become ``consent_required`` (reasons given earlier are kept)."""
    why = Reason.CONSENT_REQUIRED

    def overlay(_ctx: NegotiationContext, doc: SessionCapabilities) -> SessionCapabilities:
        update: dict[str, Any] = {}
        if "files" not in consents and doc.file_system.available:
            update["file_system"] = doc.file_system.model_copy(
                update={"available": False, "read_only": True, "reason": why}
            )
        if "exec" not in consents and doc.terminal.transport is not None:
            update["terminal"] = doc.terminal.model_copy(
                update={"transport": None, "url": None, "token": None, "expires_at": None, "reason": why}
            )
        if not {"files", "exec"} <= consents and doc.git.available:
            update["git"] = doc.git.model_copy(update={"available": False, "reason": why})
        if "screen_view" not in consents:
            if doc.desktop_stream.transport is not None:
                update["desktop_stream"] = _desktop_off(doc, why)
            if doc.recording.available:
                update["recording"] = doc.recording.model_copy(
                    update={"available": False, "modes": (), "codecs": (), "reason": why}
                )
            if doc.computer_use.available:
                update["computer_use"] = doc.computer_use.model_copy(update={"available": False, "reason": why})
        return doc.model_copy(update=update) if update else doc

    return overlay


def _desktop_off(doc: SessionCapabilities, reason: Reason) -> Any:
    return doc.desktop_stream.model_copy(
        update={
            "transport": None,
            "client": None,
            "mode": "read-only",
            "url": None,
            "token": None,
            "expires_at": None,
            "requires_acknowledgment": False,
            "acknowledged": False,
            "shared": False,
            "shared_session_ids": (),
            "reason": reason,
        }
    )


def _parse(ctx: SelfhostedNegotiationContext | Mapping[str, Any]) -> SelfhostedNegotiationContext:
    if isinstance(ctx, SelfhostedNegotiationContext):
        return ctx
    try:
        return SelfhostedNegotiationContext.model_validate(ctx)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '<context>'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequest(f"invalid selfhosted negotiation context: {problems}") from exc


def negotiate_selfhosted_capabilities(
    ctx: SelfhostedNegotiationContext | Mapping[str, Any],
) -> SessionCapabilities:
    """The capability document of a session on a selfhosted machine (rules in the module docstring).

    A missing ``probeResponded`` counts as no answer; use
    :func:`negotiate_selfhosted_capabilities_live` to ping the agent instead.

    Raises:
        InvalidRequest: the context is malformed.
    """
    context = _parse(ctx)
    liveness = selfhosted_liveness(context.enrollment, bool(context.probe_responded), context.now)
    base = NegotiationContext(
        session_id=context.session_id,
        backend="selfhosted",
        # Only an absent OS defaults (upstream `os ?? "linux"`): "" is echoed and unsupported.
        os="linux" if context.os is None else context.os,
        liveness="warm" if liveness.state == "online" else "cold",
        lease_epoch=context.lease_epoch,
        workspace_generation=context.workspace_generation,
        archive_generation=context.archive_generation,
        archive_complete=context.archive_complete,
        desktop_enabled=context.desktop_enabled,
        desktop_interactive=context.desktop_interactive,
        computer_use_enabled=context.computer_use_enabled,
        computer_use_read_only=context.computer_use_read_only,
        stream_token_secret_available=context.stream_token_secret_available,
        terminal_enabled=context.terminal_enabled,
        desktop_acknowledged=context.desktop_acknowledged,
        shared=context.shared,
        shared_session_ids=context.shared_session_ids,
        desktop_stream=context.desktop_stream,
        terminal_stream=context.terminal_stream,
        now=context.now,
    )
    return negotiate_capabilities(base, overlays=[selfhosted_overlay(liveness)])


class _Pingable(Protocol):
    async def ping(self) -> bool: ...


async def negotiate_selfhosted_capabilities_live(
    ctx: SelfhostedNegotiationContext | Mapping[str, Any], session: _Pingable | None = None
) -> SessionCapabilities:
    """:func:`negotiate_selfhosted_capabilities`, pinging ``session`` when ``probeResponded`` is not given."""
    context = _parse(ctx)
    if context.probe_responded is None and session is not None:
        context = context.model_copy(update={"probe_responded": await session.ping()})
    return negotiate_selfhosted_capabilities(context)
