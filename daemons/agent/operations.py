"""What the agent does for each op, independent of how requests arrive (NATS lives in ``daemon.py``).

:class:`AgentOperations` answers one :class:`~sandbox.control_protocol.ControlRequest` with one
:class:`~sandbox.control_protocol.ControlResponse`. File ops are confined to the agent's
:class:`~daemons.agent.confinement.Root`; ``exec`` runs in its own session with its cwd under the
root and its whole process group killed at the deadline; output that could not travel in one
message is refused (``PAYLOAD_TOO_LARGE``), never cut. Each op first needs the owner's consent to
its capability (:class:`~daemons.agent.consent.AgentConsent`, ``CONSENT_REQUIRED`` otherwise);
``desktop_input`` then needs a display; ``screenshot`` and desktop
streams need a display (``UNSUPPORTED`` with reason ``display_unavailable`` otherwise). The
``pty_*`` ops are served by :class:`~daemons.agent.terminals.AgentTerminals`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daemons.agent.confinement import OpRefused, Root, os_refusal
from daemons.agent.consent import AgentConsent
from daemons.agent.spawn import start_command
from daemons.agent.terminals import AgentTerminals, machine_environment
from sandbox.control_protocol import (
    NATS_DEFAULT_MAX_PAYLOAD,
    ControlErrorCode,
    ControlRequest,
    ControlResponse,
    DesktopInputOp,
    DesktopInputReply,
    DisplayInfo,
    ExecOp,
    ExecReply,
    FsListOp,
    FsListReply,
    FsReadOp,
    FsReadReply,
    FsStatOp,
    FsStatReply,
    FsWriteOp,
    FsWriteReply,
    KeyEvent,
    PingOp,
    PingReply,
    PointerEvent,
    PtyCloseOp,
    PtyCloseReply,
    PtyOpenOp,
    PtyOpenReply,
    PtyReadOp,
    PtyReadReply,
    PtyResizeOp,
    PtyResizeReply,
    PtyWriteOp,
    PtyWriteReply,
    ScreenshotOp,
    ScreenshotReply,
    ScrollEvent,
    StreamChannel,
    StreamEnsureOp,
    StreamEnsureReply,
    error_response,
    max_chunk_bytes,
)

__all__ = ["AgentOperations", "DisplayAccess"]

_PIPE_GRACE_SECONDS: Final = 0.2
"""How long to keep reading output that a background child of a finished command still holds open."""
_BUTTONS: Final = {"left": "1", "middle": "2", "right": "3"}


def _png_size(png: bytes) -> tuple[int, int]:
    if len(png) >= 24 and png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        width, height = struct.unpack(">II", png[16:24])
        return int(width), int(height)
    return 0, 0


@dataclass(frozen=True)
class DisplayAccess:
    """The machine's display (``None``: it has none)."""

    display: str | None

    @property
    def available(self) -> bool:
        """Whether there is a display to capture or stream."""
        return bool(self.display)


def _no_display() -> OpRefused:
    return OpRefused(ControlErrorCode.UNSUPPORTED, "this machine has no display", {"reason": "display_unavailable"})


