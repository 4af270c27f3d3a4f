"""What the machine's owner lets the runtime do: one flag per capability, checked before each op.

The owner chooses when starting the agent (``sandboxctl agent run``): ``--no-exec`` (commands and
terminals), ``--no-files`` (every ``fs_*`` op), ``--no-screen-view`` (screenshots and desktop
streams) and ``--allow-screen-control`` (mouse and keyboard, the only one off by default). An op
whose capability is not allowed is answered ``CONSENT_REQUIRED`` naming the capability and the flag
that allows it, and nothing runs. :data:`OP_CAPABILITY` is the one table from op to capability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from daemons.agent.confinement import OpRefused
from sandbox.control_protocol import (
    ControlErrorCode,
    DesktopInputOp,
    ExecOp,
    FsListOp,
    FsReadOp,
    FsStatOp,
    FsWriteOp,
    PtyCloseOp,
    PtyOpenOp,
    PtyReadOp,
    PtyResizeOp,
    PtyWriteOp,
    ScreenshotOp,
    StreamEnsureOp,
)

__all__ = ["OP_CAPABILITY", "AgentConsent", "Capability"]

Capability = Literal["exec", "files", "screen_view", "screen_control"]

OP_CAPABILITY: Final[dict[type, Capability]] = {
    ExecOp: "exec",
    PtyOpenOp: "exec",
    PtyWriteOp: "exec",
    PtyReadOp: "exec",
    PtyResizeOp: "exec",
    PtyCloseOp: "exec",
    FsReadOp: "files",
    FsWriteOp: "files",
    FsListOp: "files",
    FsStatOp: "files",
    ScreenshotOp: "screen_view",
    DesktopInputOp: "screen_control",
}
"""The capability each op needs; ``ping`` needs none, ``stream_ensure`` depends on its kind."""

_FLAG: Final[dict[Capability, str]] = {
    "exec": "--exec",
    "files": "--files",
    "screen_view": "--screen-view",
    "screen_control": "--allow-screen-control",
}


@dataclass(frozen=True)
class AgentConsent:
    """The capabilities the owner allows; screen control is off unless asked for."""

    exec: bool = True
    files: bool = True
    screen_view: bool = True
    screen_control: bool = False

    def allowed(self) -> tuple[Capability, ...]:
        """The allowed capabilities, in a fixed order (what ``ping`` reports)."""
        return tuple(name for name in _FLAG if getattr(self, name))

    def require(self, op: object) -> None:
        """Refuse ``op`` with ``CONSENT_REQUIRED`` unless the owner allows what it needs.

        Raises:
            OpRefused: the op's capability is not allowed (detail ``capability`` and ``flag``).
        """
        capability = capability_of(op)
        if capability is None or getattr(self, capability):
            return
        flag = _FLAG[capability]
        raise OpRefused(
            ControlErrorCode.CONSENT_REQUIRED,
            f"the machine's owner has not allowed {capability.replace('_', ' ')} (start the agent with {flag})",
            {"capability": capability, "flag": flag},
        )


def capability_of(op: object) -> Capability | None:
    """The capability ``op`` needs, or None (``ping``, unknown ops: those are refused elsewhere)."""
    if isinstance(op, StreamEnsureOp):
        return "screen_view" if op.kind == "desktop" else "exec"
    return OP_CAPABILITY.get(type(op))
