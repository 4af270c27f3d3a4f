"""Computer use: screenshots of a box's display and pointer/keyboard input into it.

Both activities run one command in the box against the display the desktop plane brought up:
its number and X authority are in the desktop-up state directory
(``${SANDBOX_EDGE_DIR:-${TMPDIR:-/tmp}/.sandbox-edge}/desktop/{display,xauth}``). When the desktop is
not up (no state, or the X server does not answer) the desktop is brought up through
:meth:`activities.planes.PlaneActivities.ensure_display_stack` and the command is run once more.

Screenshots use ImageMagick's ``import -window root`` (PNG on stdout); input uses ``xdotool``. The
typed text and key chords reach ``xdotool`` as positional arguments of a fixed script, never as
shell text. Policy (worker settings): ``computer_use_enabled`` false refuses both with
:class:`~sandbox.errors.ComputerUseDisabled`; ``computer_use_read_only`` refuses input with
:class:`~sandbox.errors.ComputerUseReadOnly` and still allows screenshots.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from temporalio import activity

from activities.box_sessions import BoxSessions
from activities.planes import PlaneActivities
from activities.provider_errors import maps_provider_errors
from providers.registry import ProviderRegistry
from sandbox.box import Envelope
from sandbox.errors import BoxNotFound, ComputerUseDisabled, ComputerUseError, ComputerUseReadOnly, ExecTimeout
from sandbox.inbox_scripts import host_edge_environment
from sandbox.settings import Settings
from workflows.activity_names import ActivityName
from workflows.models.computer_use import (
    ClickAction,
    DesktopAction,
    DesktopInputInput,
    DesktopInputResult,
    DoubleClickAction,
    DragAction,
    KeyAction,
    MoveAction,
    Screenshot,
    ScreenshotInput,
    ScrollAction,
    TypeAction,
)
from workflows.models.planes import DisplayStackRequest

__all__ = ["ComputerUseActivities", "computer_use_policy", "input_script"]

EXIT_NO_DISPLAY: Final = 20
EXIT_MISSING_TOOL: Final = 16
COMMAND_TIMEOUT_SECONDS: Final = 60.0
_BUTTONS: Final = {"left": "1", "middle": "2", "right": "3"}
_SCROLL_BUTTONS: Final = {"up": "4", "down": "5", "left": "6", "right": "7"}
_HOST_SHARING_BACKENDS: Final = frozenset({"local"})

# Finds the display of the desktop plane and checks that its X server answers (exit 20 if not).
_DISPLAY_PREAMBLE: Final = r"""
EDGE=${SANDBOX_EDGE_DIR:-${TMPDIR:-/tmp}/.sandbox-edge}
for tool in $TOOLS; do
    command -v "$tool" >/dev/null 2>&1 || { echo "SANDBOX_COMPUTER_USE_UNAVAILABLE missing=$tool"; exit 16; }
done
n=
read -r n 2>/dev/null <"$EDGE/desktop/display" || true
[[ $n =~ ^[0-9]+$ ]] || { echo "no desktop display in $EDGE/desktop" >&2; exit 20; }
export DISPLAY=":$n" XAUTHORITY="$EDGE/desktop/xauth"
geometry=$(xdotool getdisplaygeometry 2>/dev/null) || { echo "the X server of :$n does not answer" >&2; exit 20; }
echo "SANDBOX_DISPLAY n=$n geometry=${geometry/ /x}" >&2
"""

_SCREENSHOT_SCRIPT: Final = (
    "TOOLS='xdotool import'\n"
    + _DISPLAY_PREAMBLE
    + r"""
if [ -n "${1:-}" ]; then
    exec import -silent -window root -resize "$1" png:-
