"""Fixtures for the Channel-A suite: real local boxes in both isolation modes, real git on the host.

The suite is parametrized over providers through ``provider``; a selfhosted session can join the
list once it exists. Each test gets a fresh box; git tests share one box per module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from providers.base import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult
from providers.local import LocalBoxSession, LocalProvider
from sandbox.channel_a import ChannelA, MemoryEventSink
from sandbox.errors import SandboxConfigError

ISOLATIONS = ["bubblewrap", "process"]


@pytest.fixture(scope="module", params=ISOLATIONS)
async def provider(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalProvider]:
    if request.param == "bubblewrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    prov = LocalProvider(
        tmp_path_factory.mktemp("boxes"), bubblewrap="always" if request.param == "bubblewrap" else "never"
    )
    try:
        prov.validate_credentials()
    except SandboxConfigError as err:
        pytest.skip(f"bubblewrap does not work here: {err.message}")
    yield prov
    await prov.aclose()


async def new_box(provider: LocalProvider) -> LocalBoxSession:
    spec = BoxSpec(lease_id="lease/ws1/g1", workspace_id="ws1", group_id="g1", epoch=1)
    return await provider.create(spec, f"channel-a-test:{uuid.uuid4()}")


@pytest.fixture
async def box(provider: LocalProvider) -> AsyncIterator[LocalBoxSession]:
    session = await new_box(provider)
    yield session
    await provider.terminate(session.serialize_state())


@pytest.fixture
def sink() -> MemoryEventSink:
    return MemoryEventSink()


@pytest.fixture
async def ca(box: LocalBoxSession, sink: MemoryEventSink) -> AsyncIterator[ChannelA]:
    channel = ChannelA(box, events=sink, lease_epoch=7)
    yield channel
    await channel.aclose()


def box_view(provider: LocalProvider, session: LocalBoxSession, host: Path) -> str:
    """How a command in the box names a host path under the box directory."""
    if provider.isolation == "process":
        return str(host)
    rel = host.relative_to(session.path)
    top, rest = rel.parts[0], rel.parts[1:]
    base = {"workspace": "/workspace", "home": "/root", "tmp": "/tmp"}[top]
    return "/".join([base, *rest])


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

    def __init__(self, inner: LocalBoxSession) -> None:
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
