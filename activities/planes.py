"""Activities of the desktop and terminal planes: bring a plane up in a box, expose it, tear it down.

Each ``ensure`` runs the plane's in-box script (:mod:`sandbox.inbox_scripts`) once: the script is
idempotent under ``flock``, so a healthy plane answers in one exec and concurrent ensures bring up
exactly one stack. The box's derived stream-token key for (lease, epoch) is computed here from
the worker's root secret and handed to the script on stdin; the script stores it in a 0600 file
that the edge reads. It never appears on a command line, in a log or in a result, and tokens are
minted by the client, never here (tokens do not go through Temporal history).

Boxes of the local provider share the host's network namespace, so their edges listen on any
free port (chosen atomically by the kernel) and their X displays are picked by Xvfb itself
(``-displayfd``): two warm leases get two independent desktops. Other backends use the fixed
in-box ports (6080 desktop, 7681 terminal) and let the provider expose them.

:func:`runtime_desktop` tells capability negotiation what desktop the worker can run in a
backend's boxes beyond the backend's static descriptor: for ``local``, whether the host has the
desktop stack's tools (boxes run the host's binaries), ffmpeg and xdotool.

Errors: :class:`~sandbox.errors.DisplayStackError` (with ``stage``),
:class:`~sandbox.errors.DisplayStackUnsupported`, :class:`~sandbox.errors.TerminalServerError`,
:class:`~sandbox.errors.TerminalServerUnsupported` and
:class:`~sandbox.errors.StreamPortUnavailable`, mapped by :func:`maps_provider_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final, Literal

from temporalio import activity

from activities.models import (
    ENSURE_DISPLAY_STACK,
    ENSURE_PLANE,
    ENSURE_TERMINAL_SERVER,
    EXPOSE_STREAM_PORT,
    TEAR_DOWN_DISPLAY_STACK,
    TEAR_DOWN_PLANES,
    TEAR_DOWN_TERMINAL_SERVER,
    DisplayStackRequest,
    DisplayStackResult,
    ExposeStreamPortRequest,
    PlaneRequest,
    TearDownPlanesRequest,
    TerminalServerRequest,
    TerminalServerResult,
)
from activities.provider_errors import maps_provider_errors
from providers.base import BoxSession, Envelope
from providers.registry import ProviderRegistry
from sandbox.capabilities import RuntimeDesktop
from sandbox.errors import (
    BoxNotFound,
    DisplayStackError,
    DisplayStackUnsupported,
    ExecTimeout,
    InvalidRequest,
    ProviderError,
    ProviderUnavailable,
    StreamPortUnavailable,
    TerminalServerError,
    TerminalServerUnsupported,
    Unsupported,
)
from sandbox.inbox_scripts import (
    EXIT_UNAVAILABLE,
    InboxScripts,
    ScriptName,
    desktop_stage,
    host_edge_environment,
    missing_tools,
    parse_desktop_up,
    parse_terminal_up,
    terminal_stage,
)
from sandbox.settings import Settings
from sandbox.stream_token import DEFAULT_STREAM_PORT, derive_lease_key, root_secret_for
from sandbox.stream_url import build_stream_url
from workflows.models import BoxEnvelope, PlaneEndpoint

__all__ = ["LOCAL_BOX_PATH", "PlaneActivities", "runtime_desktop"]

log = logging.getLogger(__name__)

DESKTOP_TRANSPORT: Final = "vnc-ws"
TERMINAL_TRANSPORT: Final = "pty-ws"
TERMINAL_STREAM_PORT: Final = 7681
# Below the lease workflow's 60 s start-to-close timeout, so a stuck bring-up is reported typed.
DISPLAY_STACK_TIMEOUT_SECONDS: Final = 50.0
TERMINAL_SERVER_TIMEOUT_SECONDS: Final = 50.0
TEAR_DOWN_TIMEOUT_SECONDS: Final = 30.0
# Backends whose boxes share the worker host's network namespace (ports must not collide) and
# see its file system (scripts, edge interpreter and ttyd run in place).
_HOST_SHARING_BACKENDS: Final = frozenset({"local"})
LOCAL_BOX_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The PATH commands in a local box get (the host's binaries, see :mod:`providers.local`)."""
# What desktop-up, the recording's ffmpeg and computer use run (sandbox/scripts, activities/*).
_DESKTOP_TOOLS: Final = ("Xvfb", "x11vnc", "xauth", "setsid", "flock")
_RECORDING_TOOLS: Final = ("ffmpeg", "ffprobe")
_COMPUTER_USE_TOOLS: Final = ("xdotool", "import")
_GEOMETRY_RE: Final = re.compile(r"^([1-9][0-9]{2,4})x([1-9][0-9]{2,4})$")
_MAX_SIDE: Final = 8192
_TEAR_DOWN_SCRIPT: Final = (
    'bash "$1"; bash "$2"; rm -f "${SANDBOX_EDGE_DIR:-${TMPDIR:-/tmp}/.sandbox-edge}/key"; echo "SANDBOX_PLANES_DOWN"'
)


