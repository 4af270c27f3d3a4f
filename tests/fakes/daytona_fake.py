"""A stateful fake of Daytona at the SDK boundary: an object with ``AsyncDaytona``'s methods.

The real SDK talks to the Daytona API and to each sandbox's toolbox through generated aiohttp
clients (``daytona_api_client_async``, ``daytona_toolbox_api_client_async``) behind a shared
session, proxy-URL discovery and an event subscription, so a transport-level fake would re-serve
two OpenAPI surfaces; instead :meth:`FakeDaytonaCloud.client` hands out a
:class:`FakeAsyncDaytona` with the same method and parameter names as ``daytona.AsyncDaytona``
and ``AsyncSandbox`` (a unit test checks the signatures against the installed SDK), returning the
SDK's own models (``ExecuteResponse``, ``FileInfo``, ``SignedPortPreviewUrl``,
``SandboxState``) and raising the SDK's own error classes, built with
``create_daytona_error`` from the status, code and source the services send. Commands and files
run in real local boxes of a :class:`~tests.fakes.machine.FakeMachine` (workspace
``/workspace``).

Reproduced:

- sandbox ids are UUIDs, names are unique per organization (a second create with a taken name is
  ``DaytonaConflictError``, 409), labels (plus the SDK's ``code-toolbox-language`` label),
  ``created_at``, states ``started``/``stopped``/``destroyed``;
- ``get`` by id or name; an unknown one is ``DaytonaNotFoundError`` (404); a deleted sandbox stays
  readable with state ``destroyed`` (as the API keeps it for a while) and leaves ``list``;
- the idle stop: ``auto_stop_interval`` minutes (default 15, 0 = never) without toolbox activity
  stop the sandbox, on an injectable clock; a stopped sandbox keeps its files (the workspace is
  kept across stop/start), loses its processes, and answers toolbox calls with an error until
  ``start``;
- ``list(ListSandboxesQuery(labels=..., limit=...))`` paged by ``limit`` over live sandboxes;
- the API key checked on every call (``DaytonaAuthenticationError``, 401);
- ``process.exec`` runs the command line with ``bash -c`` (``cwd``, ``env``, ``timeout`` in
  seconds), answers ``exit_code`` and one ``result`` text (stdout then stderr, UTF-8 with
  replacement); past the timeout ``DaytonaProcessExecutionTimeoutError``;
- ``fs.upload_file`` (bytes, creates parents), ``download_file``, ``list_files`` (depth 1),
  ``get_file_info``: a missing path is the daemon's ``FILE_NOT_FOUND``
  (``DaytonaFileNotFoundError``); modes in Go's ``FileMode.String()`` form, permissions octal;
- ``create_signed_preview_url(port, expires_in_seconds)``: ``https://<port>-<token>.proxy...``;
- ``create_snapshot(name)`` keeps a tar of ``/workspace`` that ``create`` with ``snapshot=name``
  starts from; ``snapshot.delete`` of an unknown snapshot is ``DaytonaNotFoundError``; an unknown
  snapshot on create is 404;
- fault injection and latency through :class:`FaultPlan` on ``create``, ``get``, ``list_boxes``,
  ``start``, ``terminate`` (delete), ``snapshot``, ``delete_snapshot``, ``exec``, ``read``,
  ``write``, ``list``, ``stat``, ``preview``.

Not reproduced: image builds (any image name "builds" instantly), regions/targets, resources,
volumes, sessions, PTY, git, LSP, computer use, archive and auto-archive/auto-delete, pause,
waiting states (starting/stopping are instantaneous), streaming transfers, the preview proxy
itself, the real daemon's shell choice (zsh first) and interleaving of stdout with stderr,
``os_user`` (commands run as the worker's user with HOME ``/root``), stale sandbox objects
(the fake's sandbox objects reflect the state when fetched, like the SDK's, but ``refresh_data``
is the only way they change).
"""

