"""RemoteWorkspace against real boxes: capture on one workspace root, restore on another, tree identical."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from providers.remote_workspace import _CAPTURE_SCRIPT, RemoteWorkspace, RemoteWorkspaceSnapshots
from sandbox.box import BoxSession, DirEntry, Endpoint, Envelope, ExecResult
from sandbox.errors import ArchiveCorrupt, ProviderError
from tests.fakes.machine import FakeMachine

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/bwrap").exists(), reason="bubblewrap is installed by scripts/install"
)

_MANIFEST = (
    r"""cd "$1" && find . -mindepth 1 -printf '%P %y %m %s %l\n' | LC_ALL=C sort && """
    r"""find . -type f -exec sha256sum {} + | LC_ALL=C sort -k2"""
)


class MachineSession:
    """The smallest BoxSession over a FakeMachine box (absolute paths, binary-safe)."""

    def __init__(self, machine: FakeMachine, key: str) -> None:
        self.machine = machine
        self.key = key

    @property
    def instance_id(self) -> str:
        return self.key

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        return await self.machine.exec(self.key, cmd, workdir=workdir, timeout=timeout, env=env, stdin=stdin)

    async def read_file(self, path: str) -> bytes:
        return await self.machine.read(self.key, path)

    async def write_file(self, path: str, data: bytes) -> None:
        await self.machine.write(self.key, path, data)

    async def list_dir(self, path: str) -> list[DirEntry]:
        return await self.machine.list(self.key, path)

    async def path_exists(self, path: str) -> bool:
        return (await self.exec(["test", "-e", path])).exit_code == 0

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        return Endpoint(host="127.0.0.1", port=port)

    def serialize_state(self) -> Envelope:
        return Envelope(backend_id="fake", instance_id=self.key)


@pytest.fixture
async def machines(tmp_path: Path) -> AsyncIterator[tuple[FakeMachine, FakeMachine]]:
    a = FakeMachine(tmp_path / "a")
    b = FakeMachine(tmp_path / "b", workspace_root="/home/user")
    yield a, b
    await a.aclose()
    await b.aclose()


async def _manifest(session: MachineSession, root: str) -> str:
    done = await session.exec(["sh", "-c", _MANIFEST, "sh", root])
    assert done.exit_code == 0, done.stderr
    return done.stdout.decode()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_capture_on_one_root_restores_identically_on_another(machines: tuple[FakeMachine, FakeMachine]) -> None:
    a, b = machines
    await a.start("src")
    await b.start("dst")
    src, dst = MachineSession(a, "src"), MachineSession(b, "dst")
    setup = (
        "mkdir -p d/empty d/sub && printf 'hello' > d/sub/f.txt && head -c 300000 /dev/urandom > big.bin && "
        "chmod 750 d/sub && chmod 600 d/sub/f.txt && ln -s sub/f.txt d/link && touch -d @1000000000 big.bin && "
        "printf 'rc' > /root/.profile-test"
    )
    assert (await src.exec(["sh", "-c", setup])).exit_code == 0
    await dst.write_file("stale.txt", b"must disappear")
    source = RemoteWorkspace(workspace_root="/workspace")
    archive = b"".join([chunk async for chunk in source.capture(src)])
    assert archive == b"".join([chunk async for chunk in source.capture(src)]), "same tree, same bytes"
    names = tarfile.open(fileobj=io.BytesIO(archive)).getnames()
    assert "workspace/d/sub/f.txt" in names and "home/.profile-test" in names
    # The scratch file is gone from the box.
    assert (await src.exec(["sh", "-c", "ls -A /tmp"])).stdout == b""

    target = RemoteWorkspace(workspace_root="/home/user", home_dir="/root")
    await target.restore(dst, _chunks(archive))
    assert await _manifest(dst, "/home/user") == await _manifest(src, "/workspace")
    assert await dst.read_file("/root/.profile-test") == b"rc"
    assert not await dst.path_exists("/home/user/stale.txt")


async def test_fingerprint_changes_with_metadata_only(machines: tuple[FakeMachine, FakeMachine]) -> None:
    a, _ = machines
    await a.start("fp")
    box = MachineSession(a, "fp")
    ws = RemoteWorkspace(workspace_root="/workspace")
    await box.write_file("a.txt", b"1")
    first = await ws.fingerprint(box)
    assert first is not None and first == await ws.fingerprint(box)
    await box.write_file("a.txt", b"22")
    assert await ws.fingerprint(box) != first


async def test_a_corrupt_or_hostile_archive_leaves_the_box_untouched(machines: tuple[FakeMachine, FakeMachine]) -> None:
    a, _ = machines
    await a.start("c")
    box = MachineSession(a, "c")
    await box.write_file("keep.txt", b"kept")
    ws = RemoteWorkspace(workspace_root="/workspace")
    with pytest.raises(ArchiveCorrupt):
        await ws.restore(box, _chunks(b"not a tar at all" * 100))
    hostile = io.BytesIO()
    with tarfile.open(fileobj=hostile, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("workspace/../../etc/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveCorrupt):
        await ws.restore(box, _chunks(hostile.getvalue()))

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ArchiveCorrupt("sha256 mismatch")

    with pytest.raises(ArchiveCorrupt, match="sha256"):
        await ws.restore(box, failing())
    assert await box.read_file("keep.txt") == b"kept"


class SnapshotsProvider(RemoteWorkspaceSnapshots):
    """A provider that only resumes boxes of one machine; the snapshot methods come from the mixin."""

    def __init__(self, machine: FakeMachine, *, home_from_box: bool = False) -> None:
        self.machine = machine
        self.home_from_box = home_from_box
        self.remote_workspace = RemoteWorkspace(workspace_root="/workspace", home_dir=None)
        self.resumed: list[str] = []

    async def resume(self, envelope: Envelope) -> MachineSession:
        self.resumed.append(envelope.instance_id)
        return MachineSession(self.machine, envelope.instance_id)

    async def workspace_of(self, session: BoxSession) -> RemoteWorkspace:
        if self.home_from_box:
            return RemoteWorkspace(workspace_root="/workspace", home_dir="/root")
        return await super().workspace_of(session)


async def test_the_snapshot_mixin_resumes_the_box_and_delegates(machines: tuple[FakeMachine, FakeMachine]) -> None:
    a, _ = machines
    await a.start("m")
    box = MachineSession(a, "m")
    await box.write_file("w.txt", b"workspace")
    await box.write_file("/root/h.txt", b"home")
    envelope = Envelope(backend_id="fake", instance_id="m")
    plain, with_home = SnapshotsProvider(a), SnapshotsProvider(a, home_from_box=True)

    archive = b"".join([chunk async for chunk in plain.capture_workspace(envelope)])
    assert "home/h.txt" not in tarfile.open(fileobj=io.BytesIO(archive)).getnames()
    full = b"".join([chunk async for chunk in with_home.capture_workspace(envelope)])
    assert "home/h.txt" in tarfile.open(fileobj=io.BytesIO(full)).getnames()

    fingerprint = await plain.workspace_fingerprint(envelope)
    await box.write_file("w.txt", b"changed")
    assert fingerprint is not None and await plain.workspace_fingerprint(envelope) != fingerprint
    await with_home.restore_workspace(envelope, _chunks(full))
    assert await box.read_file("w.txt") == b"workspace"
    assert plain.resumed == ["m"] * 3 and with_home.resumed == ["m"] * 2


class FlakyTarSession(MachineSession):
    """Answers the capture's tar with the exit codes queued in ``tar_exits`` first (1: a file changed)."""

    def __init__(self, machine: FakeMachine, key: str, tar_exits: list[int]) -> None:
        super().__init__(machine, key)
        self.tar_exits = tar_exits
        self.tar_runs = 0

    async def exec(self, cmd: Sequence[str], **kwargs: object) -> ExecResult:
        if len(cmd) > 2 and cmd[2] == _CAPTURE_SCRIPT:
            self.tar_runs += 1
            if self.tar_exits:
                return ExecResult(
                    exit_code=self.tar_exits.pop(0), stdout=b"", stderr=b"tar: file changed as we read it"
                )
        return await super().exec(cmd, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tar_exits", "runs", "fails"),
    [([1, 1], 3, False), ([1, 1, 1], 3, True), ([2], 1, True)],
)
async def test_capture_runs_tar_again_only_when_a_file_changed_three_times_at_most(
    machines: tuple[FakeMachine, FakeMachine], tar_exits: list[int], runs: int, fails: bool
) -> None:
    a, _ = machines
    await a.start("flaky")
    box = FlakyTarSession(a, "flaky", tar_exits)
    await box.write_file("/workspace/f.txt", b"x")
    ws = RemoteWorkspace(workspace_root="/workspace")
    if fails:
        with pytest.raises(ProviderError, match="tar could not archive /workspace"):
            _ = [chunk async for chunk in ws.capture(box)]
    else:
        assert (
            "workspace/f.txt"
            in tarfile.open(fileobj=io.BytesIO(b"".join([c async for c in ws.capture(box)]))).getnames()
        )
    assert box.tar_runs == runs
