"""``BoxAccess`` with a fake lease client and a fake provider whose box is a local directory.

What a caller checks: the lease is held as ``direct`` for exactly as long as the block runs, the
box is resumed from the grant's envelope with the grant's backend, Channel-A works in the
envelope's workspace root at the grant's epoch, and nothing is left open afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import pytest

from client.box_access import DEFAULT_WORKSPACE_ROOT, BoxAccess, workspace_root_of
from client.lease_client import LeaseClient
from providers.registry import ProviderRegistry
from sandbox.box import Envelope, ExecResult
from sandbox.settings import Settings
from tests.conftest import free_port
from workflows.models.lease import LeaseGrant

pytestmark = pytest.mark.timeout(30)


def grant_for(root: str | None, *, epoch: int = 4) -> LeaseGrant:
    state = {} if root is None else {"workspace_root": root}
    return LeaseGrant(
        lease_id="lease/ws1/g1",
        epoch=epoch,
        role="spawner",
        liveness="warm",
        backend="fake",
        backend_id="fake",
        instance_id="box-1",
        envelope=Envelope(backend_id="fake", instance_id="box-1", state=state),
        holder_id="direct-1",
        kind="direct",
    )


class DirectoryBox:
    """A box whose commands run on this host in its workspace directory."""

    instance_id = "box-1"

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=workdir,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin or b"")
        return ExecResult(exit_code=proc.returncode or 0, stdout=out, stderr=err)


class FakeProvider:
    def __init__(self) -> None:
        self.resumed: list[Envelope] = []

    async def resume(self, envelope: Envelope) -> DirectoryBox:
        self.resumed.append(envelope)
        return DirectoryBox()


class FakeRegistry:
    def __init__(self) -> None:
        self.provider = FakeProvider()
        self.asked: list[str] = []
        self.closed = False

    def get(self, backend: str) -> FakeProvider:
        self.asked.append(backend)
        return self.provider

    async def aclose(self) -> None:
        self.closed = True


class FakeLeases:
    """Hands out one grant per ``hold`` and records holding and releasing."""

    def __init__(self, grant: LeaseGrant, settings: Settings) -> None:
        self.grant = grant
        self.settings = settings
        self.held: list[tuple[str, str, str]] = []
        self.released = 0

    @contextlib.asynccontextmanager
    async def hold(self, workspace_id: str, group_id: str, *, kind: str = "turn") -> AsyncIterator[LeaseGrant]:
        self.held.append((workspace_id, group_id, kind))
        try:
            yield self.grant
        finally:
            self.released += 1


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # No NATS listens there (auth on, the runtime identity from the test environment): change events are
    # best effort and must not fail an operation.
    return Settings(data_dir=tmp_path / "data", nats_url=f"nats://127.0.0.1:{free_port()}")


async def test_a_channel_holds_the_lease_as_direct_and_works_in_the_envelopes_root(
    tmp_path: Path, settings: Settings
) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    leases = FakeLeases(grant_for(str(workspace)), settings)
    registry = FakeRegistry()
    boxes = BoxAccess(cast(LeaseClient, leases), providers=cast(ProviderRegistry, registry))

    async with boxes.channel("ws1", "g1") as channel:
        assert leases.held == [("ws1", "g1", "direct")] and leases.released == 0
        written = await channel.fs_write("notes/a.txt", b"hello")
        listing = await channel.fs_list("", depth=2)
        assert channel.lease_epoch == 4

    assert (workspace / "notes" / "a.txt").read_bytes() == b"hello"
    assert written.size_bytes == 5
    assert "notes/a.txt" in {child.path for node in listing.root.children or () for child in node.children or ()}
    assert leases.released == 1
    assert registry.asked == ["fake"]
    assert registry.provider.resumed == [
        Envelope(backend_id="fake", instance_id="box-1", state={"workspace_root": str(workspace)})
    ]
    assert not registry.closed  # closing a registry would stop the box holders it adopted


async def test_an_error_inside_the_block_still_releases_the_lease(tmp_path: Path, settings: Settings) -> None:
    leases = FakeLeases(grant_for(str(tmp_path)), settings)
    boxes = BoxAccess(cast(LeaseClient, leases), providers=cast(ProviderRegistry, FakeRegistry()))
    with pytest.raises(RuntimeError, match="boom"):
        async with boxes.channel("ws1", "g1"):
            raise RuntimeError("boom")
    assert leases.released == 1


def test_the_workspace_root_defaults_when_the_envelope_does_not_say() -> None:
    assert workspace_root_of(grant_for("/home/user/project")) == "/home/user/project"
    assert workspace_root_of(grant_for(None)) == DEFAULT_WORKSPACE_ROOT
    assert workspace_root_of(grant_for("")) == DEFAULT_WORKSPACE_ROOT