from __future__ import annotations

import posixpath
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from daytona.common.daytona import (
    CODE_TOOLBOX_LANGUAGE_LABEL,
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    DaytonaConfig,
)
from daytona.common.errors import SOURCE_API, SOURCE_DAEMON, SOURCE_PROXY, DaytonaError, create_daytona_error
from daytona.common.process import ExecuteResponse, ExecutionArtifacts
from daytona.common.sandbox import ListSandboxesQuery
from daytona_api_client_async import SandboxState, SignedPortPreviewUrl
from daytona_toolbox_api_client_async import FileInfo

from sandbox.errors import ExecTimeout
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["FAKE_DAYTONA_API_KEY", "FakeAsyncDaytona", "FakeDaytonaCloud", "FakeDaytonaSandbox"]

FAKE_DAYTONA_API_KEY = "dtn_fake_0123456789abcdef0123456789abcdef"
WORKSPACE = "/workspace"
DEFAULT_AUTO_STOP_MINUTES = 15
_LIST_SCRIPT = (
    'test -e "$1" || test -L "$1" || { echo "No such file or directory" >&2; exit 2; }; '
    'if [ "$2" = list ]; then test -d "$1" || { echo "Not a directory" >&2; exit 3; }; '
    'find "$1" -mindepth 1 -maxdepth 1 -printf "%f\\0%s\\0%m\\0%M\\0%T@\\0%p\\0"; '
    'else find "$1" -maxdepth 0 -printf "%f\\0%s\\0%m\\0%M\\0%T@\\0%p\\0"; fi'
)


def _api_error(status: int, message: str, code: str | None = None, source: str = SOURCE_API) -> DaytonaError:
    return create_daytona_error(message, status_code=status, code=code, source=source)


@dataclass
class _Record:
    id: str
    name: str
    labels: dict[str, str]
    env: dict[str, str]
    snapshot: str | None
    created_at: float
    auto_stop_interval: int
    state: SandboxState = SandboxState.STARTED
    last_activity: float = 0.0
    saved_workspace: bytes | None = None


