"""A stateful fake of the Runloop devbox API, served at the HTTP transport level.

:class:`RunloopFake` is an ``httpx.MockTransport`` handler that answers the REST endpoints the
``runloop_api_client`` SDK (``AsyncRunloop``) calls, with Runloop-shaped JSON and real status
codes, so the provider runs the real SDK end to end (request building, pagination, error classes,
the ``await_running`` long-poll) and cannot tell it is talking to a fake::

    client = AsyncRunloop(bearer_token=fake.api_key, base_url=fake.base_url,
                          http_client=fake.http_client(), max_retries=0)

Devboxes run as boxes of a shared :class:`~tests.fakes.machine.FakeMachine`: commands really
run (``bash -lc <command>`` from the home directory, as Runloop runs them in a fresh login shell)
and files really exist.

Reproduced:

- ids in Runloop's format (``dbx_…`` devboxes, ``snp_…`` disk snapshots, ``exe_…`` executions);
  the devbox view (``status``, ``metadata``, ``create_time_ms``, ``end_time_ms``,
  ``state_transitions``, ``shutdown_reason``, ``launch_parameters``, ``tunnel``, ``blueprint_id``);
- the lifecycle ``provisioning`` → ``running`` → ``shutdown`` (also ``suspended`` and back), with
  the ``wait_for_status`` long-poll answering 408 when the wait times out; a shut-down devbox is
  still returned by ``GET /v1/devboxes/{id}`` and listed, with status ``shutdown``, as on Runloop;
  operations on a devbox that is not running answer 400;
- cursor pagination of ``GET /v1/devboxes`` (``limit``, ``starting_after``, ``has_more``,
  ``status`` filter), newest first;
- executions: ``execute_sync``, ``execute``, ``execute_async``, ``wait_for_status`` on an
  execution, ``kill`` (kills the process tree), ``last_n`` line truncation of stdout/stderr with
  ``stdout_truncated``/``stderr_truncated``; output is decoded as UTF-8 text, as the JSON API does;
- files: ``read_file_contents``/``write_file_contents`` (UTF-8 text) and multipart
  ``upload_file``/binary ``download_file``; relative paths are under the user's home; a missing
  file answers 404;
- V2 tunnels (``tunnel`` at create, ``enable_tunnel``; ``open`` or ``authenticated``), disk
  snapshots (``snapshot_disk``, list, delete; a devbox created from ``snapshot_id`` starts with a
  copy of the snapshotted workspace and home);
- errors: 401 for a wrong bearer token, 404 for an unknown devbox/execution/snapshot, 400 for an
  invalid request, 408 for a long-poll timeout; any status (429, 5xx, ...) or a transport failure
  can be injected per operation through a :class:`~tests.fakes.faults.FaultPlan`, which also
  adds latency. Operation names: ``create``, ``get``, ``list_boxes``, ``wait``, ``exec``,
  ``exec_wait``, ``kill``, ``read``, ``write``, ``terminate``, ``tunnel``, ``snapshot``,
  ``delete_snapshot``, ``suspend``, ``resume``.

Not reproduced: blueprints (a blueprint id/name is recorded, not built), launch parameters other
than ``keep_alive_time_seconds`` (recorded, never enforced: there is no idle killer unless a test
calls :meth:`RunloopFake.expire`), suspend keeps processes running (Runloop stops them), stdin
streaming (``send_std_in``), output streaming (``stream_*_updates``), logs, PTY, SSH, gateways,
MCP, network policies, output size limits other than ``last_n``, the real error body text (bodies
are ``{"message", "error_code"}`` JSON), and the platform's own retries and rate limiting (inject
a 429 to test them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
import re
import secrets
import shlex
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from sandbox.errors import ExecTimeout
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["RunloopFake", "RunloopHttpFault"]

HOME: Final = "/root"
"""The devbox user's home in the fake (commands start here; relative file paths resolve here)."""

_ALPHABET: Final = string.ascii_letters + string.digits
_TERMINAL: Final = frozenset({"shutdown", "failure"})
_DEFAULT_LAST_N: Final = 100
_MAX_LONG_POLL: Final = 30.0
# What a snapshot copies of a devbox (the fake's "disk"): the workspace and the home directory.
_SNAPSHOT_ROOTS: Final = ("/workspace", HOME)


