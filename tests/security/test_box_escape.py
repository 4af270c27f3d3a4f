"""Hostile code in a real local box, attacking what the threat model says it must not reach.

Every attack runs from inside a real bubblewrap box; every one has a positive control: the same
probe where it must work (the box's own workspace, its own loopback, a destination the test
allows explicitly on a network outside the host, the host itself), so that a probe which cannot
succeed anywhere does not pass for a defence.

The destination "outside" is a web server in a network namespace of its own, reached through a
veth pair: an address that is neither loopback nor the host's (exactly what an operator would
allow), so the proxy's positive controls cross a real network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from providers.egress_proxy import _someone_listens
from providers.local import LocalBoxSession, LocalProvider
from sandbox.box import BoxSpec, Envelope, ExecResult
from sandbox.box_limits import BoxLimits

REPO = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Outside:
    """A web server on another network: ``address:port`` serves ``/hello.txt``; ``port2`` a second one."""

    address: str
    host_side: str  # the host's own address on that link
    port: int
    port2: int


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _wait_tcp(address: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    tag = secrets.token_hex(3)
    ns, host_if, peer_if = f"sbx-out-{tag}", f"sbxh{tag}", f"sbxp{tag}"
    net = 200 + secrets.randbelow(50)
    host_side, address = f"10.251.{net}.1", f"10.251.{net}.2"
    docs = tmp_path_factory.mktemp("outside")
    (docs / "hello.txt").write_text("hello from outside\n")
    servers: list[subprocess.Popen[bytes]] = []
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _sh("ip", "link", "set", peer_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_side}/30", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/30", "dev", peer_if)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", peer_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for port in (8080, 8081):
            servers.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        "-m",
                        "http.server",
                        str(port),
                        "--bind",
                        address,
                        "--directory",
                        str(docs),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
            _wait_tcp(address, port)
        yield Outside(address=address, host_side=host_side, port=8080, port2=8081)
    finally:
        for server in servers:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


ProviderFactory = Callable[..., Awaitable[LocalProvider]]


@pytest.fixture
async def make_provider(tmp_path: Path) -> AsyncIterator[ProviderFactory]:
    made: list[LocalProvider] = []

    async def make(**kwargs: Any) -> LocalProvider:
        provider = LocalProvider(tmp_path / f"boxes{len(made)}", **kwargs)
        provider.validate_credentials()
        made.append(provider)
        return provider

    yield make
    for provider in made:
        for owned in await provider.list_owned():
            await provider.terminate(Envelope(backend_id="unix_local", instance_id=owned.instance_id))
        await provider.aclose()


async def new_box(provider: LocalProvider) -> LocalBoxSession:
    spec = BoxSpec(lease_id=f"lease/ws/{secrets.token_hex(3)}", workspace_id="ws", group_id="g", epoch=1)
    return await provider.create(spec, f"security:{secrets.token_hex(8)}")


async def sh(box: LocalBoxSession, script: str, timeout: float = PROBE_TIMEOUT) -> ExecResult:
    return await box.exec(["bash", "-c", script], timeout=timeout)


def tcp_probe(address: str, port: int) -> str:
    """A bash line that exits 0 only if a TCP connection to address:port opens (3 s at most)."""
    return f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}' 2>/dev/null"


def host_connects(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=3).close()
        return True
    except OSError:
        return False


def host_addresses() -> list[str]:
    """The host's own non-loopback IPv4 addresses."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]


@pytest.fixture
async def box(make_provider: ProviderFactory) -> LocalBoxSession:
    return await new_box(await make_provider())


# --- network -----------------------------------------------------------------------------------