@dataclass
class FakeDaytonaCloud:
    """The service: sandboxes, snapshots, one API key, a clock and a fault plan.

    Args:
        machine: Runs the sandboxes' commands and holds their files (workspace root ``/workspace``).
        api_key: The only key the API accepts.
        faults: Planned failures and latency.
        clock: Wall-clock seconds for the idle stop (tests pass a controllable one).
        proxy_domain: The preview proxy's domain.
    """

    machine: FakeMachine
    api_key: str = FAKE_DAYTONA_API_KEY
    faults: FaultPlan = field(default_factory=FaultPlan)
    clock: Callable[[], float] = time.time
    proxy_domain: str = "proxy.daytona.works"
    organization_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    sandboxes: dict[str, _Record] = field(default_factory=dict)
    snapshots: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if posixpath.normpath(self.machine.workspace_root) != WORKSPACE:
            raise ValueError(f"the Daytona fake needs FakeMachine(workspace_root={WORKSPACE!r})")

    def client(self, config: DaytonaConfig | None = None) -> FakeAsyncDaytona:
        """An ``AsyncDaytona`` for this service, authenticating with ``config.api_key``."""
        return FakeAsyncDaytona(self, config or DaytonaConfig(api_key=self.api_key))

    # -- service internals ---------------------------------------------------------------------

    def check_key(self, config: DaytonaConfig) -> None:
        if config.api_key != self.api_key:
            raise _api_error(401, "Unauthorized: invalid API key")

    def lookup(self, sandbox_id_or_name: str) -> _Record:
        record = self.sandboxes.get(sandbox_id_or_name)
        if record is None:
            live = [r for r in self.sandboxes.values() if r.name == sandbox_id_or_name]
            record = next((r for r in live if r.state is not SandboxState.DESTROYED), live[0] if live else None)
        if record is None:
            raise _api_error(404, f"Sandbox with ID or name {sandbox_id_or_name} not found")
        return record

    async def expire(self) -> None:
        """Stop sandboxes idle past their auto-stop interval."""
        now = self.clock()
        for record in list(self.sandboxes.values()):
            if (
                record.state is SandboxState.STARTED
                and record.auto_stop_interval > 0
                and now - record.last_activity >= record.auto_stop_interval * 60
            ):
                await self.stop(record)

    async def stop(self, record: _Record) -> None:
        record.saved_workspace = await self.tar_workspace(record.id)
        await self.machine.stop(record.id)
        record.state = SandboxState.STOPPED

    async def start(self, record: _Record) -> None:
        if record.state is SandboxState.STARTED:
            return
        await self.machine.start(record.id, record.env)
        if record.saved_workspace is not None:
            await self.untar_workspace(record.id, record.saved_workspace)
            record.saved_workspace = None
        record.state = SandboxState.STARTED
        record.last_activity = self.clock()

    async def toolbox(self, sandbox_id: str) -> _Record:
        """The record for a toolbox call: the proxy refuses unless the sandbox is started."""
        await self.expire()
        record = self.sandboxes.get(sandbox_id)
        if record is None or record.state is SandboxState.DESTROYED:
            raise _api_error(404, f"Sandbox {sandbox_id} not found", source=SOURCE_PROXY)
        if record.state is not SandboxState.STARTED:
            raise _api_error(
                400, f"Sandbox {sandbox_id} is not running (state: {record.state.value})", source=SOURCE_PROXY
            )
        record.last_activity = self.clock()
        return record

    async def tar_workspace(self, sandbox_id: str) -> bytes:
        done = await self.machine.exec(sandbox_id, ["tar", "-C", WORKSPACE, "-cf", "-", "."], workdir="/")
        if done.exit_code != 0:
            raise _api_error(500, done.stderr.decode(errors="replace"))
        return done.stdout

    async def untar_workspace(self, sandbox_id: str, data: bytes) -> None:
        done = await self.machine.exec(sandbox_id, ["tar", "-C", WORKSPACE, "-xpf", "-"], workdir="/", stdin=data)
        if done.exit_code != 0:
            raise _api_error(500, done.stderr.decode(errors="replace"))

    def view(self, record: _Record) -> FakeDaytonaSandbox:
        return FakeDaytonaSandbox(self, record.id)

    async def aclose(self) -> None:
        """Destroy every sandbox."""
        for record in self.sandboxes.values():
            await self.machine.stop(record.id)
            record.state = SandboxState.DESTROYED


class FakeSnapshotService:
    """``AsyncDaytona.snapshot``: delete only."""

    def __init__(self, cloud: FakeDaytonaCloud, config: DaytonaConfig) -> None:
        self._cloud = cloud
        self._config = config

    async def delete(self, snapshot: str) -> None:
        """Delete a snapshot by name (``DaytonaNotFoundError`` when unknown)."""
        await self._cloud.faults.before("delete_snapshot")
        self._cloud.check_key(self._config)
        if self._cloud.snapshots.pop(snapshot, None) is None:
            raise _api_error(404, f"Snapshot {snapshot} not found")


