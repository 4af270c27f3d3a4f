"""The ``blaxel`` provider: boxes are Blaxel sandboxes, driven with the ``blaxel`` SDK (``SandboxInstance``).

SDK calls:

- create: ``SandboxInstance.create_if_not_exists`` with a name derived from the idempotency key
  (``sbx-`` + 32 hex digits of its SHA-256): the control plane returns the live sandbox holding the
  name as it is, or creates one (replacing a terminated one), so a retried create adopts the box
  the first attempt made, with no lookup/create race. Image, memory, region, TTL, environment and
  the labels ``sandbox.lease_id``, ``sandbox.key``, ``sandbox.epoch`` come with it;
- resume: ``SandboxInstance.get(name)``; terminate: ``SandboxInstance.delete(name)``;
  list_owned: ``SandboxInstance.list`` pages, filtered on our ``sandbox.key`` label;
- exec: ``sandbox.process.exec`` (not waiting), ``process.wait`` until our deadline, then
  ``process.kill``; files: ``sandbox.fs.read_binary``/``write_binary``;
- ports: previews (on demand, one per port): ``sandbox.previews.create_if_not_exists``; a private
  preview (the default) gets a token from ``preview.tokens.create`` valid for
  ``SANDBOX_BLAXEL_EXPOSED_PORT_URL_TTL_SECONDS``, passed as the ``bl_preview_token`` query.

Identity (upstream ``sandboxIdentity``): the envelope keeps the sandbox name, its ``created_at`` and
the workspace. A name re-used by a newer sandbox is a different box: resuming the old envelope
says :class:`BoxNotFound`, and terminating it leaves the newer sandbox alone.

Exec: the sandbox API returns stdout/stderr as JSON text, so commands run in the POSIX wrapper of
:func:`providers.shell_exec.exec_script` (argv shell-quoted; the output goes to files; the wrapper
prints the exit status and base64 of each stream, or a file path for a stream over 256 KiB, read
with ``read_binary``): output is byte-exact.

NotFound rule: ``get`` answers 404 for a name never used and, during the retention window, the
record with status ``TERMINATED`` (``DELETING`` while it goes; ``FAILED`` for a sandbox whose
microVM died for good): all prove the box is gone. A data-plane call on a deleted sandbox answers a
404 (``WORKLOAD_NOT_FOUND``), the same status as a missing file, so every data-plane failure is
re-checked against the control plane (``get``) before it is reported: gone there → BoxNotFound,
else the failure as translated below (a 404 on a file → PathNotFound).

=================================================================  ====================
SDK error (``SandboxAPIError``/``ResponseError``/``UnexpectedStatus``  Raised here
— status, code — or a transport error)
=================================================================  ====================
404 or code ``NOT_FOUND``/``WORKLOAD_NOT_FOUND``/``SANDBOX_DELETED``  BoxNotFound
status ``TERMINATED``/``DELETING``/``FAILED`` or another created_at  BoxNotFound
404 from a file call on a live sandbox                               PathNotFound
401/403, ``AUTHENTICATION_*``/``UNAUTHORIZED*``/``TOKEN_REVOKED``    ProviderAuthError
(but ``AUTHENTICATION_UNAVAILABLE``)
429, ``QUOTA_EXCEEDED``/``*RATE_LIMIT_EXCEEDED``/``USAGE_LIMIT…``    ProviderQuotaError
408, 5xx, ``retryable``, ``SERVICE_UNAVAILABLE``/``WORKLOAD_UNAVAIL…``  ProviderUnavailable
/``ROUTING_UNAVAILABLE``/``UPSTREAM_*``/``AUTHENTICATION_UNAVAILABLE``,
``httpx.TransportError``, ``SandboxCreationTimeoutError``
any other 4xx                                                        ProviderError
command past its timeout (``process.wait`` timed out; killed)        ExecTimeout
=================================================================  ====================

Transient codes win over the NotFound rule, as in upstream ``classifyProviderSandboxFailure``.

The SDK keeps its credentials in module globals (``blaxel.core.common.settings`` and the
control-plane ``client``); :class:`BlaxelSdk` sets them from ``SANDBOX_BLAXEL_API_KEY`` and
``SANDBOX_BLAXEL_WORKSPACE`` once, so a worker serves one Blaxel workspace.

Snapshots are tar-only (:class:`~providers.remote_workspace.RemoteWorkspace`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import posixpath
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import SERVER_ERRORS, ErrorTable, Row, confirmed
from providers.shell_exec import (
    LIST_DIR_SCRIPT,
    check_env_names,
    dir_listing,
    exec_script,
    parse_exec_report,
    stage_stdin,
)
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
    Unsupported,
)

if TYPE_CHECKING:
    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

__all__ = [
    "BlaxelApi",
    "BlaxelBoxSession",
    "BlaxelProvider",
    "BlaxelSdk",
    "BlaxelSettings",
    "build_provider",
    "sandbox_name_for_key",
]

BACKEND: Final = "blaxel"
HOME: Final = "/root"

_GONE: Final = frozenset({"TERMINATED", "DELETING", "FAILED"})
_NOT_FOUND_CODES: Final = frozenset({"NOT_FOUND", "RESOURCE_NOT_FOUND", "SANDBOX_NOT_FOUND", "WORKLOAD_NOT_FOUND",
                                     "SANDBOX_DELETED"})  # fmt: skip
_AUTH_CODES: Final = frozenset({"AUTHENTICATION_REQUIRED", "AUTHENTICATION_FAILED", "TOKEN_REVOKED", "FORBIDDEN",
                                "UNAUTHORIZED", "UNAUTHORIZED_WORKSPACE", "WORKSPACE_REQUIRED"})  # fmt: skip
_QUOTA_CODES: Final = frozenset({"QUOTA_EXCEEDED", "RATE_LIMIT_EXCEEDED", "WORKSPACE_RATE_LIMIT_EXCEEDED",
                                 "USAGE_LIMIT_EXCEEDED"})  # fmt: skip
_TRANSIENT_CODES: Final = frozenset({"SERVICE_UNAVAILABLE", "WORKLOAD_UNAVAILABLE", "ROUTING_UNAVAILABLE",
                                     "AUTHENTICATION_UNAVAILABLE", "UPSTREAM_CONNECT_FAILED",
                                     "UPSTREAM_CONNECT_TIMEOUT", "UPSTREAM_ERROR", "UPSTREAM_TIMEOUT",
                                     "GATEWAY_INTERNAL_ERROR", "DATABASE_ERROR", "LOCK_ACQUISITION_FAILED",
                                     "CREATION_TIMEOUT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"})  # fmt: skip
_TTL: Final = re.compile(r"[1-9][0-9]*[smhdw]")
_INLINE_LIMIT: Final = 256 * 1024
_LIST_PAGE: Final = 100


# -- the SDK surface we use, typed ---------------------------------------------------------------


class BlaxelProcess(Protocol):
    """``sandbox.process`` (``SandboxProcess``)."""

    async def exec(self, process: dict[str, Any]) -> Any: ...
    async def wait(self, identifier: str, max_wait: int = ..., interval: int = ...) -> Any: ...
    async def kill(self, identifier: str) -> Any: ...


class BlaxelFileSystem(Protocol):
    """``sandbox.fs`` (``SandboxFileSystem``)."""

    async def read_binary(self, path: str) -> bytes: ...
    async def write_binary(self, path: str, content: bytes) -> Any: ...


class BlaxelPreviews(Protocol):
    """``sandbox.previews`` (``SandboxPreviews``)."""

    async def create_if_not_exists(self, preview: dict[str, Any]) -> Any: ...


class BlaxelSandbox(Protocol):
    """A ``SandboxInstance``."""

    @property
    def metadata(self) -> Any: ...
    @property
    def status(self) -> Any: ...
    @property
    def process(self) -> BlaxelProcess: ...
    @property
    def fs(self) -> BlaxelFileSystem: ...
    @property
    def previews(self) -> BlaxelPreviews: ...


class BlaxelApi(Protocol):
    """The ``SandboxInstance`` class methods the provider calls."""

    async def create_if_not_exists(self, sandbox: dict[str, Any]) -> BlaxelSandbox: ...
    async def get(self, sandbox_name: str) -> BlaxelSandbox: ...
    async def list(self, limit: int = ..., cursor: str | None = ...) -> Any: ...
    async def delete(self, sandbox_name: str) -> Any: ...


class BlaxelSdk:
    """The real SDK behind :class:`BlaxelApi`: ``SandboxInstance``, with credentials from our settings.

    Importing ``blaxel`` runs its ``autoload`` (client setup, telemetry off unless configured); the
    import and the credential set-up happen on the first call, so building the provider dials nothing.
    """

    def __init__(self, settings: BlaxelSettings) -> None:
        self._settings = settings
        self._cls: Any = None

    def _instance_class(self) -> Any:
        if self._cls is None:
            from blaxel.core import SandboxInstance
            from blaxel.core.authentication.apikey import ApiKey
            from blaxel.core.authentication.types import CredentialsType
            from blaxel.core.client.client import client
            from blaxel.core.common.settings import settings as sdk_settings

            self._settings.validate()
            assert self._settings.api_key is not None and self._settings.workspace is not None
            workspace = self._settings.workspace
            credentials = CredentialsType(api_key=self._settings.api_key.get_secret_value(), workspace=workspace)
            auth = ApiKey(credentials, workspace, sdk_settings.base_url)
            # The SDK reads credentials from module globals: the control-plane client and settings.auth
            # (which also gives the data plane its headers and the sandbox URLs their workspace).
            sdk_settings.auth = auth
            client.with_auth(auth)
            self._cls = SandboxInstance
        return self._cls

    async def create_if_not_exists(self, sandbox: dict[str, Any]) -> BlaxelSandbox:
        """``SandboxInstance.create_if_not_exists``."""
        instance: BlaxelSandbox = await self._instance_class().create_if_not_exists(sandbox)
        return instance

    async def get(self, sandbox_name: str) -> BlaxelSandbox:
        """``SandboxInstance.get``."""
        instance: BlaxelSandbox = await self._instance_class().get(sandbox_name)
        return instance

    async def list(self, limit: int = 50, cursor: str | None = None) -> Any:
        """``SandboxInstance.list`` (one page)."""
        return await self._instance_class().list(limit=limit, cursor=cursor)

    async def delete(self, sandbox_name: str) -> Any:
        """``SandboxInstance.delete``."""
        return await self._instance_class().delete(sandbox_name)


# -- settings ------------------------------------------------------------------------------------


class BlaxelSettings(BaseSettings):
    """Blaxel settings (environment prefix ``SANDBOX_BLAXEL_``).

    Attributes:
        api_key: The Blaxel API key (``SANDBOX_BLAXEL_API_KEY``); required.
        workspace: The Blaxel workspace the sandboxes live in (``SANDBOX_BLAXEL_WORKSPACE``); required.
        image: The sandbox image (the SDK default ``blaxel/base-image:latest`` when unset).
        region: Where sandboxes run (e.g. ``us-pdx-1``); the platform picks one when unset.
        exposed_port_public: Publish ports on public previews (no token) instead of private ones.
        exposed_port_url_ttl_seconds: How long a private preview's token is valid.
        memory_mb: Sandbox memory in MB.
        ttl: Delete sandboxes this long after creation (a Blaxel duration: ``30m``, ``24h``, ``7d``).
    """

    model_config = SettingsConfigDict(env_prefix="SANDBOX_BLAXEL_", extra="ignore")

    api_key: SecretStr | None = None
    workspace: str | None = None
    image: str | None = None
    region: str | None = None
    exposed_port_public: bool = False
    exposed_port_url_ttl_seconds: int = Field(default=3600, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)
    ttl: str | None = None

    def validate(self) -> None:  # type: ignore[override]  # pydantic's classmethod validate is deprecated
        """Check the settings offline.

        Raises:
            SandboxConfigError: the API key or workspace is missing, or the TTL is not a duration.
        """
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise SandboxConfigError(
                "[sandbox:blaxel] SANDBOX_BLAXEL_API_KEY is not set; create an API key in the Blaxel console "
                "(Workspace settings → API keys) and export it as SANDBOX_BLAXEL_API_KEY"
            )
        if not self.workspace or not self.workspace.strip():
            raise SandboxConfigError(
                "[sandbox:blaxel] SANDBOX_BLAXEL_WORKSPACE is not set; export the name of the Blaxel workspace "
                "the API key belongs to as SANDBOX_BLAXEL_WORKSPACE"
            )
        if self.ttl is not None and not _TTL.fullmatch(self.ttl):
            raise SandboxConfigError(
                f"[sandbox:blaxel] SANDBOX_BLAXEL_TTL must be a duration such as 30m, 24h or 7d, not {self.ttl!r}"
            )


def sandbox_name_for_key(idempotency_key: str) -> str:
    """The sandbox name for an idempotency key: ``sbx-`` and 32 hex digits (Blaxel names: ≤ 49, [a-z0-9-])."""
    return "sbx-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


# -- error translation ---------------------------------------------------------------------------


def _signals(err: BaseException) -> tuple[int | None, str | None, bool | None]:
    """(HTTP status, error code, retryable) of an SDK error, whichever of its classes it is."""
    status = getattr(err, "status", None)
    if not isinstance(status, int):
        status = getattr(err, "status_code", None)
    if not isinstance(status, int):
        status = None
    code = getattr(err, "code", None)
    if isinstance(code, int) and status is None:
        status = code
    retryable = getattr(err, "retryable", None)
    return status, code if isinstance(code, str) else None, retryable if isinstance(retryable, bool) else None


_DETAIL: Final = "blaxel: {name}: {err}"
_AUTH_DETAIL: Final = _DETAIL + " (check SANDBOX_BLAXEL_API_KEY and SANDBOX_BLAXEL_WORKSPACE)"
_NO_IMAGE: Final = "blaxel: the image or region to create from does not exist: {err}"
_ERRORS: Final = ErrorTable(
    (
        # Transient signals win over the NotFound rule (upstream ``classifyProviderSandboxFailure``).
        Row((httpx.TransportError, TimeoutError), ProviderUnavailable, _DETAIL),
        Row(BaseException, ProviderUnavailable, _DETAIL, code=_TRANSIENT_CODES),
        Row(BaseException, ProviderUnavailable, _DETAIL, test=lambda err: _signals(err)[2] is True),
        Row(BaseException, ProviderUnavailable, _DETAIL, status={408, *SERVER_ERRORS}),
        Row(BaseException, BoxNotFound, _DETAIL, status={404}, box=True),
        Row(BaseException, BoxNotFound, _DETAIL, code=_NOT_FOUND_CODES, box=True),
        # Not about a box (create): the 404 names the image or region.
        Row(BaseException, ProviderError, _NO_IMAGE, status={404}),
        Row(BaseException, ProviderError, _NO_IMAGE, code=_NOT_FOUND_CODES),
        Row(BaseException, ProviderAuthError, _AUTH_DETAIL, status={401, 403}),
        Row(BaseException, ProviderAuthError, _AUTH_DETAIL, code=_AUTH_CODES),
        Row(BaseException, ProviderQuotaError, _DETAIL, status={429}),
        Row(BaseException, ProviderQuotaError, _DETAIL, code=_QUOTA_CODES),
    ),
    default=_DETAIL,
    status_of=lambda err: _signals(err)[0],
    code_of=lambda err: _signals(err)[1],
)
"""The module docstring's table (SDK errors of any class, told apart by status, code and ``retryable``)."""