class AgentOperations:
    """The op handlers of one agent: its root, its display, its owner's consent and its identity."""

    def __init__(
        self,
        *,
        workspace_id: str,
        agent_id: str,
        root: Path,
        display: DisplayAccess,
        consent: AgentConsent | None = None,
        max_payload: int = NATS_DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.workspace_id = workspace_id
        self.consent = consent or AgentConsent()
        self.agent_id = agent_id
        self.root = Root(root)
        self.display = display
        self.max_payload = max_payload
        self.newest_epoch = 0
        self._groups: set[int] = set()
        # Commands get the agent's environment as it was at start (plus the op's), copied once.
        self._environment = dict(os.environb)
        self.terminals = AgentTerminals(self.root, machine_environment(self._environment))
        self._hostname = socket.gethostname()
        self._os = {"Darwin": "macos", "Windows": "windows"}.get(platform.system(), "linux")

    @property
    def payload_budget(self) -> int:
        """Raw bytes that fit base64-encoded in one reply."""
        return max_chunk_bytes(self.max_payload)

    async def handle(self, request: ControlRequest) -> ControlResponse:
        """Run the request's op and answer it (errors are answers too; this never raises an op failure)."""
        rid = request.request_id
        # A newer binding of this machine fences the older one: its shells end like a replaced box's.
        self.terminals.fence(request.epoch)
        try:
            self.consent.require(request.op)
            result = await self._dispatch(request.op, request.epoch)
        except OpRefused as refusal:
            return error_response(
                rid, refusal.code, refusal.message, retryable=refusal.retryable, detail=refusal.detail
            )
        return ControlResponse(request_id=rid, result=result)

    async def _dispatch(
        self, op: object, epoch: int
    ) -> (
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
        | PtyCloseReply
    ):
        if isinstance(op, PingOp):
            return self.ping(op)
        if isinstance(op, ExecOp):
            return await self.exec(op)
        if isinstance(op, FsReadOp):
            content, size = self.root.read(op.path, op.offset, op.length, self.payload_budget)
            return FsReadReply(content=content, total_size=size)
        if isinstance(op, FsWriteOp):
            if op.upload_id is not None:
                written = self.root.write_chunk(
                    op.path,
                    op.content,
                    upload_id=op.upload_id,
                    offset=op.upload_offset,
                    final=op.final,
                    create_parents=op.create_parents,
                    mode=op.mode,
                )
            else:
                written = self.root.write(
                    op.path, op.content, create_parents=op.create_parents, append=op.append, mode=op.mode
                )
            return FsWriteReply(bytes_written=written)
        if isinstance(op, FsListOp):
            entries = await asyncio.to_thread(self.root.list_dir, op.path, recursive=op.recursive)
            return FsListReply(entries=entries)
        if isinstance(op, FsStatOp):
            entry = self.root.stat(op.path)
            return FsStatReply(exists=entry is not None, entry=entry)
        if isinstance(op, ScreenshotOp):
            return await self.screenshot(op)
        if isinstance(op, DesktopInputOp):
            return await self.desktop_input(op)
        if isinstance(op, StreamEnsureOp):
            return self.stream_ensure(op)
        if isinstance(op, PtyOpenOp):
            return await self.terminals.open(op, epoch=epoch)
        if isinstance(op, PtyWriteOp):
            return await self.terminals.write(op)
        if isinstance(op, PtyReadOp):
            return await self.terminals.read(op, reply_budget=self.payload_budget)
        if isinstance(op, PtyResizeOp):
            return await self.terminals.resize(op)
        if isinstance(op, PtyCloseOp):
            return await self.terminals.close(op)
        raise OpRefused(ControlErrorCode.UNSUPPORTED, f"this agent does not implement {type(op).__name__}")

    # --- ping ---

    def ping(self, op: PingOp) -> PingReply:
        """Echo the nonce with what the agent can do right now."""
        return PingReply(
            nonce=op.nonce,
            agent_monotonic_ms=int(time.monotonic() * 1000),
            hostname=self._hostname,
            os=self._os,
            has_display=self.display.available,
            screen_control=self.consent.screen_control,
            consents=list(self.consent.allowed()),
            newest_epoch=self.newest_epoch,
        )

    # --- exec ---

    async def exec(self, op: ExecOp) -> ExecReply:
        """Run a command with its cwd under the root; kill its process group at the deadline."""
        cwd = self.root.directory(op.cwd)
        argv = ["/bin/sh", "-c", " ".join(op.command)] if op.shell else list(op.command)
        started = time.monotonic()
        cap = self.payload_budget
        try:
            command = await start_command(
                argv, cwd=cwd, env=op.env, stdin=op.stdin, cap=cap, base_env=self._environment
            )
        except FileNotFoundError:
            return ExecReply(exit_code=127, stderr=f"{argv[0]}: command not found\n".encode())
        except PermissionError:
            return ExecReply(exit_code=126, stderr=f"{argv[0]}: permission denied\n".encode())
        except OSError as spawn_error:
            # E2BIG (an argv or env over the kernel's limits), ENAMETOOLONG...: a typed OS refusal.
            raise os_refusal(spawn_error, argv[0][:256]) from None
        self._groups.add(command.pid)
        timed_out = False
        try:
            if not await command.wait(op.timeout_ms / 1000 if op.timeout_ms else None):
                timed_out = True
                self._kill_group(command.pid)
                await command.wait(None)
            # A background child may keep the pipes open: read what is there, then stop.
            await command.finish_output(_PIPE_GRACE_SECONDS)
        finally:
            self._groups.discard(command.pid)
            if command.returncode is None:
                self._kill_group(command.pid)
            command.close()
        returncode = command.returncode if command.returncode is not None else -9
        exit_code = 128 - returncode if returncode < 0 else returncode
        out, err = command.stdout, command.stderr
        total = out.total + err.total
        if total > cap:
            encoded = (total + 2) // 3 * 4
            raise OpRefused(
                ControlErrorCode.PAYLOAD_TOO_LARGE,
                f"command output of {total} bytes does not fit one message",
                {"encoded_bytes": str(encoded), "max_payload": str(self.max_payload), "exit_code": str(exit_code)},
            )
        return ExecReply(
            exit_code=exit_code,
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            timed_out=timed_out,
            duration_ms=int((time.monotonic() - started) * 1000),
        )

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def kill_running(self) -> None:
        """Kill every command still running (when a drain runs out of time)."""
        for pgid in list(self._groups):
            self._kill_group(pgid)

    # --- display ---

    def _display_env(self) -> dict[str, str]:
        return {**os.environ, "DISPLAY": self.display.display or ""}

    async def _run_tool(self, argv: list[str], what: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=self._display_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            self._kill_group(proc.pid)
            await proc.wait()
            raise OpRefused(ControlErrorCode.OS, f"{what} timed out", {"tool": argv[0]}) from None
        if proc.returncode != 0:
            raise OpRefused(
                ControlErrorCode.OS,
                f"{what} failed: {stderr.decode(errors='replace').strip()[-300:]}",
                {"tool": argv[0], "exit_code": str(proc.returncode)},
            )
        return stdout

    async def _capture(self, scale: int, max_w: int, max_h: int) -> bytes:
        resize: list[str] = []
        if max_w or max_h:
            resize = ["-resize", f"{max_w or ''}x{max_h or ''}>"]
        if scale != 100:
            resize += ["-resize", f"{scale}%"]
        if shutil.which("import"):
            return await self._run_tool(["import", "-silent", "-window", "root", *resize, "png:-"], "screenshot")
        if shutil.which("ffmpeg"):
            scale_filter = [] if scale == 100 else ["-vf", f"scale=iw*{scale}/100:-2"]
            return await self._run_tool(
                [
                    "ffmpeg",
                    "-loglevel",
                    "error",
                    "-f",
                    "x11grab",
                    "-i",
                    self.display.display or "",
                    "-frames:v",
                    "1",
                    *scale_filter,
                    "-f",
                    "image2",
                    "-vcodec",
                    "png",
                    "-",
                ],
                "screenshot",
            )
        raise OpRefused(ControlErrorCode.UNSUPPORTED, "no screenshot tool (ImageMagick import or ffmpeg) installed")

    async def screenshot(self, op: ScreenshotOp) -> ScreenshotReply:
        """One PNG of the display, scaled down until it fits one message."""
        if not self.display.available:
            raise _no_display()
        native: tuple[int, int] | None = None
        for scale in (100, 50, 25, 12):
            png = await self._capture(scale, op.max_width, op.max_height)
            width, height = _png_size(png)
            if native is None:
                native = (width, height) if scale == 100 and not (op.max_width or op.max_height) else (0, 0)
            if len(png) <= self.payload_budget:
                return ScreenshotReply(
                    png=png, width=width, height=height, native_width=native[0], native_height=native[1]
                )
        raise OpRefused(
            ControlErrorCode.PAYLOAD_TOO_LARGE,
            "even a scaled-down screenshot does not fit one message",
            {"encoded_bytes": str((len(png) + 2) // 3 * 4), "max_payload": str(self.max_payload)},
        )

    async def desktop_input(self, op: DesktopInputOp) -> DesktopInputReply:
        """Inject one event with xdotool (the owner's consent was checked in :meth:`handle`)."""
        if not self.display.available:
            raise _no_display()
        if not shutil.which("xdotool"):
            raise OpRefused(ControlErrorCode.UNSUPPORTED, "xdotool is not installed on this machine")
        await self._run_tool(["xdotool", *_xdotool(op.event)], "desktop input")
        return DesktopInputReply()

    def stream_ensure(self, op: StreamEnsureOp) -> StreamEnsureReply:
        """Name the relay channel for a port (a desktop channel needs a display)."""
        display = None
        if op.kind == "desktop":
            if not self.display.available:
                raise _no_display()
            display = DisplayInfo(id=self.display.display or "", width=op.width, height=op.height, virtual=False)
        channel = StreamChannel(
            channel_id=f"{self.workspace_id}:{self.agent_id}:{op.port}",
            workspace_id=self.workspace_id,
            agent_id=self.agent_id,
            kind=op.kind,
            port=op.port,
        )
        return StreamEnsureReply(channel=channel, display=display)


def _xdotool(event: PointerEvent | KeyEvent | ScrollEvent) -> list[str]:
    """One chained xdotool command line for an input event (one process, so nothing runs in between)."""
    if isinstance(event, PointerEvent):
        move = ["mousemove", str(event.x), str(event.y)]
        button = _BUTTONS[event.button]
        actions = {
            "move": [],
            "click": ["click", button],
            "double_click": ["click", "--repeat", "2", button],
            "down": ["mousedown", button],
            "up": ["mouseup", button],
        }
        return [*move, *actions[event.action]]
    if isinstance(event, KeyEvent):
        if event.is_text:
            return ["type", "--", event.key]
        verb = {"press": "key", "down": "keydown", "up": "keyup"}[event.action]
        return [verb, "--", event.key]
    steps: list[str] = ["mousemove", str(event.x), str(event.y)]
    if event.delta_y:
        steps += ["click", "--repeat", str(abs(event.delta_y)), "5" if event.delta_y > 0 else "4"]
    if event.delta_x:
        steps += ["click", "--repeat", str(abs(event.delta_x)), "7" if event.delta_x > 0 else "6"]
    return steps