async def test_no_port_of_the_running_stack_is_reachable(
    box: LocalBoxSession, temporal_client: Any, nats_url: str, postgres_url: str
) -> None:
    temporal_host, _, temporal_port = temporal_client.service_client.config.target_host.rpartition(":")
    targets = {
        "temporal": (temporal_host, int(temporal_port)),
        "nats": (urlsplit(nats_url).hostname or "", urlsplit(nats_url).port or 4222),
        "postgres": (urlsplit(postgres_url).hostname or "127.0.0.1", urlsplit(postgres_url).port or 5432),
    }
    for name, (address, port) in targets.items():
        assert host_connects(address, port), f"positive control: the host reaches {name}"
        for candidate in {address, "127.0.0.1", *host_addresses()}:
            if host_connects(candidate, port):
                result = await sh(box, tcp_probe(candidate, port))
                assert result.exit_code != 0, f"the box reached {name} on {candidate}:{port}"
    # Positive control: the same probe works on the box's own loopback.
    port = targets["nats"][1]
    server = f"python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & sleep 0.5; "
    assert (
        await sh(
            box,
            server + "for i in 1 2 3 4 5 6; do " + tcp_probe("127.0.0.1", port) + " && exit 0; sleep 0.5; done; exit 1",
        )
    ).exit_code == 0


