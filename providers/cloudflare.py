"""The ``cloudflare`` provider: boxes are Cloudflare Sandbox containers behind a Sandbox Worker.

Cloudflare sandboxes (``@cloudflare/sandbox``) are Durable-Object-backed containers driven from a
Worker, so there is no Python SDK: the runtime talks to a small Worker the operator deploys at
``SANDBOX_CLOUDFLARE_WORKER_URL``, with :mod:`httpx`. The Worker maps each route below onto one
call of the ``@cloudflare/sandbox`` SDK (``getSandbox(env.Sandbox, id)`` then ``exec``,
``readFile``/``writeFile``, ``listFiles``, ``exposePort``, ``destroy``) and keeps a label index
(KV or D1) because Durable Objects cannot be listed.

REST contract of the Worker (JSON unless said otherwise; every request carries
``Authorization: Bearer <SANDBOX_CLOUDFLARE_API_KEY>`` when a key is configured)::

    PUT    /v1/sandboxes/{id}                  {"labels": {...}, "envVars": {...}}
           -> 201 created | 200 already running: {"sandbox": Sandbox}     (getSandbox: get-or-create)
    GET    /v1/sandboxes/{id}                  -> 200 {"sandbox": Sandbox}
    GET    /v1/sandboxes?label=k=v[&label=..]  -> 200 {"sandboxes": [Sandbox, ...]}   (live ones only)
    DELETE /v1/sandboxes/{id}                  -> 200 {"sandbox": Sandbox(status="destroyed")}
    POST   /v1/sandboxes/{id}/exec             {"argv": [...], "cwd": "/abs", "env": {...},
                                                "timeoutMs": int|null, "stdin": base64|null}
           -> 200 {"exitCode": int|null, "stdout": base64, "stderr": base64, "timedOut": bool,
                   "durationMs": int}
    GET    /v1/sandboxes/{id}/files?path=/abs  -> 200 raw bytes (application/octet-stream)
    PUT    /v1/sandboxes/{id}/files?path=/abs  raw bytes -> 204  (parent directories are created)
    GET    /v1/sandboxes/{id}/files/list?path=/abs
           -> 200 {"files": [{"name", "type": "file|directory|symlink|other", "size", "mode"}]}
    POST   /v1/sandboxes/{id}/ports            {"port": int} -> 200 {"port": int, "url": "https://..."}
                                               (exposePort; idempotent)

    Sandbox = {"id", "status": "running"|"destroyed", "labels": {...}, "createdAt": ISO-8601}
    Error   = {"error": {"code": str, "message": str}} with the HTTP status below.

Sandbox ids are chosen by the caller, as with ``getSandbox``: ``sbx-`` and 32 hex digits of the
SHA-256 of the idempotency key. Create is therefore one idempotent ``PUT``: a retried create of the
same key adopts the running sandbox, with no lookup/create race. Every sandbox carries the labels
``sandbox.lease_id``, ``sandbox.key``, ``epoch`` and ``sandbox.managed_by=sandbox-runtime``; ``list_owned`` asks
the Worker for the last one. The envelope keeps the sandbox's ``createdAt``: a sandbox re-created
under the same id after a terminate is a different box, and resuming the old envelope says so
(``BoxNotFound``).

NotFound rule (upstream ``classifyProviderSandboxFailure`` for ``cloudflare``): a transient code
wins; then HTTP 404 or a code in ``NOT_FOUND RESOURCE_NOT_FOUND SANDBOX_NOT_FOUND``; then the exact
message ``Cloudflare sandbox <id> is no longer running.``. File routes answer a missing path with
``404 FILE_NOT_FOUND``, which is a :class:`PathNotFound`, never evidence that the box is gone.

=========================================================  =========================
Worker answer / client failure                             Raised here
=========================================================  =========================
code in the transient list (UNAVAILABLE, ETIMEDOUT, ...)   ProviderUnavailable
404, or code NOT_FOUND/RESOURCE_NOT_FOUND/SANDBOX_NOT_FOUND BoxNotFound
message ``Cloudflare sandbox <id> is no longer running.``  BoxNotFound
404/400 FILE_NOT_FOUND, NOT_A_DIRECTORY (file routes)      PathNotFound
400 IS_A_DIRECTORY (file read)                             InvalidRequest
401, 403                                                   ProviderAuthError
429                                                        ProviderQuotaError
408, 5xx; httpx timeouts and connection errors             ProviderUnavailable
exec answered ``"timedOut": true``                         ExecTimeout
anything else (other 4xx, malformed body)                  ProviderError
=========================================================  =========================

Workspace snapshots are tar-only (:class:`~providers.remote_workspace.RemoteWorkspace`, GNU tar in
the container); the backend has no native snapshots.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import SERVER_ERRORS, ErrorTable, Row, status_attribute
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
    "LABEL_EPOCH",
    "CloudflareBoxSession",
    "CloudflareProvider",
    "CloudflareSettings",
    "WorkerError",
    "build_provider",
    "sandbox_id_for_key",
]

BACKEND: Final = "cloudflare"
#: Sandboxes carry the lease epoch under the bare label ``epoch`` (the others: :mod:`providers.box_labels`).
LABEL_EPOCH: Final = "epoch"

_KINDS: Final = {"file": "file", "directory": "dir", "symlink": "symlink"}
_TRANSIENT_CODES: Final = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "DEADLINE_EXCEEDED",
        "INTERNAL",
        "UNAVAILABLE",
        "ECONNRESET",
        "ECONNREFUSED",
        "ETIMEDOUT",
        "EAI_AGAIN",
        "ENOTFOUND",
    }
)
_NOT_FOUND_CODES: Final = frozenset({"404", "NOT_FOUND", "RESOURCE_NOT_FOUND", "SANDBOX_NOT_FOUND"})
_GONE_MESSAGE: Final = re.compile(r"^Cloudflare sandbox \S+ is no longer running\.$")
_PATH_CODES: Final = frozenset({"FILE_NOT_FOUND", "NOT_A_DIRECTORY"})


class CloudflareSettings(BaseSettings):
    """Settings of the Cloudflare backend (environment prefix ``SANDBOX_CLOUDFLARE_``)."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_CLOUDFLARE_", extra="ignore")

    worker_url: str | None = Field(default=None, description="Base URL of the Cloudflare Sandbox Worker.")
    api_key: SecretStr | None = Field(default=None, description="Bearer token the Worker expects, if any.")
    request_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Timeout of one Worker request (an exec adds its own timeout)."
    )

    def validate(self) -> None:  # type: ignore[override]  # pydantic's classmethod validate is deprecated
        """Check the settings offline.

        Raises:
            SandboxConfigError: the Worker URL is missing or is not an http(s) URL.
        """
        if not self.worker_url:
            raise SandboxConfigError(
                "[sandbox:cloudflare] SANDBOX_CLOUDFLARE_WORKER_URL is not set; set it to the URL of the "
                "Cloudflare Sandbox Worker (e.g. https://sandbox.<account>.workers.dev)"
            )
        parts = urlsplit(self.worker_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SandboxConfigError(
                f"[sandbox:cloudflare] SANDBOX_CLOUDFLARE_WORKER_URL must be an http(s) URL, not {self.worker_url!r}"
            )


class WorkerError(Exception):
    """An error answer of the Sandbox Worker (``{"error": {"code", "message"}}`` with its HTTP status)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"HTTP {status} {code or '-'}: {message}")
        self.status = status
        self.code = code
        self.message = message


def sandbox_id_for_key(idempotency_key: str) -> str:
    """The sandbox id a create with ``idempotency_key`` uses (lowercase, so it fits a preview hostname)."""
    return "sbx-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def _worker_code(err: BaseException) -> str | None:
    return (err.code or "").upper() if isinstance(err, WorkerError) else None


def _gone_message(err: BaseException) -> bool:
    return isinstance(err, WorkerError) and _GONE_MESSAGE.fullmatch(err.message) is not None


_ANSWER: Final = "cloudflare worker: {err}"
_ERRORS: Final = ErrorTable(
    (
        Row(httpx.TransportError, ProviderUnavailable, "cloudflare worker unreachable: {name}: {err}"),
        Row(WorkerError, ProviderUnavailable, _ANSWER, code=_TRANSIENT_CODES),
        Row(WorkerError, BoxNotFound, _ANSWER, status={404}),
        Row(WorkerError, BoxNotFound, _ANSWER, code=_NOT_FOUND_CODES),
        Row(WorkerError, BoxNotFound, _ANSWER, test=_gone_message),
        Row(WorkerError, ProviderAuthError, _ANSWER, status={401, 403}),
        Row(WorkerError, ProviderQuotaError, _ANSWER, status={429}),
        Row(WorkerError, ProviderUnavailable, _ANSWER, status={408, *SERVER_ERRORS}),
        Row(WorkerError, ProviderError, _ANSWER),
    ),
    default="cloudflare worker: unexpected {name}: {err}",
    status_of=status_attribute("status"),
    code_of=_worker_code,
)
"""The module docstring's table: a Worker answer (status, code) or an httpx failure → our error."""


def _worker_error(response: httpx.Response) -> WorkerError:
    code: str | None = None
    message = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        raw_code = body["error"].get("code")
        raw_message = body["error"].get("message")
        code = str(raw_code) if raw_code is not None else None
        message = str(raw_message) if raw_message is not None else message
    elif response.text:
        message = response.text[:500]
    return WorkerError(response.status_code, code, message)


class _WorkerClient:
    """The Worker's REST routes over one ``httpx.AsyncClient``; raises typed errors only."""

    def __init__(self, settings: CloudflareSettings, transport: httpx.AsyncBaseTransport | None) -> None:
        headers = {"user-agent": "sandbox-runtime"}
        if settings.api_key is not None:
            headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self.timeout = settings.request_timeout_seconds
        self._http = httpx.AsyncClient(
            base_url=(settings.worker_url or "").rstrip("/"),
            headers=headers,
            timeout=self.timeout,
            transport=transport,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Any = None,
        timeout: float | None | httpx.Timeout = None,
    ) -> httpx.Response:
        with _ERRORS.mapped(catch=httpx.HTTPError):
            response = await self._http.request(
                method,
                path,
                json=json,
                content=content,
                params=params,
                timeout=self.timeout if timeout is None else timeout,
            )
        if response.is_success:
            return response
        raise _worker_error(response)

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Like :meth:`request`, with every Worker error translated."""
        with _ERRORS.mapped(catch=WorkerError):
            return await self.request(method, path, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()


def _sandbox_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as err:
        raise ProviderError("cloudflare worker answered a body that is not JSON") from err
    sandbox = body.get("sandbox") if isinstance(body, dict) else None
    if not isinstance(sandbox, dict) or not isinstance(sandbox.get("id"), str):
        raise ProviderError(f"cloudflare worker answered without a sandbox: {str(body)[:200]}")
    return sandbox


class CloudflareBoxSession:
    """A handle on one Cloudflare sandbox. Relative paths are under ``/workspace``."""

    def __init__(self, client: _WorkerClient, sandbox_id: str, created_at: str | None, workspace_root: str) -> None:
        self._client = client
        self._id = sandbox_id
        self._created_at = created_at
        self._root = workspace_root

    @property
    def instance_id(self) -> str:
        """The sandbox id."""
        return self._id

    def _path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self._root, path))

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv) in the sandbox through the Worker's ``exec`` route.

        Raises:
            ExecTimeout: the Worker killed the command after ``timeout`` seconds.
            BoxNotFound: the sandbox is gone.
        """
        if not cmd:
            raise InvalidRequest("exec needs a non-empty argv")
        body = {
            "argv": list(cmd),
            "cwd": self._path(workdir or "."),
            "env": dict(env or {}),
            "timeoutMs": None if timeout is None else max(1, int(timeout * 1000)),
            "stdin": None if stdin is None else base64.b64encode(stdin).decode(),
        }
        # The Worker answers once the command ends: the read timeout covers the command itself.
        read = None if timeout is None else timeout + self._client.timeout
        response = await self._client.call(
            "POST",
            f"/v1/sandboxes/{self._id}/exec",
            json=body,
            timeout=httpx.Timeout(self._client.timeout, read=read),
        )
        try:
            done = response.json()
            if done.get("timedOut"):
                raise ExecTimeout(f"{cmd[0]} ran past {timeout}s in sandbox {self._id}", timeout=timeout or 0.0)
            return ExecResult(
                exit_code=int(done["exitCode"]),
                stdout=base64.b64decode(done.get("stdout") or ""),
                stderr=base64.b64decode(done.get("stderr") or ""),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ProviderError(f"cloudflare worker answered a malformed exec result: {err}") from err

    async def read_file(self, path: str) -> bytes:
        """Read a whole file (binary safe).

        Raises:
            PathNotFound: no such file.
            InvalidRequest: the path is a directory.
            BoxNotFound: the sandbox is gone.
        """
        target = self._path(path)
        try:
            response = await self._client.request("GET", f"/v1/sandboxes/{self._id}/files", params={"path": target})
        except WorkerError as err:
            raise _file_error(err, target) from err
        return response.content

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parent directories.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        target = self._path(path)
        try:
            await self._client.request("PUT", f"/v1/sandboxes/{self._id}/files", params={"path": target}, content=data)
        except WorkerError as err:
            raise _file_error(err, target) from err

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level, sorted by name.

        Raises:
            PathNotFound: no such directory (or not a directory).
            BoxNotFound: the sandbox is gone.
        """
        target = self._path(path)
        try:
            response = await self._client.request(
                "GET", f"/v1/sandboxes/{self._id}/files/list", params={"path": target}
            )
        except WorkerError as err:
            raise _file_error(err, target) from err
        try:
            files = response.json()["files"]
            entries = [
                DirEntry(
                    name=str(f["name"]),
                    kind=_KINDS.get(str(f.get("type")), "other"),
                    size=int(f.get("size") or 0),
                    mode=int(f.get("mode") or 0),
                )
                for f in files
            ]
        except (ValueError, KeyError, TypeError) as err:
            raise ProviderError(f"cloudflare worker answered a malformed listing: {err}") from err
        return sorted(entries, key=lambda e: e.name)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists (a dangling symbolic link counts).

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        done = await self.exec(["sh", "-c", 'test -e "$1" || test -L "$1"', "sh", self._path(path)], workdir="/")
        return done.exit_code == 0

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """Expose ``port`` through the Worker's preview URL (``exposePort``; idempotent) and return it.

        Raises:
            InvalidRequest: the port is out of range.
            BoxNotFound: the sandbox is gone.
        """
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be 1..65535, not {port}")
        response = await self._client.call("POST", f"/v1/sandboxes/{self._id}/ports", json={"port": port})
        try:
            url = urlsplit(str(response.json()["url"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ProviderError(f"cloudflare worker answered a malformed port: {err}") from err
        if not url.hostname:
            raise ProviderError(f"cloudflare worker answered a preview URL without a host for port {port}")
        tls = url.scheme == "https"
        return Endpoint(
            host=url.hostname, port=url.port or (443 if tls else 80), tls=tls, path=url.path or "/", query=url.query
        )

    def serialize_state(self) -> Envelope:
        """The envelope: sandbox id and its creation time."""
        return Envelope(
            backend_id=BACKEND,
            instance_id=self._id,
            state={"sandbox_id": self._id, "created_at": self._created_at},
        )


def _file_error(err: WorkerError, path: str) -> ProviderError | InvalidRequest:
    code = (err.code or "").upper()
    if code in _PATH_CODES:
        return PathNotFound(f"no such file or directory in the sandbox: {path}", path=path)
    if code == "IS_A_DIRECTORY":
        return InvalidRequest(f"{path} is a directory")
    return _ERRORS.translate(err)


class CloudflareProvider(RemoteWorkspaceSnapshots):
    """Boxes are Cloudflare Sandbox containers driven through a Sandbox Worker (see the module doc).

    Args:
        settings: The backend's settings.
        transport: The httpx transport to the Worker; tests pass the fake Worker's, production
            passes nothing (the network).
    """

    def __init__(self, settings: CloudflareSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._client = _WorkerClient(settings, transport)
        self.remote_workspace = RemoteWorkspace(workspace_root=self.descriptor.workspace_root, home_dir="/root")

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static descriptor of the ``cloudflare`` backend."""
        from sandbox.descriptors import select_backend

        return select_backend(BACKEND)

    @property
    def backend_id(self) -> str:
        """``cloudflare``."""
        return self.descriptor.backend_id

    def validate_credentials(self) -> None:
        """Check the settings offline (see :meth:`CloudflareSettings.validate`)."""
        self.settings.validate()

    def _session(self, sandbox: Mapping[str, Any]) -> CloudflareBoxSession:
        created = sandbox.get("createdAt")
        return CloudflareBoxSession(
            self._client,
            str(sandbox["id"]),
            created if isinstance(created, str) else None,
            self.descriptor.workspace_root,
        )

    async def create(self, spec: BoxSpec, idempotency_key: str) -> CloudflareBoxSession:
        """Get-or-create the sandbox whose id derives from ``idempotency_key`` (one idempotent PUT).

        Raises:
            ProviderUnavailable: the Worker could not be reached or failed transiently.
            ProviderAuthError: the Worker refused the API key.
        """
        sandbox_id = sandbox_id_for_key(idempotency_key)
        labels = {
            box_labels.LEASE_ID: spec.lease_id,
            box_labels.KEY: idempotency_key,
            LABEL_EPOCH: str(spec.epoch),
            box_labels.MANAGED_BY: box_labels.MANAGED_BY_US,
        }
        response = await self._client.call(
            "PUT", f"/v1/sandboxes/{sandbox_id}", json={"labels": labels, "envVars": dict(spec.environment)}
        )
        return self._session(_sandbox_of(response))

    async def resume(self, envelope: Envelope) -> CloudflareBoxSession:
        """Find the sandbox of ``envelope`` again.

        Raises:
            BoxNotFound: the sandbox is gone, or its id now names a newer sandbox.
            InvalidRequest: the envelope is not a Cloudflare one.
        """
        sandbox_id, created_at = self._identity(envelope)
        sandbox = _sandbox_of(await self._client.call("GET", f"/v1/sandboxes/{sandbox_id}"))
        if sandbox.get("status") not in (None, "running"):
            raise BoxNotFound(f"Cloudflare sandbox {sandbox_id} is no longer running.")
        if created_at is not None and sandbox.get("createdAt") != created_at:
            raise BoxNotFound(f"Cloudflare sandbox {sandbox_id} was replaced by a newer sandbox under the same id")
        return self._session(sandbox)

    async def terminate(self, envelope: Envelope) -> None:
        """Destroy the sandbox (``destroy``); a sandbox that is already gone is not an error."""
        sandbox_id, _ = self._identity(envelope)
        try:
            await self._client.call("DELETE", f"/v1/sandboxes/{sandbox_id}")
        except BoxNotFound:
            return

    async def list_owned(self) -> list[OwnedBox]:
        """Every live sandbox labelled ``sandbox.managed_by=sandbox-runtime``, with its lease id."""
        response = await self._client.call(
            "GET", "/v1/sandboxes", params={"label": f"{box_labels.MANAGED_BY}={box_labels.MANAGED_BY_US}"}
        )
        try:
            sandboxes = response.json()["sandboxes"]
            return [
                box_labels.owned_box(
                    str(s["id"]), s.get("labels") or {}, created_at=box_labels.iso_seconds(s.get("createdAt"))
                )
                for s in sandboxes
            ]
        except (ValueError, KeyError, TypeError, ValidationError) as err:
            raise ProviderError(f"cloudflare worker answered a malformed sandbox list: {err}") from err

    async def delete_snapshot(self, native_id: str) -> None:
        """Cloudflare sandboxes have no native snapshots (archives are tar-only).

        Raises:
            Unsupported: always.
        """
        raise Unsupported(f"the cloudflare backend has no native snapshots (asked to delete {native_id!r})")

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    def _identity(self, envelope: Envelope) -> tuple[str, str | None]:
        if envelope.backend_id != BACKEND:
            raise InvalidRequest(f"not a cloudflare envelope (backend {envelope.backend_id!r})")
        sandbox_id = envelope.state.get("sandbox_id") or envelope.instance_id
        created = envelope.state.get("created_at")
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise InvalidRequest("cloudflare envelope without a sandbox id")
        return sandbox_id, created if isinstance(created, str) else None


def build_provider(settings: Settings) -> CloudflareProvider:
    """Build the Cloudflare provider from ``SANDBOX_CLOUDFLARE_*`` (the runtime settings are not needed)."""
    del settings
    return CloudflareProvider(CloudflareSettings())
