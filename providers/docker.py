"""The ``docker`` provider: every box is a container of a Docker engine, driven through the ``docker`` SDK.

A box is one container of the desktop image (``deploy/desktop/Dockerfile``, built by
``deploy/images/build``: Xvfb, x11vnc, websockify, noVNC, ttyd, ffmpeg and the in-box scripts),
kept alive by ``sleep infinity`` under the engine's init, hardened by default:

- run as the unprivileged box user (``SANDBOX_DOCKER_USER``, ``1000:1000``; HOME ``/root``, its
  own, as in local boxes), with ``no-new-privileges``, every capability dropped (the box image
  needs none), never the host's network (``SANDBOX_DOCKER_NETWORK=host`` is refused), and the
  pids/memory/CPU limits of local boxes (``SANDBOX_LOCAL_PIDS_MAX``, ``SANDBOX_LOCAL_MEMORY_MAX``
  (swap included), ``SANDBOX_LOCAL_CPU_MAX``); files the provider writes belong to the box user;
- its workspace at ``/workspace`` on a named volume ``<container name>-workspace``, created with the
  box's labels (and ``sandbox.container_name``) and removed with the box, or on a bind of
  ``$SANDBOX_DOCKER_WORKSPACE_BASE_DIR/<container name>`` when that is set (the host directory is
  the operator's and is kept). A volume of ours that no container mounts any more (its container
  was removed behind the runtime's back, by ``docker rm -f`` or a crash) is listed by
  :meth:`DockerProvider.list_owned` under its own name, so the orphan sweep judges it like a box
  and its terminate removes it; the engine never removes a volume a container still mounts;
- the ports of ``SANDBOX_DOCKER_EXPOSED_PORTS`` plus 6080 (desktop), 7681 (terminal) and 7682
  published on ephemeral host ports (on 127.0.0.1 when the engine is local);
- labels ``sandbox.owner``, ``sandbox.lease_id``, ``sandbox.key`` (the idempotency key) and the
  lease's workspace, group and epoch, and a name derived from owner and key.

SDK calls (the low-level ``docker.APIClient``, each run in a worker thread because the SDK is
synchronous): ``containers(all, filters={"label": ...})`` to adopt a box created with the same key
and for :meth:`DockerProvider.list_owned` (with ``volumes(filters={"label": ...})``);
``create_volume`` + ``create_container`` + ``start`` (``pull`` once when the image is missing);
``inspect_container`` to resume and to resolve published ports; ``remove_container(force, v)`` +
``inspect_volume`` + ``remove_volume`` to terminate; ``exec_create`` +
``exec_start(demux=True)`` (the multiplexed stream, binary safe) + ``exec_inspect`` for the exit
code; ``get_archive``/``put_archive`` (tar) and a ``HEAD`` of the archive endpoint (path stat)
for files. A command with a timeout runs under GNU ``timeout`` in the box (TERM, then KILL 2 s
later, to the command's whole process group), because the engine has no call that kills an exec.
Workspace capture/restore/fingerprint run GNU tar in the box (:class:`RemoteWorkspace`). A session
is a Channel-A ``PtyHost``: a PTY is the engine's ``tty`` exec (:mod:`providers.docker_pty`).

NotFound rule (upstream): a container id must match ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`` (else
:class:`InvalidRequest`, and no request is sent); only the engine's 404 whose message is ``No such
container: <ref>`` (or ``No such object``; podman's Docker API says ``no container with name or ID
"<ref>" found: no such container``) proves the box is gone. A container that exists but is
stopped or paused is started or unpaused by ``resume``; one that is ``dead`` or being removed is gone.
``resume`` and ``terminate`` refuse (:class:`InvalidRequest`) a container whose ``sandbox.owner``
label is not this runtime's, so an envelope can never reach or remove somebody else's container.

==========================================================  ===============================
SDK error                                                    raised as
==========================================================  ===============================
``NotFound`` (404) ``No such container``/``No such object``  :class:`BoxNotFound`
(podman: ``no container with name or ID ... found``)
``NotFound`` (404) ``Could not find the file ...`` (podman:   :class:`PathNotFound`
``no such file or directory``)
``ImageNotFound`` after one pull attempt                     :class:`ProviderError`
other ``NotFound`` (network, exec instance, ...)             :class:`ProviderError`
``APIError`` 409 ``is not running``/``paused``/``restarting``  :class:`ProviderUnavailable`
``APIError`` 401 / 403                                       :class:`ProviderAuthError`
``APIError`` 429                                             :class:`ProviderQuotaError`
``APIError`` 5xx                                             :class:`ProviderUnavailable`
other ``APIError`` (400, 409 name conflict, ...)             :class:`ProviderError`
``requests`` connection errors and timeouts, ``OSError``,    :class:`ProviderUnavailable`
``DockerException`` (engine unreachable at client setup)
a command still running at its timeout (``timeout`` 124/137)  :class:`ExecTimeout`
==========================================================  ===============================
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import posixpath
import re
import secrets
import tarfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import requests
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.box_labels import owned_box
from providers.docker_pty import DockerPty
from providers.remote_workspace import RemoteWorkspace
from providers.sdk_errors import SERVER_ERRORS, ErrorTable, Row
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.box_limits import BoxLimits
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
    StreamPortUnavailable,
    Unsupported,
)
from sandbox.settings import Settings

if TYPE_CHECKING:
    from sandbox.channel_a.pty import ExitCallback, OutputCallback
    from sandbox.descriptors import CapabilityDescriptor

__all__ = [
    "BACKEND",
    "BOX_HOME",
    "CONTAINER_ID_RE",
    "DEFAULT_IMAGE",
    "DEFAULT_USER",
    "PLANE_PORTS",
    "WORKSPACE_ROOT",
    "DockerBoxSession",
    "DockerProvider",
    "DockerSettings",
    "build_provider",
    "container_name_for_key",
]

BACKEND: Final = "docker"
WORKSPACE_ROOT: Final = "/workspace"
BOX_HOME: Final = "/root"
"""The box user's HOME in the box image, owned by it as in local boxes (captured as ``home/``)."""
DEFAULT_USER: Final = "1000:1000"
DEFAULT_IMAGE: Final = "sandbox-desktop:latest"
PLANE_PORTS: Final = (6080, 7681, 7682)
"""Always published: the desktop edge, the terminal edge and the box's control port."""
CONTAINER_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