async def test_the_box_network_has_only_loopback(box: LocalBoxSession, outside: Outside) -> None:
    interfaces = (await sh(box, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")).stdout.split()
    assert interfaces == [b"lo"]
    assert host_connects(outside.address, outside.port), "positive control: the host reaches the outside server"
    assert (await sh(box, tcp_probe(outside.address, outside.port))).exit_code != 0, "a direct route out exists"


async def test_temporal_and_nats_clients_cannot_connect(
    box: LocalBoxSession, temporal_client: Any, nats_url: str
) -> None:
    # The attack of the finding: the Temporal CLI (a static binary) run inside the box.
    temporal = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    address = temporal_client.service_client.config.target_host
    cli = ["workflow", "list", "--address", address, "--limit", "1", "--command-timeout", "3s"]
    host_run = subprocess.run([temporal, *cli], capture_output=True, timeout=30)
    assert host_run.returncode == 0, f"positive control: the CLI works on the host: {host_run.stderr!r}"
    await box.write_file("temporal", Path(temporal).read_bytes())
    in_box = await box.exec(["sh", "-c", 'chmod +x temporal && ./temporal "$@"', "temporal", *cli], timeout=30)
    assert in_box.exit_code != 0
    # A NATS client: read the server's INFO banner.
    nats = urlsplit(nats_url)
    client = (
        "import socket,sys\n"
        f"s=socket.create_connection(({nats.hostname!r},{nats.port}),timeout=3)\n"
        "sys.stdout.write(s.recv(4096).decode()[:4])\n"
    )
    host_banner = subprocess.run(["/usr/bin/python3", "-c", client], capture_output=True, text=True, timeout=10)
    assert host_banner.stdout == "INFO", "positive control: the NATS probe works on the host"
    result = await box.exec(["python3", "-c", client], timeout=PROBE_TIMEOUT)
    assert result.exit_code != 0 and result.stdout == b""


async def test_proxy_reaches_only_what_the_allowlist_names(make_provider: ProviderFactory, outside: Outside) -> None:
    allowed = await new_box(await make_provider(egress_allow=f"{outside.address}:{outside.port}"))
    url = f"http://{outside.address}:{outside.port}/hello.txt"
    ok = await sh(allowed, f"curl -sS {url}")
    assert ok.exit_code == 0 and ok.stdout == b"hello from outside\n", ok.stderr
    tunnel = await sh(allowed, f"curl -sS --proxytunnel {url}")  # CONNECT, as HTTPS would
    assert tunnel.stdout == b"hello from outside\n", tunnel.stderr
    other_port = await sh(allowed, f"curl -sS -w '%{{http_code}}' http://{outside.address}:{outside.port2}/hello.txt")
    assert other_port.stdout.endswith(b"403") and b"SANDBOX_LOCAL_EGRESS_ALLOW" in other_port.stdout
    # Default: an empty allowlist refuses everything, with a body that says what to set.
    denied_provider = await make_provider()
    denied = await new_box(denied_provider)
    refused = await sh(denied, f"curl -sS -w '%{{http_code}}' {url}")
    assert refused.stdout.endswith(b"403") and b"SANDBOX_LOCAL_EGRESS_ALLOW" in refused.stdout
    connect = await sh(denied, f"curl -sS --proxytunnel {url}")
    assert connect.exit_code != 0 and b"403" in connect.stderr
    assert denied_provider.egress_proxy is not None
    refusals = [r for r in denied_provider.egress_proxy.refusals if r[1] == outside.address]
    assert refusals and all(r[2] == outside.port for r in refusals)


async def test_proxy_refuses_loopback_the_host_and_runtime_endpoints_even_under_star(
    make_provider: ProviderFactory, outside: Outside, nats_url: str
) -> None:
    provider = await make_provider(
        egress_allow="*", runtime_endpoints=[nats_url, f"http://{outside.address}:{outside.port2}"]
    )
    box = await new_box(provider)
    nats_port = urlsplit(nats_url).port
    for target, reason in (
        (f"http://127.0.0.1:{nats_port}/", b"loopback"),
        (f"http://localhost:{nats_port}/", b"loopback"),
        (f"http://[::1]:{nats_port}/", b"loopback"),
        ("http://169.254.169.254/latest/meta-data/", b"link-local"),
        (f"http://{outside.host_side}:{nats_port}/", b"sandbox host itself"),
        *((f"http://{a}:{nats_port}/", b"sandbox host itself") for a in host_addresses()),
        (f"http://{outside.address}:{outside.port2}/hello.txt", b"runtime itself"),
    ):
        result = await sh(box, f"curl -sS --noproxy '' -w '%{{http_code}}' {target}")
        assert result.stdout.endswith(b"403") and reason in result.stdout, (target, result.stdout)
        tunnel = await sh(box, f"curl -sS --noproxy '' --proxytunnel {target}")
        assert tunnel.exit_code != 0, target
    # Positive control: under the same `*`, a destination outside is reached.
    ok = await sh(box, f"curl -sS http://{outside.address}:{outside.port}/hello.txt")
    assert ok.stdout == b"hello from outside\n", ok.stderr


async def test_egress_none_has_no_way_out(make_provider: ProviderFactory, outside: Outside) -> None:
    box = await new_box(await make_provider(egress="none", egress_allow="*"))
    result = await sh(box, f"env | grep -i _proxy; curl -sS -m 5 http://{outside.address}:{outside.port}/hello.txt")
    assert result.exit_code != 0 and b"_proxy" not in result.stdout.lower()
    assert (await sh(box, tcp_probe("127.0.0.1", 3128))).exit_code != 0


# --- file system ---------------------------------------------------------------------------------


async def test_the_box_sees_none_of_the_host(make_provider: ProviderFactory) -> None:
    provider = await make_provider()
    box, other = await new_box(provider), await new_box(provider)
    await other.write_file("private.txt", b"other box's secret")
    await box.write_file("mine.txt", b"my own")
    assert (await sh(box, "cat /workspace/mine.txt")).stdout == b"my own", "positive control: own workspace"
    assert (await sh(other, "cat private.txt")).stdout == b"other box's secret", "positive control: other box"
    hidden = [
        provider.root,  # every box, the data dir's boxes
        provider.root.parent,  # the data dir (the store, the stream-token secret)
        other.workspace_path / "private.txt",
        REPO / "pyproject.toml",  # the runtime's checkout
        Path(sys.prefix) / "bin" / "python",  # its virtualenv
        Path(sys.base_prefix),
        "/work",
        "/srv",
        "/mnt",
        "/var/lib",
        "/home",
    ]
    hidden += [Path("/root") / name for name in os.listdir("/root")]
    for path in hidden:
        assert (await sh(box, f"test -e '{path}' || test -L '{path}'")).exit_code != 0, f"the box sees {path}"
    shadow = Path("/etc/shadow")
    if shadow.exists():
        assert shadow.read_bytes(), "positive control: the host's /etc/shadow has content"
        assert (await sh(box, "cat /etc/shadow /etc/gshadow")).stdout == b""
    users = (await sh(box, "id -un; getent passwd $(id -u) | cut -d: -f6; cat /etc/hostname")).stdout.split()
    assert users == [b"sandbox", b"/root", b"sandbox"]
    assert (await sh(box, "ls /etc/ssh 2>/dev/null | wc -l")).stdout.strip() == b"0"
    # Only the box's own processes are visible.
    assert int((await sh(box, "ls -d /proc/[0-9]* | wc -l")).stdout) < 10


async def test_a_workdir_symlink_does_not_tell_what_exists_on_the_host(make_provider: ProviderFactory) -> None:
    from sandbox.errors import InvalidRequest, PathNotFound

    provider = await make_provider()
    box = await new_box(provider)
    there, not_there = provider.root, provider.root / "no-such-dir"  # on the host; the box sees neither
    assert there.is_dir() and not not_there.exists()
    # Code in the box plants the links (its own files); the worker must not follow them on the host.
    planted = f"mkdir sub && ln -s {there} to-there && ln -s {not_there} to-not-there && ln -s ../.. climbs"
    planted += " && ln -s /workspace/sub inside-abs && ln -s sub inside-rel && ln -s /etc to-box-etc"
    assert (await sh(box, planted)).exit_code == 0
    answers = set()
    for link, target in (("to-there", there), ("to-not-there", not_there), ("climbs", None), ("to-box-etc", None)):
        with pytest.raises(InvalidRequest, match="resolves outside /workspace") as info:
            await box.exec(["true"], workdir=link)
        if target is not None:
            # The message quotes the link and its target, both the box's own: take them out to compare.
            answers.add(info.value.message.replace(str(target), "TARGET").replace(link, "LINK"))
    assert len(answers) == 1, answers  # the same answer whether or not the host path exists
    with pytest.raises(PathNotFound):
        await box.exec(["true"], workdir="sub/missing")
    # Positive control: links that stay in the workspace work, as does a plain directory.
    for workdir in ("inside-abs", "inside-rel", "sub", "/workspace/sub"):
        out = await box.exec(["sh", "-c", f"echo x > made-in-{workdir.replace('/', '_')}"], workdir=workdir)
        assert out.exit_code == 0, (workdir, out.stderr)
    made = sorted(p.name for p in (box.workspace_path / "sub").iterdir())
    assert made == ["made-in-_workspace_sub", "made-in-inside-abs", "made-in-inside-rel", "made-in-sub"]


async def test_the_box_cannot_write_outside_its_own_directories(box: LocalBoxSession) -> None:
    for path in ("/usr/x", "/etc/x", "/x", "/opt/sandbox/x", "/run/sandbox/x", "/etc/passwd"):
        assert (await sh(box, f"echo x > {path}")).exit_code != 0, path
    for path in ("/workspace/x", "/tmp/x", "$HOME/x", "/var/tmp/y"):
        assert (await sh(box, f"echo x > {path}")).exit_code == 0, f"positive control: {path}"


async def test_identity_is_unprivileged_without_capabilities(box: LocalBoxSession) -> None:
    status = (await sh(box, "id -u; grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status")).stdout.decode()
    assert status.splitlines()[0] == "1000"
    assert "CapEff:\t0000000000000000" in status and "CapPrm:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    owner = box.workspace_path.stat()
    assert owner.st_uid not in (0, os.geteuid()), "box files belong to the dedicated host uid, not root"


async def test_a_setuid_binary_does_not_elevate(box: LocalBoxSession, tmp_path: Path) -> None:
    source = Path("/usr/bin/id")
    # Positive control: on the host, the same setuid-root copy run by the box's host uid is root.
    host_copy = tmp_path / "id-setuid"
    shutil.copy(source, host_copy)
    os.chown(host_copy, 0, 0)
    host_copy.chmod(0o4755)
    owner = box.workspace_path.stat().st_uid
    elevated = subprocess.run(
        ["setpriv", f"--reuid={owner}", f"--regid={owner}", "--clear-groups", str(host_copy), "-u"],
        capture_output=True,
        text=True,
    )
    assert elevated.stdout.strip() == "0", "positive control: setuid works outside the box"
    planted = box.workspace_path / "id-setuid"
    shutil.copy(source, planted)
    os.chown(planted, 0, 0)
    planted.chmod(0o4755)
    assert (await sh(box, "./id-setuid -u")).stdout.strip() == b"1000"
    made = await sh(box, "cp /usr/bin/id own-id && chmod 4755 own-id && ./own-id -u")
    assert made.stdout.strip() == b"1000"


async def test_a_box_cannot_signal_another_boxs_processes(make_provider: ProviderFactory) -> None:
    provider = await make_provider()
    attacker, victim = await new_box(provider), await new_box(provider)
    inbox_pid = (await sh(victim, "sleep 300 >/dev/null 2>&1 & echo $!")).stdout.strip().decode()
    host_pids = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == b"sleep\x00300\x00"]
    assert host_pids
    await sh(attacker, f"kill -9 {inbox_pid} {' '.join(host_pids)} -1; true")
    assert (await sh(victim, f"kill -0 {inbox_pid}")).exit_code == 0, "the attacker killed the victim's process"
    assert (await sh(victim, f"kill -9 {inbox_pid}")).exit_code == 0, "positive control: the box kills its own"


def _cmdline(pid: str) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


async def test_a_box_cannot_reach_another_boxs_edge(make_provider: ProviderFactory, tmp_path: Path) -> None:
    """A real edge of another box, as the planes start it on the host (127.0.0.1, any port)."""
    provider = await make_provider()
    attacker, victim = await new_box(provider), await new_box(provider)
    key = victim.private_path / "key"
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    port_file = victim.private_path / "terminal.port"
    edge = subprocess.Popen(
        [sys.executable, "-P", "-s", "-m", "daemons.edge", "terminal", "--port", "0", "--any-port",
         "--port-file", str(port_file), "--unix-target", str(victim.tmp_path / "ttyd.sock"),
         "--view-target", str(victim.tmp_path / "ttyd-view.sock"),
         "--key-file", str(key), "--epoch", "1"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        port = int(port_file.read_text())
        assert host_connects("127.0.0.1", port), "positive control: the host reaches the edge"
        for address in ("127.0.0.1", *host_addresses()):
            assert (await sh(attacker, tcp_probe(address, port))).exit_code != 0, address
        assert (await sh(victim, tcp_probe("127.0.0.1", port))).exit_code != 0, "nor its own box: host-side"
    finally:
        edge.kill()
        edge.wait()


async def test_a_box_cannot_reach_a_host_loopback_listener(box: LocalBoxSession) -> None:
    """What every edge, the Web UI and any other host service listening on loopback look like."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert host_connects("127.0.0.1", port), "positive control"
        assert (await sh(box, tcp_probe("127.0.0.1", port))).exit_code != 0


# --- limits --------------------------------------------------------------------------------------


async def test_a_fork_bomb_stops_at_the_pids_limit(make_provider: ProviderFactory) -> None:
    provider = await make_provider(limits=BoxLimits(pids_max=64, memory_max=None, cpu_max=None, disk_max=None))
    bombed, neighbour = await new_box(provider), await new_box(provider)
    bomb = asyncio.create_task(sh(bombed, "bomb() { bomb | bomb & }; bomb; sleep 8", timeout=30))
    try:
        await asyncio.sleep(2)
        started = time.monotonic()
        assert (await sh(neighbour, "echo alive", timeout=10)).stdout == b"alive\n"
        assert subprocess.run(["true"], timeout=10).returncode == 0
        assert time.monotonic() - started < 10
        cgroup = Path("/sys/fs/cgroup/pids/sandbox") / bombed.instance_id
        if not cgroup.exists():
            cgroup = Path("/sys/fs/cgroup/sandbox") / bombed.instance_id
        assert int((cgroup / "pids.current").read_text()) <= 64
        assert int((cgroup / "pids.max").read_text()) == 64
        # Positive control: the bomb was real, it hit the limit (the kernel counts refused forks).
        assert int((cgroup / "pids.events").read_text().split()[-1]) > 0
    finally:
        await provider.terminate(bombed.serialize_state())
        with contextlib.suppress(BaseException):
            await bomb


async def test_a_memory_hog_is_killed_and_the_box_stays_usable(make_provider: ProviderFactory) -> None:
    provider = await make_provider(limits=BoxLimits(pids_max=None, memory_max=64 * 1024**2, cpu_max=None))
    box = await new_box(provider)
    small = await box.exec(["python3", "-c", "b = b'x' * (8 << 20); print(len(b))"], timeout=30)
    assert small.stdout == b"8388608\n", "positive control: a small allocation works"
    hog = await box.exec(["python3", "-c", "b = b'x' * (512 << 20)"], timeout=60)
    assert hog.exit_code == 137
    assert b"out of memory" in hog.stderr and b"SANDBOX_LOCAL_MEMORY_MAX" in hog.stderr
    assert (await sh(box, "echo still here")).stdout == b"still here\n"


async def test_a_disk_fill_stops_at_the_quota(make_provider: ProviderFactory, tmp_path: Path) -> None:
    provider = await make_provider(
        limits=BoxLimits(pids_max=None, memory_max=None, cpu_max=None, disk_max=64 * 1024**2)
    )
    box = await new_box(provider)
    before = shutil.disk_usage(tmp_path).free
    fill = await sh(box, "dd if=/dev/zero of=/workspace/fill bs=1M count=512 2>&1; sync", timeout=60)
    assert b"No space left on device" in fill.stdout
    assert 40 * 1024**2 < (box.workspace_path / "fill").stat().st_size < 64 * 1024**2
    assert before - shutil.disk_usage(tmp_path).free < 100 * 1024**2, "the host lost more than the quota"
    tmp_fill = await sh(box, "dd if=/dev/zero of=/tmp/more bs=1M count=16 2>&1")
    assert b"No space left on device" in tmp_fill.stdout, "/tmp shares the quota"
    assert (await sh(box, "rm -f /workspace/fill /tmp/more && echo ok > /workspace/a && cat a")).stdout == b"ok\n"


async def test_cpu_is_capped(make_provider: ProviderFactory) -> None:
    script = "TIMEFORMAT=%U; { time ( for i in 1 2; do timeout 2 sh -c 'while :; do :; done' & done; wait ) ; } 2>&1"

    async def cpu_seconds(cpu_max: float | None) -> float:
        limits = BoxLimits(pids_max=None, memory_max=None, cpu_max=cpu_max, disk_max=None)
        box = await new_box(await make_provider(limits=limits))
        return float((await sh(box, script, timeout=30)).stdout.decode().strip().splitlines()[-1])

    capped = await cpu_seconds(0.2)  # two busy loops for 2 s of wall time, 0.2 CPU between them
    assert capped < 0.8, f"a box limited to 0.2 CPUs used {capped:.2f} CPU-seconds in 2 s"
    free = await cpu_seconds(None)
    assert free > 1.2, f"positive control: without the limit the loops used only {free:.2f} CPU-seconds"


# --- no silent downgrade ----------------------------------------------------------------------------


def test_missing_isolation_refuses_with_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    for tool, hint in (("bwrap", "apt install bubblewrap"), ("socat", "apt install socat")):
        monkeypatch.setattr(shutil, "which", lambda name, tool=tool: None if name == tool else real_which(name))
        with pytest.raises(Exception, match=hint):
            LocalProvider(tmp_path / tool).validate_credentials()
    monkeypatch.setattr(shutil, "which", real_which)
    assert LocalProvider(tmp_path / "ok").isolation == "bubblewrap", "positive control"


async def test_a_restarted_worker_serves_the_egress_of_boxes_it_adopts(
    make_provider: ProviderFactory, outside: Outside
) -> None:
    allow = f"{outside.address}:{outside.port}"
    first = await make_provider(egress_allow=allow)
    box = await new_box(first)
    url = f"http://{outside.address}:{outside.port}/hello.txt"
    assert (await sh(box, f"curl -sS {url}")).stdout == b"hello from outside\n"
    # The worker dies: its proxy goes with it; the box (its holder) lives on.
    assert first._gateway is not None
    first._gateway.close()
    first._gateway = None
    socket_path = box.path / "run" / "egress.sock"
    assert not _someone_listens(socket_path), "positive control: nobody serves the egress now"
    second = LocalProvider(first.root, egress_allow=allow)
    adopted = await second.resume(box.serialize_state())
    try:
        again = await sh(adopted, f"curl -sS {url}")
        assert again.stdout == b"hello from outside\n", again.stderr
    finally:
        await second.aclose()
