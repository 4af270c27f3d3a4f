"""The E2B backend: boxes are E2B cloud sandboxes, driven through the official ``e2b`` SDK (``AsyncSandbox``).

SDK calls (class-level, credentials passed per call as ``api_key``/``domain``/``api_url``):
``AsyncSandbox.create(template, timeout, metadata, envs, allow_internet_access, lifecycle,
idempotency_key)``, ``AsyncSandbox.list(query=SandboxQuery(metadata=..., state=[running, paused]))``
to adopt a box created under the same idempotency key and for :meth:`E2BProvider.list_owned`,
``AsyncSandbox.connect(sandbox_id)`` to resume (it also resumes a paused sandbox),
``AsyncSandbox.get_info`` to tell a stopped sandbox from a paused one, ``AsyncSandbox.kill``,
``AsyncSandbox.create_snapshot`` / ``delete_snapshot`` for native snapshots. On a sandbox:
``commands.run`` (a bash command line; argv is quoted with :func:`shlex.join`), ``files.read``
(``format="bytes"``), ``files.write``, ``files.list``, ``files.exists`` and ``get_host(port)``
(preview URL ``<port>-<sandbox id>.<domain>``, always TLS on 443).

``commands.run`` decodes output as UTF-8 text and raises ``CommandExitException`` for a non-zero
exit, so :class:`E2BBoxSession.exec` wraps the command in :func:`providers.shell_exec.exec_script`:
it runs with its output redirected to scratch files, and the wrapper prints the exit status and both
streams base64-encoded in one report line and exits 0; stdout and stderr come back byte-exact and a
non-zero exit is an :class:`ExecResult`, not an error.
Input for ``stdin`` is uploaded to a scratch file first. A command with a timeout also runs under
``timeout -s KILL`` a few seconds past it, so it cannot outlive the SDK's deadline for long.

NotFound rule: only the control plane's typed answer proves a box gone —
``SandboxNotFoundException`` (HTTP 404 on get/connect/pause/snapshot) or ``kill`` answering False.
A sandbox operation that fails with ``SandboxNotRunningException`` (the proxy in front of envd did
not find the sandbox: killed, timed out, *or paused*) is confirmed with ``get_info``: 404 is
:class:`BoxNotFound`, a paused or running sandbox is :class:`ProviderUnavailable` (``resume``
reconnects and resumes it).

=====================================================  =====================================
SDK error                                              our error
=====================================================  =====================================
``SandboxNotFoundException`` / status 404 (box ops)    :class:`BoxNotFound`
status 404 on create (unknown template / snapshot)     :class:`ProviderError`
``SandboxNotRunningException``                         confirmed with ``get_info`` (above)
``FileNotFoundException``                              :class:`PathNotFound`
``AuthenticationException`` / status 401, 403          :class:`ProviderAuthError`
``RateLimitException`` / status 429                    :class:`ProviderQuotaError`
``ServiceBusyException`` (503), status 5xx             :class:`ProviderUnavailable`
``SandboxUnreachableException``, ``TimeoutException``  :class:`ProviderUnavailable`
  (connection level, request deadline)
``TimeoutException`` after the command's own timeout   :class:`ExecTimeout`
``httpx.TransportError``, ``OSError``                  :class:`ProviderUnavailable`
anything else (``InvalidArgumentException``, ...)      :class:`ProviderError`
=====================================================  =====================================
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

import httpx
from e2b import (
    AuthenticationException,
    CommandExitException,
    EntryInfo,
    FileNotFoundException,
    FileType,
    RateLimitException,
    SandboxException,
    SandboxInfo,
    SandboxLifecycle,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    ServiceBusyException,
    SnapshotInfo,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import CommandResult
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import SERVER_ERRORS, ErrorTable, Row, confirmed
from providers.shell_exec import MARKER, NO_WORKDIR, exec_script, parse_exec_report, stage_stdin
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.descriptors import CAPABILITY_DESCRIPTORS
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    PathNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
)

if TYPE_CHECKING:
    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

__all__ = [
    "E2B_SNAPSHOT_REF_PREFIX",
    "WORKSPACE_ROOT",
    "E2BBoxSession",
    "E2BProvider",
    "E2BSandbox",
    "E2BSdk",
    "E2BSettings",
    "build_provider",
    "decode_snapshot_ref",
    "encode_snapshot_ref",
]

WORKSPACE_ROOT: Final = "/home/user"
#: Prefix of a native snapshot reference (upstream ``E2B_SANDBOX_SNAPSHOT_V1``).
E2B_SNAPSHOT_REF_PREFIX: Final = b"E2B_SANDBOX_SNAPSHOT_V1\n"

_KILL_GRACE_SECONDS: Final = 5
_LIST_PAGE: Final = 100
_KINDS: Final = {FileType.FILE: "file", FileType.DIR: "dir", FileType.SYMLINK: "symlink"}


# --- settings -----------------------------------------------------------------------------------


class E2BSettings(BaseSettings):
    """E2B settings (environment prefix ``SANDBOX_E2B_``); the API key also falls back to ``E2B_API_KEY``."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_E2B_", extra="ignore", populate_by_name=True)

    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("api_key", "SANDBOX_E2B_API_KEY", "E2B_API_KEY")
    )
    template: str = "base"
    timeout_seconds: int = Field(default=3600, description="Sandbox lifetime in seconds (the SDK's unit).")
    timeout_action: Literal["kill", "pause"] = "kill"
    allow_internet_access: bool = True
    auto_resume: bool | None = None
    workspace_persistence: Literal["tar", "snapshot"] = "tar"
    domain: str | None = Field(default=None, description="E2B domain (the SDK's E2B_DOMAIN), e.g. for self-hosting.")
    api_url: str | None = Field(default=None, description="E2B API URL override (the SDK's E2B_API_URL).")
    request_timeout_seconds: float = 60.0

    def check(self) -> None:
        """Check the settings offline.

        Raises:
            SandboxConfigError: the API key is missing, or a value is out of range; the message names the setting.
        """
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise SandboxConfigError(
                "[sandbox:e2b] SANDBOX_E2B_API_KEY is not set; set it (or E2B_API_KEY) to an API key "
                "from the E2B dashboard"
            )
        if not 1 <= self.timeout_seconds <= 86_400:
            raise SandboxConfigError(
                f"[sandbox:e2b] SANDBOX_E2B_TIMEOUT_SECONDS must be between 1 and 86400, not {self.timeout_seconds}"
            )
        if self.auto_resume and self.timeout_action != "pause":
            raise SandboxConfigError(
                "[sandbox:e2b] SANDBOX_E2B_AUTO_RESUME=true needs SANDBOX_E2B_TIMEOUT_ACTION=pause"
            )
        if not self.template.strip():
            raise SandboxConfigError("[sandbox:e2b] SANDBOX_E2B_TEMPLATE must not be empty")