class RunloopHttpFault(Exception):  # noqa: N818 (it is an HTTP answer, not an error of ours)
    """An HTTP error answer the fake returns instead of handling the request (for a FaultPlan).

    Attributes:
        status: The HTTP status code.
        body: The JSON body.
    """

    def __init__(self, status: int, message: str, *, error_code: str | None = None) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.body: dict[str, Any] = {"message": message, "error_code": error_code or _code_for(status)}


def _code_for(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        408: "request_timeout",
        409: "conflict",
        429: "rate_limited",
        500: "internal_error",
        502: "bad_gateway",
        503: "service_unavailable",
    }.get(status, "error")


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(21))


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Devbox:
    id: str
    status: str
    create_time_ms: int
    metadata: dict[str, str]
    launch_parameters: dict[str, Any]
    environment: dict[str, str]
    name: str | None = None
    blueprint_id: str | None = None
    blueprint_name: str | None = None
    snapshot_id: str | None = None
    tunnel: dict[str, Any] | None = None
    end_time_ms: int | None = None
    shutdown_reason: str | None = None
    failure_reason: str | None = None
    transitions: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    boot: asyncio.Task[None] | None = None

    def set_status(self, status: str) -> None:
        self.status = status
        self.transitions.append({"status": status, "transition_time_ms": _now_ms()})
        # Wake every long-poll waiting on this devbox, then arm the event for the next change.
        self.changed.set()
        self.changed = asyncio.Event()

    def view(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "capabilities": [],
            "create_time_ms": self.create_time_ms,
            "end_time_ms": self.end_time_ms,
            "launch_parameters": self.launch_parameters,
            "metadata": dict(self.metadata),
            "state_transitions": list(self.transitions),
            "status": self.status,
            "blueprint_id": self.blueprint_id,
            "failure_reason": self.failure_reason,
            "initiator_type": "api",
            "name": self.name,
            "shutdown_reason": self.shutdown_reason,
            "snapshot_id": self.snapshot_id,
            "tunnel": self.tunnel,
        }
        return body


@dataclass
class _Execution:
    id: str
    devbox_id: str
    command: str
    task: asyncio.Task[None] | None = None
    status: str = "queued"
    exit_status: int | None = None
    stdout: str = ""
    stderr: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self, last_n: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"devbox_id": self.devbox_id, "execution_id": self.id, "status": self.status}
        if self.status == "completed":
            stdout, out_cut = _last_lines(self.stdout, last_n)
            stderr, err_cut = _last_lines(self.stderr, last_n)
            body.update(
                exit_status=self.exit_status,
                stdout=stdout,
                stderr=stderr,
                stdout_truncated=out_cut,
                stderr_truncated=err_cut,
            )
        return body


@dataclass
class _Snapshot:
    id: str
    source_devbox_id: str
    create_time_ms: int
    metadata: dict[str, str]
    name: str | None
    commit_message: str | None
    archive: bytes

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "create_time_ms": self.create_time_ms,
            "metadata": dict(self.metadata),
            "source_devbox_id": self.source_devbox_id,
            "commit_message": self.commit_message,
            "name": self.name,
            "size_bytes": len(self.archive),
        }


def _last_lines(text: str, last_n: int | None) -> tuple[str, bool]:
    if last_n is None:
        return text, False
    lines = text.splitlines(keepends=True)
    if len(lines) <= last_n:
        return text, False
    return "".join(lines[-last_n:]), True


_Handler = Callable[..., Awaitable[httpx.Response]]


