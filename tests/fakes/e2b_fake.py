"""A stateful fake of E2B at the SDK boundary: an object with ``AsyncSandbox``'s class-level methods.

The real SDK talks REST to the E2B API through pyqwest transports and connect-rpc to envd inside
each sandbox, so a transport-level fake would mean re-implementing both protocols; instead
:class:`FakeE2BCloud` hands out :attr:`FakeE2BCloud.sdk`, an object with the same method names,
parameter names and return types as ``e2b.AsyncSandbox`` (a unit test checks the signatures
against the installed SDK), returning the SDK's own dataclasses (``SandboxInfo``,
``SnapshotInfo``, ``CommandResult``, ``EntryInfo``, ``WriteInfo``) and raising the SDK's own
exception classes with the messages the SDK builds. Commands and files run in real local boxes of
a :class:`~tests.fakes.machine.FakeMachine` whose workspace sits at ``/home/user``.

Reproduced:

- sandbox ids in E2B's shape (20 lowercase alphanumerics), metadata, ``started_at``/``end_at``,
  states ``running``/``paused``; a killed sandbox disappears (``get_info``/``connect`` raise
  ``SandboxNotFoundException``, ``kill`` answers False, ``list`` no longer shows it);
- the sandbox timeout (``timeout`` seconds, default 300) with ``lifecycle.on_timeout`` ``kill``
  (the sandbox is gone) or ``pause`` (paused; ``connect`` resumes it, ``auto_resume`` resumes on
  the next sandbox call), checked against an injectable clock on every call; ``connect`` extends
  a running sandbox's timeout only when the new one is longer;
- ``Idempotency-Key`` on create (validated with the SDK's own rules): a retried create returns
  the same sandbox while it lives;
- ``list`` with metadata and state filters, paginated by ``limit`` (``has_next``/``next_items``);
- API key checked on every control-plane call (``AuthenticationException`` with the SDK's text);
  lifecycle options validated with the SDK's own ``build_lifecycle_config``;
- sandbox calls on a killed or paused sandbox raise ``SandboxNotRunningException`` (the proxy's
  "was not found" answer), as envd's proxy does;
- ``commands.run`` runs ``/bin/bash -l -c <cmd>`` with ``envs``/``cwd``/``timeout`` (0 = no
  limit, default 60), decodes output as UTF-8 with replacement like the SDK, raises
  ``CommandExitException`` for a non-zero exit and ``TimeoutException`` past the deadline;
- ``files.read`` (text/bytes), ``files.write`` (creates parents), ``files.list`` (depth 1),
  ``files.exists``; relative paths resolve under ``/home/user``; a missing path is
  ``FileNotFoundException``, listing a file ``InvalidArgumentException``;
- ``create_snapshot`` keeps a tar of ``/home/user`` under an id ``<20 chars>:default`` that
  ``create(template=<id>)`` starts from; ``delete_snapshot`` answers False for an unknown id;
  an unknown template is the API's 404 ``SandboxException``;
- ``get_host(port)`` = ``<port>-<id>.<domain>``;
- fault injection and latency through :class:`FaultPlan` on operations ``create``, ``get``
  (connect, get_info), ``list_boxes``, ``terminate`` (kill), ``pause``, ``snapshot``,
  ``delete_snapshot``, ``exec``, ``read``, ``write``, ``list``, ``exists``.

Not reproduced: memory snapshots (a paused box keeps its processes running; a snapshot keeps
only ``/home/user``), background commands, PTYs, streaming reads and writes, watch, ``user=``
(commands run as the worker's user with HOME ``/root``), networking rules and the preview
proxy itself (``get_host`` only names the host), the 24 h plan limit, request timeouts,
Idempotency-Key expiry, server-side retries, envd versions.
"""

from __future__ import annotations

import asyncio
import posixpath
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, overload

