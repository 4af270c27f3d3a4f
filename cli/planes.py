"""``sandboxctl desktop attach|open`` and ``sandboxctl terminal attach|open``: watch a lease's box.

``attach`` holds the lease as a viewer, brings the plane up and prints the viewer cell (edge URL,
short-lived stream token, expiry); ``--json`` prints it whole for scripts, token included, which is
the only way a token leaves this command. ``open`` does the same, then serves a local page
(noVNC for the desktop, xterm.js for the terminal) on 127.0.0.1 that fetches the cell from this
process and offers the token as a WebSocket subprotocol (never in a URL). It renews the token
(re-attaching with the same viewer id, which also keeps the viewer holder alive) well before it
expires, and releases the viewer holder when interrupted.

The page URL carries a random path segment so that other local users cannot read the cell; it is
not the stream token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import secrets
import signal
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import typer

from cli.output import emit, fail, note

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
PagePort = typer.Option(0, "--port", help="Local port of the viewer page (default: any free port).")

NOVNC_DIRS = (Path("/usr/share/novnc"),)
"""Where noVNC is looked for (Debian ``novnc``); ``SANDBOX_NOVNC_DIR`` comes first."""
XTERM_DIRS = (
    Path("/usr/share/nodejs/@xterm/xterm"),
    Path("/usr/local/lib/node_modules/@xterm/xterm"),
    Path("/usr/lib/node_modules/@xterm/xterm"),
)
"""Where the npm ``@xterm/xterm`` package is looked for; ``SANDBOX_XTERM_DIR`` comes first."""
RENEW_MARGIN_SECONDS = 30.0


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
function show(state) { window.viewerState = state; status.textContent = state; }
async function connect() {
  const cell = await (await fetch('./cell.json', {cache: 'no-store'})).json();
  // The token travels as a WebSocket subprotocol; 'binary' must come first for websockify.
  const rfb = new RFB(document.getElementById('screen'), cell.url, {wsProtocols: ['binary', cell.token]});
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => show('connected'));
  rfb.addEventListener('disconnect', (e) => {
    show(e.detail.clean ? 'disconnected' : 'refused');
    if (window.viewerState === 'disconnected') setTimeout(connect, 1000);
  });
}
connect().catch((e) => show('error: ' + e));
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
function show(state) { window.viewerState = state; status.textContent = state; }
const term = new Terminal({cols: 100, rows: 30});
term.open(document.getElementById('term'));
const enc = new TextEncoder();
async function connect() {
  const cell = await (await fetch('./cell.json', {cache: 'no-store'})).json();
  // ttyd's protocol: 'tty' subprotocol; frames start with a command byte ('0' data).
  const ws = new WebSocket(cell.url, ['tty', cell.token]);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    show('connected');
    ws.send(enc.encode(JSON.stringify({AuthToken: '', columns: term.cols, rows: term.rows})));
  };
  ws.onmessage = (ev) => {
    const data = new Uint8Array(ev.data);
    if (data[0] === 48) term.write(new TextDecoder().decode(data.slice(1)));
  };
  ws.onclose = () => { show('disconnected'); };
  term.onData((d) => { if (ws.readyState === 1) ws.send(enc.encode('0' + d)); });
}
connect().catch((e) => show('error: ' + e));
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
    hint = "apt-get install novnc" if plane == "desktop" else "npm install --global @xterm/xterm"
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
) -> Any:
    from cli.lease import _run, _settings

    settings = _settings(data_dir)

    async def action(leases: Any) -> Any:
        return await leases.attach_viewer(
            workspace, group, viewer_id=viewer, subject=subject, plane=plane, geometry=geometry
        )

    return _run(settings, action)


def _attach_command(plane: Plane) -> Callable[..., None]:
    def attach(
        workspace: str = typer.Argument(..., help="Workspace id."),
        group: str = typer.Argument(..., help="Sandbox group id."),
        viewer: str | None = Viewer,
        subject: str | None = Subject,
        geometry: str = Geometry,
        data_dir: Path | None = DataDir,
        json_out: bool = Json,
    ) -> None:
        cell = _attach(plane, workspace, group, viewer, subject, geometry, data_dir)
        if json_out:
            emit(_cell_json(cell, with_token=True), True)
            return
        emit(f"{plane} of {cell.lease_id} epoch={cell.epoch}: {cell.url} ({cell.transport})", False)
        emit(f"viewer={cell.viewer_id} token expires {cell.expires_at.isoformat()} (token: use --json)", False)
        note(f"next: sandboxctl {plane} open {workspace} {group} --viewer {cell.viewer_id}")

    attach.__doc__ = f"Hold the lease as a viewer, bring the {plane} up and print the viewer cell."
    return attach


def _open_command(plane: Plane) -> Callable[..., None]:
    def open_(
        workspace: str = typer.Argument(..., help="Workspace id."),
        group: str = typer.Argument(..., help="Sandbox group id."),
        viewer: str | None = Viewer,
        subject: str | None = Subject,
        geometry: str = Geometry,
        port: int = PagePort,
        data_dir: Path | None = DataDir,
    ) -> None:
        from cli.lease import _settings
        from client import LeaseClient
        from sandbox.errors import SandboxError
        from worker import connect

        try:
            assets = find_assets(plane)
        except FileNotFoundError as err:
            fail(str(err))
        settings = _settings(data_dir)
        viewer_id = viewer or str(uuid.uuid4())

        async def main() -> None:
            leases = LeaseClient(await connect(settings), settings)

            async def attach() -> Any:
                return await leases.attach_viewer(
                    workspace, group, viewer_id=viewer_id, subject=subject, plane=plane, geometry=geometry
                )

            current = await attach()
            page = ViewerPage(plane, lambda: _cell_json(current, with_token=True), assets, port=port).start()
            emit(page.url, False)
            note(f"viewing the {plane} of {current.lease_id}; Ctrl-C to stop (the viewer holder is released)")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                while not stop.is_set():
                    left = (current.expires_at - datetime.now(UTC)).total_seconds()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(1.0, left - RENEW_MARGIN_SECONDS))
                    if not stop.is_set():
                        current = await attach()  # a fresh token, and the viewer holder stays alive
            finally:
                page.stop()
                with contextlib.suppress(SandboxError):
                    await leases.release(workspace, group, viewer_id, kind="viewer")

        try:
            asyncio.run(main())
        except SandboxError as err:
            fail(f"{err.error_type}: {err.message}", 2)

    open_.__doc__ = (
        f"Attach a viewer and serve a local {plane} page; prints its URL, renews the token, releases on exit."
    )
    return open_


desktop_app.command("attach")(_attach_command("desktop"))
desktop_app.command("open")(_open_command("desktop"))
terminal_app.command("attach")(_attach_command("terminal"))
terminal_app.command("open")(_open_command("terminal"))
