"""Hostile code in a box of the docker backend on a real engine (podman's Docker Engine API).

A box is hardened by default: the unprivileged box user, no capabilities, no new privileges, the
pids/memory/CPU limits of local boxes, the engine's bridge network (never the host's). Every probe
has a positive control: the same probe in a container of the same image made *without* the
provider's hardening (root, the engine's default capabilities, no limits), or the host itself, so a
probe that cannot succeed anywhere does not pass for a defence. Skipped only when podman is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import socket
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import docker  # type: ignore[import-untyped]
import pytest

from providers.docker import DockerBoxSession, DockerProvider, DockerSettings
from sandbox.box import BoxSpec, Envelope, ExecResult
from sandbox.box_limits import BoxLimits
from tests.container_engine import ContainerEngine

pytestmark = pytest.mark.container_engine

PROBE_TIMEOUT = 30.0
STATUS = "id -u; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status"
CGROUP_LIMITS = (
    "cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes "
    "/sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us"
)

LEASE_PREFIX = "lease/confinement/"
ProviderFactory = Callable[..., DockerProvider]


@pytest.fixture
async def make_provider(container_engine: ContainerEngine) -> AsyncIterator[ProviderFactory]:
    made: list[DockerProvider] = []

    def make(limits: BoxLimits | None = None) -> DockerProvider:
        provider = DockerProvider(
            DockerSettings(host=container_engine.host, image=container_engine.image, owner=container_engine.owner),
            limits=limits,
        )
        made.append(provider)
        return provider

    yield make
    cleaner = make()
    for owned in await cleaner.list_owned():
        if owned.lease_id.startswith(LEASE_PREFIX):
            await cleaner.terminate(Envelope(backend_id="docker", instance_id=owned.instance_id, state={}))
    for provider in made:
        await provider.aclose()


@pytest.fixture
async def box(make_provider: ProviderFactory) -> DockerBoxSession:
    return await new_box(make_provider())


async def new_box(provider: DockerProvider) -> DockerBoxSession:
    group = f"g-{secrets.token_hex(4)}"
    spec = BoxSpec(lease_id=f"{LEASE_PREFIX}{group}", workspace_id="confinement", group_id=group, epoch=1)
    return await provider.create(spec, f"{spec.lease_id}#1")


async def sh(box: DockerBoxSession, script: str, timeout: float = PROBE_TIMEOUT) -> ExecResult:
    return await box.exec(["bash", "-c", script], timeout=timeout)


def tcp_probe(address: str, port: int) -> str:
    """A bash line that exits 0 only if a TCP connection to address:port opens (3 s at most)."""
    return f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}' 2>/dev/null"


class Control:
    """A container of the box image as the engine makes it by default: root, default capabilities, no limits."""

    def __init__(self, api: Any, container_id: str) -> None:
        self.api = api
        self.id = container_id

    def run(self, script: str, user: str = "") -> tuple[int, bytes]:
        """Run ``script`` with bash (as ``user``, default root); returns the exit code and the output."""
        exec_id = self.api.exec_create(self.id, ["bash", "-c", script], user=user)["Id"]
        output = self.api.exec_start(exec_id)
        return int(self.api.exec_inspect(exec_id)["ExitCode"]), output


@contextlib.contextmanager
def unhardened(engine: ContainerEngine) -> Iterator[Control]:
    """The positive control: the same image, without the provider's hardening."""
    client = docker.DockerClient(base_url=engine.host)
    api = client.api
    container = api.create_container(
        engine.image,
        command=["sleep", "infinity"],
        user="0:0",
        labels={"sandbox.owner": f"{engine.owner}-control"},
        host_config=api.create_host_config(init=True),
    )["Id"]
    try:
        api.start(container)
        yield Control(api, container)
    finally:
        api.remove_container(container, v=True, force=True)
        client.close()


def _setuid_tar(path: str) -> bytes:
    """A tar holding a root-owned setuid copy of ``id`` (planted the way an image layer would be)."""
    with open("/usr/bin/id", "rb") as f:
        data = f.read()
    buf = io.BytesIO()
    info = tarfile.TarInfo(path.lstrip("/"))
    info.size, info.mode, info.uid, info.gid = len(data), 0o4755, 0, 0
    with tarfile.open(fileobj=buf, mode="w") as archive:
        archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_identity_is_unprivileged_without_capabilities(box: DockerBoxSession, container_engine: Any) -> None:
    status = (await sh(box, STATUS)).stdout.decode()
    assert status.splitlines()[0] == "1000"
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert f"{field}:\t0000000000000000" in status, status
    assert "NoNewPrivs:\t1" in status
    owner = (await sh(box, "stat -c '%u %g' /workspace $HOME")).stdout.split()
    assert owner == [b"1000"] * 4, "the box user owns its workspace and its home"
    with unhardened(container_engine) as control:
        code, out = await asyncio.to_thread(control.run, STATUS)
    assert code == 0 and out.decode().splitlines()[0] == "0", "positive control: the engine's default is root"
    assert "CapEff:\t0000000000000000" not in out.decode() and "NoNewPrivs:\t0" in out.decode()


async def test_a_setuid_binary_does_not_elevate(box: DockerBoxSession, container_engine: ContainerEngine) -> None:
    planted = _setuid_tar("/tmp/id-setuid")
    with unhardened(container_engine) as control:
        # Positive control: in the engine's default container, the box user's uid gets root from it.
        await asyncio.to_thread(control.api.put_archive, control.id, "/", planted)
        code, out = await asyncio.to_thread(control.run, "/tmp/id-setuid -u", "1000")
        assert (code, out.strip()) == (0, b"0"), "positive control: setuid elevates without the hardening"
        await asyncio.to_thread(control.api.put_archive, box.instance_id, "/", planted)
    assert (await sh(box, "stat -c '%u %a' /tmp/id-setuid")).stdout.strip() == b"0 4755"
    assert (await sh(box, "/tmp/id-setuid -u")).stdout.strip() == b"1000"