class FakeAsyncDaytona:
    """``AsyncDaytona`` over :class:`FakeDaytonaCloud` (same method and parameter names as the SDK)."""

    def __init__(self, cloud: FakeDaytonaCloud, config: DaytonaConfig) -> None:
        self._cloud = cloud
        self._config = config
        self.snapshot = FakeSnapshotService(cloud, config)

    async def create(
        self,
        params: CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams | None = None,
        *,
        timeout: float = 60,
        on_snapshot_create_logs: Callable[[str], None] | None = None,
    ) -> FakeDaytonaSandbox:
        """Create a sandbox and wait until it started."""
        cloud = self._cloud
        await cloud.faults.before("create")
        cloud.check_key(self._config)
        params = params or CreateSandboxFromSnapshotParams()
        if params.auto_stop_interval is not None and params.auto_stop_interval < 0:
            raise create_daytona_error("auto_stop_interval must be a non-negative integer")
        await cloud.expire()
        sandbox_id = str(uuid.uuid4())
        name = params.name or sandbox_id
        if any(r.name == name and r.state is not SandboxState.DESTROYED for r in cloud.sandboxes.values()):
            raise _api_error(409, f"Sandbox with name {name} already exists")
        snapshot = params.snapshot if isinstance(params, CreateSandboxFromSnapshotParams) else None
        if snapshot is not None and snapshot not in cloud.snapshots:
            raise _api_error(404, f"Snapshot {snapshot} not found")
        now = cloud.clock()
        record = _Record(
            id=sandbox_id,
            name=name,
            labels={**(params.labels or {}), CODE_TOOLBOX_LANGUAGE_LABEL: str(params.language or "python")},
            env=dict(params.env_vars or {}),
            snapshot=snapshot,
            created_at=now,
            auto_stop_interval=(
                params.auto_stop_interval if params.auto_stop_interval is not None else DEFAULT_AUTO_STOP_MINUTES
            ),
            last_activity=now,
        )
        cloud.sandboxes[sandbox_id] = record  # the name is taken from here on (a racing create gets 409)
        try:
            await cloud.machine.start(sandbox_id, record.env)
            if snapshot is not None:
                await cloud.untar_workspace(sandbox_id, cloud.snapshots[snapshot])
        except BaseException:
            del cloud.sandboxes[sandbox_id]
            raise
        return cloud.view(record)

    async def get(self, sandbox_id_or_name: str, request_timeout: float | None = None) -> FakeDaytonaSandbox:
        """One sandbox by id or name (destroyed ones stay readable)."""
        cloud = self._cloud
        await cloud.faults.before("get")
        cloud.check_key(self._config)
        await cloud.expire()
        return cloud.view(cloud.lookup(sandbox_id_or_name))

    async def list(
        self, query: ListSandboxesQuery | None = None, request_timeout: float | None = None
    ) -> AsyncIterator[FakeDaytonaSandbox]:
        """Every live sandbox matching the labels (and states) of ``query``, fetched page by page."""
        cloud = self._cloud
        q = query or ListSandboxesQuery()
        if q.limit is not None and q.limit < 1:
            raise create_daytona_error("limit must be a positive integer")
        wanted = q.labels or {}
        states = {str(getattr(s, "value", s)) for s in q.states} if q.states else None
        offset = 0
        while True:
            await cloud.faults.before("list_boxes")
            cloud.check_key(self._config)
            await cloud.expire()
            matching = sorted(
                (
                    r
                    for r in cloud.sandboxes.values()
                    if (r.state.value in states if states else r.state is not SandboxState.DESTROYED)
                    and all(r.labels.get(k) == v for k, v in wanted.items())
                ),
                key=lambda r: (r.created_at, r.id),
            )
            page = matching[offset : offset + (q.limit or 100)]
            for record in page:
                yield cloud.view(record)
            offset += len(page)
            if not page or offset >= len(matching):
                return

    async def close(self) -> None:
        """Nothing to release."""

    async def __aenter__(self) -> FakeAsyncDaytona:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class FakeDaytonaSandbox:
    """An ``AsyncSandbox``: a view of one sandbox as it was when fetched (``refresh_data`` updates it)."""

    def __init__(self, cloud: FakeDaytonaCloud, sandbox_id: str) -> None:
        self._cloud = cloud
        self.id = sandbox_id
        self.organization_id = cloud.organization_id
        self.process = FakeProcess(cloud, sandbox_id)
        self.fs = FakeFileSystem(cloud, sandbox_id)
        self._copy(cloud.sandboxes[sandbox_id])

    def _copy(self, record: _Record) -> None:
        self.name = record.name
        self.labels = dict(record.labels)
        self.env = dict(record.env)
        self.snapshot = record.snapshot
        self.state = record.state
        self.auto_stop_interval = record.auto_stop_interval
        self.created_at = datetime.fromtimestamp(record.created_at, UTC).isoformat().replace("+00:00", "Z")
        self.toolbox_proxy_url = f"https://{self._cloud.proxy_domain}/toolbox"

    async def refresh_data(self, request_timeout: float | None = None) -> None:
        """Re-read the sandbox from the API."""
        await self._cloud.faults.before("get")
        await self._cloud.expire()
        self._copy(self._cloud.lookup(self.id))

    async def start(self, timeout: float | None = 60) -> None:
        """Start a stopped sandbox (its workspace is kept)."""
        cloud = self._cloud
        await cloud.faults.before("start")
        await cloud.expire()
        record = cloud.lookup(self.id)
        if record.state is SandboxState.DESTROYED:
            raise _api_error(400, f"Sandbox {self.id} is destroyed")
        await cloud.start(record)
        self._copy(record)

    async def stop(self, timeout: float | None = 60, force: bool = False) -> None:
        """Stop the sandbox (processes end; the workspace is kept)."""
        cloud = self._cloud
        await cloud.faults.before("stop")
        record = cloud.lookup(self.id)
        if record.state is SandboxState.STARTED:
            await cloud.stop(record)
        self._copy(record)

    async def delete(self, timeout: float | None = 60, wait: bool = False) -> None:
        """Delete the sandbox (it stays readable as ``destroyed``)."""
        cloud = self._cloud
        await cloud.faults.before("terminate")
        record = cloud.lookup(self.id)
        if record.state is SandboxState.DESTROYED:
            raise _api_error(404, f"Sandbox {self.id} not found")
        await cloud.machine.stop(record.id)
        record.state = SandboxState.DESTROYED
        record.saved_workspace = None
        self._copy(record)

    async def create_signed_preview_url(
        self, port: int, expires_in_seconds: int | None = None, request_timeout: float | None = None
    ) -> SignedPortPreviewUrl:
        """A preview URL for ``port`` with its token embedded in the host."""
        cloud = self._cloud
        await cloud.faults.before("preview")
        await cloud.toolbox(self.id)
        token = secrets.token_hex(12)
        return SignedPortPreviewUrl(
            sandbox_id=self.id, port=port, token=token, url=f"https://{port}-{token}.{cloud.proxy_domain}"
        )

    async def create_snapshot(self, name: str, timeout: float | None = 60) -> None:
        """Keep the sandbox's ``/workspace`` as snapshot ``name``."""
        cloud = self._cloud
        await cloud.faults.before("snapshot")
        await cloud.toolbox(self.id)
        if name in cloud.snapshots:
            raise _api_error(409, f"Snapshot {name} already exists")
        cloud.snapshots[name] = await cloud.tar_workspace(self.id)


