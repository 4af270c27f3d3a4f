"""A stateful fake of Blaxel sandboxes at the SDK object level (``blaxel.core.SandboxInstance``).

Why not the transport: the ``blaxel`` SDK keeps its control-plane client and credentials in module
globals, and every sandbox's data-plane helpers (``process``, ``fs``) build their own
``httpx.AsyncClient`` for the sandbox URL with no transport hook. So this fake stands in for the
SDK's objects instead, with the same method names and parameters (checked against the real classes
with ``inspect.signature`` in ``tests/unit/providers/test_blaxel.py``), returning the SDK's real model
objects (``Sandbox``, ``Metadata``, ``ProcessResponse``, ``Preview``, ``PreviewToken``) and raising
its real exceptions (``SandboxAPIError`` for the control plane, ``ResponseError`` built from an
HTTP response for the data plane, ``UnexpectedStatus`` for previews):

======================================  ===============================================
fake                                    real SDK
======================================  ===============================================
:class:`FakeSandboxApi`                 ``SandboxInstance`` class methods (``create``,
                                        ``create_if_not_exists``, ``get``, ``list``,
                                        ``delete``)
:class:`FakeSandboxInstance`            a ``SandboxInstance``
:class:`FakeSandboxProcess`             ``SandboxProcess`` (``sandbox.process``)
:class:`FakeSandboxFileSystem`          ``SandboxFileSystem`` (``sandbox.fs``)
:class:`FakeSandboxPreviews` / ``…Preview`` / ``…PreviewTokens``  ``SandboxPreviews`` and friends
======================================  ===============================================

Reproduced:

- names as the identity (lowercase, digits, single hyphens, at most 49 characters; anything else
  answers 400), ``metadata.created_at``/``url``/``workspace``/``labels``, status ``DEPLOYED``;
- ``create`` of a taken name answers 409; ``create_if_not_exists`` returns the live sandbox as is
  and replaces a ``TERMINATED``/``FAILED`` one (a new ``created_at``);
- ``delete``: the sandbox and its processes are gone, ``get`` answers the record with status
  ``TERMINATED`` (the retention window, never expiring here), ``list`` leaves it out; data-plane
  calls on it answer 404 ``WORKLOAD_NOT_FOUND``; ``get`` of a name never used answers 404;
- processes: ``exec`` (``sh -c command`` in ``working_dir`` with ``env``; ``wait_for_completion``;
  a running name answers 400; ``timeout`` kills the command, status ``killed``), ``get``,
  ``wait`` (``TimeoutError`` after ``max_wait`` ms, the command keeps running), ``kill``; stdout and
  stderr are text (decoded UTF-8), as the JSON API returns them;
- files: ``read_binary``/``write_binary``/``read``/``write`` (parents created), a missing file
  answers 404;
- previews: one per port (``preview-<port>``), public or private, ``https://…preview.bl.run``
  URLs, tokens with an expiry;
- failures: a :class:`~tests.fakes.faults.FaultPlan` (``create``, ``get``, ``list_boxes``,
  ``terminate``, ``exec``, ``read``, ``write``, ``preview``) raises the error it is given, and adds
  latency; :meth:`BlaxelFake.transient_error`, :meth:`BlaxelFake.quota_error` and
  :meth:`BlaxelFake.auth_error` build the SDK's real errors for a 503, a 429 and a 401.

Not reproduced: the HTTP wire format itself, standby/scale-to-zero, archive/unarchive, snapshots
and forks, drives and volumes, sessions, streaming logs, ``fs.ls``/``find``/``grep``/``watch``
(the provider lists through exec), multipart uploads (sizes are unlimited), the retention
window's expiry, lifecycle/TTL deletion (recorded, never enforced unless a test calls
:meth:`BlaxelFake.expire`), regions and images (recorded only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import httpx
from blaxel.core.client.errors import UnexpectedStatus
from blaxel.core.client.models import Preview, PreviewToken, Sandbox
from blaxel.core.sandbox.client.models import ProcessResponse, SuccessResponse
from blaxel.core.sandbox.default.preview import SandboxPreviewToken
from blaxel.core.sandbox.default.sandbox import SandboxAPIError
from blaxel.core.sandbox.types import ResponseError

from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = [
    "BlaxelFake",
    "FakePage",
    "FakeSandboxApi",
    "FakeSandboxFileSystem",
    "FakeSandboxInstance",
    "FakeSandboxPreview",
    "FakeSandboxPreviewTokens",
    "FakeSandboxPreviews",
    "FakeSandboxProcess",
]

_NAME: Final = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_NAME_MAX: Final = 49
_GONE: Final = frozenset({"TERMINATED", "FAILED"})


def _iso(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _data_plane_error(status: int, message: str, code: str) -> ResponseError:
    """The ``ResponseError`` the SDK raises when a sandbox's API answers ``status``."""
    request = httpx.Request("GET", "https://run.blaxel.ai/")
    return ResponseError(
        httpx.Response(
            status, json={"error": message, "code": code}, headers={"x-blaxel-error-code": code}, request=request
        )
    )


