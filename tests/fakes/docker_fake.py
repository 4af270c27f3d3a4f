"""A fake Docker Engine: an in-process HTTP server speaking the Engine API that the ``docker`` SDK talks to.

:class:`FakeDockerEngine` listens on ``127.0.0.1:<port>``; a real ``docker.DockerClient(base_url=
"tcp://127.0.0.1:<port>")`` drives it through its ordinary HTTP code paths (version negotiation,
JSON bodies, filters, the hijacked exec stream, tar archives), so the provider under test does not
know it talks to a fake. Requests are served by a stdlib ``ThreadingHTTPServer`` thread; every
request is handed to the event loop that started the engine, where the engine's state lives and
where the container's commands run on the shared :class:`~tests.fakes.machine.FakeMachine`
(a container is a machine box keyed by its id).

What it reproduces (Engine API v1.45 shapes):

- ``GET /version``, ``GET /_ping``; a client asking for a newer API version than the server gets
  the engine's 400 ``client version ... is too new``.
- Containers: 64-hex ids, ``/name`` names (validated, a taken name is the engine's 409
  ``Conflict. The container name ...``), labels, ``Created`` timestamps, states ``created``,
  ``running``, ``paused``, ``exited``; create/start (204, or 304 when already started)/stop/kill/
  pause/unpause/delete (409 for a running container without ``force``), inspect, and list with
  ``all``, ``limit`` and the ``label``/``name``/``id``/``status`` filters (list or map form). A
  container is found by full id, name or unique id prefix.
- Published ports: ``PortBindings`` with an empty host port get an ephemeral host port from
  32768 up when the container starts (a taken fixed port fails the start like the engine does);
  ``NetworkSettings.Ports`` shows bindings only while the container runs.
- Volumes: a ``Binds`` entry whose source is not absolute is a named volume, created with the
  container unless ``POST /volumes/create`` made it first (with labels; an existing name returns the
  volume unchanged); ``GET /volumes`` (``label`` filters), ``GET /volumes/{name}``,
  ``DELETE /volumes/{name}`` (404 for an unknown volume, 409 while a container uses it).
  A bind source (an absolute host path) is created on the host if it is missing, as ``-v`` does.
- Execs: ``POST /containers/{id}/exec`` (409 ``Container ... is not running``/``is paused``),
  ``POST /exec/{id}/start`` answered as the engine does, ``101 UPGRADED`` followed by the raw
  multiplexed stream (8-byte frame headers: stream 1 stdout, 2 stderr, big-endian length) and the
  connection closed at the end; ``GET /exec/{id}/json`` with ``Running`` and ``ExitCode``.
- Archives: ``GET``/``HEAD``/``PUT /containers/{id}/archive`` with real tar streams produced and
  extracted by GNU tar inside the box and the ``X-Docker-Container-Path-Stat`` header (Go
  ``FileMode`` bits); a missing path is the engine's 404 ``Could not find the file <path> in
  container <ref>``, extracting into a non-directory is a 400.
- Images: ``GET /images/{name}/json`` (404 ``No such image: <name>``) and ``POST /images/create``
  (a pull), which succeeds only for references listed in ``registry``.
- Errors use the engine's JSON ``{"message": ...}``: 404 ``No such container: <ref>``, 404 ``No such
  exec instance: <id>``, 409 conflicts, 400 bad parameters, 500 for anything unexpected.
- Faults and latency: every endpoint calls :meth:`FaultPlan.before` with an operation name
  (``create``, ``start``, ``get`` (inspect), ``list_boxes``, ``stop``, ``kill``, ``terminate``
  (delete), ``exec`` (exec create), ``exec_start``, ``exec_inspect``, ``read`` (archive GET),
  ``stat`` (archive HEAD), ``write`` (archive PUT), ``image``, ``pull``, ``volume_list``,
  ``volume_create``, ``volume_inspect``, ``volume_remove``, ``version``, ``ping``). A planned
  :class:`EngineFault` becomes that HTTP status with the engine's error body; a planned
  :class:`ConnectionError` drops the connection without an answer
  (the SDK then raises ``requests.exceptions.ConnectionError``); any other planned error is a 500.

What it does not reproduce: image layers, builds and the image's own ``Cmd``/``Env``/``User``
(every container is a machine box whatever its image); the container's main process (there is
none: a stopped container keeps its box, files and any background processes, and only refuses
new execs); the contents of volumes and bind mounts (files live in the box, so a volume does not
outlive its container's files or share them between containers); networks other than the mode
recorded in ``HostConfig``; restart policies, health checks, resource limits, logs, attach,
events, TTY execs and exec stdin (``AttachStdin`` is refused with a 400); TLS; the registry's
authentication.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import posixpath
import re
import secrets
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from sandbox.errors import BoxNotFound, ExecTimeout, PathNotFound, SandboxError
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["API_VERSION", "EngineFault", "FakeContainer", "FakeDockerEngine", "FakeExec", "FakeVolume"]

API_VERSION: Final = "1.45"
MIN_API_VERSION: Final = "1.24"
ENGINE_VERSION: Final = "26.1.4"
FIRST_EPHEMERAL_PORT: Final = 32768

_NAME_RE: Final = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_VOLUME_NAME_RE: Final = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_VERSION_PREFIX_RE: Final = re.compile(r"^/v(\d+)\.(\d+)(/.*)$")
_MISSING_EXIT: Final = 44
_NOT_DIR_EXIT: Final = 45
# Go's os.FileMode type bits, as the engine encodes them in the path-stat header.
_GO_MODE_DIR: Final = 1 << 31
_GO_MODE_SYMLINK: Final = 1 << 27
_S_IFMT: Final = 0o170000

# $1 path: size, raw mode (hex), mtime and link target of the path itself (not followed).
_STAT_SCRIPT: Final = r"""
[ -e "$1" ] || [ -L "$1" ] || exit 44
stat -c '%s %f %Y' -- "$1" && { [ -L "$1" ] && readlink -- "$1" || true; }
"""
# $1 path: a tar of the path, named by its base name (as the engine's archive).
_TAR_SCRIPT: Final = r"""
[ -e "$1" ] || [ -L "$1" ] || exit 44
cd -- "$(dirname -- "$1")" && exec tar -cf - --format=pax --numeric-owner -- "$(basename -- "$1")"
"""
# $1 directory: extract the tar on stdin into it.
_UNTAR_SCRIPT: Final = r"""
[ -e "$1" ] || [ -L "$1" ] || exit 44
[ -d "$1" ] || exit 45
exec tar -xf - -C "$1" --no-same-owner
"""


class EngineFault(Exception):
    """A planned engine error: the fake answers with ``status`` and ``{"message": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


@dataclass
class FakeVolume:
    """A named volume (metadata only: the files live in the box of the container that mounts it)."""

    name: str
    created_at: str
    labels: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The engine's JSON for this volume."""
        return {
            "Name": self.name,
            "Driver": "local",
            "Mountpoint": f"/var/lib/docker/volumes/{self.name}/_data",
            "CreatedAt": self.created_at,
            "Labels": self.labels,
            "Scope": "local",
            "Options": {},
        }


@dataclass
class FakeContainer:
    """One container: the engine's record of it (its commands run on the machine box keyed by ``id``)."""

    id: str
    name: str
    image: str
    image_id: str
    config: dict[str, Any]
    host_config: dict[str, Any]
    mounts: list[dict[str, Any]]
    created: float
    status: str = "created"
    exit_code: int = 0
    started_at: str = "0001-01-01T00:00:00Z"
    finished_at: str = "0001-01-01T00:00:00Z"
    ports: dict[str, list[dict[str, str]] | None] = field(default_factory=dict)
    machine_started: bool = False

    @property
    def labels(self) -> dict[str, str]:
        """The container's labels."""
        labels: dict[str, str] = self.config.get("Labels") or {}
        return labels

    @property
    def running(self) -> bool:
        """Whether the engine reports the container as running (paused containers too, as Docker does)."""
        return self.status in ("running", "paused")


@dataclass
class FakeExec:
    """One exec instance of a container."""

    id: str
    container_id: str
    config: dict[str, Any]
    running: bool = False
    started: bool = False
    exit_code: int | None = None


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    hijack_exec: str | None = None


def _json(status: int, payload: Any) -> _Reply:
    return _Reply(status, json.dumps(payload).encode())


def _error(status: int, message: str) -> _Reply:
    return _json(status, {"message": message})


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _normalize_image(ref: str) -> str:
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def _env_dict(entries: Iterable[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries or ():
        name, sep, value = entry.partition("=")
        if sep:
            env[name] = value
    return env


def _go_mode(raw_mode: int) -> int:
    perm = raw_mode & 0o7777
    kind = raw_mode & _S_IFMT
    if kind == 0o040000:
        return perm | _GO_MODE_DIR
    if kind == 0o120000:
        return perm | _GO_MODE_SYMLINK
    return perm


class FakeDockerEngine:
    """An in-process Docker Engine API server whose containers are boxes of a :class:`FakeMachine`.

    Args:
        machine: Runs the containers' commands and holds their files.
        faults: Planned failures and latency (a fresh plan when omitted).
        images: Image references present locally (``name:tag``; ``:latest`` is implied).
        registry: References a pull (``POST /images/create``) can fetch.
        networks: Network names containers may join besides ``bridge``, ``host`` and ``none``.
    """

    def __init__(
        self,
        machine: FakeMachine,
        *,
        faults: FaultPlan | None = None,
        images: Iterable[str] = (),
        registry: Iterable[str] = (),
        networks: Iterable[str] = (),
    ) -> None:
        self.machine = machine
        self.faults = faults if faults is not None else FaultPlan()
        self.images: dict[str, str] = {}
        for ref in images:
            self.add_image(ref)
        self.registry = {_normalize_image(ref) for ref in registry}
        self.networks = {"bridge", "host", "none", *networks}
        self.containers: dict[str, FakeContainer] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.execs: dict[str, FakeExec] = {}
        self.requests: list[tuple[str, str]] = []
        """Every request served, as (method, path without the version prefix)."""
        self._ports = itertools.count(FIRST_EPHEMERAL_PORT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The ``tcp://`` URL to give ``docker.DockerClient``."""
        if self._server is None:
            raise RuntimeError("the fake engine is not started")
        host, port = self._server.server_address[:2]
        return f"tcp://{host!s}:{port}"

    async def start(self) -> None:
        """Listen on an ephemeral loopback port; requests are served on the calling event loop."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-docker-engine", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Stop serving and stop every container's box."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        for container in list(self.containers.values()):
            if container.machine_started:
                await self.machine.stop(container.id)
        self.containers.clear()

    def add_image(self, ref: str) -> str:
        """Make an image present locally; returns its ``sha256:`` id."""
        name = _normalize_image(ref)
        image_id = self.images.get(name) or f"sha256:{secrets.token_hex(32)}"
        self.images[name] = image_id
        return image_id

    # -- dispatch (on the engine's loop) --------------------------------------------------------

    def _submit(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> _Reply:
        loop = self._loop
        if loop is None or loop.is_closed():
            return _Reply(503, drop=True)
        future = asyncio.run_coroutine_threadsafe(self._dispatch(method, path, query, body), loop)
        return future.result()

    async def _dispatch(self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes) -> _Reply:
        path = raw_path
        match = _VERSION_PREFIX_RE.match(raw_path)
        if match:
            requested = (int(match[1]), int(match[2]))
            major, minor = (int(x) for x in API_VERSION.split("."))
            if requested > (major, minor):
                return _error(
                    400,
                    f"client version {match[1]}.{match[2]} is too new. Maximum supported API version is {API_VERSION}",
                )
            path = match[3]
        self.requests.append((method, path))
        route = self._route(method, path)
        if route is None:
            return _error(404, "page not found")
        operation, handler, args = route
        try:
            await self.faults.before(operation)
        except EngineFault as fault:
            return _error(fault.status, fault.message)
        except ConnectionError:
            return _Reply(0, drop=True)
        except Exception as err:
            return _error(500, str(err))
        try:
            reply: _Reply = await handler(query, body, *args)
            return reply
        except EngineFault as fault:
            return _error(fault.status, fault.message)
        except BoxNotFound as err:
            return _error(500, f"container box is gone: {err.message}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            return _error(400, f"invalid request: {err}")

    def _route(self, method: str, path: str) -> tuple[str, Any, tuple[str, ...]] | None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        table: list[tuple[str, tuple[str, ...], str, Any]] = [
            ("GET", ("version",), "version", self._version),
            ("GET", ("_ping",), "ping", self._ping),
            ("HEAD", ("_ping",), "ping", self._ping),
            ("GET", ("containers", "json"), "list_boxes", self._list),
            ("POST", ("containers", "create"), "create", self._create),
            ("GET", ("containers", "*", "json"), "get", self._inspect),
            ("POST", ("containers", "*", "start"), "start", self._start),
            ("POST", ("containers", "*", "stop"), "stop", self._stop),
            ("POST", ("containers", "*", "kill"), "kill", self._kill),
            ("POST", ("containers", "*", "pause"), "pause", self._pause),
            ("POST", ("containers", "*", "unpause"), "unpause", self._unpause),
            ("DELETE", ("containers", "*"), "terminate", self._delete),
            ("POST", ("containers", "*", "exec"), "exec", self._exec_create),
            ("POST", ("exec", "*", "start"), "exec_start", self._exec_start),
            ("GET", ("exec", "*", "json"), "exec_inspect", self._exec_inspect),
            ("GET", ("containers", "*", "archive"), "read", self._archive_get),
            ("HEAD", ("containers", "*", "archive"), "stat", self._archive_head),
            ("PUT", ("containers", "*", "archive"), "write", self._archive_put),
            ("POST", ("images", "create"), "pull", self._pull),
            ("GET", ("volumes",), "volume_list", self._volume_list),
            ("POST", ("volumes", "create"), "volume_create", self._volume_create),
            ("GET", ("volumes", "*"), "volume_inspect", self._volume_inspect),
            ("DELETE", ("volumes", "*"), "volume_remove", self._volume_remove),
        ]
        for verb, pattern, operation, handler in table:
            if verb == method and len(pattern) == len(parts):
                args = [p for p, q in zip(parts, pattern, strict=True) if q == "*"]
                if all(q in ("*", p) for p, q in zip(parts, pattern, strict=True)):
                    return operation, handler, tuple(args)
        # Image names contain slashes: GET /images/<name...>/json.
        if method == "GET" and len(parts) >= 3 and parts[0] == "images" and parts[-1] == "json":
            return "image", self._image_inspect, ("/".join(parts[1:-1]),)
        return None

    # -- system ---------------------------------------------------------------------------------

    async def _version(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        return _json(
            200,
            {
                "Version": ENGINE_VERSION,
                "ApiVersion": API_VERSION,
                "MinAPIVersion": MIN_API_VERSION,
                "Os": "linux",
                "Arch": "amd64",
                "KernelVersion": "6.1.0-fake",
                "GoVersion": "go1.21.11",
                "GitCommit": "fake",
                "Components": [{"Name": "Engine", "Version": ENGINE_VERSION, "Details": {}}],
            },
        )

    async def _ping(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        return _Reply(200, b"OK", content_type="text/plain; charset=utf-8", headers={"Api-Version": API_VERSION})

    # -- containers -----------------------------------------------------------------------------

    def _find(self, ref: str) -> FakeContainer:
        container = self.containers.get(ref)
        if container is not None:
            return container
        name = ref.lstrip("/")
        for candidate in self.containers.values():
            if candidate.name == name:
                return candidate
        matches = [c for c in self.containers.values() if ref and c.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise EngineFault(400, f"multiple IDs found with provided prefix: {ref}")
        raise EngineFault(404, f"No such container: {ref}")

    async def _create(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        config: dict[str, Any] = json.loads(body or b"{}")
        name = (query.get("name") or [""])[0]
        if name and not _NAME_RE.fullmatch(name):
            return _error(400, f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        name = name.lstrip("/")
        for other in self.containers.values():
            if name and other.name == name:
                return _error(
                    409,
                    f'Conflict. The container name "/{name}" is already in use by container "{other.id}". '
                    "You have to remove (or rename) that container to be able to reuse that name.",
                )
        image = str(config.get("Image") or "")
        image_id = self.images.get(_normalize_image(image)) if image else None
        if image_id is None:
            return _error(404, f"No such image: {_normalize_image(image) if image else image}")
        host_config: dict[str, Any] = config.pop("HostConfig", None) or {}
        network = host_config.get("NetworkMode") or "bridge"
        if network not in self.networks and network != "default":
            return _error(404, f"network {network} not found")
        mounts: list[dict[str, Any]] = []
        new_volumes: list[str] = []
        for bind in host_config.get("Binds") or []:
            source, _, rest = str(bind).partition(":")
            destination, _, mode = rest.partition(":")
            if not destination.startswith("/"):
                return _error(400, f"invalid volume specification: '{bind}'")
            if source.startswith("/"):
                mounts.append(
                    {"Type": "bind", "Source": source, "Destination": destination, "Mode": mode,
                     "RW": "ro" not in mode.split(","), "Propagation": "rprivate"}
                )  # fmt: skip
                continue
            if not _VOLUME_NAME_RE.fullmatch(source):
                return _error(
                    400,
                    f'create {source}: "{source}" includes invalid characters for a local volume name, '
                    "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed. If you intended to pass a host directory, "
                    "use absolute path",
                )
            if source not in self.volumes:
                new_volumes.append(source)
            mounts.append(
                {"Type": "volume", "Name": source, "Source": f"/var/lib/docker/volumes/{source}/_data",
                 "Destination": destination, "Driver": "local", "Mode": mode,
                 "RW": "ro" not in mode.split(","), "Propagation": ""}
            )  # fmt: skip
        for mount in mounts:
            if mount["Type"] == "bind":
                Path(mount["Source"]).mkdir(parents=True, exist_ok=True)
        for volume in new_volumes:
            self.volumes[volume] = FakeVolume(name=volume, created_at=_now_rfc3339())
        container_id = secrets.token_hex(32)
        if not name:
            name = f"fake_{container_id[:12]}"
        self.containers[container_id] = FakeContainer(
            id=container_id,
            name=name,
            image=image,
            image_id=image_id,
            config=config,
            host_config=host_config,
            mounts=mounts,
            created=time.time(),
        )
        return _json(201, {"Id": container_id, "Warnings": []})

    async def _start(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        if container.running:
            return _Reply(304)
        ports: dict[str, list[dict[str, str]] | None] = {}
        taken = {
            binding["HostPort"]
            for other in self.containers.values()
            if other.running
            for bindings in other.ports.values()
            for binding in bindings or []
        }
        for port, bindings in (container.host_config.get("PortBindings") or {}).items():
            assigned: list[dict[str, str]] = []
            for binding in bindings or [{}]:
                host_port = str(binding.get("HostPort") or "")
                if host_port in ("", "0"):
                    host_port = str(next(p for p in self._ports if str(p) not in taken))
                elif host_port in taken:
                    return _error(
                        500,
                        f"driver failed programming external connectivity on endpoint {container.name} "
                        f"({container.id}): Bind for 0.0.0.0:{host_port} failed: port is already allocated",
                    )
                taken.add(host_port)
                assigned.append({"HostIp": str(binding.get("HostIp") or "0.0.0.0"), "HostPort": host_port})
            ports[port] = assigned
        for port in container.config.get("ExposedPorts") or {}:
            ports.setdefault(port, None)
        if not container.machine_started:
            await self.machine.start(container.id, _env_dict(container.config.get("Env")))
            container.machine_started = True
        container.ports = ports
        container.status = "running"
        container.started_at = _now_rfc3339()
        return _Reply(204)

    def _halt(self, container: FakeContainer, exit_code: int) -> None:
        container.status = "exited"
        container.exit_code = exit_code
        container.finished_at = _now_rfc3339()
        container.ports = {}

    async def _stop(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        if not container.running:
            return _Reply(304)
        self._halt(container, 143)
        return _Reply(204)

    async def _kill(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        if not container.running:
            return _error(409, f"Cannot kill container: {ref}: Container {container.id} is not running")
        self._halt(container, 137)
        return _Reply(204)

    async def _pause(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        if container.status != "running":
            return _error(409, f"Container {container.id} is not running")
        container.status = "paused"
        return _Reply(204)

    async def _unpause(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        if container.status != "paused":
            return _error(500, f"Container {container.id} is not paused")
        container.status = "running"
        return _Reply(204)

    async def _delete(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        force = (query.get("force") or ["0"])[0].lower() in ("1", "true")
        if container.running and not force:
            return _error(
                409,
                f"You cannot remove a running container {container.id}. "
                "Stop the container before attempting removal or force remove",
            )
        del self.containers[container.id]
        for exec_id in [e.id for e in self.execs.values() if e.container_id == container.id]:
            del self.execs[exec_id]
        if container.machine_started:
            await self.machine.stop(container.id)
        return _Reply(204)

    def _describe(self, container: FakeContainer) -> dict[str, Any]:
        network = container.host_config.get("NetworkMode") or "bridge"
        state = {
            "Status": container.status,
            "Running": container.running,
            "Paused": container.status == "paused",
            "Restarting": False,
            "OOMKilled": False,
            "Dead": False,
            "Pid": 4242 if container.running else 0,
            "ExitCode": container.exit_code,
            "Error": "",
            "StartedAt": container.started_at,
            "FinishedAt": container.finished_at,
        }
        return {
            "Id": container.id,
            "Created": datetime.fromtimestamp(container.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "Path": (container.config.get("Cmd") or [""])[0],
            "Args": (container.config.get("Cmd") or [""])[1:],
            "State": state,
            "Image": container.image_id,
            "Name": f"/{container.name}",
            "RestartCount": 0,
            "Driver": "overlay2",
            "Platform": "linux",
            "HostConfig": container.host_config,
            "Mounts": container.mounts,
            "Config": {**container.config, "Image": container.image, "Labels": container.labels},
            "NetworkSettings": {
                "Ports": container.ports,
                "Networks": {network: {"NetworkID": "fake", "IPAddress": "172.17.0.2" if container.running else ""}},
            },
        }

    async def _inspect(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        return _json(200, self._describe(self._find(ref)))

    async def _list(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        show_all = (query.get("all") or ["0"])[0].lower() in ("1", "true")
        limit = int((query.get("limit") or ["-1"])[0] or -1)
        raw_filters = json.loads((query.get("filters") or ["{}"])[0] or "{}")
        filters: dict[str, list[str]] = {
            key: list(value) if isinstance(value, list) else [k for k, v in value.items() if v]
            for key, value in raw_filters.items()
        }
        chosen = sorted(self.containers.values(), key=lambda c: c.created, reverse=True)
        if not show_all and limit <= 0:
            chosen = [c for c in chosen if c.running]
        for key, values in filters.items():
            if key == "label":
                chosen = [c for c in chosen if all(_label_matches(c.labels, v) for v in values)]
            elif key == "name":
                chosen = [c for c in chosen if any(re.search(v.lstrip("/"), c.name) for v in values)]
            elif key == "id":
                chosen = [c for c in chosen if any(c.id.startswith(v) for v in values)]
            elif key == "status":
                chosen = [c for c in chosen if c.status in values]
            else:
                return _error(400, f"invalid filter '{key}'")
        if limit > 0:
            chosen = chosen[:limit]
        return _json(200, [self._summary(c) for c in chosen])

    def _summary(self, container: FakeContainer) -> dict[str, Any]:
        ports = [
            {"IP": b["HostIp"], "PrivatePort": int(port.split("/")[0]), "PublicPort": int(b["HostPort"]),
             "Type": port.split("/")[1]}
            for port, bindings in container.ports.items()
            for b in bindings or []
        ]  # fmt: skip
        status = {"running": "Up 1 second", "paused": "Up 1 second (Paused)", "created": "Created"}.get(
            container.status, f"Exited ({container.exit_code}) 1 second ago"
        )
        return {
            "Id": container.id,
            "Names": [f"/{container.name}"],
            "Image": container.image,
            "ImageID": container.image_id,
            "Command": " ".join(container.config.get("Cmd") or []),
            "Created": int(container.created),
            "Ports": ports,
            "Labels": container.labels,
            "State": container.status,
            "Status": status,
            "HostConfig": {"NetworkMode": container.host_config.get("NetworkMode") or "bridge"},
            "Mounts": container.mounts,
        }

    # -- execs ----------------------------------------------------------------------------------

    async def _exec_create(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        config: dict[str, Any] = json.loads(body or b"{}")
        if container.status == "paused":
            return _error(409, f"Container {container.id} is paused, unpause the container before exec")
        if not container.running:
            return _error(409, f"Container {container.id} is not running")
        if not config.get("Cmd"):
            return _error(400, "No exec command specified")
        if config.get("AttachStdin") or config.get("Tty"):
            return _error(400, "the fake engine does not attach stdin or a TTY to execs")
        exec_id = secrets.token_hex(32)
        self.execs[exec_id] = FakeExec(id=exec_id, container_id=container.id, config=config)
        return _json(201, {"Id": exec_id})

    def _find_exec(self, exec_id: str) -> FakeExec:
        found = self.execs.get(exec_id)
        if found is None:
            raise EngineFault(404, f"No such exec instance: {exec_id}")
        return found

    async def _exec_start(self, query: dict[str, list[str]], body: bytes, exec_id: str) -> _Reply:
        instance = self._find_exec(exec_id)
        container = self._find(instance.container_id)
        if instance.started:
            return _error(409, f"Error: Exec command {exec_id} is already running")
        if not container.running:
            return _error(409, f"Container {container.id} is not running")
        options: dict[str, Any] = json.loads(body or b"{}")
        instance.started = True
        instance.running = True
        if options.get("Detach"):
            asyncio.get_running_loop().create_task(self.run_exec(exec_id))
            return _Reply(200, b"", content_type="application/json")
        return _Reply(101, hijack_exec=exec_id)

    async def run_exec(self, exec_id: str) -> tuple[bytes, bytes]:
        """Run a started exec on the machine; records its exit code and returns (stdout, stderr)."""
        instance = self._find_exec(exec_id)
        config = instance.config
        container = self.containers.get(instance.container_id)
        workdir = config.get("WorkingDir") or (container.config.get("WorkingDir") if container else None) or "/"
        try:
            done = await self.machine.exec(
                instance.container_id, list(config["Cmd"]), workdir=workdir, env=_env_dict(config.get("Env"))
            )
            stdout, stderr, code = done.stdout, done.stderr, done.exit_code
        except PathNotFound:
            stdout, code = b"", 126
            stderr = (
                f"OCI runtime exec failed: exec failed: unable to start container process: chdir to cwd "
                f'("{workdir}") set in config.json failed: no such file or directory: unknown\r\n'
            ).encode()
        except (BoxNotFound, ExecTimeout, SandboxError) as err:
            stdout, stderr, code = b"", f"{err}\n".encode(), 137
        instance.exit_code = code
        instance.running = False
        return stdout, stderr

    async def _exec_inspect(self, query: dict[str, list[str]], body: bytes, exec_id: str) -> _Reply:
        instance = self._find_exec(exec_id)
        return _json(
            200,
            {
                "ID": instance.id,
                "Running": instance.running,
                "ExitCode": instance.exit_code,
                "ProcessConfig": {
                    "tty": bool(instance.config.get("Tty")),
                    "entrypoint": instance.config["Cmd"][0],
                    "arguments": instance.config["Cmd"][1:],
                    "privileged": bool(instance.config.get("Privileged")),
                    "user": instance.config.get("User") or "",
                },
                "OpenStdin": False,
                "OpenStderr": bool(instance.config.get("AttachStderr", True)),
                "OpenStdout": bool(instance.config.get("AttachStdout", True)),
                "CanRemove": False,
                "ContainerID": instance.container_id,
                "DetachKeys": "",
                "Pid": 4343 if instance.running else 0,
            },
        )

    # -- archives -------------------------------------------------------------------------------

    async def _box_sh(self, container: FakeContainer, script: str, *args: str, stdin: bytes | None = None) -> Any:
        if not container.machine_started:
            # A created container's file system exists before it starts.
            await self.machine.start(container.id, _env_dict(container.config.get("Env")))
            container.machine_started = True
        return await self.machine.exec(container.id, ["sh", "-c", script, "sh", *args], workdir="/", stdin=stdin)

    async def _stat(self, container: FakeContainer, ref: str, path: str) -> dict[str, Any]:
        if not path.startswith("/"):
            path = "/" + path
        done = await self._box_sh(container, _STAT_SCRIPT, path)
        if done.exit_code == _MISSING_EXIT:
            raise EngineFault(404, f"Could not find the file {path} in container {ref}")
        if done.exit_code != 0:
            raise EngineFault(500, done.stderr.decode(errors="replace").strip())
        lines = done.stdout.decode(errors="surrogateescape").split("\n")
        size, raw_mode, mtime = lines[0].split()
        return {
            "name": posixpath.basename(path.rstrip("/")) or "/",
            "size": int(size),
            "mode": _go_mode(int(raw_mode, 16)),
            "mtime": datetime.fromtimestamp(int(mtime), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "linkTarget": lines[1] if len(lines) > 1 else "",
        }

    @staticmethod
    def _stat_header(stat: dict[str, Any]) -> dict[str, str]:
        encoded = base64.b64encode(json.dumps(stat).encode()).decode()
        return {"X-Docker-Container-Path-Stat": encoded}

    async def _archive_head(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        path = query["path"][0]
        stat = await self._stat(container, ref, path)
        return _Reply(200, b"", content_type="application/x-tar", headers=self._stat_header(stat))

    async def _archive_get(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        path = query["path"][0]
        stat = await self._stat(container, ref, path)
        done = await self._box_sh(container, _TAR_SCRIPT, path if path.startswith("/") else "/" + path)
        if done.exit_code == _MISSING_EXIT:
            raise EngineFault(404, f"Could not find the file {path} in container {ref}")
        if done.exit_code != 0:
            raise EngineFault(500, done.stderr.decode(errors="replace").strip())
        return _Reply(200, done.stdout, content_type="application/x-tar", headers=self._stat_header(stat))

    async def _archive_put(self, query: dict[str, list[str]], body: bytes, ref: str) -> _Reply:
        container = self._find(ref)
        path = query["path"][0]
        try:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
                archive.getmembers()
        except tarfile.TarError as err:
            return _error(400, f"Error processing tar file: {err}")
        done = await self._box_sh(container, _UNTAR_SCRIPT, path if path.startswith("/") else "/" + path, stdin=body)
        if done.exit_code == _MISSING_EXIT:
            return _error(404, f"Could not find the file {path} in container {ref}")
        if done.exit_code == _NOT_DIR_EXIT:
            return _error(400, "extraction point is not a directory")
        if done.exit_code != 0:
            detail = done.stderr.decode(errors="replace").strip() or f"tar exited {done.exit_code}"
            return _error(500, f"Error processing tar file: {detail}")
        return _Reply(200, b"", content_type="text/plain")

    # -- images and volumes ---------------------------------------------------------------------

    async def _image_inspect(self, query: dict[str, list[str]], body: bytes, name: str) -> _Reply:
        ref = _normalize_image(name)
        image_id = self.images.get(ref)
        if image_id is None:
            image_id = next(
                (i for i in self.images.values() if name and i.removeprefix("sha256:").startswith(name)), None
            )
        if image_id is None:
            return _error(404, f"No such image: {ref}")
        tags = [r for r, i in self.images.items() if i == image_id]
        return _json(200, {"Id": image_id, "RepoTags": tags, "RepoDigests": [], "Os": "linux", "Architecture": "amd64"})

    async def _pull(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        image = (query.get("fromImage") or [""])[0]
        tag = (query.get("tag") or [""])[0]
        ref = _normalize_image(f"{image}:{tag}" if tag else image)
        if ref not in self.registry:
            repo = ref.rsplit(":", 1)[0]
            return _error(
                404,
                f"pull access denied for {repo}, repository does not exist or may require 'docker login': "
                "denied: requested access to the resource is denied",
            )
        self.add_image(ref)
        lines = [
            {"status": f"Pulling from {ref.rsplit(':', 1)[0]}", "id": ref.rsplit(":", 1)[1]},
            {"status": "Digest: sha256:" + secrets.token_hex(32)},
            {"status": f"Status: Downloaded newer image for {ref}"},
        ]
        return _Reply(200, b"".join(json.dumps(line).encode() + b"\r\n" for line in lines))

    async def _volume_list(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        raw_filters = json.loads((query.get("filters") or ["{}"])[0] or "{}")
        chosen = list(self.volumes.values())
        for key, value in raw_filters.items():
            values = list(value) if isinstance(value, list) else [k for k, v in value.items() if v]
            if key != "label":
                return _error(400, f"invalid filter '{key}'")
            chosen = [v for v in chosen if all(_label_matches(v.labels, wanted) for wanted in values)]
        return _json(200, {"Volumes": [v.describe() for v in chosen], "Warnings": []})

    async def _volume_create(self, query: dict[str, list[str]], body: bytes) -> _Reply:
        spec = json.loads(body or b"{}")
        name = str(spec.get("Name") or "")
        if not _VOLUME_NAME_RE.fullmatch(name):
            return _error(400, f"create {name}: invalid volume name")
        # As the engine: creating an existing volume returns it unchanged.
        volume = self.volumes.setdefault(
            name, FakeVolume(name=name, created_at=_now_rfc3339(), labels=dict(spec.get("Labels") or {}))
        )
        return _json(201, volume.describe())

    async def _volume_inspect(self, query: dict[str, list[str]], body: bytes, name: str) -> _Reply:
        if name not in self.volumes:
            return _error(404, f"get {name}: no such volume")
        return _json(200, self.volumes[name].describe())

    async def _volume_remove(self, query: dict[str, list[str]], body: bytes, name: str) -> _Reply:
        if name not in self.volumes:
            return _error(404, f"get {name}: no such volume")
        users = [c.id for c in self.containers.values() if any(m.get("Name") == name for m in c.mounts)]
        if users:
            return _error(409, f"remove {name}: volume is in use - [{', '.join(users)}]")
        del self.volumes[name]
        return _Reply(204)


def _label_matches(labels: Mapping[str, str], wanted: str) -> bool:
    key, sep, value = wanted.partition("=")
    if key not in labels:
        return False
    return not sep or labels[key] == value


def _frames(stream: int, data: bytes) -> bytes:
    # The engine sends output in chunks of at most 32 KiB, each behind an 8-byte header.
    out = bytearray()
    for start in range(0, len(data), 32 * 1024):
        chunk = data[start : start + 32 * 1024]
        out += struct.pack(">BxxxL", stream, len(chunk)) + chunk
    return bytes(out)


def _handler_class(engine: FakeDockerEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"Docker/{ENGINE_VERSION} (linux)"
        sys_version = ""

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes: without this, Nagle's algorithm and the
            # client's delayed ACK stall every response by ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            return

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self) -> None:
            split = urlsplit(self.path)
            body = self._body()
            reply = engine._submit(self.command, split.path, parse_qs(split.query, keep_blank_values=True), body)
            if reply.drop:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if reply.hijack_exec is not None:
                self._hijack(reply.hijack_exec)
                return
            self.send_response(reply.status)
            self.send_header("Api-Version", API_VERSION)
            self.send_header("Ostype", "linux")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.status not in (204, 304):
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD" and reply.status not in (204, 304):
                self.wfile.write(reply.body)

        def _hijack(self, exec_id: str) -> None:
            self.send_response(101, "UPGRADED")
            self.send_header("Content-Type", "application/vnd.docker.multiplexed-stream")
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", "tcp")
            self.end_headers()
            self.wfile.flush()
            # The SDK reads the stream from the raw socket once it has parsed the headers: give
            # it the headers alone first (the engine's output comes later too).
            time.sleep(0.01)
            loop = engine._loop
            if loop is not None and not loop.is_closed():
                stdout, stderr = asyncio.run_coroutine_threadsafe(engine.run_exec(exec_id), loop).result()
                with contextlib.suppress(OSError):
                    self.wfile.write(_frames(1, stdout) + _frames(2, stderr))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve  # noqa: N815 - stdlib naming

    return Handler
