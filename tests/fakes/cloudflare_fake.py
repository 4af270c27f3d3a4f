"""A fake Cloudflare Sandbox Worker: the REST contract of :mod:`providers.cloudflare`, in process.

:class:`FakeCloudflareWorker` serves the Worker's routes through an ``httpx.MockTransport``, so
:class:`~providers.cloudflare.CloudflareProvider` runs its real HTTP code (URLs, headers, JSON
bodies, status codes) against it by taking ``transport=worker.transport``. Each sandbox is a box
of a :class:`~tests.fakes.machine.FakeMachine`, so commands really run and files are real.

Reproduced:

- caller-chosen sandbox ids with get-or-create ``PUT`` (``getSandbox`` semantics: 201 when created,
  200 when the id already runs; concurrent PUTs of one id create one sandbox), labels stored and
  filtered by ``GET /v1/sandboxes?label=k=v``, ISO-8601 ``createdAt``;
- ``destroy``: the container and its files are gone; every later route of that id answers
  ``404 {"error": {"code": "SANDBOX_NOT_FOUND", "message": "Cloudflare sandbox <id> is no longer
  running."}}`` (the exact upstream text), an id never created answers the same, and a later PUT
  of the id makes a new sandbox with a new ``createdAt``;
- exec of an argv with cwd, env, stdin and a timeout (``timedOut: true`` after killing it),
  base64 stdout/stderr; binary file read/write (parents created), ``404 FILE_NOT_FOUND``,
  ``400 IS_A_DIRECTORY``/``NOT_A_DIRECTORY``; listings with type, size and mode;
- ``exposePort`` preview URLs ``https://<port>-<id>-<token>.<hostname>/`` (stable per port);
- bearer-key auth: a wrong or missing key is ``401 {"error": {"code": "UNAUTHORIZED"}}``;
- planned failures and latency through :class:`~tests.fakes.faults.FaultPlan` on the
  operations ``create get exec read write list terminate list_boxes expose_port``: a planned
  :class:`WorkerFault` becomes the Worker's JSON error answer with its status (503 UNAVAILABLE,
  429 RATE_LIMITED, ...); any other planned exception (``httpx.ConnectError``) is raised by the
  transport, as a network failure would be.

Not reproduced: container cold starts and the idle sleep of Durable Objects (a sandbox runs until
destroyed), the Worker's request-size limits, process streaming and background processes
(``startProcess``), preview-URL routing itself (URLs are returned but not served), ``mkdir``,
``deleteFile`` and git routes the provider does not use, per-account quotas.
"""

from __future__ import annotations

import asyncio
import base64
import json
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import httpx

from sandbox.errors import BoxNotFound, ExecTimeout
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["FakeCloudflareWorker", "FakeSandbox", "WorkerFault"]

WORKER_URL: Final = "https://sandbox-worker.fake.workers.dev"
_ROUTE: Final = re.compile(r"^/v1/sandboxes(?:/(?P<id>[^/]+)(?:/(?P<rest>exec|files|files/list|ports))?)?$")
_KINDS: Final = {"file": "file", "dir": "directory", "symlink": "symlink"}