def _labels(metadata: Any) -> dict[str, str]:
    labels: Any = getattr(metadata, "labels", None)
    raw = labels.to_dict() if hasattr(labels, "to_dict") else labels
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _text(value: Any) -> str | None:
    # Model fields are UNSET (a falsy sentinel) when absent; enums carry their text in .value.
    value = getattr(value, "value", value)
    return value if isinstance(value, str) and value else None


# -- session -------------------------------------------------------------------------------------


class BlaxelBoxSession:
    """A handle on one Blaxel sandbox."""

    def __init__(self, provider: BlaxelProvider, sandbox: BlaxelSandbox) -> None:
        self._provider = provider
        self._sandbox = sandbox
        metadata = sandbox.metadata
        self._name = str(metadata.name)
        self._created_at = _text(getattr(metadata, "created_at", None))
        self._labels = _labels(metadata)

    @property
    def instance_id(self) -> str:
        """The sandbox name."""
        return self._name

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv) in the sandbox from ``workdir`` (default: the workspace) and wait for it.

        Raises:
            InvalidRequest: empty argv, bad environment names or a non-positive timeout.
            ExecTimeout: the command ran past ``timeout`` seconds and was killed.
            BoxNotFound: the sandbox is gone.
        """
        argv = list(cmd)
        if not argv:
            raise InvalidRequest("exec needs a non-empty command")
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, not {timeout}")
        check_env_names(env or {})
        stdin_path = await stage_stdin(stdin, self._write)
        script = exec_script(
            argv,
            workdir=self._path(workdir or "."),
            missing_workdir_is_result=True,
            stdin_file=stdin_path,
            env=env,
            spill_over=_INLINE_LIMIT,
        )
        name = f"sandbox-exec-{secrets.token_hex(6)}"
        request: dict[str, Any] = {"command": shlex.join(["sh", "-c", script]), "name": name, "working_dir": "/"}
        if timeout is not None:
            # Belt and braces: the sandbox API also kills the command a little after our deadline.
            request["timeout"] = math.ceil(timeout) + 5
        process = self._sandbox.process
        async with self._classified():
            await process.exec(request)
            try:
                done = await process.wait(name, max_wait=-1 if timeout is None else math.ceil(timeout * 1000),
                                          interval=200)  # fmt: skip
            except TimeoutError:
                await process.kill(name)
                raise ExecTimeout(
                    f"{argv[0]} ran past its {timeout} s timeout and was killed", timeout=timeout or 0.0
                ) from None
        return await self._result(str(getattr(done, "stdout", "") or ""))

    async def _result(self, stdout: str) -> ExecResult:
        report = parse_exec_report(stdout)
        if report is None:
            raise ProviderError(f"blaxel: the command wrapper in sandbox {self._name} gave no result")
        try:
            return await report.result(self.read_file)
        finally:
            cleanup = report.cleanup_command()
            if cleanup is not None:
                try:
                    await self._sandbox.process.exec({"command": cleanup, "working_dir": "/"})
                except Exception:  # best effort: a leftover file in /tmp harms nothing
                    pass

    async def read_file(self, path: str) -> bytes:
        """The bytes of a file in the sandbox (relative paths are under the workspace).

        Raises:
            PathNotFound: no such file.
            BoxNotFound: the sandbox is gone.
        """
        async with self._classified(path):
            return await self._sandbox.fs.read_binary(self._path(path))

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file in the sandbox, creating its parent directories.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        await self._write(self._path(path), data)

    async def _write(self, target: str, data: bytes) -> None:
        async with self._classified():
            await self._sandbox.fs.write_binary(target, bytes(data))

    async def list_dir(self, path: str) -> list[DirEntry]:
        """One level of a directory in the sandbox, sorted by name.

        Raises:
            PathNotFound: no such directory.
            InvalidRequest: the path is not a directory.
            BoxNotFound: the sandbox is gone.
        """
        done = await self.exec(["sh", "-c", LIST_DIR_SCRIPT, "sh", self._path(path)], workdir="/")
        return dir_listing(done, path, backend="blaxel")

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the sandbox (a dangling symbolic link counts)."""
        done = await self.exec(["sh", "-c", 'test -e "$1" || test -L "$1"', "sh", self._path(path)], workdir="/")
        return done.exit_code == 0

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The preview URL for ``port`` (created on demand); private previews carry a token query.

        Raises:
            InvalidRequest: the port is out of range.
            BoxNotFound: the sandbox is gone.
            StreamPortUnavailable: the preview has no usable URL.
        """
        from sandbox.errors import StreamPortUnavailable

        if not 0 < port < 65536:
            raise InvalidRequest(f"port must be in 1..65535, not {port}")
        settings = self._provider.settings
        async with self._classified():
            preview = await self._sandbox.previews.create_if_not_exists(
                {"port": port, "public": settings.exposed_port_public}
            )
            query = ""
            if not settings.exposed_port_public:
                expires = datetime.now(UTC) + timedelta(seconds=settings.exposed_port_url_ttl_seconds)
                token = await preview.tokens.create(expires)
                query = urlencode({"bl_preview_token": str(token.value)})
        url = urlsplit(str(preview.url or ""))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise StreamPortUnavailable(f"blaxel preview for port {port} has no usable URL: {preview.url!r}")
        tls = url.scheme == "https"
        return Endpoint(
            host=url.hostname, port=url.port or (443 if tls else 80), tls=tls, path=url.path or "/", query=query
        )

    def serialize_state(self) -> Envelope:
        """The envelope that finds this sandbox again (``sandboxIdentity``: name, created_at, workspace)."""
        identity: dict[str, Any] = {"name": self._name, "workspace": self._provider.settings.workspace}
        if self._created_at is not None:
            identity["createdAt"] = self._created_at
        state: dict[str, Any] = {"sandboxIdentity": identity}
        if box_labels.KEY in self._labels:
            state["idempotencyKey"] = self._labels[box_labels.KEY]
        if box_labels.LEASE_ID in self._labels:
            state["leaseId"] = self._labels[box_labels.LEASE_ID]
        return Envelope(backend_id=self._provider.backend_id, instance_id=self._name, state=state)

    def _classified(self, path: str | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """Raise a data-plane failure as :meth:`BlaxelProvider._classify` calls it (the control plane decides)."""
        return confirmed(functools.partial(self._provider._classify, self, path=path))

    def _path(self, path: str) -> str:
        if "\0" in path:
            raise InvalidRequest("a path must not contain NUL")
        return posixpath.normpath(posixpath.join(self._provider.descriptor.workspace_root, path))


# -- provider ------------------------------------------------------------------------------------


class BlaxelProvider(RemoteWorkspaceSnapshots):
    """Blaxel sandboxes as sandbox boxes.

    Args:
        settings: The ``SANDBOX_BLAXEL_*`` settings.
        api: The ``SandboxInstance`` class methods; by default the real SDK (:class:`BlaxelSdk`).
            Tests pass :class:`~tests.fakes.blaxel_fake.FakeSandboxApi`.
    """

    def __init__(self, settings: BlaxelSettings, *, api: BlaxelApi | None = None) -> None:
        from sandbox.descriptors import CAPABILITY_DESCRIPTORS

        self.settings = settings
        self.api: BlaxelApi = api if api is not None else BlaxelSdk(settings)
        self._descriptor = CAPABILITY_DESCRIPTORS[BACKEND]
        self.remote_workspace = RemoteWorkspace(workspace_root=self._descriptor.workspace_root, home_dir=HOME)

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The blaxel capability descriptor."""
        return self._descriptor

    @property
    def backend_id(self) -> str:
        """``blaxel``."""
        return self._descriptor.backend_id

    def validate_credentials(self) -> None:
        """Check the settings offline; raise ``SandboxConfigError`` naming what is missing."""
        self.settings.validate()

    async def create(self, spec: BoxSpec, idempotency_key: str) -> BlaxelBoxSession:
        """Create the sandbox named after ``idempotency_key``, or adopt the live one holding that name.

        Raises:
            InvalidRequest: empty idempotency key or environment names that are not variable names.
            ProviderUnavailable: the API failed transiently (or the creation timed out).
            ProviderError: the sandbox could not be created.
        """
        if not idempotency_key:
            raise InvalidRequest("an idempotency key is required")
        check_env_names(spec.environment)
        settings = self.settings
        config: dict[str, Any] = {
            "name": sandbox_name_for_key(idempotency_key),
            "labels": {box_labels.LEASE_ID: spec.lease_id, box_labels.KEY: idempotency_key,
                       box_labels.EPOCH: str(spec.epoch), "sandbox.workspace_id": spec.workspace_id,
                       "sandbox.group_id": spec.group_id},
            "envs": [{"name": k, "value": v} for k, v in spec.environment.items()],
        }  # fmt: skip
        image = spec.image or settings.image
        for key, value in (("image", image), ("region", settings.region), ("memory", settings.memory_mb),
                           ("ttl", settings.ttl)):  # fmt: skip
            if value is not None:
                config[key] = value
        with _ERRORS.mapped(box_op=False):  # a 404 on create names the image, never a box
            sandbox = await self.api.create_if_not_exists(config)
        status = _text(sandbox.status)
        if status in _GONE:
            raise ProviderUnavailable(f"blaxel sandbox {config['name']} is {status}; retry once it is replaced")
        session = BlaxelBoxSession(self, sandbox)
        done = await session.exec(["mkdir", "-p", self._descriptor.workspace_root], workdir="/")
        if done.exit_code != 0:
            raise ProviderError(
                f"blaxel: cannot create {self._descriptor.workspace_root} in {session.instance_id}: "
                + done.stderr.decode(errors="replace").strip()
            )
        return session

    async def resume(self, envelope: Envelope) -> BlaxelBoxSession:
        """Find the sandbox again by name and creation time.

        Raises:
            BoxNotFound: no such sandbox, it is terminated/deleting/failed, or the name now holds a newer one.
            ProviderUnavailable: the API failed transiently.
        """
        name, created_at = self._identity(envelope)
        sandbox = await self._get(name)
        self._check_alive(sandbox, name, created_at)
        return BlaxelBoxSession(self, sandbox)

    async def terminate(self, envelope: Envelope) -> None:
        """Delete the sandbox; one that is gone (or replaced by a newer one of the same name) is no error."""
        name, created_at = self._identity(envelope)
        try:
            sandbox = await self._get(name)
            self._check_alive(sandbox, name, created_at)
        except BoxNotFound:
            return
        with contextlib.suppress(BoxNotFound), _ERRORS.mapped():
            await self.api.delete(name)

    async def list_owned(self) -> list[OwnedBox]:
        """Every live sandbox of the workspace that carries our ``sandbox.key`` label.

        ``labels`` holds the sandbox labels, ``sandbox.*`` ones also under their bare names (``epoch``).
        """
        owned: list[OwnedBox] = []
        cursor: str | None = None
        with _ERRORS.mapped():
            while True:
                page = await self.api.list(limit=_LIST_PAGE, cursor=cursor)
                for sandbox in page.data:
                    labels = _labels(sandbox.metadata)
                    if box_labels.KEY not in labels or _text(sandbox.status) in _GONE:
                        continue
                    owned.append(
                        box_labels.owned_box(
                            str(sandbox.metadata.name),
                            labels,
                            created_at=box_labels.iso_seconds(_text(getattr(sandbox.metadata, "created_at", None))),
                        )
                    )
                cursor = page.next_cursor if page.has_more else None
                if not cursor:
                    return owned

    async def delete_snapshot(self, native_id: str) -> None:
        """Blaxel workspaces are captured as tar archives only; there are no native snapshots to delete."""
        raise Unsupported("blaxel has no native workspace snapshots (tar-only)")

    # -- helpers --------------------------------------------------------------------------------

    def _identity(self, envelope: Envelope) -> tuple[str, str | None]:
        if envelope.backend_id != self.backend_id:
            raise InvalidRequest(f"envelope of backend {envelope.backend_id!r} given to the blaxel provider")
        identity = envelope.state.get("sandboxIdentity")
        identity = identity if isinstance(identity, dict) else {}
        name = identity.get("name") or envelope.instance_id
        if not isinstance(name, str) or name != envelope.instance_id or not name or "/" in name:
            raise InvalidRequest(f"not a Blaxel sandbox name, or one the envelope disagrees on: {name!r}")
        created_at = identity.get("createdAt")
        return name, created_at if isinstance(created_at, str) else None

    async def _get(self, name: str) -> BlaxelSandbox:
        with _ERRORS.mapped():
            return await self.api.get(name)

    @staticmethod
    def _check_alive(sandbox: BlaxelSandbox, name: str, created_at: str | None) -> None:
        status = _text(sandbox.status)
        if status in _GONE:
            raise BoxNotFound(f"blaxel sandbox {name} is {status}")
        current = _text(getattr(sandbox.metadata, "created_at", None))
        if created_at is not None and current is not None and current != created_at:
            raise BoxNotFound(f"blaxel sandbox {name} was replaced (created {current}, not {created_at})")

    async def _classify(
        self, session: BlaxelBoxSession, err: BaseException, *, path: str | None = None
    ) -> ProviderError:
        """Translate a data-plane failure, asking the control plane whether the sandbox is gone first."""
        translated = _ERRORS.translate(err)
        if isinstance(translated, ProviderAuthError | ProviderQuotaError):
            return translated
        try:
            self._check_alive(await self.api.get(session.instance_id), session.instance_id, session._created_at)
        except BoxNotFound as gone:
            return gone
        except Exception as lookup:
            lookup_error = _ERRORS.translate(lookup)
            if isinstance(lookup_error, BoxNotFound):
                return lookup_error
            return translated if not isinstance(translated, BoxNotFound) else lookup_error
        # The sandbox is alive: a 404 was about a path (or a process), never the box.
        if isinstance(translated, BoxNotFound):
            if path is not None:
                return PathNotFound(f"no such file: {path}", path=path)
            return ProviderError(f"blaxel: {translated.message}")
        return translated


def build_provider(settings: Settings) -> BlaxelProvider:
    """Build the Blaxel provider from ``SANDBOX_BLAXEL_*`` (the runtime settings are not needed)."""
    del settings
    return BlaxelProvider(BlaxelSettings())