from e2b import (
    CommandExitException,
    EntryInfo,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    SandboxInfo,
    SandboxLifecycle,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    SnapshotInfo,
    TimeoutException,
    WriteInfo,
)
from e2b.api import api_exception_from_code
from e2b.exceptions import format_sandbox_unavailable_exception
from e2b.retry import resolve_idempotency_key
from e2b.sandbox.commands.command_handle import CommandResult
from e2b.sandbox.sandbox_api import build_lifecycle_config

from sandbox.errors import ExecTimeout
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["FAKE_E2B_API_KEY", "FakeE2BCloud", "FakeE2BSandbox", "FakeE2BSdk"]

FAKE_E2B_API_KEY = "e2b_fake_0123456789abcdef0123456789abcdef"
WORKSPACE = "/home/user"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_KINDS = {"file": FileType.FILE, "dir": FileType.DIR, "symlink": FileType.SYMLINK}


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def _permissions(mode: int) -> str:
    bits = "rwxrwxrwx"
    return "".join(bits[i] if mode & (1 << (8 - i)) else "-" for i in range(9))


@dataclass
class _Record:
    sandbox_id: str
    template: str
    metadata: dict[str, str]
    envs: dict[str, str]
    started_at: float
    end_at: float
    on_timeout: Literal["kill", "pause"]
    auto_resume: bool
    allow_internet_access: bool | None
    state: SandboxState = SandboxState.RUNNING
    timeout: int = 300

    def info(self, domain: str) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=self.sandbox_id,
            sandbox_domain=domain,
            template_id=self.template,
            name=self.template,
            metadata=dict(self.metadata),
            started_at=datetime.fromtimestamp(self.started_at, UTC),
            end_at=datetime.fromtimestamp(self.end_at, UTC),
            state=self.state,
            cpu_count=2,
            memory_mb=512,
            envd_version="0.2.4",
            allow_internet_access=self.allow_internet_access,
            lifecycle={"on_timeout": self.on_timeout, "auto_resume": self.auto_resume},
        )


@dataclass
class FakeE2BCloud:
    """The service: sandboxes, snapshots, idempotency keys, one API key, a clock and a fault plan.

    Args:
        machine: Runs the sandboxes' commands and holds their files (workspace root ``/home/user``).
        api_key: The only key the API accepts.
        faults: Planned failures and latency.
        domain: The sandbox domain (``get_host``).
        clock: Wall-clock seconds, for sandbox timeouts (tests pass a controllable one).
    """

    machine: FakeMachine
    api_key: str = FAKE_E2B_API_KEY
    faults: FaultPlan = field(default_factory=FaultPlan)
    domain: str = "e2b.app"
    clock: Callable[[], float] = time.time
    templates: set[str] = field(default_factory=lambda: {"base"})
    sandboxes: dict[str, _Record] = field(default_factory=dict)
    snapshots: dict[str, bytes] = field(default_factory=dict)
    idempotency: dict[str, str] = field(default_factory=dict)
    inflight: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if posixpath.normpath(self.machine.workspace_root) != WORKSPACE:
            raise ValueError(f"the E2B fake needs FakeMachine(workspace_root={WORKSPACE!r})")
        self.sdk = FakeE2BSdk(self)

    # -- service internals ---------------------------------------------------------------------

    def check_key(self, opts: dict[str, Any]) -> None:
        if opts.get("api_key") != self.api_key:
            raise api_exception_from_code(401, "Invalid API key")

    async def expire(self) -> None:
        """Apply sandbox timeouts that passed on the clock (kill or pause)."""
        now = self.clock()
        for record in list(self.sandboxes.values()):
            if record.state is SandboxState.RUNNING and now >= record.end_at:
                if record.on_timeout == "pause":
                    record.state = SandboxState.PAUSED
                else:
                    await self.destroy(record.sandbox_id)

    async def destroy(self, sandbox_id: str) -> None:
        self.sandboxes.pop(sandbox_id, None)
        await self.machine.stop(sandbox_id)

    async def live(self, sandbox_id: str) -> _Record:
        """The record for an envd (in-sandbox) call: killed, timed out or paused is the proxy's 502."""
        await self.expire()
        record = self.sandboxes.get(sandbox_id)
        if record is not None and record.state is SandboxState.PAUSED and record.auto_resume:
            self.resume(record, record.timeout)
        if record is None or record.state is not SandboxState.RUNNING:
            raise format_sandbox_unavailable_exception(f"The sandbox {sandbox_id} was not found")
        return record

    def resume(self, record: _Record, timeout: int | None) -> None:
        now = self.clock()
        seconds = timeout if timeout is not None else record.timeout
        if record.state is SandboxState.PAUSED:
            record.state = SandboxState.RUNNING
            record.end_at = now + seconds
        else:
            record.end_at = max(record.end_at, now + seconds)

    async def tar_workspace(self, sandbox_id: str) -> bytes:
        done = await self.machine.exec(sandbox_id, ["tar", "-C", WORKSPACE, "-cf", "-", "."], workdir="/")
        if done.exit_code != 0:
            raise api_exception_from_code(500, done.stderr.decode(errors="replace"))
        return done.stdout

    async def untar_workspace(self, sandbox_id: str, data: bytes) -> None:
        done = await self.machine.exec(sandbox_id, ["tar", "-C", WORKSPACE, "-xpf", "-"], workdir="/", stdin=data)
        if done.exit_code != 0:
            raise api_exception_from_code(500, done.stderr.decode(errors="replace"))

    async def aclose(self) -> None:
        """Kill every sandbox."""
        for sandbox_id in list(self.sandboxes):
            await self.destroy(sandbox_id)


