"""A fake Vercel Sandbox API at the HTTP transport of the ``vercel`` SDK (``vercel.sandbox`` 0.10).

:class:`FakeVercelApi` answers the Sandbox REST API the SDK calls, through an
``httpx2.MockTransport``: the provider builds its real ``vercel.sandbox.SandboxClient`` with
``httpx_client_factory=api.httpx_client_factory`` and runs the SDK's own request building,
response validation, NDJSON process streams, stdin protocol, tar+gzip uploads and lifecycle
recovery against it. Each sandbox is a box of a :class:`~tests.fakes.machine.FakeMachine`
whose workspace really is ``/vercel/sandbox``.

Routes served (paths under the base URL, ``teamId`` accepted and ignored)::

    POST   v3/sandboxes                                create (409 if the name exists)
    GET    v2/sandboxes/{name}?projectId&resume        get (404 not_found when absent)
    GET    v2/sandboxes?project&tags=k:v               query, one page
    DELETE v2/sandboxes/{name}?projectId               destroy
    POST   v2/sandboxes/sessions/{sid}/cmd?wait&logs   run: NDJSON {"command"} / {"stream","data"} / {"command"}
    POST   v2/sandboxes/sessions/{sid}/cmd/{cid}/stdin {"data": b64, "offset", "close"} -> bytesWritten
    POST   v2/sandboxes/sessions/{sid}/cmd/{cid}/kill  {"signal"}
    POST   v2/sandboxes/sessions/{sid}/fs/read         {"path", "cwd"} -> raw bytes
    POST   v2/sandboxes/sessions/{sid}/fs/write        tar+gzip body, extracted at x-cwd

Reproduced: sandbox names as ids, ``sbx_`` session ids, ``cmd_`` command ids, millisecond
timestamps, tags and the ``tags=key:value`` filter, routes (``https://sb-<id>.vercel.run``) for the
ports declared at create, the ``{"error": {"code", "message"}}`` error bodies (404 ``not_found``,
403 ``forbidden`` with ``invalidToken`` for a wrong bearer token, 409 ``sandbox_already_exists``,
404 ``file_not_found``, 400 ``is_a_directory``), 410 ``sandbox_stopped`` for a session whose
sandbox was destroyed (the SDK then resumes by name and gets the 404), process output as UTF-8 text
(invalid bytes replaced, as a JSON string must), stdin by offset, kill, and commands killed
(exit 137) past their ``timeout``. Failures and latency come from a
:class:`~tests.fakes.faults.FaultPlan` on ``create get list_boxes terminate exec read write
kill``: a planned :class:`VercelApiFault` is answered as the API's error body with its status,
any other planned exception (``httpx2.ConnectError``) is raised by the transport like a network
failure.

Not reproduced: pending/stopping transitions (a sandbox runs at once), session stop and resume of
stopped persistent sandboxes (the current session lives until the sandbox is destroyed), the
execution time limit, snapshots, forks, drives, network policies, the logs and wait endpoints,
sudo, pagination beyond one page, regions and resource sizes (fixed values are reported),
quotas (only planned 429s).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import posixpath
import re
import secrets
import string
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import httpx2

from sandbox.errors import BoxNotFound, ExecTimeout
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["API_URL", "FakeVercelApi", "FakeVercelSandbox", "VercelApiFault"]

API_URL: Final = "https://fake.vercel.test/api"
WORKSPACE_ROOT: Final = "/vercel/sandbox"
_ALNUM: Final = string.ascii_lowercase + string.digits
_SESSION_ROUTE: Final = re.compile(
    r"^v2/sandboxes/sessions/(?P<sid>[^/]+)/(?P<op>cmd|fs/read|fs/write|fs/mkdir)(?:/(?P<cid>[^/]+)/(?P<cop>stdin|kill))?$"
)
_SANDBOX_ROUTE: Final = re.compile(r"^v2/sandboxes/(?P<name>[^/]+)$")


class VercelApiFault(Exception):
    """A failure the fake API answers as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Command:
    id: str
    name: str
    args: list[str]
    cwd: str
    session_id: str
    started_at: int
    attach_stdin: bool
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[tuple[int, bytes, bytes]] | None = None
    exit_code: int | None = None
    kill_signal: int | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "cwd": self.cwd,
            "sessionId": self.session_id,
            "exitCode": self.exit_code,
            "startedAt": self.started_at,
        }


