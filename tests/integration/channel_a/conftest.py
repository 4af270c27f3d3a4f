"""Fixtures for the Channel-A suite: real boxes of every provider, real git on the host.

The suite is parametrized over providers through ``provider`` (module scoped): a ``local`` box in
``bubblewrap`` and in ``process`` isolation, and ``selfhosted``, a :class:`SelfhostedSession` over
the real nats-server to an in-process agent daemon whose root plays the workspace. Every test
runs on every provider: none is allowed to skip a capability.

Each test gets a fresh :class:`TestBox`; git tests share one box per module.

The main file and PTY operations also run on ``docker_engine``: a hardened docker box on the
session's real engine (podman), its workspace the volume's directory on the host and the PTY the
engine's ``tty`` exec. A test module opts tests in by name (``ON_DOCKER_ENGINE``); they skip only
when podman is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import docker as docker_sdk  # type: ignore[import-untyped]
import pytest

from providers.docker import DockerProvider, DockerSettings
from providers.local import LocalBoxSession, LocalProvider
from providers.selfhosted import NatsControlRpc
from sandbox.box import BoxSession, BoxSpec, DirEntry, Endpoint, Envelope, ExecResult
from sandbox.channel_a import ChannelA, MemoryEventSink
from sandbox.errors import SandboxConfigError
from tests.conftest import give_to_box_user, nats_server_at
from tests.container_engine import ContainerEngine
from tests.integration.selfhosted.conftest import Agent, new_id, running_agent, session_for

ProviderKind = Literal["bubblewrap", "process", "selfhosted", "docker_engine"]
PROVIDERS: tuple[ProviderKind, ...] = ("bubblewrap", "process", "selfhosted")
ENGINE: Final = "docker_engine"
"""The docker backend on the real engine, for the tests a module names in ``ON_DOCKER_ENGINE``."""
BOX_ENV = {"CHANNEL_A_BOX_VAR": "from-the-box-spec"}
"""The box environment every local test box is created with."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "provider" in metafunc.fixturenames:
        kinds: list[Any] = list(PROVIDERS)
        if metafunc.function.__name__ in getattr(metafunc.module, "ON_DOCKER_ENGINE", ()):
            kinds.append(pytest.param(ENGINE, marks=pytest.mark.container_engine, id=ENGINE))
        metafunc.parametrize("provider", kinds, indirect=True, scope="module")


@dataclass
class TestBox:
    """One box under test and where its pieces are on the host.

    Attributes:
        kind: Which provider made it.
        session: The box.
        workspace: The host directory that is the workspace root.
        outside: A host directory outside the workspace that commands in the box can reach and
            write (a local box's HOME; a directory next to the agent's root).
        parent: A host directory holding the workspace, private to this box.
    """

    __test__ = False  # not a test class, despite the name

    kind: ProviderKind
    session: BoxSession
    workspace: Path
    outside: Path
    parent: Path
    _close: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def view(self, host: Path) -> str:
        """How a command in the box names a host path (of the workspace or ``outside``)."""
        if self.kind == ENGINE:
            for root, box_root in ((self.workspace, "/workspace"), (self.outside, "/root")):
                if host == root or root in host.parents:
                    return "/".join([box_root, *host.relative_to(root).parts])
            raise AssertionError(f"{host} is not in the docker box")
        if self.kind != "bubblewrap":
            return str(host)
        assert isinstance(self.session, LocalBoxSession)
        rel = host.relative_to(self.session.path / "data")
        top, rest = rel.parts[0], rel.parts[1:]
        base = {"workspace": "/workspace", "home": "/root", "tmp": "/tmp"}[top]
        return "/".join([base, *rest])

    def hand_over(self) -> None:
        """Give what the test wrote on the host to the box user (as the provider's own writes are)."""
        owner = self.session.owner if isinstance(self.session, LocalBoxSession) else None
        if self.kind == ENGINE:
            owner = DOCKER_BOX_USER
        if owner is not None:
            for top in (self.workspace, self.outside):
                give_to_box_user(top, owner)

    @property
    def local(self) -> LocalBoxSession:
        """The session as a local box (for tests that only run on the local provider)."""
        assert isinstance(self.session, LocalBoxSession), self.kind
        return self.session


