"""``sandboxctl desktop attach|open`` and ``sandboxctl terminal attach|open``: watch a lease's box.

``attach`` holds the lease as a viewer, brings the plane up and prints the viewer cell (edge URL,
short-lived stream token, expiry, mode); ``--json`` prints it whole for scripts, token included,
which is the only way a token leaves this command. The token is a ``view`` token (watch only)
unless ``--control`` asks for one that may also type and move the pointer; the edge enforces it.
``open`` does the same, then serves a local page (noVNC for the desktop, xterm.js for the
terminal) on 127.0.0.1 that fetches the cell from this process and offers the token as a
WebSocket subprotocol (never in a URL). While it runs, :class:`ViewerSession` keeps the cell
valid and current: it renews the token (re-attaching with the same viewer id, which also
refreshes the viewer holder) well before it expires, heartbeats the holder in between, and
re-attaches at once when the lease's epoch changes, learnt from a
``stream.url.rotated`` event on the session's NATS subject (:class:`SessionEventFeed`) or from a
heartbeat refused with ``StaleEpoch``; the page sees the new cell and reconnects. Interrupted, it
releases the viewer holder.

The page URL carries a random path segment so that other local users cannot read the cell; it is
not the stream token. Its scripts and styles come from local files only (Debian's ``novnc``, the
npm package ``@xterm/xterm`` installed by ``scripts/install``); nothing is loaded from the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import secrets
import signal
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import typer

from cli.output import emit, fail, note
from sandbox.nats_auth import NatsAuth

Plane = Literal["desktop", "terminal"]

desktop_app = typer.Typer(help="Watch a lease's desktop (noVNC through the token-checking edge).", no_args_is_help=True)
terminal_app = typer.Typer(
    help="Open a lease's terminal (xterm.js through the token-checking edge).", no_args_is_help=True
)

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print the cell as one JSON document, token included (for scripts).")
Viewer = typer.Option(None, "--viewer", help="Viewer id (default: a new uuid).")
Subject = typer.Option(None, "--subject", help="Who is watching (recorded with the viewer holder).")
Geometry = typer.Option("1280x800", "--geometry", help="Desktop size for a desktop that is not up yet.")
Control = typer.Option(
    False, "--control", help="Mint a control token (input allowed); the default is a view token (watch only)."
)
PagePort = typer.Option(0, "--port", help="Local port of the viewer page (default: any free port).")

NOVNC_DIRS = (Path("/usr/share/novnc"),)
"""Where noVNC is looked for (Debian ``novnc``); ``SANDBOX_NOVNC_DIR`` comes first."""
XTERM_PREFIX = Path(sys.prefix) / "share" / "sandbox-web"
"""Where ``scripts/install`` puts the npm package ``@xterm/xterm`` (under the venv, no root needed)."""
XTERM_VERSION = "5.5.0"
XTERM_INSTALL = (
    f"npm install --prefix {XTERM_PREFIX} --no-save --no-package-lock --no-audit --no-fund @xterm/xterm@{XTERM_VERSION}"
)
"""The command that installs xterm.js where :func:`find_assets` looks first."""
XTERM_DIRS = (
    XTERM_PREFIX / "node_modules" / "@xterm" / "xterm",
    Path("/usr/share/nodejs/@xterm/xterm"),
    Path("/usr/local/lib/node_modules/@xterm/xterm"),
    Path("/usr/lib/node_modules/@xterm/xterm"),
)
"""Where the npm ``@xterm/xterm`` package is looked for; ``SANDBOX_XTERM_DIR`` comes first."""
RENEW_MARGIN_SECONDS = 30.0
"""Renew a token this long before it expires (a quarter of its lifetime when that is shorter)."""
RETRY_MAX_SECONDS = 10.0
"""Longest wait between attempts to re-attach after a failure."""


def register(app: typer.Typer) -> None:
    """Attach ``desktop`` and ``terminal`` to the root app."""
    app.add_typer(desktop_app, name="desktop")
    app.add_typer(terminal_app, name="terminal")


# --------------------------------------------------------------------------- the viewer page

DESKTOP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>desktop - sandbox</title>
<style>html,body{margin:0;height:100%;background:#222;color:#ddd;font:14px sans-serif}
#status{position:fixed;top:0;right:0;padding:4px 8px;background:#0008;z-index:1}
#screen{width:100%;height:100%}</style></head>
<body><div id="status">connecting</div><div id="screen"></div>
<script type="module">
import RFB from './novnc/core/rfb.js';
const status = document.getElementById('status');
window.viewerState = 'connecting';
window.viewerEpoch = null;
function show(state) { window.viewerState = state; status.textContent = state; }
let rfb = null;
let cell = null;
function connect(next) {
  cell = next;
  window.viewerEpoch = cell.epoch;
  show('connecting');
  // The token travels as a WebSocket subprotocol; 'binary' must come first for websockify.
  const current = new RFB(document.getElementById('screen'), cell.url, {wsProtocols: ['binary', cell.token]});
  rfb = current;
  current.scaleViewport = true;
  // A view token reaches a view-only VNC server anyway; this only stops sending input.
  current.viewOnly = cell.mode !== 'control';
  current.addEventListener('connect', () => { if (rfb === current) show('connected'); });
  current.addEventListener('disconnect', (e) => {
    if (rfb === current) show(e.detail.clean ? 'disconnected' : 'refused');
  });
}
// The cell changes when the token is renewed and when the lease's box is replaced (new epoch,
// new URL): reconnect for a new box, after a clean disconnect, or after a refusal once renewed.
async function watch() {
  try {
    const next = await (await fetch('./cell.json', {cache: 'no-store'})).json();
    const moved = !cell || next.epoch !== cell.epoch || next.url !== cell.url;
    const renewed = window.viewerState === 'refused' && next.token !== cell.token;
    const retry = window.viewerState === 'disconnected' || renewed;
    if (moved || retry) {
      if (rfb) { const old = rfb; rfb = null; try { old.disconnect(); } catch (e) {} }
      connect(next);
    }
  } catch (e) { show('error: ' + e); }
  setTimeout(watch, 1000);
}
watch();
</script></body></html>
"""

