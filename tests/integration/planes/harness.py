"""A plane test harness: local boxes (bubblewrap when available) plus the plane activities, no Temporal.

Viewer tests also run on docker boxes of the real engine (:func:`engine_plane_harness`,
:meth:`PlaneHarness.viewer_box`): the same plane activities, the edge in the box, reached through
the port the engine published.

A local box's planes have two halves: the servers in the box (state under ``/tmp/.sandbox-edge``
of the box, on the host at :attr:`Box.state_dir`) and the edges on the host (key, pid, port and
log files in the box's private directory, :attr:`Box.private_dir`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from activities.planes import LocalBoxLayout, PlaneActivities, local_box_layout
from daemons.edge import DESKTOP_TOKEN_PORT, TERMINAL_TOKEN_PORT
from providers.docker import DockerBoxSession, DockerProvider, DockerSettings
from providers.local import BOX_MARKER_VAR, LocalBoxSession, LocalProvider
from providers.registry import ProviderRegistry
from sandbox.box import BoxSession, BoxSpec, Envelope
from sandbox.inbox_scripts import ScriptName, parse_status
from sandbox.settings import Settings
from sandbox.stream_token import StreamTokenKey, derive_lease_key, root_secret_for
from tests.container_engine import ContainerEngine
from workflows.models.planes import DisplayStackRequest, TearDownPlanesRequest, TerminalServerRequest

ROOT_SECRET = "plane-tests-root-secret"


class _LeaseBoxRequests:
    """What a plane test asks of a box of either backend: the activities' requests and a shell."""

    backend: ClassVar[str]
    lease_id: str
    epoch: int
    session: BoxSession
    envelope: Envelope

    def desktop_request(self, **overrides: object) -> DisplayStackRequest:
        fields: dict[str, object] = {
            "backend": self.backend,
            "envelope": self.envelope,
            "lease_id": self.lease_id,
            "epoch": self.epoch,
        }
        fields.update(overrides)
        return DisplayStackRequest.model_validate(fields)

    def terminal_request(self) -> TerminalServerRequest:
        return TerminalServerRequest(
            backend=self.backend, envelope=self.envelope, lease_id=self.lease_id, epoch=self.epoch
        )

    async def sh(self, script: str, *, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
        """Run a shell snippet in the box; (exit code, stdout + stderr)."""
        result = await self.session.exec(["bash", "-c", script], env=env, timeout=timeout)
        return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")


@dataclass
class Box(_LeaseBoxRequests):
    """One local box of a lease."""

    backend: ClassVar[str] = "local"

    lease_id: str
    epoch: int
    session: LocalBoxSession
    envelope: Envelope

    @property
    def layout(self) -> LocalBoxLayout:
        """Where the plane activities find this box's parts."""
        return local_box_layout(self.session)

    @property
    def state_dir(self) -> Path:
        """The in-box scripts' state directory (the box's ``/tmp/.sandbox-edge``), on the host."""
        return self.layout.edge.box_tmp / ".sandbox-edge"

    @property
    def private_dir(self) -> Path:
        """The box's host-only directory: edge key, pid, port and log files."""
        return self.layout.edge.private

    def edge_log(self, plane: str) -> Path:
        """The log of the box's host edge of ``plane``."""
        return self.private_dir / f"{plane}.log"

    async def status(self, script: ScriptName) -> tuple[int, dict[str, bool]]:
        """``<script> --status`` in the box, as the activities run it: (exit code, part -> up)."""
        layout = self.layout
        argv = layout.scripts.command(script, "--status")
        result = await self.session.exec(argv, env={**layout.env, "SANDBOX_EDGE_EXTERNAL": "1"}, timeout=30)
        status = parse_status(result.stdout.decode())
        assert status is not None, result
        return result.exit_code, status.parts

    def ref(self) -> TearDownPlanesRequest:
        return TearDownPlanesRequest(backend="local", envelope=self.envelope)

    async def edge_url(self, port: int) -> str:
        """Where a viewer dials the edge of a plane listening on ``port`` (a local box's edge is on the host)."""
        return f"ws://127.0.0.1:{port}/"


@dataclass
class EngineBox(_LeaseBoxRequests):
    """One docker box of a lease on the real engine: what a viewer test needs of it (as :class:`Box`)."""

    backend: ClassVar[str] = "docker"

    lease_id: str
    epoch: int
    session: DockerBoxSession
    envelope: Envelope

    async def edge_url(self, port: int) -> str:
        """Where a viewer dials the in-box edge on ``port``: the host port the engine published for it."""
        at = await self.session.resolve_exposed_port(port)
        return f"ws://{at.host}:{at.port}/"


ViewerBox = Box | EngineBox
"""A box a viewer test opens, of either backend (:meth:`PlaneHarness.viewer_box`)."""


_MAX_SCANNED_BYTES = 8 << 20


def box_files(box: Box) -> list[Path]:
    """Every file of the box on the host (its directory, its private directory), for content checks.

    Regular files only, not followed through links, and none over 8 MiB (a box's disk image: its
    contents are scanned through the mounted directories instead).
    """
    found: set[Path] = set()
    for root in (box.session.path, box.private_dir):
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_size <= _MAX_SCANNED_BYTES:
                    found.add(path)
    return sorted(found)


X_ENV = (  # a shell prefix that points X clients at the box's desktop
    'EDGE=${TMPDIR:-/tmp}/.sandbox-edge; read -r n <"$EDGE/desktop/display"; '
    'export DISPLAY=":$n" XAUTHORITY="$EDGE/desktop/xauth"; '
)


class Rfb:
    """Just enough of an RFB 3.8 client over the edge's WebSocket to send input (no framebuffer)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.buffer = b""

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            frame = await asyncio.wait_for(self.ws.recv(), 5)
            self.buffer += frame if isinstance(frame, bytes) else frame.encode()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def handshake(self) -> tuple[int, int]:
        assert await self.read(12) == b"RFB 003.008\n"
        await self.ws.send(b"RFB 003.008\n")
        (count,) = await self.read(1)
        assert 1 in await self.read(count), "x11vnc runs without a password behind the edge"
        await self.ws.send(b"\x01")  # security type None
        assert await self.read(4) == b"\0\0\0\0"
        await self.ws.send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", await self.read(4))
        await self.read(16)  # pixel format
        (name_length,) = struct.unpack(">I", await self.read(4))
        await self.read(name_length)
        return width, height

    async def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        await self.ws.send(struct.pack(">BBHH", 5, buttons, x, y))

    async def key(self, keysym: int) -> None:
        await self.ws.send(struct.pack(">BBxxI", 4, 1, keysym))
        await self.ws.send(struct.pack(">BBxxI", 4, 0, keysym))


async def pointer_at(box: Box) -> tuple[int, int]:
    """Where the box's X pointer is (``xdotool getmouselocation``)."""
    code, out = await box.sh(X_ENV + "xdotool getmouselocation --shell")
    assert code == 0, out
    values = dict(line.split("=", 1) for line in out.split())
    return int(values["X"]), int(values["Y"])


def host_edges(box: Box, plane: str) -> list[int]:
    """The host edge processes of ``box``'s ``plane`` that lead their session (not per-connection children)."""
    marker = f"{BOX_MARKER_VAR}={box.session.instance_id}".encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            leader = os.getsid(pid) == pid
        except OSError:
            continue
        if leader and marker in environ and b"daemons.edge" in cmdline and plane.encode() in cmdline:
            found.append(pid)
    return found


class PlaneHarness:
    """Creates boxes and mints tokens against the activities' root secret."""

    def __init__(self, settings: Settings, registry: ProviderRegistry, *, backend: str = "local") -> None:
        self.settings = settings
        self.registry = registry
        self.backend = backend
        self.activities = PlaneActivities(registry, settings)
        self.root = root_secret_for(settings)
        self.made: list[Envelope] = []

    @property
    def provider(self) -> LocalProvider:
        provider = self.registry.get("local")
        assert isinstance(provider, LocalProvider)
        return provider

    async def box(self, group: str | None = None, *, epoch: int = 1) -> Box:
        group = group or uuid.uuid4().hex[:8]
        lease_id = f"lease/ws-planes/{group}"
        spec = BoxSpec(lease_id=lease_id, workspace_id="ws-planes", group_id=group, epoch=epoch)
        session = await self.provider.create(spec, f"{lease_id}#{epoch}#{uuid.uuid4().hex}")
        assert isinstance(session, LocalBoxSession)
        envelope = Envelope(**session.serialize_state().model_dump())
        return Box(lease_id, epoch, session, envelope)

    async def viewer_box(self, group: str | None = None, *, epoch: int = 1) -> ViewerBox:
        """A box of the harness's backend: a local box, or a docker box on the real engine."""
        if self.backend == "local":
            return await self.box(group, epoch=epoch)
        group = group or uuid.uuid4().hex[:8]
        lease_id = f"lease/ws-planes/{group}"
        spec = BoxSpec(lease_id=lease_id, workspace_id="ws-planes", group_id=group, epoch=epoch)
        session = await self.registry.get(self.backend).create(spec, f"{lease_id}#{epoch}#{uuid.uuid4().hex}")
        assert isinstance(session, DockerBoxSession)
        envelope = Envelope(**session.serialize_state().model_dump())
        self.made.append(envelope)
        return EngineBox(lease_id, epoch, session, envelope)

    def mint(
        self,
        lease_id: str,
        epoch: int,
        *,
        plane: str = "desktop",
        now: float | None = None,
        ttl: int = 120,
        root: bytes | None = None,
        mode: str = "view",
    ) -> str:
        """A stream token of ``mode`` for (lease, epoch), as the client mints it."""
        key = StreamTokenKey(derive_lease_key(root or self.root, lease_id, epoch))
        fields = {
            "workspace_id": str(uuid.uuid4()),
            "session_id": str(uuid.uuid4()),
            "viewer_id": str(uuid.uuid4()),
            "lease_epoch": epoch,
            "mode": mode,
            "port": DESKTOP_TOKEN_PORT if plane == "desktop" else TERMINAL_TOKEN_PORT,
        }
        return key.mint_for(fields, now=now, ttl_seconds=ttl)


@contextlib.asynccontextmanager
async def plane_harness(data_dir: Path, **settings_fields: Any) -> AsyncIterator[PlaneHarness]:
    """A harness whose boxes and processes are gone when the block ends."""
    settings = Settings(data_dir=data_dir, stream_token_secret=ROOT_SECRET, **settings_fields)
    registry = ProviderRegistry(settings)
    harness = PlaneHarness(settings, registry)
    try:
        yield harness
    finally:
        provider = harness.provider
        for owned in await provider.list_owned():
            with contextlib.suppress(Exception):
                await provider.terminate(Envelope(backend_id=provider.backend_id, instance_id=owned.instance_id))
        await registry.aclose()


@contextlib.asynccontextmanager
async def engine_plane_harness(data_dir: Path, engine: ContainerEngine) -> AsyncIterator[PlaneHarness]:
    """A harness whose viewer boxes are hardened docker boxes on the real engine, removed when the block ends.

    Only the boxes it made are removed: the session's other tests share the engine's owner label.
    """
    settings = Settings(data_dir=data_dir, stream_token_secret=ROOT_SECRET)
    provider = DockerProvider(
        DockerSettings(host=engine.host, image=engine.image, owner=engine.owner), limits=settings.local_limits()
    )
    registry = ProviderRegistry(settings, {"docker": provider})
    harness = PlaneHarness(settings, registry, backend="docker")
    try:
        yield harness
    finally:
        for envelope in harness.made:
            with contextlib.suppress(Exception):
                await provider.terminate(envelope)
        await registry.aclose()