def _success(message: str, path: str) -> SuccessResponse:
    response = SuccessResponse.from_dict({"message": message, "path": path})
    assert response is not None
    return response


@dataclass
class _Process:
    name: str
    command: str
    working_dir: str
    started_at: str
    pid: str
    task: asyncio.Task[None] | None = None
    status: str = "running"
    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    completed_at: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def response(self) -> ProcessResponse:
        response = ProcessResponse.from_dict(
            {
                "command": self.command,
                "completedAt": self.completed_at,
                "exitCode": self.exit_code,
                "logs": self.stdout + self.stderr,
                "name": self.name,
                "pid": self.pid,
                "startedAt": self.started_at,
                "status": self.status,
                "stderr": self.stderr,
                "stdout": self.stdout,
                "workingDir": self.working_dir,
            }
        )
        assert response is not None
        return response


@dataclass
class _Record:
    name: str
    box_key: str
    created_at: str
    status: str
    labels: dict[str, str]
    envs: dict[str, str]
    image: str
    memory: int
    region: str | None
    ttl: str | None
    processes: dict[str, _Process] = field(default_factory=dict)
    previews: dict[str, Preview] = field(default_factory=dict)

    def model(self, workspace: str) -> Sandbox:
        spec: dict[str, Any] = {
            "runtime": {
                "image": self.image,
                "memory": self.memory,
                "envs": [{"name": k, "value": v} for k, v in self.envs.items()],
            }
        }
        if self.ttl:
            spec["runtime"]["ttl"] = self.ttl
        if self.region:
            spec["region"] = self.region
        sandbox = Sandbox.from_dict(
            {
                "metadata": {
                    "name": self.name,
                    "createdAt": self.created_at,
                    "updatedAt": self.created_at,
                    "workspace": workspace,
                    "url": f"https://sbx-{self.name}-{workspace}.{self.region or 'us-pdx-1'}.bl.run",
                    "labels": dict(self.labels),
                },
                "spec": spec,
                "status": self.status,
            }
        )
        assert sandbox is not None
        return sandbox