@dataclass
class FakeVercelSandbox:
    """What the fake API knows about one sandbox."""

    name: str
    project_id: str
    session_id: str
    tags: dict[str, str]
    env: dict[str, str]
    ports: list[int]
    timeout_ms: int
    persistent: bool
    created_at: int
    routes: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"

    def sandbox_payload(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "currentSessionId": self.session_id,
            "status": self.status,
            "persistent": self.persistent,
            "projectId": self.project_id,
            "cwd": WORKSPACE_ROOT,
            "region": "iad1",
            "memory": 2048,
            "vcpus": 1,
            "timeout": self.timeout_ms,
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
            "statusUpdatedAt": self.created_at,
            "tags": dict(self.tags),
        }

    def session_payload(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "sourceSandboxName": self.name,
            "projectId": self.project_id,
            "status": self.status,
            "cwd": WORKSPACE_ROOT,
            "region": "iad1",
            "memory": 2048,
            "vcpus": 1,
            "timeout": self.timeout_ms,
            "requestedAt": self.created_at,
            "startedAt": self.created_at,
        }

    def response(self) -> dict[str, Any]:
        return {"sandbox": self.sandbox_payload(), "session": self.session_payload(), "routes": self.routes}


class FakeVercelApi:
    """The Vercel Sandbox API for one project, served through an ``httpx2.MockTransport``.

    Args:
        machine: Runs the sandboxes' commands and holds their files; build it with
            ``workspace_root="/vercel/sandbox"``.
        token: The bearer token the API accepts.
        project_id: The project every sandbox belongs to.
        faults: Planned failures and latency; a fresh plan when omitted.
    """

    def __init__(self, machine: FakeMachine, *, token: str, project_id: str, faults: FaultPlan | None = None) -> None:
        self.machine = machine
        self.token = token
        self.project_id = project_id
        self.faults = faults or FaultPlan()
        self.sandboxes: dict[str, FakeVercelSandbox] = {}
        self.stopped_sessions: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self._commands: dict[str, _Command] = {}
        self._lock = asyncio.Lock()
        self.transport = httpx2.MockTransport(self._handle)
        self.url = API_URL

    def httpx_client_factory(self) -> httpx2.AsyncClient:
        """A client whose requests this fake answers (the SDK's ``httpx_client_factory``)."""
        return httpx2.AsyncClient(transport=self.transport)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        prefix = httpx2.URL(self.url).path.rstrip("/") + "/"
        route = path[len(prefix) :] if path.startswith(prefix) else path
        self.requests.append((request.method, route))
        try:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                raise VercelApiFault(403, "forbidden", "Not authorized", invalidToken=True)
            return await self._route(request, route)
        except VercelApiFault as fault:
            error = {"code": fault.code, "message": fault.message, **fault.extra}
            return httpx2.Response(fault.status, json={"error": error})

    async def _route(self, request: httpx2.Request, route: str) -> httpx2.Response:
        method = request.method
        if route == "v3/sandboxes" and method == "POST":
            await self.faults.before("create")
            return await self._create(_json(request))
        if route == "v2/sandboxes" and method == "GET":
            await self.faults.before("list_boxes")
            return self._query(request)
        if match := _SANDBOX_ROUTE.match(route):
            name = match.group("name")
            if name == "sessions":
                raise VercelApiFault(404, "not_found", "Not found")
            if method == "GET":
                await self.faults.before("get")
                return httpx2.Response(200, json=self._sandbox(name).response())
            if method == "DELETE":
                await self.faults.before("terminate")
                return await self._destroy(name)
        if match := _SESSION_ROUTE.match(route):
            sandbox = self._session(match.group("sid"))
            op, cid, cop = match.group("op"), match.group("cid"), match.group("cop")
            if op == "cmd" and cid is None and method == "POST":
                await self.faults.before("exec")
                return self._run(sandbox, request)
            if op == "cmd" and cop == "stdin" and method == "POST":
                return self._stdin(self._command(sandbox, cid), _json(request))
            if op == "cmd" and cop == "kill" and method == "POST":
                await self.faults.before("kill")
                return self._kill(self._command(sandbox, cid), _json(request))
            if op == "fs/read" and method == "POST":
                await self.faults.before("read")
                return await self._read(sandbox, _json(request))
            if op == "fs/write" and method == "POST":
                await self.faults.before("write")
                return await self._write(sandbox, request)
        raise VercelApiFault(404, "not_found", f"No route for {method} /{route}")

    # -- sandboxes ----------------------------------------------------------------------------

    def _sandbox(self, name: str) -> FakeVercelSandbox:
        sandbox = self.sandboxes.get(name)
        if sandbox is None:
            raise VercelApiFault(404, "not_found", "Sandbox not found")
        return sandbox

    def _session(self, session_id: str) -> FakeVercelSandbox:
        for sandbox in self.sandboxes.values():
            if sandbox.session_id == session_id:
                return sandbox
        if session_id in self.stopped_sessions:
            raise VercelApiFault(410, "sandbox_stopped", "The sandbox session has stopped")
        raise VercelApiFault(404, "not_found", "Sandbox session not found")

    async def _create(self, body: dict[str, Any]) -> httpx2.Response:
        name = body.get("name") or f"sandbox-{_rand(12)}"
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}", name):
            raise VercelApiFault(400, "bad_request", f"Invalid sandbox name {name!r}")
        if body.get("projectId") != self.project_id:
            raise VercelApiFault(404, "not_found", "Project not found")
        async with self._lock:
            if name in self.sandboxes:
                raise VercelApiFault(409, "sandbox_already_exists", f"A sandbox named {name!r} already exists")
            env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
            ports = [int(p) for p in body.get("ports") or []]
            if len(ports) > 4:
                raise VercelApiFault(400, "bad_request", "At most 4 ports can be exposed")
            await self.machine.start(name, env)
            sandbox = FakeVercelSandbox(
                name=name,
                project_id=self.project_id,
                session_id=f"sbx_{_rand(24)}",
                tags={str(k): str(v) for k, v in (body.get("tags") or {}).items()},
                env=env,
                ports=ports,
                timeout_ms=int(body.get("timeout") or 300_000),
                persistent=bool(body.get("persistent", True)),
                created_at=_now_ms(),
            )
            for port in ports:
                subdomain = f"sb-{_rand(12)}"
                sandbox.routes.append({"url": f"https://{subdomain}.vercel.run", "port": port, "subdomain": subdomain})
            self.sandboxes[name] = sandbox
        return httpx2.Response(200, json=sandbox.response())

    async def _destroy(self, name: str) -> httpx2.Response:
        sandbox = self._sandbox(name)
        del self.sandboxes[name]
        self.stopped_sessions.add(sandbox.session_id)
        for command in list(self._commands.values()):
            if command.session_id == sandbox.session_id and command.task is not None:
                command.task.cancel()
        await self.machine.stop(name)
        sandbox.status = "stopped"
        return httpx2.Response(200, json={"sandbox": sandbox.sandbox_payload()})

    def _query(self, request: httpx2.Request) -> httpx2.Response:
        tag = request.url.params.get("tags")
        key, _, value = (tag or "").partition(":")
        found = [
            s.sandbox_payload()
            for s in sorted(self.sandboxes.values(), key=lambda s: s.created_at, reverse=True)
            if tag is None or s.tags.get(key) == value
        ]
        return httpx2.Response(200, json={"sandboxes": found, "pagination": {"count": len(found), "next": None}})

    # -- commands -----------------------------------------------------------------------------

    def _command(self, sandbox: FakeVercelSandbox, command_id: str | None) -> _Command:
        command = self._commands.get(command_id or "")
        if command is None or command.session_id != sandbox.session_id:
            raise VercelApiFault(404, "not_found", "Command not found")
        return command

    def _run(self, sandbox: FakeVercelSandbox, request: httpx2.Request) -> httpx2.Response:
        body = _json(request)
        if request.url.params.get("wait") != "true" or request.url.params.get("logs") != "true":
            raise VercelApiFault(400, "bad_request", "the fake serves only wait=true&logs=true runs")
        name = body.get("command")
        args = body.get("args") or []
        if not isinstance(name, str) or not name or not all(isinstance(a, str) for a in args):
            raise VercelApiFault(400, "bad_request", "command must be a string and args strings")
        command = _Command(
            id=f"cmd_{_rand(24)}",
            name=name,
            args=list(args),
            cwd=_resolve(WORKSPACE_ROOT, body.get("cwd") or "."),
            session_id=sandbox.session_id,
            started_at=_now_ms(),
            attach_stdin=bool(body.get("attachStdin")),
        )
        self._commands[command.id] = command
        timeout_ms = body.get("timeout")
        env = {**sandbox.env, **(body.get("env") or {})}
        return httpx2.Response(
            200,
            headers={"content-type": "application/x-ndjson"},
            content=self._run_stream(sandbox, command, env, None if timeout_ms is None else timeout_ms / 1000),
        )

    async def _run_stream(
        self, sandbox: FakeVercelSandbox, command: _Command, env: dict[str, str], timeout: float | None
    ) -> AsyncIterator[bytes]:
        yield _line({"command": command.payload()})
        if command.attach_stdin:
            await command.stdin_closed.wait()
        if command.task is None and command.kill_signal is None:
            command.task = asyncio.create_task(self._execute(sandbox, command, env, timeout))
        # Shielded: a client that stops reading does not kill the process, as on the service.
        if command.task is not None:
            try:
                exit_code, out, err = await asyncio.shield(command.task)
            except asyncio.CancelledError:
                if not command.task.cancelled():
                    raise
                exit_code, out, err = 128 + (command.kill_signal or 9), b"", b""
        else:
            exit_code, out, err = 128 + (command.kill_signal or 9), b"", b""
        command.exit_code = exit_code
        for stream, data in (("stdout", out), ("stderr", err)):
            if data:
                yield _line({"stream": stream, "data": data.decode("utf-8", errors="replace")})
        yield _line({"command": command.payload()})

    async def _execute(
        self, sandbox: FakeVercelSandbox, command: _Command, env: dict[str, str], timeout: float | None
    ) -> tuple[int, bytes, bytes]:
        try:
            done = await self.machine.exec(
                sandbox.name,
                [command.name, *command.args],
                workdir=command.cwd,
                env=env,
                timeout=timeout,
                stdin=bytes(command.stdin) if command.attach_stdin else None,
            )
        except ExecTimeout:
            return 137, b"", b""
        except BoxNotFound:
            return 137, b"", b""
        return done.exit_code, done.stdout, done.stderr

    def _stdin(self, command: _Command, body: dict[str, Any]) -> httpx2.Response:
        if not command.attach_stdin or command.stdin_closed.is_set():
            raise VercelApiFault(409, "stdin_not_available", "The command does not accept input")
        data = base64.b64decode(body.get("data") or "")
        offset = body.get("offset")
        if data:
            if offset != len(command.stdin):
                raise VercelApiFault(409, "stdin_offset_mismatch", f"expected offset {len(command.stdin)}")
            command.stdin.extend(data)
        if body.get("close"):
            command.stdin_closed.set()
        return httpx2.Response(200, json={"command": command.payload(), "bytesWritten": len(command.stdin)})

    def _kill(self, command: _Command, body: dict[str, Any]) -> httpx2.Response:
        command.kill_signal = int(body.get("signal") or 15)
        if command.task is not None:
            command.task.cancel()
        command.stdin_closed.set()
        return httpx2.Response(200, json={"command": command.payload()})

    # -- files --------------------------------------------------------------------------------

    async def _read(self, sandbox: FakeVercelSandbox, body: dict[str, Any]) -> httpx2.Response:
        path = _resolve(body.get("cwd") or WORKSPACE_ROOT, str(body.get("path") or ""))
        try:
            data = await self.machine.read(sandbox.name, path)
        except IsADirectoryError as err:
            raise VercelApiFault(400, "is_a_directory", f"{path} is a directory") from err
        except (FileNotFoundError, NotADirectoryError) as err:
            raise VercelApiFault(404, "file_not_found", f"File not found: {path}") from err
        return httpx2.Response(200, content=data, headers={"content-type": "application/octet-stream"})

    async def _write(self, sandbox: FakeVercelSandbox, request: httpx2.Request) -> httpx2.Response:
        cwd = request.headers.get("x-cwd") or "/"
        try:
            archive = tarfile.open(fileobj=io.BytesIO(gzip.decompress(request.content)), mode="r:")
        except (OSError, tarfile.TarError, EOFError) as err:
            raise VercelApiFault(400, "bad_request", f"the body is not a tar+gzip archive: {err}") from err
        with archive:
            for member in archive:
                if not member.isfile():
                    continue
                source = archive.extractfile(member)
                data = source.read() if source is not None else b""
                target = _resolve(cwd, member.name)
                done = await self.machine.exec(
                    sandbox.name,
                    ["sh", "-c", 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" "$1"', "sh", target,
                     format(member.mode & 0o7777, "o")],
                    stdin=data,
                )  # fmt: skip
                if done.exit_code != 0:
                    text = done.stderr.decode(errors="replace")
                    if "Is a directory" in text:
                        raise VercelApiFault(400, "is_a_directory", f"{target} is a directory")
                    raise VercelApiFault(500, "internal_server_error", f"write failed: {text.strip()}")
        return httpx2.Response(200, json={})

    async def aclose(self) -> None:
        """Cancel running commands and stop every sandbox's box (the machine belongs to the caller)."""
        for command in self._commands.values():
            if command.task is not None:
                command.task.cancel()
        for name in list(self.sandboxes):
            await self.machine.stop(name)
        self.sandboxes.clear()


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _json(request: httpx2.Request) -> dict[str, Any]:
    try:
        body = json.loads(request.content or b"{}")
    except ValueError as err:
        raise VercelApiFault(400, "bad_request", "Invalid JSON body") from err
    if not isinstance(body, dict):
        raise VercelApiFault(400, "bad_request", "The body must be a JSON object")
    return body


def _resolve(cwd: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(cwd, path))
