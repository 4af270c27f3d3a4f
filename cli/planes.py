"""``sandboxctl desktop attach|open`` and ``sandboxctl terminal attach|open``: watch a lease's box.

``attach`` holds the lease as a viewer, brings the plane up and prints the viewer cell (edge URL,
short-lived stream token, expiry, mode); ``--json`` prints it whole for scripts, token included,
which is the only way a token leaves this command. The token is a ``view`` token (watch only)
unless ``--control`` asks for one that may also type and move the pointer; the edge enforces it.
``open`` does the same, then serves a local page (noVNC for the desktop, xterm.js for the
terminal) on 127.0.0.1 that fetches the cell from this process and offers the token as a
WebSocket subprotocol (never in a URL). While it runs, :class:`client.viewer.ViewerSession` keeps the cell
valid and current: it renews the token (re-attaching with the same viewer id, which also
refreshes the viewer holder) well before it expires, heartbeats the holder in between, and
re-attaches at once when the lease's epoch changes, learnt from a
``stream.url.rotated`` event on the session's NATS subject (:class:`client.events.SessionEventFeed`) or from a
heartbeat refused with ``StaleEpoch``; the page sees the new cell and reconnects. Interrupted, it
releases the viewer holder.

The page URL carries a random path segment so that other local users cannot read the cell; it is
not the stream token. Its scripts and styles come from local files only (Debian's ``novnc``, the
npm package ``@xterm/xterm`` installed by ``scripts/install``); nothing is loaded from the internet.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import typer

from cli.exits import connected, load_settings, refuse, run, with_leases
from cli.output import emit, fail, note
from client.connection import connect_leases
from client.events import SessionEventFeed
from client.lease_client import LeaseClient, ViewerCell, validate_lease_ids
from client.viewer import Plane, ViewerSession, ViewMode, cell_document
from sandbox.errors import SandboxError

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


def _attach(
    plane: Plane,
    workspace: str,
    group: str,
    viewer: str | None,
    subject: str | None,
    geometry: str,
    data_dir: Path | None,
    mode: ViewMode = "view",
) -> ViewerCell:
    settings = load_settings(data_dir)

    async def action(leases: LeaseClient) -> ViewerCell:
        return await leases.attach_viewer(
            workspace, group, viewer_id=viewer, subject=subject, plane=plane, geometry=geometry, mode=mode
        )

    return with_leases(settings, action)


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
        mode: ViewMode = "control" if control else "view"
        cell = _attach(plane, workspace, group, viewer, subject, geometry, data_dir, mode)
        if json_out:
            emit(cell_document(cell, with_token=True), True)
            return
        emit(f"{plane} of {cell.lease_id} epoch={cell.epoch}: {cell.url} ({cell.transport}, {cell.mode})", False)
        emit(f"viewer={cell.viewer_id} token expires {cell.expires_at.isoformat()} (token: use --json)", False)
        again = " --control" if control else ""
        note(f"next: sandboxctl {plane} open {workspace} {group} --viewer {cell.viewer_id}{again}")

    attach.__doc__ = (
        f"Hold the lease as a viewer, bring the {plane} up and print the viewer cell (view only unless --control)."
    )
    return attach


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
        json_out: bool = typer.Option(
            False, "--json", help="Print the session's details as one JSON line (the page URL, lease, epoch)."
        ),
    ) -> None:
        try:
            assets = find_assets(plane)
        except FileNotFoundError as err:
            fail(str(err))
        settings = load_settings(data_dir)
        try:
            validate_lease_ids(workspace, group)
        except SandboxError as err:
            refuse(err)

        async def main() -> None:
            session = ViewerSession.for_lease(
                await connected(connect_leases(settings)),
                workspace,
                group,
                plane=plane,
                viewer_id=viewer,
                subject=subject,
                geometry=geometry,
                mode="control" if control else "view",
                report=note,
            )
            current = await session.start()
            page = ViewerPage(plane, session.snapshot, assets, port=port).start()
            feed = SessionEventFeed.for_lease(settings, workspace, group, session.notice_rotation, report=note).start()
            if json_out:
                emit(
                    {
                        "event": "open",
                        "plane": plane,
                        "url": page.url,
                        "lease_id": current.lease_id,
                        "epoch": current.epoch,
                        "viewer_id": current.viewer_id,
                        "mode": current.mode,
                    },
                    True,
                )
            else:
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

        run(settings, main)

    open_.__doc__ = (
        f"Attach a viewer and serve a local {plane} page; prints its URL, keeps the token and the box current, "
        "releases on exit (view only unless --control)."
    )
    return open_


desktop_app.command("attach")(_attach_command("desktop"))
desktop_app.command("open")(_open_command("desktop"))
terminal_app.command("attach")(_attach_command("terminal"))
terminal_app.command("open")(_open_command("terminal"))