@contextlib.asynccontextmanager
async def _heartbeating(interval: float = 2.0) -> AsyncIterator[None]:
    """Heartbeat while the block runs, when running as an activity (tests call the methods directly)."""
    if not activity.in_activity():
        yield
        return

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


def _parse_geometry(geometry: str) -> tuple[int, int]:
    m = _GEOMETRY_RE.fullmatch(geometry)
    if m is None or int(m[1]) > _MAX_SIDE or int(m[2]) > _MAX_SIDE:
        raise InvalidRequest(f"geometry must be <width>x<height> with sides 100..{_MAX_SIDE}, not {geometry!r}")
    return int(m[1]), int(m[2])


def _tail(data: bytes, limit: int = 400) -> str:
    return data.decode("utf-8", errors="replace").strip()[-limit:]


def runtime_desktop(backend: str, *, path: str = LOCAL_BOX_PATH) -> RuntimeDesktop | None:
    """What desktop this worker can run in ``backend``'s boxes beyond its descriptor (for negotiation).

    Only ``local`` boxes run the host's binaries, so only there does the host decide: the desktop
    stack's tools and the edge's interpreter on ``path`` make ``display``; ffmpeg and ffprobe add
    ``recording``; xdotool and ``import`` add ``computer_use``. None for every other backend (its
    descriptor decides). Pass the result as the negotiation context's ``runtime_desktop``.
    """
    if backend not in _HOST_SHARING_BACKENDS:
        return None

    def have(tools: Iterable[str]) -> bool:
        return all(shutil.which(tool, path=path) is not None for tool in tools)

    edge = Path(host_edge_environment()["SANDBOX_EDGE_PYTHON"])
    display = have(_DESKTOP_TOOLS) and edge.is_file()
    return RuntimeDesktop(
        display=display,
        recording=display and have(_RECORDING_TOOLS),
        computer_use=display and have(_COMPUTER_USE_TOOLS),
    )