LABEL_OWNER: Final = "sandbox.owner"
LABEL_LEASE: Final = box_labels.LEASE_ID
LABEL_KEY: Final = box_labels.KEY
LABEL_VOLUME: Final = "sandbox.workspace_volume"
LABEL_CONTAINER_NAME: Final = "sandbox.container_name"
"""On a workspace volume: the name of the container it was made for."""

_NO_SUCH_CONTAINER_RE: Final = re.compile(
    r"^(?:Error(?: response from daemon)?: )?No such (?:object|container): "
    # podman's Docker API (4.x), also behind "the container doesn't exists: " on archive PUT
    r'|^(?:[^"]*: )?no container with name or ID "[^"]*" found: no such container$'
)
_PODMAN_NO_SUCH_FILE: Final = "no such file or directory"
_NOT_RUNNING_RE: Final = re.compile(r"is not running|is paused|is restarting|removal of container .* in progress", re.I)
_VOLUME_NAME_RE: Final = re.compile(r"^sandbox-[0-9a-f]{24}-workspace$")
_ENV_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NETWORK_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_USER_RE: Final = re.compile(r"^(?P<uid>[0-9]{1,10}):(?P<gid>[0-9]{1,10})$")
# The engine's modes that share a namespace of the host (or another container) with the box.
_SHARED_NETWORKS: Final = frozenset({"host"})
_NO_NEW_PRIVILEGES: Final = "no-new-privileges"
_HOST_SCHEMES: Final = ("unix", "tcp", "ssh", "npipe", "http", "https")
_GO_MODE_DIR: Final = 1 << 31
_GO_MODE_SYMLINK: Final = 1 << 27
_MAX_SYMLINK_HOPS: Final = 40
_KILL_GRACE_SECONDS: Final = 2
_TIMEOUT_EXITS: Final = (124, 137)
_EXEC_BACKSTOP_SECONDS: Final = 30.0
_EXIT_CODE_POLLS: Final = 50
_GONE_STATES: Final = ("dead", "removing")
_KEEP_ALIVE: Final = ("sleep", "infinity")
_KINDS: Final = {"f": "file", "d": "dir", "l": "symlink"}
_MISSING_EXIT: Final = 44
_NOT_DIR_EXIT: Final = 45

# $1 stdin file: make it the command's stdin, delete it, run the rest of the argv.
_STDIN_SHIM: Final = 'exec 0<"$1" && rm -f -- "$1" && shift && exec "$@"'
# $1 directory: one level, NUL-separated name, kind, size, permission bits.
_LIST_SCRIPT: Final = r"""
if [ -d "$1" ]; then exec find -H "$1" -mindepth 1 -maxdepth 1 -printf '%f\0%y\0%s\0%m\0'; fi
if [ -e "$1" ] || [ -L "$1" ]; then exit 45; fi
exit 44
"""

T = TypeVar("T")


class DockerSettings(BaseSettings):
    """Settings of the ``docker`` backend (environment prefix ``SANDBOX_DOCKER_``).

    Attributes:
        host: Engine URL (``unix:///var/run/docker.sock``, ``tcp://host:2376``, ``ssh://...``);
            unset means the SDK's environment (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
            ``DOCKER_CERT_PATH``, else the local socket).
        image: The box image (build it from ``deploy/desktop/Dockerfile``).
        network: A user-defined network boxes join; ports are then reached as ``<12-hex id>:<port>``.
        exposed_ports: Extra container ports to publish, comma-separated (``8000,8080``).
        workspace_base_dir: Absolute host directory under which each box's workspace is a bind
            mount ``<dir>/<container name>``; unset means a named volume per box.
        owner: Value of the ``sandbox.owner`` label: which runtime deployment owns a container.
        user: ``uid:gid`` every box process runs as (numeric, not root: the box image's ``box`` user).
        timeout_seconds: Deadline of one engine API request (exec output is not bounded by it).
    """

    model_config = SettingsConfigDict(env_prefix="SANDBOX_DOCKER_", extra="ignore")

    host: str | None = None
    image: str = DEFAULT_IMAGE
    network: str | None = None
    exposed_ports: str = ""
    workspace_base_dir: str | None = None
    owner: str = "sandbox-runtime"
    user: str = DEFAULT_USER
    timeout_seconds: float = 60.0

    def validate(self) -> None:  # type: ignore[override]  # pydantic's classmethod validate is deprecated
        """Check the settings offline.

        Raises:
            SandboxConfigError: ``[sandbox:docker] ...`` naming the setting that is wrong.
        """
        if self.host is not None:
            scheme = self.host.split("://", 1)[0] if "://" in self.host else ""
            if scheme not in _HOST_SCHEMES:
                raise SandboxConfigError(
                    f"[sandbox:docker] SANDBOX_DOCKER_HOST must be an engine URL "
                    f"({', '.join(s + '://' for s in _HOST_SCHEMES)}), not {self.host!r}"
                )
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise SandboxConfigError(
                "[sandbox:docker] SANDBOX_DOCKER_IMAGE must name an image (build deploy/desktop/Dockerfile "
                f"and tag it, e.g. {DEFAULT_IMAGE})"
            )
        if self.network is not None and not _NETWORK_RE.fullmatch(self.network):
            raise SandboxConfigError(f"[sandbox:docker] SANDBOX_DOCKER_NETWORK is not a network name: {self.network!r}")
        if self.network is not None and self.network.lower() in _SHARED_NETWORKS:
            raise SandboxConfigError(
                "[sandbox:docker] SANDBOX_DOCKER_NETWORK=host would give boxes the host's network "
                "(its loopback services included); use a bridge or a user-defined network"
            )
        self.box_ids()
        self.ports()
        if self.workspace_base_dir is not None and not self.workspace_base_dir.startswith("/"):
            raise SandboxConfigError(
                "[sandbox:docker] SANDBOX_DOCKER_WORKSPACE_BASE_DIR must be an absolute path, "
                f"not {self.workspace_base_dir!r}"
            )
        if not self.owner or not _NETWORK_RE.fullmatch(self.owner):
            raise SandboxConfigError(
                f"[sandbox:docker] SANDBOX_DOCKER_OWNER must be a plain label value, not {self.owner!r}"
            )
        if not (self.timeout_seconds > 0 and math.isfinite(self.timeout_seconds)):
            raise SandboxConfigError("[sandbox:docker] SANDBOX_DOCKER_TIMEOUT_SECONDS must be a positive number")

    def box_ids(self) -> tuple[int, int]:
        """The ``(uid, gid)`` of ``SANDBOX_DOCKER_USER``.

        Raises:
            SandboxConfigError: not a numeric ``uid:gid``, or uid 0 (a box never runs as root).
        """
        m = _USER_RE.fullmatch(self.user)
        if m is None or int(m["uid"]) == 0:
            raise SandboxConfigError(
                f"[sandbox:docker] SANDBOX_DOCKER_USER must be a numeric uid:gid other than root "
                f"(the box image's user is {DEFAULT_USER}), not {self.user!r}"
            )
        return int(m["uid"]), int(m["gid"])

    def ports(self) -> tuple[int, ...]:
        """The container ports to publish: ``SANDBOX_DOCKER_EXPOSED_PORTS`` then 6080, 7681 and 7682.

        Raises:
            SandboxConfigError: an entry is not an integer in 1..65535.
        """
        ports: list[int] = []
        for raw in self.exposed_ports.split(","):
            item = raw.strip()
            if not item:
                continue
            if not item.isdigit() or not 1 <= int(item) <= 65535:
                raise SandboxConfigError(
                    "[sandbox:docker] SANDBOX_DOCKER_EXPOSED_PORTS must be comma-separated port numbers "
                    f"in 1..65535, not {item!r}"
                )
            if int(item) not in ports:
                ports.append(int(item))
        return tuple(ports) + tuple(p for p in PLANE_PORTS if p not in ports)