class BlaxelFake:
    """The fake Blaxel workspace: sandboxes, their processes, files and previews.

    Args:
        machine: Runs the sandboxes' commands and holds their files.
        workspace: The Blaxel workspace name the sandboxes belong to.
        faults: Planned failures and latency (a new plan if omitted).
    """

    def __init__(self, machine: FakeMachine, *, workspace: str = "fake-workspace", faults: FaultPlan | None = None):
        self.machine = machine
        self.workspace = workspace
        self.faults = faults if faults is not None else FaultPlan()
        self.records: dict[str, _Record] = {}
        self.api = FakeSandboxApi(self)

    @staticmethod
    def transient_error() -> SandboxAPIError:
        """The control plane's 503 while it is overloaded or deploying (retryable)."""
        return SandboxAPIError(
            "Service temporarily unavailable", status_code=503, code="SERVICE_UNAVAILABLE",
            body={"code": "SERVICE_UNAVAILABLE", "message": "Service temporarily unavailable", "status": 503,
                  "retryable": True},
        )  # fmt: skip

    @staticmethod
    def quota_error() -> SandboxAPIError:
        """The 429 answered when the workspace's sandbox quota or request rate is exceeded."""
        return SandboxAPIError("Quota exceeded for sandboxes", status_code=429, code="QUOTA_EXCEEDED")

    @staticmethod
    def auth_error() -> SandboxAPIError:
        """The 401 answered for a revoked or unknown API key."""
        return SandboxAPIError("Token revoked", status_code=401, code="TOKEN_REVOKED")

    async def expire(self, name: str) -> None:
        """Delete a sandbox the way its TTL or idle lifecycle policy does."""
        await self._delete(self.records[name])

    async def aclose(self) -> None:
        """Stop every process and sandbox."""
        for record in self.records.values():
            await self._delete(record)

    # -- internals used by the fake SDK objects --------------------------------------------------

    def _instance(self, record: _Record) -> FakeSandboxInstance:
        return FakeSandboxInstance(self, record)

    def _live(self, name: str) -> _Record:
        """The record of a live sandbox, for a data-plane call (404 ``WORKLOAD_NOT_FOUND`` otherwise)."""
        record = self.records.get(name)
        if record is None or record.status != "DEPLOYED":
            raise _data_plane_error(404, f"Sandbox {name} not found", "WORKLOAD_NOT_FOUND")
        return record

    async def _delete(self, record: _Record) -> None:
        for process in record.processes.values():
            if process.task is not None:
                process.task.cancel()
        await self.machine.stop(record.box_key)
        record.status = "TERMINATED"


@dataclass
class FakePage:
    """One page of ``list`` (the SDK's ``AsyncPaginatedList``: ``data``, ``has_more``, ``next_cursor``)."""

    data: list[FakeSandboxInstance]
    has_more: bool
    next_cursor: str | None