fi
exec import -silent -window root png:-
"""
)


def computer_use_policy(settings: Settings) -> dict[str, bool]:
    """The computer-use toggles of ``settings`` as capability-negotiation context fields.

    Pass them into :class:`sandbox.capabilities.NegotiationContext` so the ``ComputerUse`` cell says
    what the activities enforce.
    """
    return {
        "computer_use_enabled": settings.computer_use_enabled,
        "computer_use_read_only": settings.computer_use_read_only,
    }


def _xy(x: int | None, y: int | None) -> list[str]:
    return [] if x is None or y is None else ["mousemove", str(x), str(y)]


def input_script(actions: Sequence[DesktopAction]) -> tuple[str, list[str]]:
    """A bash script running ``actions`` with xdotool, and its positional arguments.

    Every value (numbers, the typed text, key chords) is passed as an argument and referenced as
    ``"${N}"``; the script text itself is built from fixed words only.
    """
    lines: list[str] = []
    args: list[str] = []

    def ref(value: str) -> str:
        args.append(value)
        return f'"${{{len(args)}}}"'

    def xdotool(*words: str) -> None:
        lines.append("xdotool " + " ".join(ref(w) for w in words))

    for action in actions:
        if isinstance(action, MoveAction):
            xdotool("mousemove", str(action.x), str(action.y))
        elif isinstance(action, ClickAction):
            xdotool(*_xy(action.x, action.y), "click", "--repeat", str(action.count), _BUTTONS[action.button])
        elif isinstance(action, DoubleClickAction):
            xdotool(*_xy(action.x, action.y), "click", "--repeat", "2", "--delay", "80", _BUTTONS[action.button])
        elif isinstance(action, DragAction):
            button = _BUTTONS[action.button]
            xdotool("mousemove", str(action.x), str(action.y), "mousedown", button)
            lines.append("sleep 0.05")
            xdotool("mousemove", str(action.to_x), str(action.to_y))
            lines.append("sleep 0.05")
            xdotool("mouseup", button)
        elif isinstance(action, TypeAction):
            lines.append(f"xdotool type --clearmodifiers --delay 8 -- {ref(action.text)}")
        elif isinstance(action, KeyAction):
            lines.append("xdotool key --clearmodifiers -- " + " ".join(ref(k) for k in action.keys))
        elif isinstance(action, ScrollAction):
            xdotool(
                *_xy(action.x, action.y), "click", "--repeat", str(action.amount), _SCROLL_BUTTONS[action.direction]
            )
    # Positional parameters above 9 need braces ("${10}"); `ref` always writes them.
    body = "TOOLS='xdotool'\nset -e\n" + _DISPLAY_PREAMBLE + "\n".join(lines) + "\nxdotool getmouselocation --shell\n"
    return body, args


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG from its IHDR chunk.

    Raises:
        ComputerUseError: ``data`` is not a PNG.
    """
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ComputerUseError("the screenshot tool did not produce a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _display_line(stderr: str) -> tuple[int, int, int] | None:
    for line in stderr.splitlines():
        if line.startswith("SANDBOX_DISPLAY "):
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            try:
                w, h = fields["geometry"].split("x")
                return int(fields["n"]), int(w), int(h)
            except (KeyError, ValueError):
                return None
    return None


class ComputerUseActivities:
    """Screenshot and desktop-input activities; one instance per worker.

    Args:
        providers: The worker's provider registry.
        settings: Worker settings (the computer-use policy).
        planes: The plane activities, used to bring the desktop up when it is not.
    """

    def __init__(self, providers: ProviderRegistry, settings: Settings, planes: PlaneActivities) -> None:
        self._providers = providers
        self._settings = settings
        self._planes = planes
        self._sessions = BoxSessions(providers)

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """Every computer-use activity, for the worker's activity list."""
        return [self.screenshot, self.desktop_input]

    async def _run(
        self,
        backend: str,
        envelope: Envelope,
        lease_id: str,
        epoch: int,
        geometry: str,
        argv: list[str],
    ) -> tuple[bytes, str]:
        """Run ``argv`` against the box's display, bringing the desktop up once if it is not up."""
        env = host_edge_environment() if backend in _HOST_SHARING_BACKENDS else {}
        for attempt in (1, 2):
            try:
                session = await self._sessions.get(backend, envelope)
                result = await session.exec(argv, env=env, timeout=COMMAND_TIMEOUT_SECONDS)
            except BoxNotFound:
                self._sessions.forget(backend, envelope.instance_id)
                raise
            except ExecTimeout as err:
                raise ComputerUseError(f"the desktop command ran past {err.timeout:g} s and was killed") from err
            stderr = result.stderr.decode("utf-8", "replace")
            if result.exit_code == EXIT_NO_DISPLAY and attempt == 1:
                await self._planes.ensure_display_stack(
                    DisplayStackRequest(
                        backend=backend, envelope=envelope, lease_id=lease_id, epoch=epoch, geometry=geometry
                    )
                )
                continue
            if result.exit_code == EXIT_MISSING_TOOL:
                missing = result.stdout.decode("utf-8", "replace").strip().rpartition("missing=")[2]
                raise ComputerUseError(f"this box cannot do computer use: {missing or 'a tool'} is missing")
            if result.exit_code != 0:
                raise ComputerUseError(f"the desktop command exited {result.exit_code}: {stderr.strip()[-400:]}")
            return result.stdout, stderr
        raise ComputerUseError("the desktop did not come up")

    def _check_enabled(self) -> None:
        if not self._settings.computer_use_enabled:
            raise ComputerUseDisabled("computer use is disabled on this worker (SANDBOX_COMPUTER_USE_ENABLED=false)")

    @activity.defn(name=ActivityName.COMPUTER_SCREENSHOT)
    @maps_provider_errors
    async def screenshot(self, inp: ScreenshotInput) -> Screenshot:
        """A PNG of the box's whole display (shrunk to fit ``max_png_bytes`` when it is larger).

        Raises:
            ComputerUseDisabled: Computer use is off by policy.
            ComputerUseError: The screenshot could not be taken.
            BoxNotFound: The box is gone.
        """
        self._check_enabled()
        argv = ["bash", "-c", _SCREENSHOT_SCRIPT, "screenshot"]
        png, stderr = await self._run(inp.backend, inp.envelope, inp.lease_id, inp.epoch, inp.geometry, argv)
        shown = _display_line(stderr)
        width, height = png_size(png)
        display, screen_w, screen_h = shown if shown is not None else (-1, width, height)
        scale = 1.0
        while len(png) > inp.max_png_bytes and scale > 0.1:
            # PNG size grows with the pixel count: shrink by the square root of the overshoot, and a bit more.
            scale = round(scale * min(0.9, (inp.max_png_bytes / len(png)) ** 0.5), 3)
            resize = f"{max(1, round(scale * 100))}%"
            png, _ = await self._run(inp.backend, inp.envelope, inp.lease_id, inp.epoch, inp.geometry, [*argv, resize])
            width, height = png_size(png)
        if len(png) > inp.max_png_bytes:
            raise ComputerUseError(f"the screenshot is {len(png)} bytes even at scale {scale}")
        return Screenshot(
            png=png,
            width=width,
            height=height,
            screen_width=screen_w,
            screen_height=screen_h,
            scale=scale,
            display=display,
            epoch=inp.epoch,
        )

    @activity.defn(name=ActivityName.COMPUTER_DESKTOP_INPUT)
    @maps_provider_errors
    async def desktop_input(self, inp: DesktopInputInput) -> DesktopInputResult:
        """Run pointer and keyboard actions in order with xdotool; report where the pointer is.

        Raises:
            ComputerUseDisabled: Computer use is off by policy.
            ComputerUseReadOnly: Computer use is read-only (input refused).
            ComputerUseError: An action failed (nothing after it ran).
            BoxNotFound: The box is gone.
        """
        self._check_enabled()
        if self._settings.computer_use_read_only:
            raise ComputerUseReadOnly(
                "computer use is read-only on this worker (SANDBOX_COMPUTER_USE_READ_ONLY=true): "
                "screenshots are allowed, input is not"
            )
        script, args = input_script(inp.actions)
        out, stderr = await self._run(
            inp.backend, inp.envelope, inp.lease_id, inp.epoch, inp.geometry, ["bash", "-c", script, "input", *args]
        )
        fields: dict[str, str] = {}
        for line in out.decode("utf-8", "replace").splitlines():
            name, sep, value = line.partition("=")
            if sep:
                fields[name.strip()] = value.strip()
        try:
            x, y = int(fields["X"]), int(fields["Y"])
        except (KeyError, ValueError):
            raise ComputerUseError(f"xdotool did not report the pointer: {out[-200:]!r}") from None
        shown = _display_line(stderr)
        return DesktopInputResult(
            performed=len(inp.actions),
            pointer_x=x,
            pointer_y=y,
            display=shown[0] if shown is not None else -1,
            epoch=inp.epoch,
        )
