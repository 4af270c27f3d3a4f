"""The codec server: lets the Temporal Web UI show our encrypted payloads to an operator.

It speaks Temporal's remote codec protocol: ``POST /decode`` and ``POST /encode`` take and return
``{"payloads": [...]}`` (the protobuf JSON of ``temporal.api.common.v1.Payloads``), and apply
:class:`sandbox.payload_codec.PayloadEncryptionCodec` with the same keys as the worker. The Web UI
calls it from the operator's browser (``temporal server start-dev --ui-codec-endpoint``), so it
answers CORS preflights for the UI's origin only.

It decrypts for anyone who can reach it, so it binds to loopback, and refuses what a browser
sends on behalf of any other page: a request whose ``Origin`` is not the UI's, whose ``Host`` is
not the loopback address it serves (DNS rebinding), that is not JSON (no CORS-free "simple"
request), or whose ``X-Namespace`` is not the namespace it serves. A local process that is none of
these can still call it: see README "Security model". ``python -m daemons.codec_server --port N
--ui-origin URL`` runs it (``sandboxctl up`` does); keys and namespace come from ``SANDBOX_*``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from sandbox.errors import PayloadCodecError, SandboxConfigError
from sandbox.payload_codec import PayloadEncryptionCodec, load_payload_keys
from sandbox.settings import Settings

log = logging.getLogger("daemons.codec_server")

HOST = "127.0.0.1"
#: The largest request body accepted: a batch of exec outputs fits; anything larger is refused.
MAX_BODY_BYTES = 64 * 1024 * 1024
_ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"


def build_app(codec: PayloadEncryptionCodec, *, ui_origin: str, namespace: str, port: int) -> web.Application:
    """The aiohttp application serving ``/encode`` and ``/decode`` for one UI origin and namespace."""
    hosts = {f"{HOST}:{port}", f"localhost:{port}"}
    ui_origin = ui_origin.rstrip("/")

    def cors(response: web.StreamResponse) -> web.StreamResponse:
        response.headers["Access-Control-Allow-Origin"] = ui_origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
        return response

    def refuse(status: int, why: str) -> web.Response:
        log.warning("codec server refused a request: %s", why)
        return web.json_response({"error": why}, status=status)

    def admissible(request: web.Request) -> web.Response | None:
        if request.host not in hosts:
            return refuse(403, f"Host {request.host!r} is not this codec server")
        origin = request.headers.get("Origin")
        if origin is not None and origin != ui_origin:
            return refuse(403, f"Origin {origin!r} is not the Temporal Web UI this codec server serves")
        return None

    async def preflight(request: web.Request) -> web.StreamResponse:
        refused = admissible(request)
        if refused is not None:
            return refused
        response = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = _ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
        return cors(response)

    def transform(decode: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            refused = admissible(request)
            if refused is not None:
                return refused
            if request.content_type != "application/json":
                return refuse(415, "the body must be application/json")
            asked = request.headers.get("X-Namespace")
            if asked != namespace:
                return refuse(403, f"X-Namespace {asked!r}: this codec server serves namespace {namespace!r}")
            try:
                payloads = json_format.Parse(await request.text(), Payloads())
            except json_format.ParseError as exc:
                return refuse(400, f"not a Payloads JSON object: {exc}")
            try:
                if decode:
                    out = [codec.decrypt(p) for p in payloads.payloads]
                else:
                    out = [codec.encrypt(p) for p in payloads.payloads]
            except PayloadCodecError as exc:
                return cors(refuse(422, exc.message))
            body = json_format.MessageToJson(Payloads(payloads=out))
            return cors(web.Response(text=body, content_type="application/json"))

        return handle

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    for path, decode in (("/decode", True), ("/encode", False)):
        app.router.add_post(path, transform(decode))
        app.router.add_route("OPTIONS", path, preflight)
    return app


async def serve(settings: Settings, *, port: int, ui_origin: str, stop: asyncio.Event) -> None:
    """Serve on ``127.0.0.1:port`` until ``stop`` is set."""
    codec = PayloadEncryptionCodec(load_payload_keys(settings))
    app = build_app(codec, ui_origin=ui_origin, namespace=settings.temporal_namespace, port=port)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    log.info("codec server on http://%s:%d for %s (namespace %s)", HOST, port, ui_origin, settings.temporal_namespace)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Entry point of ``python -m daemons.codec_server``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--ui-origin", required=True, help="origin of the Temporal Web UI, e.g. http://127.0.0.1:8233")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(Settings(), port=args.port, ui_origin=args.ui_origin, stop=stop)

    try:
        asyncio.run(run())
    except SandboxConfigError as exc:
        raise SystemExit(f"codec server: {exc.message}") from None


if __name__ == "__main__":
    main()