class PlaneActivities:
    """Desktop and terminal plane activities; one instance per worker.

    Args:
        providers: The worker's provider registry.
        settings: Worker settings (the stream-token root secret comes from them).
    """

    def __init__(self, providers: ProviderRegistry, settings: Settings) -> None:
        self._providers = providers
        self._settings = settings
        self._sessions: dict[tuple[str, str], BoxSession] = {}
        self._scripts: dict[tuple[str, str], InboxScripts] = {}
        self._root_secret: bytes | None = None

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """Every plane activity, for the worker's activity list."""
        return [
            self.ensure_display_stack,
            self.tear_down_display_stack,
            self.ensure_terminal_server,
            self.tear_down_terminal_server,
            self.expose_stream_port,
            self.ensure_plane,
            self.tear_down_planes,
        ]

    # -- helpers --------------------------------------------------------------------------------

    def _lease_key(self, lease_id: str, epoch: int) -> bytes:
        if self._root_secret is None:
            self._root_secret = root_secret_for(self._settings)
        return derive_lease_key(self._root_secret, lease_id, epoch)

    async def _session(self, backend: str, envelope: BoxEnvelope) -> BoxSession:
        key = (backend, envelope.instance_id)
        session = self._sessions.get(key)
        if session is None:
            provider = self._providers.get(backend)
            session = await provider.resume(Envelope(**envelope.model_dump()))
            self._sessions[key] = session
        return session

    def _forget(self, backend: str, instance_id: str) -> None:
        self._sessions.pop((backend, instance_id), None)
        self._scripts.pop((backend, instance_id), None)

    async def _inbox(self, backend: str, session: BoxSession) -> InboxScripts:
        key = (backend, session.instance_id)
        scripts = self._scripts.get(key)
        if scripts is None:
            scripts = (
                InboxScripts.on_host() if backend in _HOST_SHARING_BACKENDS else await InboxScripts.install(session)
            )
            self._scripts[key] = scripts
        return scripts

    async def _run(
        self,
        backend: str,
        envelope: BoxEnvelope,
        script: ScriptName,
        *,
        env: dict[str, str],
        timeout: float,
        stdin: bytes | None = None,
        args: tuple[str, ...] = (),
    ) -> tuple[int, str, str]:
        """Run one in-box script; (exit code, stdout, stderr). Provider errors propagate."""
        try:
            session = await self._session(backend, envelope)
            scripts = await self._inbox(backend, session)
            if backend in _HOST_SHARING_BACKENDS:
                env = {**host_edge_environment(), **env}
            result = await session.exec(scripts.command(script, *args), env=env, stdin=stdin, timeout=timeout)
        except BoxNotFound:
            self._forget(backend, envelope.instance_id)
            raise
        return result.exit_code, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")

    # -- desktop --------------------------------------------------------------------------------

    async def _ensure_display_stack(self, req: DisplayStackRequest) -> DisplayStackResult:
        width, height = _parse_geometry(req.geometry)
        if not 24 <= req.dpi <= 960:
            raise InvalidRequest(f"dpi must be 24..960, not {req.dpi}")
        key = self._lease_key(req.lease_id, req.epoch)
        env = {
            "DESKTOP_W": str(width),
            "DESKTOP_H": str(height),
            "DESKTOP_DPI": str(req.dpi),
            "STREAM_PORT": "0" if req.backend in _HOST_SHARING_BACKENDS else str(DEFAULT_STREAM_PORT),
            "SANDBOX_EDGE_KEY_STDIN": "1",
        }
        try:
            code, out, err = await self._run(
                req.backend,
                req.envelope,
                "desktop-up",
                env=env,
                stdin=key.hex().encode() + b"\n",
                timeout=DISPLAY_STACK_TIMEOUT_SECONDS,
            )
        except ExecTimeout as exc:
            raise DisplayStackError(
                f"desktop-up ran past {exc.timeout:g} s and was killed", stage="timeout", retryable=True
            ) from exc
        except Unsupported as exc:
            raise DisplayStackUnsupported(f"this box cannot run a desktop: {exc.message}") from exc
        if code == 0:
            up = parse_desktop_up(out)
            if up is None:
                raise DisplayStackError(f"desktop-up exited 0 without its marker line: {out[-300:]!r}")
            return DisplayStackResult(
                port=up.port,
                geometry=up.geometry,
                dpi=up.dpi,
                display=up.display,
                already_up=up.already,
                marker=up.marker,
            )
        if code == EXIT_UNAVAILABLE:
            missing = " ".join(missing_tools(out)) or "a required tool"
            raise DisplayStackUnsupported(f"this box cannot run a desktop: {missing} is missing")
        stage = desktop_stage(code, out + err)
        raise DisplayStackError(
            f"desktop-up failed at stage {stage} (exit {code}): {_tail(err.encode()) or _tail(out.encode())}",
            stage=stage,
            retryable=stage == "lock",
        )

    @activity.defn(name=ENSURE_DISPLAY_STACK)
    @maps_provider_errors
    async def ensure_display_stack(self, req: DisplayStackRequest) -> DisplayStackResult:
        """Bring up the box's desktop (Xvfb, x11vnc, websockify edge) if it is not healthy; idempotent.

        Raises:
            InvalidRequest: Bad geometry or dpi.
            DisplayStackUnsupported: The box cannot run a desktop (no exec, or a tool is missing).
            DisplayStackError: A stage died; ``stage`` names it.
            BoxNotFound: The box is gone.
        """
        async with _heartbeating():
            return await self._ensure_display_stack(req)

    @activity.defn(name=TEAR_DOWN_DISPLAY_STACK)
    @maps_provider_errors
    async def tear_down_display_stack(self, req: TearDownPlanesRequest) -> None:
        """Stop the box's desktop (best effort; a gone box has nothing to stop)."""
        await self._tear_down(req, ("desktop-down",))

    # -- terminal -------------------------------------------------------------------------------

    async def _ensure_terminal_server(self, req: TerminalServerRequest) -> TerminalServerResult:
        key = self._lease_key(req.lease_id, req.epoch)
        env = {
            "TERMINAL_PORT": "0" if req.backend in _HOST_SHARING_BACKENDS else str(TERMINAL_STREAM_PORT),
            "SANDBOX_EDGE_KEY_STDIN": "1",
        }
        try:
            code, out, err = await self._run(
                req.backend,
                req.envelope,
                "terminal-up",
                env=env,
                stdin=key.hex().encode() + b"\n",
                timeout=TERMINAL_SERVER_TIMEOUT_SECONDS,
            )
        except ExecTimeout as exc:
            raise TerminalServerError(
                f"terminal-up ran past {exc.timeout:g} s and was killed", stage="timeout", retryable=True
            ) from exc
        except Unsupported as exc:
            return TerminalServerResult(available=False, reason=f"unsupported: {exc.message}")
        if code == 0:
            up = parse_terminal_up(out)
            if up is None:
                raise TerminalServerError(f"terminal-up exited 0 without its marker line: {out[-300:]!r}")
            return TerminalServerResult(available=True, port=up.port, already_up=up.already, marker=up.marker)
        if code == EXIT_UNAVAILABLE:
            missing = " ".join(missing_tools(out)) or "a required tool"
            return TerminalServerResult(available=False, reason=f"missing: {missing}")
        stage = terminal_stage(code, out + err)
        raise TerminalServerError(
            f"terminal-up failed at stage {stage} (exit {code}): {_tail(err.encode()) or _tail(out.encode())}",
            stage=stage,
            retryable=stage == "lock",
        )

    @activity.defn(name=ENSURE_TERMINAL_SERVER)
    @maps_provider_errors
    async def ensure_terminal_server(self, req: TerminalServerRequest) -> TerminalServerResult:
        """Bring up the box's terminal (ttyd behind the edge) if it is not healthy; idempotent.

        A box without ttyd (or without exec) is not an error: the result says ``available=False``
        and why, and the terminal plane degrades to the event feed.

        Raises:
            TerminalServerError: ttyd or its edge failed; ``stage`` names it.
            BoxNotFound: The box is gone.
        """
        async with _heartbeating():
            return await self._ensure_terminal_server(req)

    @activity.defn(name=TEAR_DOWN_TERMINAL_SERVER)
    @maps_provider_errors
    async def tear_down_terminal_server(self, req: TearDownPlanesRequest) -> None:
        """Stop the box's terminal (best effort; a gone box has nothing to stop)."""
        await self._tear_down(req, ("terminal-down",))

    # -- exposure -------------------------------------------------------------------------------

    async def _expose(
        self,
        backend: str,
        envelope: BoxEnvelope,
        plane: Literal["desktop", "terminal"],
        port: int,
        resolution: str | None,
    ) -> PlaneEndpoint:
        try:
            session = await self._session(backend, envelope)
            endpoint = await session.resolve_exposed_port(port)
        except BoxNotFound:
            self._forget(backend, envelope.instance_id)
            raise
        except (Unsupported, InvalidRequest, AttributeError, NotImplementedError) as exc:
            raise StreamPortUnavailable(f"the box cannot expose port {port}: {exc}") from exc
        except ProviderError as exc:
            if isinstance(exc, ProviderUnavailable | StreamPortUnavailable):
                raise
            raise StreamPortUnavailable(f"the box cannot expose port {port}: {exc.message}") from exc
        url = build_stream_url(endpoint)
        return PlaneEndpoint(
            plane=plane,
            url=url,
            host=endpoint.host,
            port=endpoint.port,
            tls=endpoint.tls,
            transport=DESKTOP_TRANSPORT if plane == "desktop" else TERMINAL_TRANSPORT,
            resolution=resolution,
        )

    @activity.defn(name=EXPOSE_STREAM_PORT)
    @maps_provider_errors
    async def expose_stream_port(self, req: ExposeStreamPortRequest) -> PlaneEndpoint:
        """Where a viewer reaches the plane's edge port from outside the box (no token in it).

        Raises:
            StreamPortUnavailable: The provider gives no usable endpoint for the port.
            BoxNotFound: The box is gone.
        """
        return await self._expose(req.backend, req.envelope, req.plane, req.port, req.resolution)

    # -- what the lease workflow calls ----------------------------------------------------------

    @activity.defn(name=ENSURE_PLANE)
    @maps_provider_errors
    async def ensure_plane(self, req: PlaneRequest) -> PlaneEndpoint:
        """Ensure one plane and its edge are up, and return where a viewer connects (tokens are minted by the client).

        Raises:
            DisplayStackUnsupported, TerminalServerUnsupported: The box cannot run this plane; the
                caller degrades the cell (transport null).
            DisplayStackError, TerminalServerError: The plane failed to come up.
            StreamPortUnavailable: The edge is up but cannot be reached from outside the box.
            BoxNotFound: The box is gone.
        """
        async with _heartbeating():
            if req.plane == "desktop":
                desktop = await self._ensure_display_stack(
                    DisplayStackRequest(
                        backend=req.backend,
                        envelope=req.envelope,
                        lease_id=req.lease_id,
                        epoch=req.epoch,
                        geometry=req.geometry,
                    )
                )
                return await self._expose(req.backend, req.envelope, "desktop", desktop.port, desktop.geometry)
            terminal = await self._ensure_terminal_server(
                TerminalServerRequest(
                    backend=req.backend, envelope=req.envelope, lease_id=req.lease_id, epoch=req.epoch
                )
            )
            if not terminal.available or terminal.port is None:
                raise TerminalServerUnsupported(f"this box cannot run a terminal: {terminal.reason}")
            return await self._expose(req.backend, req.envelope, "terminal", terminal.port, None)

    @activity.defn(name=TEAR_DOWN_PLANES)
    @maps_provider_errors
    async def tear_down_planes(self, req: TearDownPlanesRequest) -> None:
        """Stop every plane of the box and delete its edge key (best effort; a gone box is fine)."""
        await self._tear_down(req, ("desktop-down", "terminal-down"), drop_key=True)

    async def _tear_down(
        self, req: TearDownPlanesRequest, scripts: tuple[ScriptName, ...], *, drop_key: bool = False
    ) -> None:
        try:
            session = await self._session(req.backend, req.envelope)
            inbox = await self._inbox(req.backend, session)
            env = host_edge_environment() if req.backend in _HOST_SHARING_BACKENDS else {}
            if drop_key:
                paths = [inbox.command(name)[1] for name in scripts]
                argv = ["bash", "-c", _TEAR_DOWN_SCRIPT, "tear-down", *paths]
            else:
                argv = inbox.command(scripts[0])
            result = await session.exec(argv, env=env, timeout=TEAR_DOWN_TIMEOUT_SECONDS)
            if result.exit_code != 0:
                log.warning("tearing down %s of %s exited %d", scripts, req.envelope.instance_id, result.exit_code)
        except BoxNotFound:
            self._forget(req.backend, req.envelope.instance_id)
        except ProviderUnavailable:
            raise
        except (Unsupported, ExecTimeout, ProviderError) as exc:
            # Best effort: the box is about to be drained, which kills whatever is left.
            log.warning("tearing down %s of %s failed: %s", scripts, req.envelope.instance_id, exc)