class _EngineApi(Protocol):
    """The subset of ``docker.APIClient`` this provider calls (the SDK ships no types)."""

    base_url: str

    def containers(self, *, all: bool = ..., filters: dict[str, Any] | None = ...) -> list[dict[str, Any]]: ...
    def create_host_config(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_container(self, image: str, **kwargs: Any) -> dict[str, Any]: ...
    def start(self, container: str) -> None: ...
    def unpause(self, container: str) -> None: ...
    def inspect_container(self, container: str) -> dict[str, Any]: ...
    def remove_container(self, container: str, v: bool = ..., force: bool = ...) -> None: ...
    def create_volume(self, name: str, *, labels: dict[str, str] | None = ...) -> dict[str, Any]: ...
    def volumes(self, *, filters: dict[str, Any] | None = ...) -> dict[str, Any]: ...
    def inspect_volume(self, name: str) -> dict[str, Any]: ...
    def remove_volume(self, name: str, force: bool = ...) -> None: ...
    def pull(self, repository: str, tag: str | None = ...) -> Any: ...
    def exec_create(self, container: str, cmd: list[str], **kwargs: Any) -> dict[str, Any]: ...
    def exec_start(self, exec_id: str, **kwargs: Any) -> tuple[bytes | None, bytes | None]: ...
    def exec_inspect(self, exec_id: str) -> dict[str, Any]: ...
    def exec_resize(self, exec_id: str, height: int | None = ..., width: int | None = ...) -> None: ...
    def get_archive(self, container: str, path: str) -> tuple[Any, dict[str, Any] | None]: ...
    def put_archive(self, container: str, path: str, data: bytes) -> bool: ...
    def head(self, url: str, **kwargs: Any) -> requests.Response: ...
    def _url(self, pathfmt: str, *args: str) -> str: ...
    def _raise_for_status(self, response: requests.Response) -> None: ...
    def close(self) -> None: ...


def container_name_for_key(owner: str, idempotency_key: str) -> str:
    """The container name for an idempotency key (a second guard: the engine refuses a taken name)."""
    digest = hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()
    return f"sandbox-{digest[:24]}"


def _validate_container_id(container_id: str) -> str:
    if not isinstance(container_id, str) or not CONTAINER_ID_RE.fullmatch(container_id):
        raise InvalidRequest(f"not a Docker container id: {container_id!r} (must match {CONTAINER_ID_RE.pattern})")
    return container_id


def _explanation(err: BaseException) -> str:
    return str(getattr(err, "explanation", None) or "").strip()


def _describe(err: BaseException) -> str:
    # The engine's own sentence when it sent one, else the SDK's text.
    return _explanation(err) or str(err)


_ENGINE: Final = "docker engine: {text}"
_ERRORS: Final = ErrorTable(
    (
        Row(
            docker.errors.APIError,
            BoxNotFound,
            _ENGINE,
            status={404},
            test=lambda err: _NO_SUCH_CONTAINER_RE.match(_explanation(err)) is not None,
        ),
        Row(
            docker.errors.APIError,
            PathNotFound,
            _ENGINE,
            status={404},
            test=lambda err: (
                _explanation(err).startswith("Could not find the file") or _explanation(err) == _PODMAN_NO_SUCH_FILE
            ),
        ),
        Row(
            docker.errors.ImageNotFound,
            ProviderError,
            _ENGINE + " (build deploy/desktop/Dockerfile and tag it as SANDBOX_DOCKER_IMAGE)",
            status={404},
        ),
        Row(docker.errors.APIError, ProviderError, _ENGINE, status={404}),
        Row(
            docker.errors.APIError,
            ProviderUnavailable,
            _ENGINE + " (resume starts a stopped box)",
            status={409},
            test=lambda err: _NOT_RUNNING_RE.search(_explanation(err)) is not None,
        ),
        Row(docker.errors.APIError, ProviderAuthError, _ENGINE, status={401, 403}),
        Row(docker.errors.APIError, ProviderQuotaError, _ENGINE, status={429}),
        Row(docker.errors.APIError, ProviderUnavailable, _ENGINE, status=SERVER_ERRORS),
        Row(docker.errors.APIError, ProviderError, _ENGINE),
        Row((requests.exceptions.RequestException, OSError), ProviderUnavailable, "docker engine unreachable: {err}"),
        Row(docker.errors.DockerException, ProviderUnavailable, "docker engine unavailable: {err}"),
    ),  # fmt: skip
    default="docker: {name}: {err}",
    describe=_describe,
)
"""The module docstring's table."""


def _absolute(path: str) -> str:
    if "\0" in path:
        raise InvalidRequest(f"path contains a NUL byte: {path!r}")
    return "/" + posixpath.normpath(posixpath.join(WORKSPACE_ROOT, path)).lstrip("/")


def _one_file_tar(path: str, data: bytes, mode: int, owner: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    info = tarfile.TarInfo(path.lstrip("/"))
    info.size = len(data)
    info.mode = mode
    # The engine extracts as root and keeps the archive's owner: the box user must own what it is given.
    info.uid, info.gid = owner
    info.mtime = int(time.time())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _engine_host(base_url: str) -> str:
    """Where published ports of this engine are reached: the engine's host, or loopback for a socket."""
    split = urlsplit(base_url)
    if split.scheme in ("http", "https") and split.hostname and split.hostname != "localhost":
        return split.hostname
    return "127.0.0.1"


class DockerBoxSession:
    """A handle on one container. Paths are relative to ``/workspace`` unless absolute."""

    def __init__(self, provider: DockerProvider, container_id: str, name: str, volume: str | None) -> None:
        self._provider = provider
        self._id = container_id
        self._name = name
        self._volume = volume

    @property
    def instance_id(self) -> str:
        """The full 64-hex container id."""
        return self._id

    @property
    def name(self) -> str:
        """The container name."""
        return self._name

    def serialize_state(self) -> Envelope:
        """The envelope resume needs: the container id (``containerId``) and its name and volume."""
        return Envelope(
            backend_id=BACKEND,
            instance_id=self._id,
            state={
                "containerId": self._id,
                "containerName": self._name,
                "workspaceRootPath": WORKSPACE_ROOT,
                "workspaceVolume": self._volume,
            },
        )

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` in the container (``/workspace`` by default) and wait for it.

        Raises:
            InvalidRequest: empty command, malformed environment or timeout.
            ExecTimeout: the command ran past ``timeout`` seconds; its process group was killed.
            BoxNotFound: the container is gone.
            ProviderUnavailable: the engine failed transiently, or the container is not running.
        """
        argv = [str(a) for a in cmd]
        if not argv or any("\0" in a for a in argv):
            raise InvalidRequest("a command must be a non-empty argv without NUL bytes")
        environment: list[str] = []
        for name, value in (env or {}).items():
            if not _ENV_NAME_RE.fullmatch(name) or "\0" in value:
                raise InvalidRequest(f"invalid environment variable {name!r}")
            environment.append(f"{name}={value}")
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidRequest(f"timeout must be a positive number of seconds, not {timeout!r}")
        cwd = _absolute(workdir or ".")
        if stdin is not None:
            # The engine takes exec stdin only on a hijacked socket: stage it as a file the shim opens.
            staged = f"/tmp/.sandbox-stdin-{secrets.token_hex(8)}"
            await self._put(staged, stdin, 0o600)
            argv = ["sh", "-c", _STDIN_SHIM, "sh", staged, *argv]
        if timeout is not None:
            argv = ["timeout", "-k", str(_KILL_GRACE_SECONDS), f"{timeout:.3f}", *argv]
        return await self._provider._exec(self._id, argv, cwd, environment, timeout)

    async def read_file(self, path: str) -> bytes:
        """Read a whole file (symbolic links are followed).

        Raises:
            PathNotFound: no such file.
            InvalidRequest: the path is a directory.
            BoxNotFound: the container is gone.
        """
        target, stat = await self._resolve(_absolute(path))
        if stat is None:
            raise PathNotFound(f"no such file: {path}", path=path)
        if stat["mode"] & _GO_MODE_DIR:
            raise InvalidRequest(f"{path!r} is a directory")
        data = await self._provider._call(self._provider._read_archive, self._id, target)
        return data

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parent directories (an existing file keeps its permission bits).

        Raises:
            InvalidRequest: the path names a directory.
            BoxNotFound: the container is gone.
        """
        target, stat = await self._resolve(_absolute(path))
        if target == "/":
            raise InvalidRequest("cannot write the root directory")
        mode = 0o644
        if stat is not None:
            if stat["mode"] & _GO_MODE_DIR:
                raise InvalidRequest(f"{path!r} is a directory")
            mode = stat["mode"] & 0o7777
        else:
            parent = posixpath.dirname(target)
            if await self._provider._stat(self._id, parent) is None:
                # Made by the box user: the engine would create missing parents as root, which the
                # box user could then not write into. Where the box user may not (outside its own
                # directories), the engine still creates them, as before.
                await self.exec(["mkdir", "-p", "--", parent], workdir="/")
        await self._put(target, bytes(data), mode)

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level, sorted by name (symbolic links are not followed).

        Raises:
            PathNotFound: no such directory.
            InvalidRequest: the path is not a directory.
            BoxNotFound: the container is gone.
        """
        target = _absolute(path)
        done = await self.exec(["sh", "-c", _LIST_SCRIPT, "sh", target], workdir="/")
        if done.exit_code == _MISSING_EXIT:
            raise PathNotFound(f"no such directory: {path}", path=path)
        if done.exit_code == _NOT_DIR_EXIT:
            raise InvalidRequest(f"{path!r} is not a directory")
        if done.exit_code != 0:
            raise ProviderError(f"listing {path!r} failed: {done.stderr.decode(errors='replace').strip()[-300:]}")
        fields = done.stdout.split(b"\0")[:-1]
        entries = [
            DirEntry(
                name=fields[i].decode(errors="surrogateescape"),
                kind=_KINDS.get(fields[i + 1].decode(), "other"),
                size=int(fields[i + 2]),
                mode=int(fields[i + 3], 8),
            )
            for i in range(0, len(fields) - 3, 4)
        ]
        return sorted(entries, key=lambda e: e.name)

    async def open_pty(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        cols: int,
        rows: int,
        on_output: OutputCallback,
        on_exit: ExitCallback,
    ) -> DockerPty:
        """Start ``argv`` in the box on a new ``cols`` x ``rows`` PTY of the engine (a Channel-A ``PtyHost``).

        Raises:
            InvalidRequest: empty argv or malformed environment.
            BoxNotFound: the container is gone.
            ProviderError: the engine could not start it.
        """
        args = [str(a) for a in argv]
        if not args or any("\0" in a for a in args):
            raise InvalidRequest("a command must be a non-empty argv without NUL bytes")
        environment: list[str] = []
        for name, value in env.items():
            if not _ENV_NAME_RE.fullmatch(name) or "\0" in value:
                raise InvalidRequest(f"invalid environment variable {name!r}")
            environment.append(f"{name}={value}")
        pty = DockerPty(
            self._provider,
            self._id,
            shell=args[0],
            cwd=_absolute(cwd or "."),
            cols=cols,
            rows=rows,
            on_output=on_output,
            on_exit=on_exit,
        )
        await pty.start(args, environment)
        return pty

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists (a dangling symbolic link exists).

        Raises:
            BoxNotFound: the container is gone.
        """
        return await self._provider._stat(self._id, _absolute(path)) is not None

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The host port the engine published for ``port`` (or ``<12-hex id>:port`` on a user network).

        Raises:
            InvalidRequest: not a port number.
            StreamPortUnavailable: the port is not published (add it to SANDBOX_DOCKER_EXPOSED_PORTS).
            BoxNotFound: the container is gone.
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be 1..65535, not {port!r}")
        provider = self._provider
        if provider.settings.network:
            return Endpoint(host=self._id[:12], port=port)
        info = await provider._call(provider._api_sync().inspect_container, self._id)
        ports: dict[str, Any] = (info.get("NetworkSettings") or {}).get("Ports") or {}
        bindings: list[dict[str, str]] = ports.get(f"{port}/tcp") or []
        # Prefer an IPv4 binding: the engine lists one per address family.
        bindings = sorted(bindings, key=lambda b: ":" in (b.get("HostIp") or ""))
        for binding in bindings:
            host_port = str(binding.get("HostPort") or "")
            if host_port.isdigit() and 0 < int(host_port) < 65536:
                host_ip = binding.get("HostIp") or ""
                host = provider.engine_host if host_ip in ("", "0.0.0.0", "::") else host_ip
                return Endpoint(host=host, port=int(host_port))
        raise StreamPortUnavailable(
            f"port {port} of container {self._id[:12]} is not published; add it to SANDBOX_DOCKER_EXPOSED_PORTS"
        )

    async def _resolve(self, path: str) -> tuple[str, dict[str, Any] | None]:
        """Follow symbolic links of the last component; returns the final path and its stat (None: missing)."""
        for _ in range(_MAX_SYMLINK_HOPS):
            stat = await self._provider._stat(self._id, path)
            if stat is None or not stat["mode"] & _GO_MODE_SYMLINK:
                return path, stat
            path = "/" + posixpath.normpath(posixpath.join(posixpath.dirname(path), stat["linkTarget"])).lstrip("/")
        raise InvalidRequest(f"too many levels of symbolic links: {path!r}")

    async def _put(self, path: str, data: bytes, mode: int) -> None:
        archive = _one_file_tar(path, data, mode, self._provider.settings.box_ids())
        api = self._provider._api_sync
        await self._provider._call(lambda: api().put_archive(self._id, "/", archive))


class DockerProvider:
    """The ``docker`` backend.

    Args:
        settings: The backend's settings (see :class:`DockerSettings`).
        client: A ``docker.DockerClient`` to use (tests pass one bound to the fake engine); by
            default one is made on first use from ``settings.host`` or the environment.
        limits: The pids/memory/CPU limits of every box (the local boxes' settings,
            ``SANDBOX_LOCAL_*_MAX``; the disk limit is the engine's storage's business).
    """

    def __init__(
        self, settings: DockerSettings, *, client: docker.DockerClient | None = None, limits: BoxLimits | None = None
    ) -> None:
        self.settings = settings
        self.limits = limits if limits is not None else BoxLimits()
        self._client: Any | None = client
        self._owns_client = client is None
        self._client_lock = asyncio.Lock()
        self._workspace = RemoteWorkspace(workspace_root=WORKSPACE_ROOT, home_dir=BOX_HOME, scratch_dir="/tmp")

    # -- protocol surface -----------------------------------------------------------------------

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static descriptor of the ``docker`` backend."""
        from sandbox.descriptors import CAPABILITY_DESCRIPTORS

        return CAPABILITY_DESCRIPTORS[BACKEND]

    @property
    def backend_id(self) -> str:
        """``docker``."""
        return self.descriptor.backend_id

    @property
    def engine_host(self) -> str:
        """The host published ports are reached on."""
        return _engine_host(self._api_sync().base_url) if self._client is not None else "127.0.0.1"

    def validate_credentials(self) -> None:
        """Check the settings offline (no engine is contacted).

        Raises:
            SandboxConfigError: a setting is malformed; the message names it.
        """
        self.settings.validate()

    async def create(self, spec: BoxSpec, idempotency_key: str) -> DockerBoxSession:
        """Create and start a container, or adopt (and start) the one created with the same key.

        Raises:
            InvalidRequest: empty key or malformed environment.
            ProviderError: the image is missing and cannot be pulled, or the name is taken by a
                container that is not ours.
            ProviderUnavailable: the engine failed transiently.
        """
        if not idempotency_key:
            raise InvalidRequest("the idempotency key must not be empty")
        for name in spec.environment:
            if not _ENV_NAME_RE.fullmatch(name):
                raise InvalidRequest(f"invalid environment variable {name!r}")
        await self._ensure_client()
        api = self._api_sync()
        owner = self.settings.owner
        existing = await self._call(
            api.containers, all=True, filters={"label": [f"{LABEL_OWNER}={owner}", f"{LABEL_KEY}={idempotency_key}"]}
        )
        for summary in existing:
            if summary.get("State") not in _GONE_STATES:
                try:
                    return await self._adopt(str(summary["Id"]))
                except BoxNotFound as gone:
                    # create never reports NotFound: the box vanished between the listing and now.
                    raise ProviderUnavailable(
                        f"the container of this key went away while adopting it: {gone}"
                    ) from gone
        for summary in existing:
            # A dead container of this key still holds its name: clear it (best effort) before creating.
            try:
                await self._call(api.remove_container, str(summary["Id"]), v=True, force=True)
            except ProviderError:
                pass
        name = container_name_for_key(owner, idempotency_key)
        try:
            created, volume = await self._create_container(spec, idempotency_key, name)
        except ProviderError as err:
            if not _name_conflict(err):
                raise
            # A concurrent create with the same key won the name: adopt its container.
            info = await self._call(api.inspect_container, name)
            if (info.get("Config") or {}).get("Labels", {}).get(LABEL_KEY) != idempotency_key:
                raise ProviderError(
                    f"container name {name} is taken by a container this runtime did not create"
                ) from err
            try:
                return await self._adopt(str(info["Id"]))
            except BoxNotFound as gone:
                # create never reports NotFound: the name is held by a container on its way out.
                raise ProviderUnavailable(f"container {name} of this key is being removed; retry") from gone
        # Fresh from create: start it without another inspect (a retry adopts it if the start failed).
        try:
            await self._call(api.start, created)
        except BoxNotFound as gone:
            raise ProviderUnavailable(f"container {name} was removed while it was being started; retry") from gone
        return DockerBoxSession(self, created, name, volume)

    async def resume(self, envelope: Envelope) -> DockerBoxSession:
        """Find the container again; a stopped one is started, a paused one unpaused.

        Raises:
            InvalidRequest: the envelope is not a docker envelope, its id is malformed, or the
                container is not labelled with this runtime's owner.
            BoxNotFound: no such container, or it is dead or being removed.
        """
        if envelope.backend_id != BACKEND:
            raise InvalidRequest(f"not a docker envelope: backend {envelope.backend_id!r}")
        container_id = _validate_container_id(envelope.instance_id)
        await self._ensure_client()
        return await self._adopt(container_id)

    async def terminate(self, envelope: Envelope) -> None:
        """Remove the container (killing every process) and its named workspace volume; idempotent.

        An envelope whose instance is a workspace volume of ours that no container mounts (as
        :meth:`list_owned` lists a container's leftover) removes that volume. A volume a container
        still mounts is left alone (the engine refuses, and it belongs to that box).

        Raises:
            InvalidRequest: the id is malformed, or the container (or volume) is not this runtime's
                (never removed).
            ProviderUnavailable: the engine failed transiently; retry.
        """
        container_id = _validate_container_id(envelope.instance_id)
        await self._ensure_client()
        api = self._api_sync()
        volume = envelope.state.get("workspaceVolume")
        try:
            info = await self._call(api.inspect_container, container_id)
        except BoxNotFound:
            info = None
            if _VOLUME_NAME_RE.fullmatch(container_id):
                volume = container_id
        if info is not None:
            self._check_owned(info)
            volume = ((info.get("Config") or {}).get("Labels") or {}).get(LABEL_VOLUME) or volume
            try:
                await self._call(api.remove_container, container_id, v=True, force=True)
            except BoxNotFound:
                pass
        # Only ever a workspace volume this provider named (the envelope's state is not trusted for more).
        if isinstance(volume, str) and _VOLUME_NAME_RE.fullmatch(volume):
            await self._remove_volume(volume)

    async def list_owned(self) -> list[OwnedBox]:
        """Every container labelled with this runtime's owner (created, running, stopped or dead).

        Also every workspace volume labelled with this owner that no listed container mounts, its
        instance id the volume's name (terminate removes it).

        Raises:
            ProviderUnavailable: the engine failed transiently.
        """
        await self._ensure_client()
        api = self._api_sync()
        owner_filter = {"label": [f"{LABEL_OWNER}={self.settings.owner}"]}
        # Volumes first: a volume listed before its container is created is then seen as mounted.
        volumes = await self._call(api.volumes, filters=owner_filter)
        found = await self._call(api.containers, all=True, filters=owner_filter)
        owned: list[OwnedBox] = []
        mounted: set[str] = set()
        for summary in found:
            mounted.add(str((summary.get("Labels") or {}).get(LABEL_VOLUME) or ""))
            mounted.update(str(m.get("Name") or "") for m in summary.get("Mounts") or ())
        for volume in (volumes or {}).get("Volumes") or ():
            name = str(volume.get("Name") or "")
            labels = {str(k): str(v) for k, v in (volume.get("Labels") or {}).items()}
            if (
                _VOLUME_NAME_RE.fullmatch(name)
                and name not in mounted
                and labels.get(LABEL_OWNER) == self.settings.owner
            ):
                # A workspace whose container is gone: listed under its own name for the orphan sweep.
                owned.append(owned_box(name, labels, created_at=box_labels.iso_seconds(volume.get("CreatedAt"))))
        for summary in found:
            if summary.get("State") == "removing":
                continue
            labels = {str(k): str(v) for k, v in (summary.get("Labels") or {}).items()}
            created = summary.get("Created")
            owned.append(
                owned_box(
                    str(summary["Id"]), labels, created_at=float(created) if isinstance(created, int | float) else None
                )
            )
        return owned

    async def aclose(self) -> None:
        """Close the SDK client if this provider made it."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await asyncio.to_thread(client.close)

    # -- workspace snapshots --------------------------------------------------------------------

    async def capture_workspace(self, envelope: Envelope) -> AsyncIterator[bytes]:
        """Stream a tar of ``/workspace`` and ``/root`` (members ``workspace/`` and ``home/``), made in the box."""
        session = await self.resume(envelope)
        async for chunk in self._workspace.capture(session):
            yield chunk

    async def restore_workspace(self, envelope: Envelope, chunks: AsyncIterable[bytes]) -> None:
        """Replace ``/workspace`` and ``/root`` with the archive (the box keeps its tree if anything fails)."""
        session = await self.resume(envelope)
        await self._workspace.restore(session, chunks)

    async def workspace_fingerprint(self, envelope: Envelope) -> str | None:
        """A digest of the workspace's metadata, computed in the box."""
        session = await self.resume(envelope)
        return await self._workspace.fingerprint(session)

    async def delete_snapshot(self, native_id: str) -> None:
        """Docker workspaces are captured as tar archives; there are no native snapshots to delete."""
        raise Unsupported("the docker backend has no native snapshots (its workspaces are tar archives)")

    # -- engine calls ---------------------------------------------------------------------------

    def _api_sync(self) -> _EngineApi:
        if self._client is None:
            raise ProviderUnavailable("the docker client is not connected yet")
        return cast(_EngineApi, self._client.api)

    async def _ensure_client(self) -> None:
        if self._client is not None:
            return
        async with self._client_lock:
            if self._client is None:
                self._client = await self._call(self._make_client)

    def _make_client(self) -> Any:
        timeout = int(math.ceil(self.settings.timeout_seconds))
        if self.settings.host:
            return docker.DockerClient(base_url=self.settings.host, timeout=timeout)
        return docker.from_env(timeout=timeout)

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run one blocking SDK call in a worker thread, translating its errors."""
        with _ERRORS.mapped():
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def _create_container(self, spec: BoxSpec, key: str, name: str) -> tuple[str, str | None]:
        """Create (not start) the container; returns its id and its named workspace volume (None: a bind)."""
        api = self._api_sync()
        settings = self.settings
        ports = settings.ports()
        bind_ip = "127.0.0.1" if _engine_host(api.base_url) == "127.0.0.1" else "0.0.0.0"
        labels = {
            LABEL_OWNER: settings.owner,
            LABEL_LEASE: spec.lease_id,
            LABEL_KEY: key,
            "sandbox.workspace_id": spec.workspace_id,
            "sandbox.group_id": spec.group_id,
            box_labels.EPOCH: str(spec.epoch),
        }
        volume: str | None = None
        if settings.workspace_base_dir:
            source = posixpath.join(settings.workspace_base_dir, name)
        else:
            source = volume = f"{name}-workspace"
            labels[LABEL_VOLUME] = volume
            # Made with the box's labels, so a volume its container left behind is still known as ours;
            # creating an existing volume returns it (a retried create reuses it).
            await self._call(api.create_volume, volume, labels={**labels, LABEL_CONTAINER_NAME: name})
        host_config = api.create_host_config(
            binds={source: {"bind": WORKSPACE_ROOT, "mode": "rw"}},
            port_bindings={port: (bind_ip, None) for port in ports},
            network_mode=settings.network or None,
            init=True,
            restart_policy={"Name": "unless-stopped"},
            **self._hardening(),
        )
        uid, gid = settings.box_ids()
        kwargs: dict[str, Any] = {
            "command": list(_KEEP_ALIVE),
            "user": f"{uid}:{gid}",
            "name": name,
            "labels": labels,
            "environment": dict(spec.environment),
            "working_dir": WORKSPACE_ROOT,
            "ports": list(ports),
            "volumes": [WORKSPACE_ROOT],
            "host_config": host_config,
        }
        image = spec.image or settings.image
        try:
            created = await self._call(api.create_container, image, **kwargs)
        except ProviderError as err:
            if not isinstance(err.__cause__, docker.errors.ImageNotFound):
                raise
            await self._call(api.pull, image)
            created = await self._call(api.create_container, image, **kwargs)
        return str(created["Id"]), volume

    def _hardening(self) -> dict[str, Any]:
        """The host-config options that confine a box: no new privileges, no capabilities, the limits."""
        limits = self.limits
        options: dict[str, Any] = {"security_opt": [_NO_NEW_PRIVILEGES], "cap_drop": ["ALL"]}
        if limits.pids_max is not None:
            options["pids_limit"] = limits.pids_max
        if limits.memory_max is not None:
            # Swap included, as for local boxes (memory.memsw): the box cannot swap past its limit.
            options["mem_limit"] = limits.memory_max
            options["memswap_limit"] = limits.memory_max
        if limits.cpu_max is not None:
            options["nano_cpus"] = int(limits.cpu_max * 1e9)
        return options

    async def _adopt(self, container_id: str) -> DockerBoxSession:
        api = self._api_sync()
        info = await self._call(api.inspect_container, container_id)
        self._check_owned(info)
        state = info.get("State") or {}
        status = state.get("Status")
        if status in _GONE_STATES:
            raise BoxNotFound(f"docker container {container_id} is {status}")
        if status == "paused":
            await self._call(api.unpause, container_id)
        elif not state.get("Running"):
            await self._call(api.start, container_id)
        labels = (info.get("Config") or {}).get("Labels") or {}
        full_id = str(info["Id"])
        return DockerBoxSession(self, full_id, str(info.get("Name") or "").lstrip("/"), labels.get(LABEL_VOLUME))

    async def _remove_volume(self, volume: str) -> None:
        """Remove a workspace volume unless another owner's label is on it or a container mounts it; idempotent.

        Raises:
            InvalidRequest: the volume carries another runtime's owner label (never removed).
            ProviderUnavailable: the engine failed transiently; retry.
        """
        api = self._api_sync()
        try:
            info = await self._call(api.inspect_volume, volume)
        except ProviderError as err:
            if _volume_gone(err):
                return
            raise
        owner = (info.get("Labels") or {}).get(LABEL_OWNER)
        # Unlabelled: made by the engine for a container of an earlier version (the name is ours).
        if owner is not None and owner != self.settings.owner:
            raise InvalidRequest(
                f"docker volume {volume} is not owned by {self.settings.owner!r} ({LABEL_OWNER}={owner!r})"
            )
        try:
            await self._call(api.remove_volume, volume)
        except ProviderError as err:
            if not (_volume_gone(err) or _volume_in_use(err)):
                raise

    def _check_owned(self, info: Mapping[str, Any]) -> None:
        """Refuse a container another deployment (or no runtime) created: an envelope must not reach it."""
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_OWNER) != self.settings.owner:
            raise InvalidRequest(
                f"docker container {str(info.get('Id', ''))[:12]} is not owned by {self.settings.owner!r} "
                f"(label {LABEL_OWNER}={labels.get(LABEL_OWNER)!r})"
            )

    async def _exec(
        self, container_id: str, argv: list[str], workdir: str, env: list[str], timeout: float | None
    ) -> ExecResult:
        started = time.monotonic()
        # One worker-thread hop for the whole exec (create, start with the demuxed stream, inspect).
        run = self._call(self._exec_sync, container_id, argv, workdir, env)
        try:
            if timeout is None:
                done = await run
            else:
                # Backstop only: `timeout` in the box ends the command (and the stream) on time.
                done = await asyncio.wait_for(run, timeout + _KILL_GRACE_SECONDS + _EXEC_BACKSTOP_SECONDS)
        except TimeoutError:
            raise ExecTimeout(f"command did not finish within {timeout} s", timeout=timeout or 0.0) from None
        if timeout is not None and done.exit_code in _TIMEOUT_EXITS and time.monotonic() - started >= timeout:
            raise ExecTimeout(f"command ran past its {timeout} s timeout and was killed", timeout=timeout)
        return done

    def _exec_sync(self, container_id: str, argv: list[str], workdir: str, env: list[str]) -> ExecResult:
        api = self._api_sync()
        created = api.exec_create(container_id, argv, stdout=True, stderr=True, environment=env, workdir=workdir)
        exec_id = str(created["Id"])
        stdout, stderr = api.exec_start(exec_id, demux=True)
        for _ in range(_EXIT_CODE_POLLS):
            info = api.exec_inspect(exec_id)
            code = info.get("ExitCode")
            # The engine may report the exec as running for a moment after its stream ended.
            if not info.get("Running") and isinstance(code, int):
                return ExecResult(exit_code=code, stdout=stdout or b"", stderr=stderr or b"")
            time.sleep(0.02)
        raise ProviderUnavailable(f"docker exec {exec_id[:12]} finished its output but reports no exit code")

    async def _stat(self, container_id: str, path: str) -> dict[str, Any] | None:
        """The engine's stat of ``path`` (not following a final symbolic link), or None when it is missing."""
        try:
            return await self._call(self._stat_sync, container_id, path)
        except BoxNotFound:
            raise
        except PathNotFound:
            return None
        except ProviderError as err:
            cause = err.__cause__
            if not isinstance(cause, docker.errors.NotFound) or str(cause.explanation or "").strip():
                raise
        # A HEAD has no body, so a 404 does not say whether the path or the container is missing.
        await self._call(self._api_sync().inspect_container, container_id)
        return None

    def _stat_sync(self, container_id: str, path: str) -> dict[str, Any]:
        # docker-py has no call for the archive endpoint's HEAD (path stat without the content).
        api = self._api_sync()
        response = api.head(api._url("/containers/{0}/archive", container_id), params={"path": path})
        api._raise_for_status(response)
        encoded = response.headers.get("X-Docker-Container-Path-Stat")
        if not encoded:
            raise ProviderError(f"docker engine gave no stat for {path}")
        stat: dict[str, Any] = json.loads(base64.b64decode(encoded))
        return stat

    def _read_archive(self, container_id: str, path: str) -> bytes:
        stream, _ = self._api_sync().get_archive(container_id, path)
        data = b"".join(stream)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        extracted = archive.extractfile(member)
                        if extracted is not None:
                            return extracted.read()
                    break
        except tarfile.TarError as err:
            raise ProviderUnavailable(f"docker engine sent an unreadable archive for {path}: {err}") from err
        raise InvalidRequest(f"{path!r} is not a regular file")


def _name_conflict(err: ProviderError) -> bool:
    cause = err.__cause__
    return (
        isinstance(cause, docker.errors.APIError)
        and cause.status_code == 409
        and "Conflict" in str(cause.explanation or "")
    )


def _volume_gone(err: ProviderError) -> bool:
    cause = err.__cause__
    return isinstance(cause, docker.errors.NotFound)


def _volume_in_use(err: ProviderError) -> bool:
    # Docker: "remove <name>: volume is in use - [<ids>]"; podman: "... is being used by ...: volume is being used".
    cause = err.__cause__
    if not isinstance(cause, docker.errors.APIError) or cause.status_code != 409:
        return False
    text = str(cause.explanation or "")
    return "volume is in use" in text or "volume is being used" in text


def build_provider(settings: Settings) -> DockerProvider:
    """The docker provider configured from the environment (``SANDBOX_DOCKER_*``)."""
    # The backend's own settings have their own prefix; the box limits are the local boxes'.
    return DockerProvider(DockerSettings(), limits=settings.local_limits())