class FakeE2BSdk:
    """The class-level ``AsyncSandbox`` API of :class:`FakeE2BCloud` (same names and parameters as the SDK)."""

    def __init__(self, cloud: FakeE2BCloud) -> None:
        self._cloud = cloud

    async def create(
        self,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        secure: bool | None = None,
        allow_internet_access: bool | None = None,
        mcp: object | None = None,
        network: object | None = None,
        iam: object | None = None,
        lifecycle: SandboxLifecycle | None = None,
        volume_mounts: object | None = None,
        logger: object | None = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> FakeE2BSandbox:
        """``AsyncSandbox.create``: a new sandbox, or the one created under the same Idempotency-Key."""
        if mcp is not None or network is not None or iam is not None or volume_mounts:
            raise NotImplementedError("the E2B fake has no MCP gateway, network rules, IAM or volumes")
        cloud = self._cloud
        await cloud.faults.before("create")
        cloud.check_key(opts)
        key = resolve_idempotency_key(idempotency_key)
        build_lifecycle_config(lifecycle)  # the SDK validates before sending
        await cloud.expire()
        if key is not None and (inflight := cloud.inflight.get(key)) is not None:
            await asyncio.shield(inflight)  # the same key is being served: answer with its sandbox
        if key is not None and (existing := cloud.idempotency.get(key)) in cloud.sandboxes:
            return FakeE2BSandbox(cloud, cloud.sandboxes[existing])
        if key is None:
            return await self._create(template, timeout, metadata, envs, allow_internet_access, lifecycle, None)
        cloud.inflight[key] = done = asyncio.get_running_loop().create_future()
        try:
            return await self._create(template, timeout, metadata, envs, allow_internet_access, lifecycle, key)
        finally:
            del cloud.inflight[key]
            done.set_result(None)

    async def _create(
        self,
        template: str | None,
        timeout: int | None,
        metadata: dict[str, str] | None,
        envs: dict[str, str] | None,
        allow_internet_access: bool | None,
        lifecycle: SandboxLifecycle | None,
        key: str | None,
    ) -> FakeE2BSandbox:
        cloud = self._cloud
        body = build_lifecycle_config(lifecycle)
        template = template or "base"
        if template not in cloud.templates and template not in cloud.snapshots:
            raise api_exception_from_code(404, f"template '{template}' not found")
        seconds = timeout if timeout is not None else 300
        now = cloud.clock()
        record = _Record(
            sandbox_id=_new_id(),
            template=template,
            metadata=dict(metadata or {}),
            envs=dict(envs or {}),
            started_at=now,
            end_at=now + seconds,
            on_timeout="pause" if body.auto_pause is True else "kill",
            auto_resume=bool(lifecycle.get("auto_resume")) if lifecycle else False,
            allow_internet_access=allow_internet_access,
            timeout=seconds,
        )
        await cloud.machine.start(record.sandbox_id, record.envs)
        if template in cloud.snapshots:
            await cloud.untar_workspace(record.sandbox_id, cloud.snapshots[template])
        cloud.sandboxes[record.sandbox_id] = record
        if key is not None:
            cloud.idempotency[key] = record.sandbox_id
        return FakeE2BSandbox(cloud, record)

    async def connect(
        self,
        sandbox_id: str,
        timeout: int | None = None,
        logger: object | None = None,
        *,
        on_resume: Literal["restore", "reboot"] = "restore",
        **opts: Any,
    ) -> FakeE2BSandbox:
        """``AsyncSandbox.connect(sandbox_id)``: resume a paused sandbox, extend a running one's timeout."""
        cloud = self._cloud
        await cloud.faults.before("get")
        cloud.check_key(opts)
        await cloud.expire()
        record = cloud.sandboxes.get(sandbox_id)
        if record is None:
            raise SandboxNotFoundException(f"Paused sandbox {sandbox_id} not found")
        cloud.resume(record, timeout)
        return FakeE2BSandbox(cloud, record)

    def list(
        self,
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: Literal["asc", "desc"] | None = None,
        **opts: Any,
    ) -> FakeSandboxPaginator:
        """``AsyncSandbox.list``: a paginator over running and paused sandboxes (by default)."""
        return FakeSandboxPaginator(self._cloud, query, limit, next_token, opts)

    async def kill(self, sandbox_id: str, **opts: Any) -> bool:
        """``AsyncSandbox.kill(sandbox_id)``: True if killed, False if not found."""
        cloud = self._cloud
        await cloud.faults.before("terminate")
        cloud.check_key(opts)
        await cloud.expire()
        if sandbox_id not in cloud.sandboxes:
            return False
        await cloud.destroy(sandbox_id)
        return True

    async def get_info(self, sandbox_id: str, **opts: Any) -> SandboxInfo:
        """``AsyncSandbox.get_info(sandbox_id)``."""
        cloud = self._cloud
        await cloud.faults.before("get")
        cloud.check_key(opts)
        await cloud.expire()
        record = cloud.sandboxes.get(sandbox_id)
        if record is None:
            raise SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
        return record.info(cloud.domain)

    async def pause(
        self,
        sandbox_id: str,
        keep_memory: bool | None = None,
        *,
        mode: Literal["full", "filesystem"] | None = None,
        strict: bool = False,
        **opts: Any,
    ) -> bool:
        """``AsyncSandbox.pause(sandbox_id)``: True if paused now, False if it already was."""
        cloud = self._cloud
        await cloud.faults.before("pause")
        cloud.check_key(opts)
        await cloud.expire()
        record = cloud.sandboxes.get(sandbox_id)
        if record is None:
            raise SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
        if record.state is SandboxState.PAUSED:
            return False
        record.state = SandboxState.PAUSED
        return True

    async def create_snapshot(
        self,
        sandbox_id: str,
        name: str | None = None,
        *,
        mode: Literal["full", "filesystem"] | None = None,
        **opts: Any,
    ) -> SnapshotInfo:
        """``AsyncSandbox.create_snapshot(sandbox_id)``: keeps ``/home/user``; the sandbox keeps running."""
        cloud = self._cloud
        await cloud.faults.before("snapshot")
        cloud.check_key(opts)
        await cloud.expire()
        record = cloud.sandboxes.get(sandbox_id)
        if record is None:
            raise SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
        snapshot_id = f"{name or _new_id()}:default"
        cloud.snapshots[snapshot_id] = await cloud.tar_workspace(sandbox_id)
        return SnapshotInfo(snapshot_id=snapshot_id, names=[f"fake-team/{snapshot_id}"])

    async def delete_snapshot(self, snapshot_id: str, **opts: Any) -> bool:
        """``AsyncSandbox.delete_snapshot``: True if deleted, False if not found."""
        cloud = self._cloud
        await cloud.faults.before("delete_snapshot")
        cloud.check_key(opts)
        return cloud.snapshots.pop(snapshot_id, None) is not None


class FakeSandboxPaginator:
    """``AsyncSandboxPaginator``: pages of ``limit`` sandboxes, oldest first."""

    def __init__(
        self,
        cloud: FakeE2BCloud,
        query: SandboxQuery | None,
        limit: int | None,
        next_token: str | None,
        opts: dict[str, Any],
    ) -> None:
        self._cloud = cloud
        self.query = query
        self.limit = limit
        self._offset = int(next_token or 0)
        self._opts = opts
        self._has_next = True

    @property
    def has_next(self) -> bool:
        """Whether another page can be fetched."""
        return self._has_next

    @property
    def next_token(self) -> str | None:
        """The cursor of the next page."""
        return str(self._offset) if self._has_next else None

    async def next_items(self, **opts: Any) -> list[SandboxInfo]:
        """The next page (raises like the SDK when there is none)."""
        if not self._has_next:
            raise Exception("No more items to fetch")
        cloud = self._cloud
        await cloud.faults.before("list_boxes")
        cloud.check_key({**self._opts, **opts})
        await cloud.expire()
        states = (self.query.state if self.query and self.query.state else None) or [
            SandboxState.RUNNING,
            SandboxState.PAUSED,
        ]
        wanted = self.query.metadata if self.query and self.query.metadata else {}
        matching = sorted(
            (
                r
                for r in cloud.sandboxes.values()
                if r.state in states and all(r.metadata.get(k) == v for k, v in wanted.items())
            ),
            key=lambda r: (r.started_at, r.sandbox_id),
        )
        size = self.limit or 100
        page = matching[self._offset : self._offset + size]
        self._offset += len(page)
        self._has_next = self._offset < len(matching)
        return [r.info(cloud.domain) for r in page]


class FakeE2BSandbox:
    """A connected sandbox (``AsyncSandbox`` instance): ``commands``, ``files``, ``get_host``, ``kill``."""

    def __init__(self, cloud: FakeE2BCloud, record: _Record) -> None:
        self._cloud = cloud
        self._id = record.sandbox_id
        self.commands = FakeCommands(cloud, record.sandbox_id)
        self.files = FakeFilesystem(cloud, record.sandbox_id)

    @property
    def sandbox_id(self) -> str:
        """The sandbox id."""
        return self._id

    @property
    def sandbox_domain(self) -> str:
        """The domain the sandbox is served under."""
        return self._cloud.domain

    def get_host(self, port: int) -> str:
        """``<port>-<sandbox id>.<domain>``."""
        return f"{port}-{self._id}.{self._cloud.domain}"

    async def is_running(self, request_timeout: float | None = None) -> bool:
        """Whether envd answers (False once killed, timed out or paused)."""
        try:
            await self._cloud.live(self._id)
        except SandboxNotRunningException:
            return False
        return True

    async def kill(self, **opts: Any) -> bool:
        """Kill this sandbox (uses the API key it was created with)."""
        return await self._cloud.sdk.kill(self._id, **{"api_key": self._cloud.api_key, **opts})


class FakeCommands:
    """``AsyncSandbox.commands``: foreground ``run`` only."""

    def __init__(self, cloud: FakeE2BCloud, sandbox_id: str) -> None:
        self._cloud = cloud
        self._id = sandbox_id

    async def run(
        self,
        cmd: str,
        background: bool | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: object | None = None,
        on_stderr: object | None = None,
        stdin: bool | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult:
        """Run ``/bin/bash -l -c cmd`` and wait; ``CommandExitException`` for a non-zero exit."""
        if background:
            raise NotImplementedError("the E2B fake runs foreground commands only")
        cloud = self._cloud
        await cloud.faults.before("exec")
        await cloud.live(self._id)
        try:
            done = await cloud.machine.exec(
                self._id, ["/bin/bash", "-l", "-c", cmd], workdir=cwd or WORKSPACE, env=envs, timeout=timeout or None
            )
        except ExecTimeout:
            raise TimeoutException(
                "context deadline exceeded: This error is likely due to exceeding 'timeout' — the total time a "
                "long running request (like process or directory watch) can be active — or 'request_timeout'."
            ) from None
        stdout = done.stdout.decode("utf-8", errors="replace")
        stderr = done.stderr.decode("utf-8", errors="replace")
        if done.exit_code != 0:
            raise CommandExitException(
                stderr=stderr, stdout=stdout, exit_code=done.exit_code, error=f"exit status {done.exit_code}"
            )
        return CommandResult(stderr=stderr, stdout=stdout, exit_code=0, error=None)


class FakeFilesystem:
    """``AsyncSandbox.files``: read, write, list (depth 1), exists."""

    def __init__(self, cloud: FakeE2BCloud, sandbox_id: str) -> None:
        self._cloud = cloud
        self._id = sandbox_id

    @staticmethod
    def _path(path: str) -> str:
        return posixpath.normpath(posixpath.join(WORKSPACE, path))

    @overload
    async def read(
        self,
        path: str,
        format: Literal["text"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str: ...

    @overload
    async def read(
        self,
        path: str,
        format: Literal["bytes"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> bytearray: ...

    async def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str | bytearray:
        """A whole file as text or bytes (``FileNotFoundException`` when missing)."""
        if format == "stream":
            raise NotImplementedError("the E2B fake does not stream reads")
        cloud = self._cloud
        await cloud.faults.before("read")
        await cloud.live(self._id)
        try:
            data = await cloud.machine.read(self._id, self._path(path))
        except FileNotFoundError:
            raise FileNotFoundException(f"404: path '{self._path(path)}' does not exist") from None
        except IsADirectoryError:
            raise InvalidArgumentException(f"400: path '{self._path(path)}' is a directory") from None
        return bytearray(data) if format == "bytes" else data.decode("utf-8", errors="replace")

    async def write(
        self,
        path: str,
        data: str | bytes,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> WriteInfo:
        """Write a whole file, creating parent directories."""
        cloud = self._cloud
        await cloud.faults.before("write")
        await cloud.live(self._id)
        target = self._path(path)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        try:
            await cloud.machine.write(self._id, target, payload)
        except IsADirectoryError:
            raise InvalidArgumentException(f"400: path '{target}' is a directory") from None
        return WriteInfo(name=posixpath.basename(target), type=FileType.FILE, path=target)

    async def list(
        self,
        path: str,
        depth: int | None = 1,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> list[EntryInfo]:
        """One level of a directory."""
        if depth is not None and depth < 1:
            raise InvalidArgumentException("depth should be at least 1")
        if depth != 1:
            raise NotImplementedError("the E2B fake lists one level only")
        cloud = self._cloud
        await cloud.faults.before("list")
        await cloud.live(self._id)
        target = self._path(path)
        try:
            entries = await cloud.machine.list(self._id, target)
        except FileNotFoundError:
            raise FileNotFoundException(f"path '{target}' does not exist") from None
        except NotADirectoryError:
            raise InvalidArgumentException(f"path '{target}' is not a directory") from None
        now = datetime.now(UTC)
        return [
            EntryInfo(
                name=e.name,
                type=_KINDS.get(e.kind),
                path=posixpath.join(target, e.name),
                size=e.size,
                mode=e.mode,
                permissions=_permissions(e.mode),
                owner="user",
                group="user",
                modified_time=now,
            )
            for e in entries
            if e.kind in _KINDS
        ]

    async def exists(self, path: str, user: str | None = None, request_timeout: float | None = None) -> bool:
        """Whether a file, directory or symlink exists at ``path``."""
        cloud = self._cloud
        await cloud.faults.before("exists")
        await cloud.live(self._id)
        target = self._path(path)
        done = await cloud.machine.exec(self._id, ["sh", "-c", 'test -e "$1" || test -L "$1"', "sh", target])
        return done.exit_code == 0