class FakeSandboxApi:
    """The ``SandboxInstance`` class methods, bound to a :class:`BlaxelFake`."""

    def __init__(self, fake: BlaxelFake) -> None:
        self._fake = fake

    async def create(
        self,
        sandbox: dict[str, Any] | None = None,
        safe: bool = False,
        create_if_not_exist: bool = False,
        timeout: int | None = None,
    ) -> FakeSandboxInstance:
        """Create a sandbox from a configuration dict; a taken name answers 409."""
        fake = self._fake
        await fake.faults.before("create")
        config = dict(sandbox or {})
        name = config.get("name") or f"sandbox-{secrets.token_hex(4)}"
        if len(name) > _NAME_MAX or not _NAME.fullmatch(name):
            raise SandboxAPIError(f"Invalid sandbox name {name!r}", status_code=400, code="INVALID_INPUT")
        existing = fake.records.get(name)
        if existing is not None and existing.status not in _GONE:
            if create_if_not_exist:
                return fake._instance(existing)
            raise SandboxAPIError(f"Sandbox {name} already exists", status_code=409, code="SANDBOX_ALREADY_EXISTS")
        envs = {str(e["name"]): str(e["value"]) for e in config.get("envs") or []}
        created = _iso()
        record = _Record(
            name=name,
            box_key=f"{name}-{hashlib.sha256(created.encode()).hexdigest()[:8]}",
            created_at=created,
            status="DEPLOYING",
            labels={str(k): str(v) for k, v in (config.get("labels") or {}).items()},
            envs=envs,
            image=config.get("image") or "blaxel/base-image:latest",
            memory=int(config.get("memory") or 4096),
            region=config.get("region"),
            ttl=config.get("ttl"),
        )
        fake.records[name] = record
        try:
            await fake.machine.start(record.box_key, envs)
        except Exception:
            record.status = "FAILED"
            raise
        record.status = "DEPLOYED"
        return fake._instance(record)

    async def create_if_not_exists(self, sandbox: dict[str, Any], timeout: int | None = None) -> FakeSandboxInstance:
        """The live sandbox holding the name, as is, or a new one (replacing a terminated one)."""
        return await self.create(sandbox, create_if_not_exist=True, timeout=timeout)

    async def get(self, sandbox_name: str) -> FakeSandboxInstance:
        """The sandbox record by name (``TERMINATED`` after a delete); 404 for a name never used."""
        await self._fake.faults.before("get")
        record = self._fake.records.get(sandbox_name)
        if record is None:
            raise SandboxAPIError(f"Sandbox '{sandbox_name}' not found", status_code=404, code="NOT_FOUND")
        return self._fake._instance(record)

    async def list(self, limit: int = 50, cursor: str | None = None) -> FakePage:
        """One page of the workspace's sandboxes, oldest first; deleted ones are left out."""
        await self._fake.faults.before("list_boxes")
        live = sorted((r for r in self._fake.records.values() if r.status != "TERMINATED"), key=lambda r: r.name)
        start = int(cursor) if cursor else 0
        page = live[start : start + limit]
        more = start + limit < len(live)
        return FakePage(
            [self._fake._instance(r) for r in page], has_more=more, next_cursor=str(start + limit) if more else None
        )

    async def delete(self, sandbox_name: str) -> Sandbox:
        """Delete a sandbox by name; 404 for a name never used."""
        fake = self._fake
        await fake.faults.before("terminate")
        record = fake.records.get(sandbox_name)
        if record is None:
            raise SandboxAPIError(f"Sandbox '{sandbox_name}' not found", status_code=404, code="NOT_FOUND")
        await fake._delete(record)
        return record.model(fake.workspace)


class FakeSandboxInstance:
    """A ``SandboxInstance``: the record as read, and the process/fs/previews helpers."""

    def __init__(self, fake: BlaxelFake, record: _Record) -> None:
        self._fake = fake
        self.sandbox = record.model(fake.workspace)
        self.process = FakeSandboxProcess(fake, record.name)
        self.fs = FakeSandboxFileSystem(fake, record.name)
        self.previews = FakeSandboxPreviews(fake, record.name)

    @property
    def metadata(self) -> Any:
        """The sandbox metadata (``name``, ``created_at``, ``labels``, ``url``, ...)."""
        return self.sandbox.metadata

    @property
    def status(self) -> Any:
        """The status when the record was read."""
        return self.sandbox.status

    @property
    def spec(self) -> Any:
        """The sandbox spec as read."""
        return self.sandbox.spec