class Boxes:
    """Makes and removes test boxes of one provider kind."""

    def __init__(
        self,
        kind: ProviderKind,
        base: Path,
        *,
        local: LocalProvider | None = None,
        nats_url: str = "",
        docker: DockerProvider | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self.local = local
        self.nats_url = nats_url
        self.docker = docker
        self._rpc: NatsControlRpc | None = None

    async def new(self) -> TestBox:
        """A fresh, empty box."""
        if self.docker is not None:
            group = f"g-{uuid.uuid4().hex[:8]}"
            spec = BoxSpec(
                lease_id=f"lease/ws1/{group}", workspace_id="ws1", group_id=group, epoch=1, environment=BOX_ENV
            )
            made = await self.docker.create(spec, f"channel-a-test:{uuid.uuid4()}")
            workspace, home = await asyncio.to_thread(_engine_paths, self.docker, made.instance_id)
            return TestBox(self.kind, made, workspace, home, workspace.parent)
        if self.local is not None:
            spec = BoxSpec(lease_id="lease/ws1/g1", workspace_id="ws1", group_id="g1", epoch=1, environment=BOX_ENV)
            session = await self.local.create(spec, f"channel-a-test:{uuid.uuid4()}")
            return TestBox(self.kind, session, session.workspace_path, session.home_path, session.path)
        if self._rpc is None:
            self._rpc = nats_server_at(self.nats_url).control_rpc()
        parent = self.base / new_id("machine")
        (parent / "root").mkdir(parents=True)
        (parent / "home").mkdir()
        stack = contextlib.AsyncExitStack()
        agent = Agent(new_id("ws"), new_id("agent"), parent / "root", parent / "state")
        await stack.enter_async_context(running_agent(self.nats_url, parent, agent=agent))
        session = session_for(self._rpc, agent)
        return TestBox(self.kind, session, agent.root, parent / "home", parent, stack)

    async def drop(self, box: TestBox) -> None:
        """End the box (terminate a local one, stop the agent of a selfhosted one)."""
        if self.local is not None:
            await self.local.terminate(box.local.serialize_state())
        if self.docker is not None:
            await self.docker.terminate(box.session.serialize_state())
        await box._close.aclose()

    async def aclose(self) -> None:
        if self.local is not None:
            await self.local.aclose()
        if self.docker is not None:
            await self.docker.aclose()
        if self._rpc is not None:
            await self._rpc.close()
        shutil.rmtree(self.base, ignore_errors=True)


DOCKER_BOX_USER: Final = (1000, 1000)
"""The docker box user (``SANDBOX_DOCKER_USER``'s default): what the test writes on the host is given to it."""


def _engine_paths(provider: DockerProvider, container_id: str) -> tuple[Path, Path]:
    """A docker box's workspace (its volume's directory) and HOME (in its root filesystem), on the host.

    The engine runs as root here (rootful podman), so both are the box's own files.
    """
    client = docker_sdk.DockerClient(base_url=provider.settings.host)
    try:
        info = client.api.inspect_container(container_id)
        volume = info["Config"]["Labels"]["sandbox.workspace_volume"]
        workspace = Path(client.api.inspect_volume(volume)["Mountpoint"])
        merged = Path(info["GraphDriver"]["Data"]["MergedDir"])
        return workspace, merged / "root"
    finally:
        client.close()


@pytest.fixture(scope="module")
async def provider(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Boxes]:
    kind: ProviderKind = request.param
    base = tmp_path_factory.mktemp(kind)
    if kind == "selfhosted":
        boxes = Boxes(kind, base, nats_url=request.getfixturevalue("nats_url"))
    elif kind == ENGINE:
        engine: ContainerEngine = request.getfixturevalue("container_engine")
        docker = DockerProvider(DockerSettings(host=engine.host, image=engine.image, owner=engine.owner))
        boxes = Boxes(kind, base, docker=docker)
    else:
        if kind == "bubblewrap" and shutil.which("bwrap") is None:
            pytest.skip("bubblewrap is not installed")
        local = LocalProvider(base / "boxes", bubblewrap="always" if kind == "bubblewrap" else "never")
        try:
            local.validate_credentials()
        except SandboxConfigError as err:
            pytest.skip(f"bubblewrap does not work here: {err.message}")
        boxes = Boxes(kind, base, local=local)
    yield boxes
    await boxes.aclose()


@pytest.fixture
async def box(provider: Boxes) -> AsyncIterator[TestBox]:
    made = await provider.new()
    yield made
    await provider.drop(made)


@pytest.fixture
def sink() -> MemoryEventSink:
    return MemoryEventSink()


@pytest.fixture
async def ca(box: TestBox, sink: MemoryEventSink) -> AsyncIterator[ChannelA]:
    channel = ChannelA(box.session, events=sink, lease_epoch=7)
    yield channel
    await channel.aclose()


GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Ada Lovelace",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada Lovelace",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
    "GIT_AUTHOR_DATE": "2024-01-02T03:04:05Z",
    "GIT_COMMITTER_DATE": "2024-01-02T03:04:05Z",
    "LC_ALL": "C",
}


def git(repo: Path, *args: str) -> bytes:
    """Run git on the host in ``repo`` with a neutral configuration; its stdout."""
    env = {"PATH": os.environ["PATH"], "HOME": str(repo), **GIT_ENV}
    done = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "core.quotePath=false", *args],
        cwd=repo,
        env=env,
        capture_output=True,
    )
    if done.returncode != 0 and args[0] not in ("merge",):
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


class CountingSession:
    """A BoxSession that counts what reaches the box (to prove refusals happen before anything runs)."""

    def __init__(self, inner: BoxSession) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def instance_id(self) -> str:
        return self.inner.instance_id

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        self.calls += 1
        return await self.inner.exec(cmd, workdir=workdir, timeout=timeout, env=env, stdin=stdin)

    async def read_file(self, path: str) -> bytes:
        self.calls += 1
        return await self.inner.read_file(path)

    async def write_file(self, path: str, data: bytes) -> None:
        self.calls += 1
        await self.inner.write_file(path, data)

    async def list_dir(self, path: str) -> list[DirEntry]:
        self.calls += 1
        return await self.inner.list_dir(path)

    async def path_exists(self, path: str) -> bool:
        self.calls += 1
        return await self.inner.path_exists(path)

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        return await self.inner.resolve_exposed_port(port)

    def serialize_state(self) -> Envelope:
        return self.inner.serialize_state()