class WorkerFault(Exception):
    """A failure the fake Worker answers as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class FakeSandbox:
    """What the fake Worker knows about one sandbox."""

    id: str
    labels: dict[str, str]
    env: dict[str, str]
    created_at: str
    status: str = "running"
    ports: dict[int, str] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "labels": dict(self.labels), "createdAt": self.created_at}


class FakeCloudflareWorker:
    """The Sandbox Worker of :mod:`providers.cloudflare`, served through an httpx mock transport.

    Args:
        machine: Runs the sandboxes' commands and holds their files (workspace root ``/workspace``).
        api_key: The bearer key the Worker expects; None accepts any request.
        faults: Planned failures and latency; a fresh plan when omitted.
        hostname: The preview-URL hostname of exposed ports.
    """

    def __init__(
        self,
        machine: FakeMachine,
        *,
        api_key: str | None = None,
        faults: FaultPlan | None = None,
        hostname: str = "preview.fake.workers.dev",
    ) -> None:
        self.machine = machine
        self.api_key = api_key
        self.faults = faults or FaultPlan()
        self.hostname = hostname
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.destroyed: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self.transport = httpx.MockTransport(self._handle)
        self.url = WORKER_URL

    # -- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        self.authorizations.append(request.headers.get("authorization"))
        try:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise WorkerFault(401, "UNAUTHORIZED", "missing or invalid API key")
            match = _ROUTE.match(request.url.path)
            if match is None:
                raise WorkerFault(404, "NOT_FOUND", f"no route {request.method} {request.url.path}")
            return await self._route(request, match.group("id"), match.group("rest"))
        except WorkerFault as fault:
            return httpx.Response(fault.status, json={"error": {"code": fault.code, "message": fault.message}})

    async def _route(self, request: httpx.Request, sandbox_id: str | None, rest: str | None) -> httpx.Response:
        method = request.method
        if sandbox_id is None:
            if method != "GET":
                raise WorkerFault(405, "METHOD_NOT_ALLOWED", method)
            await self.faults.before("list_boxes")
            return self._list(request)
        if rest is None:
            if method == "PUT":
                await self.faults.before("create")
                return await self._create(sandbox_id, _json(request))
            if method == "GET":
                await self.faults.before("get")
                return httpx.Response(200, json={"sandbox": self._live(sandbox_id).payload()})
            if method == "DELETE":
                await self.faults.before("terminate")
                return await self._destroy(sandbox_id)
        elif rest == "exec" and method == "POST":
            await self.faults.before("exec")
            return await self._exec(self._live(sandbox_id), _json(request))
        elif rest == "files" and method == "GET":
            await self.faults.before("read")
            return await self._read(self._live(sandbox_id), _path_param(request))
        elif rest == "files" and method == "PUT":
            await self.faults.before("write")
            return await self._write(self._live(sandbox_id), _path_param(request), request.content)
        elif rest == "files/list" and method == "GET":
            await self.faults.before("list")
            return await self._list_files(self._live(sandbox_id), _path_param(request))
        elif rest == "ports" and method == "POST":
            await self.faults.before("expose_port")
            return self._expose(self._live(sandbox_id), _json(request))
        raise WorkerFault(405, "METHOD_NOT_ALLOWED", f"{method} {request.url.path}")

    # -- sandboxes ----------------------------------------------------------------------------

    def _live(self, sandbox_id: str) -> FakeSandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None or not self.machine.running(sandbox_id):
            raise WorkerFault(404, "SANDBOX_NOT_FOUND", f"Cloudflare sandbox {sandbox_id} is no longer running.")
        return sandbox

    async def _create(self, sandbox_id: str, body: dict[str, Any]) -> httpx.Response:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", sandbox_id):
            raise WorkerFault(400, "INVALID_SANDBOX_ID", f"sandbox id {sandbox_id!r} must be lowercase [a-z0-9-]")
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            existing = self.sandboxes.get(sandbox_id)
            if existing is not None:
                return httpx.Response(200, json={"sandbox": existing.payload()})
            labels = {str(k): str(v) for k, v in (body.get("labels") or {}).items()}
            env = {str(k): str(v) for k, v in (body.get("envVars") or {}).items()}
            await self.machine.start(sandbox_id, env)
            sandbox = FakeSandbox(
                id=sandbox_id,
                labels=labels,
                env=env,
                created_at=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            )
            self.sandboxes[sandbox_id] = sandbox
            self.destroyed.discard(sandbox_id)
            return httpx.Response(201, json={"sandbox": sandbox.payload()})

    async def _destroy(self, sandbox_id: str) -> httpx.Response:
        sandbox = self._live(sandbox_id)
        del self.sandboxes[sandbox_id]
        self.destroyed.add(sandbox_id)
        await self.machine.stop(sandbox_id)
        sandbox.status = "destroyed"
        return httpx.Response(200, json={"sandbox": sandbox.payload()})

    def _list(self, request: httpx.Request) -> httpx.Response:
        wanted = [label.split("=", 1) for label in request.url.params.get_list("label")]
        if any(len(pair) != 2 for pair in wanted):
            raise WorkerFault(400, "INVALID_LABEL_FILTER", "label filters are key=value")
        found = [
            s.payload() for s in self.sandboxes.values() if all(s.labels.get(key) == value for key, value in wanted)
        ]
        return httpx.Response(200, json={"sandboxes": found})

    # -- exec, files, ports -------------------------------------------------------------------

    async def _exec(self, sandbox: FakeSandbox, body: dict[str, Any]) -> httpx.Response:
        argv = body.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise WorkerFault(400, "INVALID_COMMAND", "argv must be a non-empty list of strings")
        timeout_ms = body.get("timeoutMs")
        stdin = body.get("stdin")
        started = time.monotonic()
        try:
            done = await self.machine.exec(
                sandbox.id,
                argv,
                workdir=body.get("cwd") or None,
                env={**sandbox.env, **(body.get("env") or {})},
                timeout=None if timeout_ms is None else timeout_ms / 1000,
                stdin=None if stdin is None else base64.b64decode(stdin),
            )
        except ExecTimeout:
            return httpx.Response(
                200,
                json={
                    "exitCode": None,
                    "stdout": "",
                    "stderr": "",
                    "timedOut": True,
                    "durationMs": int((time.monotonic() - started) * 1000),
                },
            )
        except BoxNotFound as err:
            raise WorkerFault(
                404, "SANDBOX_NOT_FOUND", f"Cloudflare sandbox {sandbox.id} is no longer running."
            ) from err
        return httpx.Response(
            200,
            json={
                "exitCode": done.exit_code,
                "stdout": base64.b64encode(done.stdout).decode(),
                "stderr": base64.b64encode(done.stderr).decode(),
                "timedOut": False,
                "durationMs": int((time.monotonic() - started) * 1000),
            },
        )

    async def _read(self, sandbox: FakeSandbox, path: str) -> httpx.Response:
        try:
            data = await self.machine.read(sandbox.id, path)
        except IsADirectoryError as err:
            raise WorkerFault(400, "IS_A_DIRECTORY", f"{path} is a directory") from err
        except (FileNotFoundError, NotADirectoryError) as err:
            raise WorkerFault(404, "FILE_NOT_FOUND", f"file not found: {path}") from err
        return httpx.Response(200, content=data, headers={"content-type": "application/octet-stream"})

    async def _write(self, sandbox: FakeSandbox, path: str, data: bytes) -> httpx.Response:
        try:
            await self.machine.write(sandbox.id, path, data)
        except IsADirectoryError as err:
            raise WorkerFault(400, "IS_A_DIRECTORY", f"{path} is a directory") from err
        except PermissionError as err:
            raise WorkerFault(403, "PERMISSION_DENIED", f"cannot write {path}") from err
        except OSError as err:
            raise WorkerFault(500, "WRITE_FAILED", str(err)) from err
        return httpx.Response(204)

    async def _list_files(self, sandbox: FakeSandbox, path: str) -> httpx.Response:
        try:
            entries = await self.machine.list(sandbox.id, path)
        except NotADirectoryError as err:
            raise WorkerFault(400, "NOT_A_DIRECTORY", f"{path} is not a directory") from err
        except FileNotFoundError as err:
            raise WorkerFault(404, "FILE_NOT_FOUND", f"directory not found: {path}") from err
        files = [
            {
                "name": e.name,
                "absolutePath": posixpath.join(path, e.name),
                "type": _KINDS.get(e.kind, "other"),
                "size": e.size,
                "mode": e.mode,
            }
            for e in entries
        ]
        return httpx.Response(200, json={"files": files})

    def _expose(self, sandbox: FakeSandbox, body: dict[str, Any]) -> httpx.Response:
        port = body.get("port")
        if not isinstance(port, int) or not 1024 <= port <= 65535 or port == 3000:
            # As exposePort: privileged ports and the control port 3000 cannot be exposed.
            raise WorkerFault(400, "INVALID_PORT", f"port {port!r} cannot be exposed")
        url = sandbox.ports.get(port)
        if url is None:
            url = f"https://{port}-{sandbox.id}-{secrets.token_hex(4)}.{self.hostname}/"
            sandbox.ports[port] = url
        return httpx.Response(200, json={"port": port, "url": url})

    async def aclose(self) -> None:
        """Destroy every sandbox's box (the machine itself belongs to the caller)."""
        for sandbox_id in list(self.sandboxes):
            await self.machine.stop(sandbox_id)
        self.sandboxes.clear()


def _json(request: httpx.Request) -> dict[str, Any]:
    try:
        body = json.loads(request.content or b"{}")
    except ValueError as err:
        raise WorkerFault(400, "INVALID_JSON", "the body is not JSON") from err
    if not isinstance(body, dict):
        raise WorkerFault(400, "INVALID_JSON", "the body is not a JSON object")
    return body


def _path_param(request: httpx.Request) -> str:
    path = str(request.url.params.get("path") or "")
    if not path or not path.startswith("/"):
        raise WorkerFault(400, "INVALID_PATH", "path must be absolute")
    return path