# --- the typed slice of the SDK this module uses ------------------------------------------------


class E2BCommands(Protocol):
    """``AsyncSandbox.commands``: foreground commands only."""

    async def run(
        self,
        cmd: str,
        *,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult:
        """Run a bash command line and wait for it (``CommandExitException`` for a non-zero exit)."""
        ...


class E2BFiles(Protocol):
    """``AsyncSandbox.files``."""

    async def read(self, path: str, format: Literal["bytes"], *, request_timeout: float | None = None) -> bytearray:
        """The bytes of a file."""
        ...

    async def write(self, path: str, data: bytes, *, request_timeout: float | None = None) -> object:
        """Write a whole file, creating parents."""
        ...

    async def list(self, path: str, depth: int | None = 1, *, request_timeout: float | None = None) -> list[EntryInfo]:
        """One directory level."""
        ...

    async def exists(self, path: str, *, request_timeout: float | None = None) -> bool:
        """Whether a path exists."""
        ...


class E2BSandbox(Protocol):
    """A connected ``AsyncSandbox`` instance."""

    @property
    def sandbox_id(self) -> str:
        """The sandbox id."""
        ...

    @property
    def sandbox_domain(self) -> str:
        """The domain the sandbox is served under."""
        ...

    @property
    def commands(self) -> E2BCommands:
        """The command module."""
        ...

    @property
    def files(self) -> E2BFiles:
        """The filesystem module."""
        ...

    def get_host(self, port: int) -> str:
        """``<port>-<sandbox id>.<domain>``."""
        ...


class E2BPaginator(Protocol):
    """``AsyncSandboxPaginator``."""

    @property
    def has_next(self) -> bool:
        """Whether another page can be fetched."""
        ...

    async def next_items(self) -> list[SandboxInfo]:
        """The next page."""
        ...


class E2BSdk(Protocol):
    """The class-level ``AsyncSandbox`` API (``e2b.AsyncSandbox`` itself, or a fake with the same methods)."""

    async def create(
        self,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        *,
        allow_internet_access: bool | None = None,
        lifecycle: SandboxLifecycle | None = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> E2BSandbox:
        """Create a sandbox."""
        ...

    async def connect(self, sandbox_id: str, timeout: int | None = None, **opts: Any) -> E2BSandbox:
        """Connect to (and resume) a sandbox by id."""
        ...

    def list(self, query: SandboxQuery | None = None, limit: int | None = None, **opts: Any) -> E2BPaginator:
        """List running and paused sandboxes."""
        ...

    async def kill(self, sandbox_id: str, **opts: Any) -> bool:
        """Kill a sandbox; False if it was not found."""
        ...

    async def get_info(self, sandbox_id: str, **opts: Any) -> SandboxInfo:
        """The control plane's view of one sandbox."""
        ...

    async def create_snapshot(self, sandbox_id: str, name: str | None = None, **opts: Any) -> SnapshotInfo:
        """Snapshot a sandbox (filesystem and memory); the id creates sandboxes like a template."""
        ...

    async def delete_snapshot(self, snapshot_id: str, **opts: Any) -> bool:
        """Delete a snapshot; False if it was not found."""
        ...


# --- error translation --------------------------------------------------------------------------


_ERRORS: Final = ErrorTable(
    (
        Row(SandboxNotFoundException, BoxNotFound, "E2B: {text}", box=True),
        Row(FileNotFoundException, PathNotFound, "E2B: {text}"),
        Row(AuthenticationException, ProviderAuthError, "E2B rejected the API key: {text}"),
        Row(RateLimitException, ProviderQuotaError, "E2B rate limit: {text}"),
        Row(ServiceBusyException, ProviderUnavailable, "E2B is busy: {text}"),
        # SandboxNotRunning/Unreachable are TimeoutExceptions too: only get_info proves a box gone.
        Row(TimeoutException, ProviderUnavailable, "E2B: {text}"),
        Row(SandboxException, BoxNotFound, "E2B: {text}", status={404}, box=True),
        Row(SandboxException, ProviderAuthError, "E2B rejected the request: {text}", status={401, 403}),
        Row(SandboxException, ProviderQuotaError, "E2B rate limit: {text}", status={429}),
        Row(SandboxException, ProviderUnavailable, "E2B: {text}", status=SERVER_ERRORS),
        Row(SandboxException, ProviderError, "E2B: {text}"),
        Row((httpx.TransportError, OSError, ConnectionError), ProviderUnavailable, "E2B could not be reached: {text}"),
    ),
    default="E2B: {name}: {text}",
)
"""The module docstring's table; ``box_op=False`` where a 404 cannot mean "the box is gone" (create)."""


# --- the box session ----------------------------------------------------------------------------


def _box_path(path: str) -> str:
    return posixpath.normpath(posixpath.join(WORKSPACE_ROOT, path))


class E2BBoxSession:
    """A connected E2B sandbox. Relative paths are under ``/home/user``; absolute paths are allowed."""

    def __init__(self, provider: E2BProvider, sandbox: E2BSandbox) -> None:
        self._provider = provider
        self._sandbox = sandbox

    @property
    def instance_id(self) -> str:
        """The E2B sandbox id."""
        return self._sandbox.sandbox_id

    async def _failed(self, err: BaseException) -> ProviderError:
        """Translate an error of a sandbox operation, asking the control plane whether a not-running box is gone."""
        if isinstance(err, SandboxNotRunningException):
            try:
                info = await self._provider.sdk.get_info(self.instance_id, **self._provider.api_params())
            except Exception as probe:
                return _ERRORS.translate(probe)
            return ProviderUnavailable(
                f"E2B sandbox {self.instance_id} is {info.state.value}, not reachable: {err}; resume it to reconnect"
            )
        return _ERRORS.translate(err)

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv) in the sandbox and wait for it.

        Raises:
            ExecTimeout: the command ran past ``timeout`` seconds.
            PathNotFound: the working directory does not exist.
            BoxNotFound: the sandbox is gone.
            ProviderUnavailable: E2B or the sandbox could not be reached; retry.
        """
        if not cmd:
            raise ProviderError("exec needs a non-empty argv")
        wd = _box_path(workdir or ".")
        stdin_path = await stage_stdin(stdin, self.write_file)
        guard = int(timeout) + _KILL_GRACE_SECONDS if timeout else None
        script = exec_script(cmd, workdir=wd, stdin_file=stdin_path, kill_after=guard)
        started = time.monotonic()
        try:
            done = await self._sandbox.commands.run(
                script,
                envs=dict(env or {}),
                timeout=timeout if timeout else 0,
                request_timeout=self._provider.settings.request_timeout_seconds,
            )
            stdout = done.stdout
        except CommandExitException as err:
            stdout = err.stdout or ""
            if err.exit_code == NO_WORKDIR and MARKER not in stdout:
                raise PathNotFound(f"working directory {wd} does not exist in the box", path=wd) from None
        except TimeoutException as err:
            if timeout and not isinstance(err, SandboxNotRunningException) and time.monotonic() - started >= timeout:
                raise ExecTimeout(
                    f"command ran past {timeout}s in E2B sandbox {self.instance_id}", timeout=timeout
                ) from err
            raise await self._failed(err) from err
        except Exception as err:
            raise await self._failed(err) from err
        report = parse_exec_report(stdout)
        if report is None:
            raise ProviderError(f"E2B sandbox {self.instance_id} returned no exec report: {stdout[-300:]!r}")
        return await report.result()

    async def read_file(self, path: str) -> bytes:
        """Read a whole file.

        Raises:
            PathNotFound: no such file.
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            try:
                return bytes(await self._sandbox.files.read(_box_path(path), format="bytes"))
            except FileNotFoundException:
                raise PathNotFound(f"no such file: {path}", path=path) from None

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parent directories.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            await self._sandbox.files.write(_box_path(path), bytes(data))

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level, sorted by name.

        Raises:
            PathNotFound: no such directory.
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            try:
                entries = await self._sandbox.files.list(_box_path(path), depth=1)
            except FileNotFoundException:
                raise PathNotFound(f"no such directory: {path}", path=path) from None
        listed = [
            DirEntry(
                name=entry.name,
                kind=_KINDS.get(entry.type, "other") if entry.type is not None else "other",
                size=entry.size,
                mode=entry.mode & 0o7777,
            )
            for entry in entries
        ]
        return sorted(listed, key=lambda e: e.name)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the sandbox.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            return await self._sandbox.files.exists(_box_path(path))

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The sandbox's public host for ``port`` (``<port>-<id>.<domain>``, TLS on 443)."""
        if not 1 <= port <= 65535:
            raise ProviderError(f"port must be in 1..65535, not {port}")
        return Endpoint(host=self._sandbox.get_host(port), port=443, tls=True)

    def serialize_state(self) -> Envelope:
        """The envelope that resumes this sandbox."""
        return Envelope(
            backend_id=self._provider.backend_id,
            instance_id=self.instance_id,
            state={"sandboxId": self.instance_id, "sandboxDomain": self._sandbox.sandbox_domain},
        )


# --- the provider -------------------------------------------------------------------------------


def _idempotency_header(key: str) -> str:
    """E2B's Idempotency-Key allows 1-255 of ``[a-z0-9-]``: a digest of ours fits and stays stable."""
    return hashlib.sha256(key.encode()).hexdigest()


def _created_at(info: SandboxInfo) -> float | None:
    started = info.started_at
    return started.timestamp() if isinstance(started, datetime) else None


class E2BProvider(RemoteWorkspaceSnapshots):
    """Boxes on E2B.

    Args:
        settings: The E2B settings (``SANDBOX_E2B_*``).
        sdk: The class-level ``AsyncSandbox`` API; the real ``e2b.AsyncSandbox`` when None (tests pass a fake).
    """

    def __init__(self, settings: E2BSettings, *, sdk: E2BSdk | None = None) -> None:
        self.settings = settings
        if sdk is None:
            from e2b import AsyncSandbox

            sdk = cast(E2BSdk, AsyncSandbox)
        self.sdk = sdk
        self.remote_workspace = RemoteWorkspace(workspace_root=WORKSPACE_ROOT, home_dir=None)

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The e2b descriptor."""
        return CAPABILITY_DESCRIPTORS["e2b"]

    @property
    def backend_id(self) -> str:
        """``e2b``."""
        return self.descriptor.backend_id

    def validate_credentials(self) -> None:
        """Check the settings offline (see :meth:`E2BSettings.check`)."""
        self.settings.check()

    def api_params(self) -> dict[str, Any]:
        """Connection options passed on every class-level SDK call."""
        params: dict[str, Any] = {"request_timeout": self.settings.request_timeout_seconds}
        if self.settings.api_key is not None:
            params["api_key"] = self.settings.api_key.get_secret_value()
        if self.settings.domain:
            params["domain"] = self.settings.domain
        if self.settings.api_url:
            params["api_url"] = self.settings.api_url
        return params

    async def _find(self, metadata: dict[str, str]) -> list[SandboxInfo]:
        query = SandboxQuery(metadata=metadata, state=[SandboxState.RUNNING, SandboxState.PAUSED])
        paginator = self.sdk.list(query=query, limit=_LIST_PAGE, **self.api_params())
        found: list[SandboxInfo] = []
        with _ERRORS.mapped(box_op=False):
            while paginator.has_next:
                found.extend(await paginator.next_items())
        return found

    async def create(self, spec: BoxSpec, idempotency_key: str) -> E2BBoxSession:
        """Create a sandbox, or adopt the running/paused one created under ``idempotency_key``.

        Raises:
            ProviderAuthError, ProviderQuotaError, ProviderUnavailable, ProviderError: E2B refused or failed.
        """
        self.settings.check()
        for info in await self._find({box_labels.KEY: idempotency_key}):
            try:
                return await self._connect(info.sandbox_id)
            except BoxNotFound:
                continue  # killed between the listing and the connect: create a new one
        lifecycle: SandboxLifecycle = {"on_timeout": self.settings.timeout_action}
        if self.settings.auto_resume is not None:
            lifecycle["auto_resume"] = self.settings.auto_resume
        with _ERRORS.mapped(box_op=False):
            sandbox = await self.sdk.create(
                template=spec.image or self.settings.template,
                timeout=self.settings.timeout_seconds,
                metadata={
                    box_labels.LEASE_ID: spec.lease_id,
                    box_labels.KEY: idempotency_key,
                    box_labels.MANAGED_BY: box_labels.MANAGED_BY_US,
                    "sandbox.workspace_id": spec.workspace_id,
                    box_labels.EPOCH: str(spec.epoch),
                },
                envs=dict(spec.environment),
                allow_internet_access=self.settings.allow_internet_access,
                lifecycle=lifecycle,
                idempotency_key=_idempotency_header(idempotency_key),
                **self.api_params(),
            )
        return E2BBoxSession(self, sandbox)

    async def _connect(self, sandbox_id: str) -> E2BBoxSession:
        with _ERRORS.mapped():
            sandbox = await self.sdk.connect(sandbox_id, timeout=self.settings.timeout_seconds, **self.api_params())
        return E2BBoxSession(self, sandbox)

    @staticmethod
    def _sandbox_id(envelope: Envelope) -> str:
        sandbox_id = envelope.instance_id or str(envelope.state.get("sandboxId") or "")
        if not sandbox_id:
            raise BoxNotFound("the envelope names no E2B sandbox")
        return sandbox_id

    async def resume(self, envelope: Envelope) -> E2BBoxSession:
        """Reconnect to the sandbox (resuming it if paused).

        Raises:
            BoxNotFound: the sandbox was killed or never existed.
            ProviderUnavailable: E2B could not be reached; retry.
        """
        return await self._connect(self._sandbox_id(envelope))

    async def terminate(self, envelope: Envelope) -> None:
        """Kill the sandbox; an unknown sandbox is not an error."""
        try:
            with _ERRORS.mapped():
                await self.sdk.kill(self._sandbox_id(envelope), **self.api_params())
        except BoxNotFound:
            return

    async def list_owned(self) -> list[OwnedBox]:
        """Running and paused sandboxes this runtime created (metadata ``sandbox.managed_by``)."""
        return [
            box_labels.owned_box(info.sandbox_id, info.metadata, created_at=_created_at(info))
            for info in await self._find({box_labels.MANAGED_BY: box_labels.MANAGED_BY_US})
        ]

    async def aclose(self) -> None:
        """Nothing to release: the SDK's connection pools are process-wide."""

    async def native_snapshot(self, envelope: Envelope) -> str:
        """Take an E2B snapshot of the sandbox and return its id (pass it as ``BoxSpec.image`` to restore).

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        with _ERRORS.mapped():
            info = await self.sdk.create_snapshot(self._sandbox_id(envelope), **self.api_params())
        return info.snapshot_id

    async def delete_snapshot(self, native_id: str) -> None:
        """Delete a native snapshot; one that is already gone is not an error."""
        with _ERRORS.mapped(box_op=False):
            await self.sdk.delete_snapshot(native_id, **self.api_params())


def encode_snapshot_ref(snapshot_id: str, workspace_persistence: str | None = "snapshot") -> bytes:
    """The upstream native reference ``E2B_SANDBOX_SNAPSHOT_V1\\n{"snapshot_id":...}`` for a snapshot id."""
    if not snapshot_id:
        raise ProviderError("an E2B snapshot reference needs a snapshot id")
    body: dict[str, str] = {"snapshot_id": snapshot_id}
    if workspace_persistence:
        body["workspace_persistence"] = workspace_persistence
    return E2B_SNAPSHOT_REF_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def decode_snapshot_ref(ref: bytes) -> str | None:
    """The snapshot id of an E2B native reference, or None when ``ref`` is not one (fatal UTF-8, non-empty id)."""
    if not ref.startswith(E2B_SNAPSHOT_REF_PREFIX):
        return None
    try:
        body = json.loads(ref[len(E2B_SNAPSHOT_REF_PREFIX) :].decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, ValueError):
        return None
    snapshot_id = body.get("snapshot_id") if isinstance(body, dict) else None
    return snapshot_id if isinstance(snapshot_id, str) and snapshot_id else None


def build_provider(settings: Settings) -> E2BProvider:
    """The E2B provider for a worker, its settings read from ``SANDBOX_E2B_*`` (and ``E2B_API_KEY``)."""
    del settings  # the backend's own settings live under their own prefix
    return E2BProvider(E2BSettings())