class FakeProcess:
    """``AsyncSandbox.process``: ``exec`` only."""

    def __init__(self, cloud: FakeDaytonaCloud, sandbox_id: str) -> None:
        self._cloud = cloud
        self._id = sandbox_id

    async def exec(
        self, command: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: int | None = None
    ) -> ExecuteResponse:
        """Run ``bash -c command``; one text result (stdout then stderr) and the exit code."""
        cloud = self._cloud
        await cloud.faults.before("exec")
        await cloud.toolbox(self._id)
        try:
            done = await cloud.machine.exec(
                self._id, ["/bin/bash", "-c", command], workdir=cwd or WORKSPACE, env=env, timeout=timeout or None
            )
        except ExecTimeout:
            raise create_daytona_error(
                "command execution timeout", status_code=408, code="PROCESS_EXECUTION_TIMEOUT", source=SOURCE_DAEMON
            ) from None
        result = (done.stdout + done.stderr).decode("utf-8", errors="replace")
        return ExecuteResponse(
            exit_code=done.exit_code, result=result, artifacts=ExecutionArtifacts(stdout=result, charts=[])
        )


class FakeFileSystem:
    """``AsyncSandbox.fs``: upload, download, list, stat."""

    def __init__(self, cloud: FakeDaytonaCloud, sandbox_id: str) -> None:
        self._cloud = cloud
        self._id = sandbox_id

    @staticmethod
    def _path(path: str) -> str:
        return posixpath.normpath(posixpath.join(WORKSPACE, path))

    @staticmethod
    def _missing(path: str) -> DaytonaError:
        return create_daytona_error(
            f"file not found: {path}", status_code=404, code="FILE_NOT_FOUND", source=SOURCE_DAEMON
        )

    async def upload_file(self, src: str | bytes, dst: str, timeout: int = 30 * 60) -> None:
        """Write ``src`` (bytes) to ``dst``, creating parent directories."""
        if isinstance(src, str):
            raise NotImplementedError("the Daytona fake uploads bytes only")
        cloud = self._cloud
        await cloud.faults.before("write")
        await cloud.toolbox(self._id)
        try:
            await cloud.machine.write(self._id, self._path(dst), bytes(src))
        except IsADirectoryError:
            raise _api_error(400, f"{dst} is a directory", "INVALID_FILE_PATH", SOURCE_DAEMON) from None

    async def download_file(self, remote_path: str, timeout: int = 30 * 60) -> bytes:
        """The bytes of a file."""
        cloud = self._cloud
        await cloud.faults.before("read")
        await cloud.toolbox(self._id)
        try:
            return await cloud.machine.read(self._id, self._path(remote_path))
        except FileNotFoundError:
            raise self._missing(remote_path) from None
        except IsADirectoryError:
            raise _api_error(400, f"{remote_path} is a directory", "INVALID_FILE_PATH", SOURCE_DAEMON) from None

    async def list_files(
        self, path: str, depth: int | None = None, request_timeout: float | None = None
    ) -> list[FileInfo]:
        """One level of a directory."""
        if depth not in (None, 1):
            raise NotImplementedError("the Daytona fake lists one level only")
        await self._cloud.faults.before("list")
        return await self._stat(path, "list")

    async def get_file_info(self, path: str, request_timeout: float | None = None) -> FileInfo:
        """Stat one path (symbolic links are not followed)."""
        await self._cloud.faults.before("stat")
        return (await self._stat(path, "one"))[0]

    async def _stat(self, path: str, what: str) -> list[FileInfo]:
        cloud = self._cloud
        await cloud.toolbox(self._id)
        target = self._path(path)
        done = await cloud.machine.exec(self._id, ["sh", "-c", _LIST_SCRIPT, "sh", target, what], workdir="/")
        if done.exit_code == 2:
            raise self._missing(path)
        if done.exit_code != 0:
            raise _api_error(400, f"{path}: {done.stderr.decode(errors='replace').strip()}", None, SOURCE_DAEMON)
        fields = done.stdout.split(b"\0")[:-1]
        infos = []
        for i in range(0, len(fields) - 5, 6):
            name, size, perm, mode, mtime, full = (f.decode(errors="surrogateescape") for f in fields[i : i + 6])
            go_mode = {"l": "L", "s": "S", "b": "D", "c": "D"}.get(mode[0], mode[0]) + mode[1:]
            when = datetime.fromtimestamp(float(mtime), UTC)
            infos.append(
                FileInfo(
                    group="daytona",
                    is_dir=mode.startswith("d"),
                    mod_time=when.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC"),
                    mode=go_mode,
                    modified_at=when.isoformat().replace("+00:00", "Z"),
                    name=name,
                    owner="daytona",
                    path=full,
                    permissions=f"{int(perm, 8):04o}",
                    size=int(size),
                )
            )
        return sorted(infos, key=lambda info: info.name)