async def test_the_box_cannot_write_outside_its_own_directories(box: DockerBoxSession) -> None:
    for path in ("/usr/x", "/etc/x", "/x", "/opt/sandbox-runtime/x", "/etc/passwd", "/usr/local/bin/ttyd"):
        assert (await sh(box, f"echo x > {path}")).exit_code != 0, path
    for path in ("/workspace/x", "/tmp/x", "$HOME/x", "/var/tmp/y"):
        assert (await sh(box, f"echo x > {path}")).exit_code == 0, f"positive control: {path}"


async def test_files_written_through_the_provider_belong_to_the_box_user(box: DockerBoxSession) -> None:
    """The engine extracts archives as root: what the provider writes must still be the box user's to change."""
    await box.write_file("new/deep/file.txt", b"one")
    await box.write_file("/tmp/staged.txt", b"two")
    owners = await sh(box, "stat -c '%u' new new/deep new/deep/file.txt /tmp/staged.txt")
    assert owners.stdout.split() == [b"1000"] * 4
    assert (await sh(box, "echo more >> new/deep/file.txt && mkdir new/deep/sub && cat new/deep/file.txt")).stdout == (
        b"onemore\n"
    )
    assert (await box.exec(["cat"], stdin=b"through stdin")).stdout == b"through stdin", "staged stdin is readable"


async def test_the_limits_are_those_of_local_boxes(make_provider: ProviderFactory, container_engine: Any) -> None:
    limits = BoxLimits(pids_max=64, memory_max=128 * 1024**2, cpu_max=0.5)
    box = await new_box(make_provider(limits))
    pids, memory, quota, period = (await sh(box, CGROUP_LIMITS)).stdout.split()
    assert (int(pids), int(memory), int(quota) / int(period)) == (64, 128 * 1024**2, 0.5)
    defaults = await new_box(make_provider())
    pids, memory, quota, period = (await sh(defaults, CGROUP_LIMITS)).stdout.split()
    assert (int(pids), int(memory), int(quota) / int(period)) == (512, 2 * 1024**3, 2.0), "the local defaults"
    with unhardened(container_engine) as control:
        code, out = await asyncio.to_thread(control.run, CGROUP_LIMITS)
    assert code == 0 and out.split()[2] == b"-1", "positive control: no CPU quota without the provider's limits"


# Python, not bash: bash retries a refused fork for ~30 s, Python's refusal is immediate.
SPAWN = """
import subprocess
started = []
for _ in range(200):
    try:
        started.append(subprocess.Popen(["sleep", "30"]))
    except OSError:
        pass
print(len(started), open("/sys/fs/cgroup/pids/pids.current").read().strip())
for p in started:
    p.kill()
"""


async def test_a_fork_bomb_stops_at_the_pids_limit(make_provider: ProviderFactory) -> None:
    provider = make_provider(BoxLimits(pids_max=64, memory_max=None, cpu_max=None))
    bombed, neighbour = await new_box(provider), await new_box(provider)
    count, current = (int(v) for v in (await bombed.exec(["python3", "-c", SPAWN], timeout=60)).stdout.split())
    assert 8 < count < 64 and current <= 64, f"{count} of 200 processes started under pids_max=64"
    assert (await sh(neighbour, "echo alive", timeout=10)).stdout == b"alive\n"
    # Positive control: under the default limit (512) all 200 start.
    roomy = await new_box(make_provider())
    assert (await roomy.exec(["python3", "-c", SPAWN], timeout=60)).stdout.split()[0] == b"200"


async def test_a_memory_hog_is_killed_and_the_box_stays_usable(make_provider: ProviderFactory) -> None:
    box = await new_box(make_provider(BoxLimits(pids_max=None, memory_max=64 * 1024**2, cpu_max=None)))
    small = await box.exec(["python3", "-c", "b = b'x' * (8 << 20); print(len(b))"], timeout=30)
    assert small.stdout == b"8388608\n", "positive control: a small allocation works"
    hog = await box.exec(["python3", "-c", "b = b'x' * (512 << 20)"], timeout=60)
    assert hog.exit_code == 137
    assert (await sh(box, "echo still here")).stdout == b"still here\n"


async def test_a_box_cannot_reach_a_host_loopback_listener(box: DockerBoxSession) -> None:
    """What the Temporal dev server, NATS, the edges and the Web UI on the host look like."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass  # positive control: the host reaches it
        assert (await sh(box, tcp_probe("127.0.0.1", port))).exit_code != 0
    own = (
        "python3 -c 'import socket,time; s=socket.create_server((\"127.0.0.1\", 9999)); time.sleep(10)' "
        ">/dev/null 2>&1 & "
        f"for i in $(seq 100); do {tcp_probe('127.0.0.1', 9999)} && exit 0; sleep 0.1; done; exit 1"
    )
    assert (await sh(box, own)).exit_code == 0, "positive control: the box reaches its own loopback"


def test_the_host_network_is_refused() -> None:
    from sandbox.errors import SandboxConfigError

    with pytest.raises(SandboxConfigError, match="host's network"):
        DockerSettings(network="host").validate()
    DockerSettings(network="sandbox-net").validate()  # positive control: a user network is fine
    with pytest.raises(SandboxConfigError, match="other than root"):
        DockerSettings(user="0:0").validate()