class FakeSandboxProcess:
    """``sandbox.process``: commands run in the sandbox's box of the fake machine."""

    def __init__(self, fake: BlaxelFake, sandbox_name: str) -> None:
        self._fake = fake
        self._name = sandbox_name

    async def exec(self, process: dict[str, Any]) -> ProcessResponse:
        """Start ``process["command"]`` (``sh -c``); wait for it with ``wait_for_completion``."""
        fake = self._fake
        await fake.faults.before("exec")
        record = fake._live(self._name)
        command = process.get("command")
        if not isinstance(command, str) or not command:
            raise _data_plane_error(400, "command is required", "BAD_REQUEST")
        name = process.get("name") or f"proc-{secrets.token_hex(4)}"
        running = record.processes.get(name)
        if running is not None and running.status == "running":
            raise _data_plane_error(400, f"process {name} is already running", "BAD_REQUEST")
        entry = _Process(
            name=name,
            command=command,
            working_dir=process.get("working_dir") or "/",
            started_at=_iso(),
            pid=str(secrets.randbelow(60000) + 100),
        )
        record.processes[name] = entry
        timeout = process.get("timeout") or None
        entry.task = asyncio.create_task(self._run(record, entry, dict(process.get("env") or {}), timeout))
        if process.get("wait_for_completion"):
            await entry.done.wait()
        return entry.response()

    async def _run(self, record: _Record, entry: _Process, env: dict[str, str], timeout: float | None) -> None:
        run = self._fake.machine.exec(record.box_key, ["sh", "-c", entry.command], workdir=entry.working_dir, env=env)
        try:
            done = await asyncio.wait_for(run, timeout)
            entry.exit_code = done.exit_code
            entry.stdout = done.stdout.decode(errors="replace")
            entry.stderr = done.stderr.decode(errors="replace")
            entry.status = "completed" if done.exit_code == 0 else "failed"
        except (asyncio.CancelledError, TimeoutError):
            entry.exit_code, entry.status = 137, "killed"
        except Exception as exc:  # the sandbox went away under the command
            entry.exit_code, entry.status, entry.stderr = 255, "failed", str(exc)
        finally:
            entry.completed_at = _iso()
            entry.done.set()

    def _process(self, identifier: str) -> _Process:
        record = self._fake._live(self._name)
        entry = record.processes.get(identifier) or next(
            (p for p in record.processes.values() if p.pid == identifier), None
        )
        if entry is None:
            raise _data_plane_error(404, f"process {identifier} not found", "NOT_FOUND")
        return entry

    async def get(self, identifier: str, *, retry: bool = True) -> ProcessResponse:
        """The process by name or pid."""
        await self._fake.faults.before("exec")
        return self._process(identifier).response()

    async def wait(self, identifier: str, max_wait: int = 60000, interval: int = 1000) -> ProcessResponse:
        """Wait until the process ends; ``TimeoutError`` after ``max_wait`` ms (-1: no deadline)."""
        await self._fake.faults.before("exec")
        entry = self._process(identifier)
        deadline = None if max_wait == -1 else max_wait / 1000
        try:
            await asyncio.wait_for(asyncio.shield(entry.done.wait()), deadline)
        except TimeoutError:
            raise TimeoutError(f"Process {identifier} did not finish in time") from None
        return entry.response()

    async def kill(self, identifier: str) -> SuccessResponse:
        """Kill the process (and its process tree)."""
        await self._fake.faults.before("exec")
        entry = self._process(identifier)
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task
        return _success("Process killed", identifier)


class FakeSandboxFileSystem:
    """``sandbox.fs``: whole-file reads and writes in the sandbox's box."""

    def __init__(self, fake: BlaxelFake, sandbox_name: str) -> None:
        self._fake = fake
        self._name = sandbox_name

    def format_path(self, path: str) -> str:
        """The path as sent to the sandbox API (unchanged, as in the SDK)."""
        return path

    def _absolute(self, path: str) -> str:
        # The sandbox API resolves a relative path under /.
        return posixpath.normpath(posixpath.join("/", self.format_path(path)))

    async def read_binary(self, path: str) -> bytes:
        """The bytes of a file; 404 when it does not exist."""
        await self._fake.faults.before("read")
        record = self._fake._live(self._name)
        target = self._absolute(path)
        try:
            return await self._fake.machine.read(record.box_key, target)
        except FileNotFoundError:
            raise _data_plane_error(404, f"file not found: {target}", "NOT_FOUND") from None
        except OSError as exc:
            raise _data_plane_error(400, f"cannot read {target}: {exc}", "BAD_REQUEST") from None

    async def read(self, path: str) -> str:
        """A text file (decoded UTF-8)."""
        return (await self.read_binary(path)).decode(errors="replace")

    async def write_binary(self, path: str, content: bytes | bytearray | str) -> SuccessResponse:
        """Write a whole file (a ``str`` is a local file path to upload, as in the SDK)."""
        await self._fake.faults.before("write")
        record = self._fake._live(self._name)
        data = content if isinstance(content, bytes | bytearray) else open(content, "rb").read()  # noqa: SIM115
        target = self._absolute(path)
        try:
            await self._fake.machine.write(record.box_key, target, bytes(data))
        except OSError as exc:
            raise _data_plane_error(400, f"cannot write {target}: {exc}", "BAD_REQUEST") from None
        return _success("File written", target)

    async def write(self, path: str, content: str) -> SuccessResponse:
        """Write a text file."""
        return await self.write_binary(path, content.encode())