TERMINAL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>terminal - sandbox</title>
<link rel="stylesheet" href="./xterm/css/xterm.css">
<style>html,body{margin:0;height:100%;background:#000}#term{height:100%}
#status{position:fixed;top:0;right:0;padding:4px 8px;background:#0008;color:#ddd;font:14px sans-serif;z-index:1}</style>
</head><body><div id="status">connecting</div><div id="term"></div>
<script src="./xterm/lib/xterm.js"></script>
<script>
const status = document.getElementById('status');
window.viewerState = 'connecting';
window.viewerEpoch = null;
function show(state) { window.viewerState = state; status.textContent = state; }
const term = new Terminal({cols: 100, rows: 30});
window.term = term;
term.open(document.getElementById('term'));
term.focus();
const enc = new TextEncoder();
let ws = null;
let cell = null;
// ttyd's protocol: the 'tty' subprotocol; each frame starts with a command byte,
// '0' input/output, '1' resize (client to server).
function connect(next) {
  cell = next;
  window.viewerEpoch = cell.epoch;
  // A view token reaches a read-only ttyd anyway; this only stops sending keystrokes.
  term.options.disableStdin = cell.mode !== 'control';
  show('connecting');
  let opened = false;
  const sock = new WebSocket(cell.url, ['tty', cell.token]);
  ws = sock;
  sock.binaryType = 'arraybuffer';
  sock.onopen = () => {
    opened = true;
    if (ws === sock) show('connected');
    sock.send(enc.encode(JSON.stringify({AuthToken: '', columns: term.cols, rows: term.rows})));
  };
  sock.onmessage = (ev) => {
    const data = new Uint8Array(ev.data);
    if (data[0] === 48) term.write(data.subarray(1));
  };
  sock.onclose = () => { if (ws === sock) show(opened ? 'disconnected' : 'refused'); };
}
term.onData((d) => { if (ws && ws.readyState === 1) ws.send(enc.encode('0' + d)); });
term.onResize((size) => {
  if (ws && ws.readyState === 1) ws.send(enc.encode('1' + JSON.stringify({columns: size.cols, rows: size.rows})));
});
// The cell changes when the token is renewed and when the lease's box is replaced (new epoch,
// new URL): reconnect for a new box, after a clean disconnect, or after a refusal once renewed.
async function watch() {
  try {
    const next = await (await fetch('./cell.json', {cache: 'no-store'})).json();
    const moved = !cell || next.epoch !== cell.epoch || next.url !== cell.url;
    const renewed = window.viewerState === 'refused' && next.token !== cell.token;
    const retry = window.viewerState === 'disconnected' || renewed;
    if (moved || retry) {
      if (ws) { const old = ws; ws = null; old.close(); }
      if (cell && moved) term.reset();
      connect(next);
    }
  } catch (e) { show('error: ' + e); }
  setTimeout(watch, 1000);
}
watch();
</script></body></html>
"""


def find_assets(plane: Plane) -> Path:
    """The noVNC (desktop) or xterm.js (terminal) directory the page is served with.

    Raises:
        FileNotFoundError: Neither the environment override nor a known location has them.
    """
    env: str = "SANDBOX_NOVNC_DIR" if plane == "desktop" else "SANDBOX_XTERM_DIR"
    dirs: tuple[Path, ...] = NOVNC_DIRS if plane == "desktop" else XTERM_DIRS
    probe: str = "core/rfb.js" if plane == "desktop" else "lib/xterm.js"
    candidates = [Path(os.environ[env])] if os.environ.get(env) else []
    for directory in [*candidates, *dirs]:
        if (directory / probe).is_file():
            return directory
    hint = "apt-get install novnc" if plane == "desktop" else XTERM_INSTALL
    raise FileNotFoundError(f"{probe} not found in {[str(d) for d in [*candidates, *dirs]]}: {hint} or set {env}")


class ViewerPage:
    """A local HTTP server for one viewer page: the page, its assets and the current cell.

    Args:
        plane: Which page to serve.
        cell: Returns the current cell as a JSON-able dict (``url``, ``token``, ...); called per request.
        assets: The noVNC or xterm.js directory.
        port: Local port (0: any free port).
    """

    def __init__(self, plane: Plane, cell: Callable[[], dict[str, Any]], assets: Path, *, port: int = 0) -> None:
        self.plane = plane
        self.secret = secrets.token_urlsafe(16)
        page = (DESKTOP_PAGE if plane == "desktop" else TERMINAL_PAGE).encode()
        prefix = f"/{self.secret}/"
        mount = "novnc/" if plane == "desktop" else "xterm/"
        root = assets.resolve()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the page's own log is noise
                return

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if not path.startswith(prefix):
                    self.send_error(404)
                    return
                rest = path[len(prefix) :]
                if rest in ("", "index.html"):
                    self._send(page, "text/html; charset=utf-8")
                elif rest == "cell.json":
                    self._send(json.dumps(cell()).encode(), "application/json")
                elif rest.startswith(mount):
                    target = (root / rest[len(mount) :]).resolve()
                    if root not in target.parents or not target.is_file():
                        self.send_error(404)
                        return
                    kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                    if target.suffix == ".js":
                        kind = "text/javascript"
                    self._send(target.read_bytes(), kind)
                else:
                    self.send_error(404)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="viewer-page", daemon=True)

    @property
    def url(self) -> str:
        """The page URL (its random path segment is not the stream token)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/{self.secret}/"

    def start(self) -> ViewerPage:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------- commands


def _cell_json(cell: Any, *, with_token: bool) -> dict[str, Any]:
    data: dict[str, Any] = cell.model_dump(mode="json")
    if not with_token:
        data.pop("token", None)
    return data


def _attach(
    plane: Plane,
    workspace: str,
    group: str,
    viewer: str | None,
    subject: str | None,
    geometry: str,
    data_dir: Path | None,
    mode: Literal["view", "control"] = "view",
) -> Any:
    from cli.lease import _run, _settings

    settings = _settings(data_dir)

    async def action(leases: Any) -> Any:
        return await leases.attach_viewer(
            workspace, group, viewer_id=viewer, subject=subject, plane=plane, geometry=geometry, mode=mode
        )

    return _run(settings, action)


def _attach_command(plane: Plane) -> Callable[..., None]:
    def attach(
        workspace: str = typer.Argument(..., help="Workspace id."),
        group: str = typer.Argument(..., help="Sandbox group id."),
        viewer: str | None = Viewer,
        subject: str | None = Subject,
        geometry: str = Geometry,
        control: bool = Control,
        data_dir: Path | None = DataDir,
        json_out: bool = Json,
    ) -> None:
        mode: Literal["view", "control"] = "control" if control else "view"
        cell = _attach(plane, workspace, group, viewer, subject, geometry, data_dir, mode)
        if json_out:
            emit(_cell_json(cell, with_token=True), True)
            return
        emit(f"{plane} of {cell.lease_id} epoch={cell.epoch}: {cell.url} ({cell.transport}, {cell.mode})", False)
        emit(f"viewer={cell.viewer_id} token expires {cell.expires_at.isoformat()} (token: use --json)", False)
        again = " --control" if control else ""
        note(f"next: sandboxctl {plane} open {workspace} {group} --viewer {cell.viewer_id}{again}")

    attach.__doc__ = (
        f"Hold the lease as a viewer, bring the {plane} up and print the viewer cell (view only unless --control)."
    )
    return attach


class ViewerSession:
    """Keeps one viewer's cell valid and current for as long as ``open`` runs, then releases the viewer.

    - The token is renewed by re-attaching (same viewer id, which also refreshes the viewer holder)
      ``min(renew_margin, a quarter of its lifetime)`` before it expires.
    - In between, the viewer holder is heartbeaten; a heartbeat refused with ``StaleEpoch`` or
      ``HolderNotFound`` means the box was replaced or the viewer dropped: re-attach at once.
    - :meth:`notice_rotation` (fed by :class:`SessionEventFeed`) re-attaches at once when an event
      names an epoch newer than the cell's.
    - A failed re-attach keeps the old cell and is retried with backoff up to :data:`RETRY_MAX_SECONDS`.

    Args:
        attach: Attaches the viewer (idempotent) and returns a fresh cell.
        heartbeat: Heartbeats the viewer holder of a cell; returns the holder's new expiry, if known.
        release: Releases the viewer holder.
        heartbeat_interval: Seconds between heartbeats (shortened to a third of the holder's TTL
            once a heartbeat reports its expiry).
        renew_margin: Renew this long before the token expires, at most.
        report: Called with a short line whenever the cell changes or something fails.
    """

    def __init__(
        self,
        attach: Callable[[], Awaitable[Any]],
        heartbeat: Callable[[Any], Awaitable[datetime | None]],
        release: Callable[[], Awaitable[object]],
        *,
        heartbeat_interval: float,
        renew_margin: float = RENEW_MARGIN_SECONDS,
        report: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self._attach = attach
        self._heartbeat = heartbeat
        self._release = release
        self._interval = heartbeat_interval
        self._margin = renew_margin
        self._report = report
        self.cell: Any = None
        self.attaches = 0
        self._rotated = asyncio.Event()
        self._renew_at = 0.0
        self._beat_at = 0.0
        self._retry = 1.0

    def snapshot(self) -> dict[str, Any]:
        """The current cell as the page reads it (token included)."""
        return _cell_json(self.cell, with_token=True)

    async def start(self) -> Any:
        """The first attach (errors propagate: there is nothing to show yet)."""
        self._adopt(await self._attach())
        return self.cell

    def notice_rotation(self, epoch: int) -> None:
        """An event says the lease moved to ``epoch``: re-attach if that is newer than the cell's."""
        if self.cell is not None and epoch > self.cell.epoch:
            self._rotated.set()

    def _adopt(self, cell: Any) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        left = (cell.expires_at - datetime.now(UTC)).total_seconds()
        self._renew_at = now + max(left - min(self._margin, left / 4), 0.5)
        self._beat_at = now + self._interval
        self.cell = cell
        self.attaches += 1
        self._retry = 1.0

    async def _reattach(self, why: str) -> None:
        from sandbox.errors import SandboxError

        before = self.cell
        try:
            cell = await self._attach()
        except SandboxError as err:
            self._report(f"re-attaching ({why}) failed: {err.error_type}: {err.message}; retrying in {self._retry:g}s")
            self._renew_at = asyncio.get_running_loop().time() + self._retry
            self._retry = min(self._retry * 2, RETRY_MAX_SECONDS)
            return
        self._adopt(cell)
        if before is None or cell.epoch != before.epoch or cell.url != before.url:
            self._report(f"re-attached ({why}): epoch {getattr(before, 'epoch', None)} -> {cell.epoch}, {cell.url}")

    async def _beat(self) -> None:
        from sandbox.errors import HolderNotFound, SandboxError, StaleEpoch

        loop = asyncio.get_running_loop()
        try:
            expires = await self._heartbeat(self.cell)
        except (StaleEpoch, HolderNotFound) as err:
            await self._reattach(f"heartbeat: {err.error_type}")
            return
        except SandboxError as err:  # transient: the holder's TTL decides, and the next beat retries
            self._report(f"heartbeat failed: {err.error_type}: {err.message}")
            self._beat_at = loop.time() + min(self._interval, RETRY_MAX_SECONDS)
            return
        interval = self._interval
        if expires is not None:
            interval = max(0.5, min(interval, (expires - datetime.now(UTC)).total_seconds() / 3))
        self._beat_at = loop.time() + interval

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the cell fresh until ``stop`` is set; then release the viewer holder (best effort)."""
        from sandbox.errors import SandboxError

        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                wake = min(self._renew_at, self._beat_at) - loop.time()
                rotated = asyncio.ensure_future(self._rotated.wait())
                await asyncio.wait({stopped, rotated}, timeout=max(wake, 0), return_when=asyncio.FIRST_COMPLETED)
                rotated.cancel()
                if stop.is_set():
                    break
                # Each step may wait on Temporal (a re-attach waits for a new box): Ctrl-C must not.
                step = asyncio.ensure_future(self._step(loop.time()))
                await asyncio.wait({stopped, step}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await step
        finally:
            stopped.cancel()
            with contextlib.suppress(SandboxError):
                await self._release()

    async def _step(self, now: float) -> None:
        if self._rotated.is_set():
            self._rotated.clear()
            await self._reattach("stream.url.rotated")
        elif now >= self._renew_at:
            await self._reattach("token renewal")
        elif now >= self._beat_at:
            await self._beat()


class SessionEventFeed:
    """Follows a session's NATS events subject and hands each ``stream.url.rotated`` epoch to ``on_rotated``.

    Optional by design: without NATS, viewers still learn of a new epoch from their heartbeat. The
    connection is made in the background and retried every ``retry_after`` seconds.

    Args:
        nats_url: The NATS server.
        subject: ``session.<workspace>.<group>.events``.
        on_rotated: Called with the new lease epoch of each rotation event.
        report: Called with a short line when NATS cannot be reached.
        retry_after: Seconds between connect attempts.
        connect_timeout: Seconds one connect attempt may take.
        auth: The read-only event identity (``NatsAuth.for_role(settings, "events")``).
    """

    def __init__(
        self,
        nats_url: str,
        subject: str,
        on_rotated: Callable[[int], None],
        *,
        report: Callable[[str], None] = lambda _line: None,
        retry_after: float = 10.0,
        connect_timeout: float = 3.0,
        auth: NatsAuth | None = None,
    ) -> None:
        self.nats_url = nats_url
        self._auth = auth or NatsAuth()
        self.subject = subject
        self._on_rotated = on_rotated
        self._report = report
        self._retry_after = retry_after
        self._connect_timeout = connect_timeout
        self._task: asyncio.Task[None] | None = None
        self._nc: Any = None
        self.subscribed = asyncio.Event()

    def start(self) -> SessionEventFeed:
        """Begin connecting and following in the background."""
        self._task = asyncio.ensure_future(self._follow())
        return self

    async def _follow(self) -> None:
        import nats

        from sandbox.nats_dial import dial_within
        from workflows.models.session_events import parse_stream_url_rotated

        async def quiet(*_args: Any) -> None:
            return None

        async def on_message(msg: Any) -> None:
            event = parse_stream_url_rotated(msg.data)
            if event is not None:
                self._on_rotated(event.lease_epoch)

        warned = False
        while self._nc is None:
            try:
                self._nc = await dial_within(
                    lambda: nats.connect(
                        self.nats_url,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        connect_timeout=max(1, int(self._connect_timeout)),
                        error_cb=quiet,
                        disconnected_cb=quiet,
                        **self._auth.connect_options(),
                    ),
                    self._connect_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not warned:
                    self._report(
                        f"no session events from NATS at {self.nats_url} ({type(err).__name__}); "
                        "a replaced box is noticed at the next heartbeat"
                    )
                    warned = True
                await asyncio.sleep(self._retry_after)
        await self._nc.subscribe(self.subject, cb=on_message)
        await self._nc.flush()
        self.subscribed.set()

    async def aclose(self) -> None:
        """Stop following and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


def _open_command(plane: Plane) -> Callable[..., None]:
    def open_(
        workspace: str = typer.Argument(..., help="Workspace id."),
        group: str = typer.Argument(..., help="Sandbox group id."),
        viewer: str | None = Viewer,
        subject: str | None = Subject,
        geometry: str = Geometry,
        control: bool = Control,
        port: int = PagePort,
        data_dir: Path | None = DataDir,
    ) -> None:
        from cli.lease import _settings
        from client import LeaseClient
        from client.lease_client import HEARTBEAT_INTERVAL_SECONDS, validate_lease_ids
        from sandbox.errors import SandboxError
        from worker import connect
        from workflows.models.session_events import session_events_subject

        try:
            assets = find_assets(plane)
        except FileNotFoundError as err:
            fail(str(err))
        settings = _settings(data_dir)
        viewer_id = viewer or str(uuid.uuid4())
        try:
            validate_lease_ids(workspace, group)
        except SandboxError as err:
            fail(f"{err.error_type}: {err.message}", 2)

        async def main() -> None:
            leases = LeaseClient(await connect(settings), settings)

            async def attach() -> Any:
                return await leases.attach_viewer(
                    workspace,
                    group,
                    viewer_id=viewer_id,
                    subject=subject,
                    plane=plane,
                    geometry=geometry,
                    mode="control" if control else "view",
                )

            async def heartbeat(cell: Any) -> datetime | None:
                result = await leases.heartbeat(workspace, group, cell.viewer_id, cell.epoch, kind="viewer")
                expires: datetime | None = result.expires_at
                return expires

            async def release() -> object:
                return await leases.release(workspace, group, viewer_id, kind="viewer")

            session = ViewerSession(
                attach,
                heartbeat,
                release,
                heartbeat_interval=min(HEARTBEAT_INTERVAL_SECONDS["viewer"], settings.holder_ttl_seconds / 3),
                report=note,
            )
            current = await session.start()
            page = ViewerPage(plane, session.snapshot, assets, port=port).start()
            feed = SessionEventFeed(
                settings.nats_url,
                session_events_subject(workspace, group),
                session.notice_rotation,
                report=note,
                auth=NatsAuth.best_effort(settings, "events"),
            ).start()
            emit(page.url, False)
            what = "controlling" if current.mode == "control" else "viewing"
            note(f"{what} the {plane} of {current.lease_id}; Ctrl-C to stop (the viewer holder is released)")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await session.run(stop)
            finally:
                page.stop()
                await feed.aclose()
            note("viewer released")

        try:
            asyncio.run(main())
        except SandboxError as err:
            fail(f"{err.error_type}: {err.message}", 2)

    open_.__doc__ = (
        f"Attach a viewer and serve a local {plane} page; prints its URL, keeps the token and the box current, "
        "releases on exit (view only unless --control)."
    )
    return open_


desktop_app.command("attach")(_attach_command("desktop"))
desktop_app.command("open")(_open_command("desktop"))
terminal_app.command("attach")(_attach_command("terminal"))
terminal_app.command("open")(_open_command("terminal"))