class RunloopFake:
    """The fake Runloop API: devboxes, executions, files, tunnels and disk snapshots.

    Args:
        machine: Runs the devboxes' commands and holds their files.
        api_key: The bearer token the fake accepts; any other answers 401.
        faults: Planned failures and latency (a new plan if omitted).
        boot_seconds: How long a new devbox stays ``provisioning`` before it is ``running``.
    """

    base_url: Final = "https://api.runloop.fake"

    def __init__(
        self,
        machine: FakeMachine,
        *,
        api_key: str = "rl_api_fake_key",
        faults: FaultPlan | None = None,
        boot_seconds: float = 0.0,
    ) -> None:
        self.machine = machine
        self.api_key = api_key
        self.faults = faults if faults is not None else FaultPlan()
        self.boot_seconds = boot_seconds
        self.devboxes: dict[str, _Devbox] = {}
        self.executions: dict[str, _Execution] = {}
        self.snapshots: dict[str, _Snapshot] = {}
        self.requests: list[tuple[str, str]] = []
        self._routes: list[tuple[str, re.Pattern[str], str, _Handler]] = [
            ("POST", re.compile(r"/v1/devboxes"), "create", self._create),
            ("GET", re.compile(r"/v1/devboxes"), "list_boxes", self._list),
            ("GET", re.compile(r"/v1/devboxes/disk_snapshots"), "list_snapshots", self._list_snapshots),
            ("POST", re.compile(r"/v1/devboxes/disk_snapshots/(?P<sid>[^/]+)/delete"), "delete_snapshot",
             self._delete_snapshot),
            ("GET", re.compile(r"/v1/devboxes/(?P<id>[^/]+)"), "get", self._retrieve),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/wait_for_status"), "wait", self._wait_for_status),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/execute_sync"), "exec", self._execute_sync),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/execute_async"), "exec", self._execute_async),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/execute"), "exec", self._execute),
            ("GET", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/executions/(?P<eid>[^/]+)"), "exec_wait",
             self._execution_retrieve),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/executions/(?P<eid>[^/]+)/wait_for_status"),
             "exec_wait", self._execution_wait),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/executions/(?P<eid>[^/]+)/kill"), "kill",
             self._execution_kill),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/read_file_contents"), "read", self._read_text),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/download_file"), "read", self._download),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/write_file_contents"), "write", self._write_text),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/upload_file"), "write", self._upload),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/enable_tunnel"), "tunnel", self._enable_tunnel),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/shutdown"), "terminate", self._shutdown),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/suspend"), "suspend", self._suspend),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/resume"), "resume", self._resume),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/keep_alive"), "keep_alive", self._keep_alive),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/snapshot_disk"), "snapshot", self._snapshot_disk),
        ]  # fmt: skip

    # -- wiring ---------------------------------------------------------------------------------

    @property
    def transport(self) -> httpx.MockTransport:
        """An httpx transport that answers every request with this fake."""
        return httpx.MockTransport(self.handle)

    def http_client(self) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for ``AsyncRunloop(http_client=...)`` that talks to this fake."""
        return httpx.AsyncClient(transport=self.transport, base_url=self.base_url, timeout=httpx.Timeout(60.0))

    @staticmethod
    def service_unavailable() -> RunloopHttpFault:
        """The 503 a Runloop API node answers while it is overloaded or deploying (transient)."""
        return RunloopHttpFault(503, "Service temporarily unavailable, please retry")

    @staticmethod
    def rate_limited() -> RunloopHttpFault:
        """The 429 answered when the account's request rate or devbox quota is exceeded."""
        return RunloopHttpFault(429, "Rate limit exceeded")

    @staticmethod
    def unauthorized() -> RunloopHttpFault:
        """The 401 answered for a missing or revoked API key."""
        return RunloopHttpFault(401, "Invalid API key")

    async def expire(self, devbox_id: str, *, reason: str = "idle") -> None:
        """Shut a devbox down the way Runloop's idle or keep-alive killer does."""
        await self._stop(self.devboxes[devbox_id], reason)

    async def aclose(self) -> None:
        """Stop every running execution and devbox."""
        for execution in self.executions.values():
            if execution.task is not None:
                execution.task.cancel()
        for box in self.devboxes.values():
            if box.boot is not None:
                box.boot.cancel()
            await self.machine.stop(box.id)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one HTTP request the way the Runloop API would."""
        path = request.url.path
        self.requests.append((request.method, path))
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Invalid API key")
        for method, pattern, operation, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None or method != request.method:
                continue
            try:
                await self.faults.before(operation)
                return await handler(request, **match.groupdict())
            except RunloopHttpFault as fault:
                return httpx.Response(fault.status, json=fault.body)
        return _error(404, f"No route for {request.method} {path}")

    # -- devboxes -------------------------------------------------------------------------------

    async def _create(self, request: httpx.Request) -> httpx.Response:
        body = _json(request)
        sources = [k for k in ("snapshot_id", "blueprint_id", "blueprint_name") if body.get(k)]
        if len(sources) > 1:
            return _error(400, "Only one of snapshot_id, blueprint_id and blueprint_name may be specified")
        metadata = body.get("metadata") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            return _error(400, "metadata must map strings to strings")
        snapshot: _Snapshot | None = None
        if body.get("snapshot_id"):
            snapshot = self.snapshots.get(body["snapshot_id"])
            if snapshot is None:
                return _error(404, f"Snapshot {body['snapshot_id']} not found")
        box = _Devbox(
            id=_new_id("dbx_"),
            status="provisioning",
            create_time_ms=_now_ms(),
            metadata=dict(metadata),
            launch_parameters=dict(body.get("launch_parameters") or {}),
            environment=dict(body.get("environment_variables") or {}),
            name=body.get("name"),
            blueprint_id=body.get("blueprint_id") or (f"bpt_{body['blueprint_name']}" if body.get("blueprint_name")
                                                      else None),
            blueprint_name=body.get("blueprint_name"),
            snapshot_id=body.get("snapshot_id"),
        )  # fmt: skip
        box.transitions.append({"status": "provisioning", "transition_time_ms": box.create_time_ms})
        if body.get("tunnel") is not None:
            box.tunnel = _tunnel(body["tunnel"])
        self.devboxes[box.id] = box
        box.boot = asyncio.create_task(self._boot(box, snapshot))
        return httpx.Response(200, json=box.view())

    async def _boot(self, box: _Devbox, snapshot: _Snapshot | None) -> None:
        try:
            if self.boot_seconds:
                await asyncio.sleep(self.boot_seconds)
            await self.machine.start(box.id, box.environment)
            if snapshot is not None:
                await self.machine.exec(
                    box.id, ["tar", "-x", "-p", "-f", "-", "-C", "/"], stdin=snapshot.archive, timeout=120
                )
        except Exception:
            box.failure_reason = "execution_failed"
            box.end_time_ms = _now_ms()
            box.set_status("failure")
            return
        if box.status == "provisioning":
            box.set_status("initializing")
            box.set_status("running")

    async def _list(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        limit = int(params.get("limit", "20"))
        boxes = sorted(self.devboxes.values(), key=lambda b: (b.create_time_ms, b.id), reverse=True)
        if params.get("status"):
            boxes = [b for b in boxes if b.status == params["status"]]
        if params.get("starting_after"):
            ids = [b.id for b in boxes]
            after = params["starting_after"]
            boxes = boxes[ids.index(after) + 1 :] if after in ids else []
        page = boxes[:limit]
        body: dict[str, Any] = {"devboxes": [b.view() for b in page], "has_more": len(boxes) > limit}
        if params.get("include_total_count", "true") != "false":
            body["total_count"] = len(boxes)
        return httpx.Response(200, json=body)

    async def _retrieve(self, request: httpx.Request, id: str) -> httpx.Response:
        return httpx.Response(200, json=self._devbox(id).view())

    async def _wait_for_status(self, request: httpx.Request, id: str) -> httpx.Response:
        body = _json(request)
        statuses = set(body.get("statuses") or [])
        if not statuses:
            return _error(400, "statuses must not be empty")
        box = self._devbox(id)
        deadline = time.monotonic() + min(float(body.get("timeout_seconds") or _MAX_LONG_POLL), _MAX_LONG_POLL)
        while box.status not in statuses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _error(408, f"Devbox {id} did not reach {sorted(statuses)} in time")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(box.changed.wait(), remaining)
        return httpx.Response(200, json=box.view())

    async def _shutdown(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._devbox(id)
        if box.status not in _TERMINAL:
            await self._stop(box, "api_shutdown")
        return httpx.Response(200, json=box.view())

    async def _stop(self, box: _Devbox, reason: str) -> None:
        if box.boot is not None:
            box.boot.cancel()
        for execution in self.executions.values():
            if execution.devbox_id == box.id and execution.task is not None:
                execution.task.cancel()
        await self.machine.stop(box.id)
        box.shutdown_reason = reason
        box.end_time_ms = _now_ms()
        box.set_status("shutdown")

    async def _suspend(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        box.set_status("suspending")
        box.set_status("suspended")
        return httpx.Response(200, json=box.view())

    async def _resume(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._devbox(id)
        if box.status != "suspended":
            return _error(400, f"Devbox {id} is {box.status}, not suspended")
        box.set_status("resuming")
        box.set_status("running")
        return httpx.Response(200, json=box.view())

    async def _keep_alive(self, request: httpx.Request, id: str) -> httpx.Response:
        self._running(id)
        return httpx.Response(200, json={})

    async def _enable_tunnel(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        if box.tunnel is None:
            box.tunnel = _tunnel(_json(request))
        return httpx.Response(200, json=box.tunnel)

    # -- executions -----------------------------------------------------------------------------

    def _start(self, box: _Devbox, command: str) -> _Execution:
        execution = _Execution(id=_new_id("exe_"), devbox_id=box.id, command=command)
        self.executions[execution.id] = execution
        execution.task = asyncio.create_task(self._run(execution))
        return execution

    async def _run(self, execution: _Execution) -> None:
        execution.status = "running"
        try:
            done = await self.machine.exec(execution.devbox_id, ["bash", "-lc", execution.command], workdir=HOME)
            execution.exit_status = done.exit_code
            execution.stdout = done.stdout.decode(errors="replace")
            execution.stderr = done.stderr.decode(errors="replace")
        except asyncio.CancelledError:
            execution.exit_status = 137
        except ExecTimeout:  # pragma: no cover (the fake sets no timeout)
            execution.exit_status = 124
        except Exception as exc:  # the box went away under the command
            execution.exit_status = 255
            execution.stderr = str(exc)
        finally:
            execution.status = "completed"
            execution.done.set()

    async def _execute_sync(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        command = _command(request)
        execution = self._start(box, command)
        await execution.done.wait()
        return httpx.Response(
            200,
            json={
                "devbox_id": id,
                "exit_status": execution.exit_status,
                "stdout": execution.stdout,
                "stderr": execution.stderr,
            },
        )

    async def _execute_async(self, request: httpx.Request, id: str) -> httpx.Response:
        execution = self._start(self._running(id), _command(request))
        return httpx.Response(200, json=execution.view(None))

    async def _execute(self, request: httpx.Request, id: str) -> httpx.Response:
        body = _json(request)
        execution = self._start(self._running(id), _command(request))
        wait = min(float(body.get("optimistic_timeout") or 25), 25.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(execution.done.wait()), wait)
        return httpx.Response(200, json=execution.view(_last_n(request)))

    def _execution(self, id: str, eid: str) -> _Execution:
        execution = self.executions.get(eid)
        if execution is None or execution.devbox_id != id:
            raise RunloopHttpFault(404, f"Execution {eid} not found")
        return execution

    async def _execution_retrieve(self, request: httpx.Request, id: str, eid: str) -> httpx.Response:
        return httpx.Response(200, json=self._execution(id, eid).view(_last_n(request)))

    async def _execution_wait(self, request: httpx.Request, id: str, eid: str) -> httpx.Response:
        execution = self._execution(id, eid)
        body = _json(request)
        statuses = set(body.get("statuses") or [])
        if not statuses:
            return _error(400, "statuses must not be empty")
        wait = min(float(body.get("timeout_seconds") or 25), 25.0)
        if execution.status not in statuses and "completed" in statuses:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(execution.done.wait()), wait)
        if execution.status not in statuses:
            return _error(408, f"Execution {eid} did not reach {sorted(statuses)} in time")
        return httpx.Response(200, json=execution.view(_last_n(request)))

    async def _execution_kill(self, request: httpx.Request, id: str, eid: str) -> httpx.Response:
        execution = self._execution(id, eid)
        if execution.task is not None and not execution.task.done():
            execution.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await execution.task
        return httpx.Response(200, json=execution.view(None))

    # -- files ----------------------------------------------------------------------------------

    async def _read_text(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        data = await self._read(box, str(_json(request).get("file_path") or ""))
        return httpx.Response(200, text=data.decode(errors="replace"))

    async def _download(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        data = await self._read(box, str(_json(request).get("path") or ""))
        return httpx.Response(200, content=data, headers={"content-type": "application/octet-stream"})

    async def _read(self, box: _Devbox, path: str) -> bytes:
        if not path:
            raise RunloopHttpFault(400, "path must not be empty")
        target = _home_path(path)
        try:
            return await self.machine.read(box.id, target)
        except FileNotFoundError:
            raise RunloopHttpFault(404, f"File not found: {path}") from None
        except IsADirectoryError:
            raise RunloopHttpFault(400, f"Path is a directory: {path}") from None
        except OSError as exc:
            raise RunloopHttpFault(400, f"Failed to read {path}: {exc}") from None

    async def _write_text(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        body = _json(request)
        await self._write(box, str(body.get("file_path") or ""), str(body.get("contents", "")).encode())
        return httpx.Response(200, json={"devbox_id": id, "exit_status": 0, "stdout": "", "stderr": ""})

    async def _upload(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        fields = _multipart(request)
        if "file" not in fields:
            return _error(400, "file is required")
        await self._write(box, fields.get("path", b"").decode(), fields["file"])
        return httpx.Response(200, json={})

    async def _write(self, box: _Devbox, path: str, data: bytes) -> None:
        if not path:
            raise RunloopHttpFault(400, "path must not be empty")
        try:
            await self.machine.write(box.id, _home_path(path), data)
        except OSError as exc:
            raise RunloopHttpFault(400, f"Failed to write {path}: {exc}") from None

    # -- disk snapshots -------------------------------------------------------------------------

    async def _snapshot_disk(self, request: httpx.Request, id: str) -> httpx.Response:
        box = self._running(id)
        body = _json(request)
        roots = " ".join(shlex.quote(r.lstrip("/")) for r in _SNAPSHOT_ROOTS)
        done = await self.machine.exec(box.id, ["sh", "-c", f"cd / && tar -c -p -f - {roots}"], timeout=120)
        if done.exit_code != 0:
            return _error(500, "Snapshot failed: " + done.stderr.decode(errors="replace"))
        snapshot = _Snapshot(
            id=_new_id("snp_"),
            source_devbox_id=id,
            create_time_ms=_now_ms(),
            metadata=dict(body.get("metadata") or {}),
            name=body.get("name"),
            commit_message=body.get("commit_message"),
            archive=done.stdout,
        )
        self.snapshots[snapshot.id] = snapshot
        return httpx.Response(200, json=snapshot.view())

    async def _list_snapshots(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        snaps = sorted(self.snapshots.values(), key=lambda s: (s.create_time_ms, s.id), reverse=True)
        if params.get("devbox_id"):
            snaps = [s for s in snaps if s.source_devbox_id == params["devbox_id"]]
        limit = int(params.get("limit", "20"))
        if params.get("starting_after"):
            ids = [s.id for s in snaps]
            after = params["starting_after"]
            snaps = snaps[ids.index(after) + 1 :] if after in ids else []
        return httpx.Response(
            200, json={"snapshots": [s.view() for s in snaps[:limit]], "has_more": len(snaps) > limit}
        )

    async def _delete_snapshot(self, request: httpx.Request, sid: str) -> httpx.Response:
        if self.snapshots.pop(sid, None) is None:
            return _error(404, f"Snapshot {sid} not found")
        return httpx.Response(200, json={})

    # -- lookups --------------------------------------------------------------------------------

    def _devbox(self, id: str) -> _Devbox:
        box = self.devboxes.get(id)
        if box is None:
            raise RunloopHttpFault(404, f"Devbox {id} not found")
        return box

    def _running(self, id: str) -> _Devbox:
        box = self._devbox(id)
        if box.status != "running":
            raise RunloopHttpFault(400, f"Devbox {id} is in state {box.status}, expected running")
        return box


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json=RunloopHttpFault(status, message).body)


def _json(request: httpx.Request) -> dict[str, Any]:
    raw = request.content
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise RunloopHttpFault(400, "Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RunloopHttpFault(400, "Request body must be a JSON object")
    return body


def _command(request: httpx.Request) -> str:
    command = _json(request).get("command")
    if not isinstance(command, str) or not command:
        raise RunloopHttpFault(400, "command is required")
    return command


def _last_n(request: httpx.Request) -> int:
    raw = request.url.params.get("last_n")
    return int(raw) if raw else _DEFAULT_LAST_N


def _home_path(path: str) -> str:
    return posixpath.normpath(posixpath.join(HOME, path))


def _tunnel(config: dict[str, Any]) -> dict[str, Any]:
    mode = config.get("auth_mode") or "open"
    tunnel: dict[str, Any] = {
        "auth_mode": mode,
        "create_time_ms": _now_ms(),
        "http_keep_alive": config.get("http_keep_alive", True) is not False,
        "tunnel_key": "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(24)),
        "wake_on_http": bool(config.get("wake_on_http", False)),
    }
    if mode == "authenticated":
        tunnel["auth_token"] = secrets.token_urlsafe(24)
    return tunnel


def _multipart(request: httpx.Request) -> dict[str, bytes]:
    """The fields of a ``multipart/form-data`` body (name → raw bytes)."""
    content_type = request.headers.get("content-type", "")
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        raise RunloopHttpFault(400, "Expected multipart/form-data")
    delimiter = b"--" + match.group(1).encode()
    fields: dict[str, bytes] = {}
    for part in request.content.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name is not None:
            fields[name.group(1).decode()] = data.removesuffix(b"\r\n")
    return fields