class FakeSandboxPreviewTokens:
    """``preview.tokens``: access tokens of a private preview."""

    def __init__(self, preview_name: str) -> None:
        self._preview = preview_name

    async def create(self, expires_at: datetime) -> SandboxPreviewToken:
        """A new token valid until ``expires_at``."""
        token = PreviewToken.from_dict(
            {
                "metadata": {"name": f"token-{secrets.token_hex(4)}", "previewName": self._preview},
                "spec": {"expiresAt": expires_at.isoformat(), "token": secrets.token_urlsafe(24), "expired": False},
            }
        )
        assert token is not None
        return SandboxPreviewToken(token)


class FakeSandboxPreview:
    """A preview publishing one sandbox port."""

    def __init__(self, preview: Preview) -> None:
        self.preview = preview
        self.tokens = FakeSandboxPreviewTokens(self.name)

    @property
    def name(self) -> str:
        """The preview name."""
        return str(self.preview.metadata.name)

    @property
    def url(self) -> str:
        """The preview URL."""
        url = getattr(self.preview.spec, "url", None)
        return url if isinstance(url, str) else ""


class FakeSandboxPreviews:
    """``sandbox.previews`` (control plane; errors are ``UnexpectedStatus``)."""

    def __init__(self, fake: BlaxelFake, sandbox_name: str) -> None:
        self._fake = fake
        self._name = sandbox_name

    def _record(self) -> Any:
        record = self._fake.records.get(self._name)
        if record is None or record.status == "TERMINATED":
            raise UnexpectedStatus(404, b'{"error":"Sandbox not found","code":404}')
        return record

    async def get(self, preview_name: str) -> FakeSandboxPreview:
        """A preview by name; 404 when there is none."""
        await self._fake.faults.before("preview")
        preview = self._record().previews.get(preview_name)
        if preview is None:
            raise UnexpectedStatus(404, b'{"error":"Preview not found","code":404}')
        return FakeSandboxPreview(preview)

    async def create(self, preview: dict[str, Any]) -> FakeSandboxPreview:
        """Create a preview from the shorthand ``{"port", "public", "name"}``; a taken name answers 409."""
        await self._fake.faults.before("preview")
        record = self._record()
        port = preview.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"invalid preview port {port!r}")
        name = preview.get("name") or f"preview-{port}"
        if name in record.previews:
            raise UnexpectedStatus(409, b'{"error":"Preview already exists","code":409}')
        host = hashlib.sha256(f"{self._fake.workspace}/{self._name}/{name}".encode()).hexdigest()[:20]
        model = Preview.from_dict(
            {
                "metadata": {"name": name, "resourceName": self._name, "resourceType": "sandbox"},
                "spec": {"port": port, "public": bool(preview.get("public")), "url": f"https://{host}.preview.bl.run"},
            }
        )
        assert model is not None
        record.previews[name] = model
        return FakeSandboxPreview(model)

    async def create_if_not_exists(self, preview: dict[str, Any]) -> FakeSandboxPreview:
        """The preview of this name (``preview-<port>``) as it is, or a new one."""
        name = preview.get("name") or f"preview-{preview.get('port')}"
        try:
            return await self.get(name)
        except UnexpectedStatus as err:
            if err.status_code != 404:
                raise
        return await self.create(preview)
