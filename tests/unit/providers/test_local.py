"""The ``local`` provider against real processes: boxes in a temporary root, both isolation modes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.local import (
    BOX_MARKER_VAR,
    DEFAULT_BOX_HOST_UID,
    LocalBoxSession,
    LocalProvider,
    _box_locked,
    instance_id_for_key,
)
from sandbox.box import BoxSpec, Envelope
from sandbox.box_limits import BoxLimits
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    SandboxConfigError,
    Unsupported,
)
from tests.conftest import eventually, remove_box_directory

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed")


def spec(**overrides: object) -> BoxSpec:
    fields: dict[str, object] = {
        "lease_id": "lease/ws1/g1",
        "workspace_id": "ws1",
        "group_id": "g1",
        "epoch": 1,
        "environment": {"BOX_VAR": "from-box"},
    }
    fields.update(overrides)
    return BoxSpec.model_validate(fields)


def key() -> str:
    return f"lease/ws1/g1:{secrets.token_hex(4)}"


def host_processes_with(needle: str) -> list[int]:
    """Host pids whose command line contains ``needle`` (zombies excluded)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z" and int(name) != os.getpid():
            found.append(int(name))
    return found


async def wait_until_gone(needle: str, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := host_processes_with(needle)) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return left


def unique_sleep() -> str:
    """A sleep duration no other process on the host uses, to find our sleeps by command line."""
    return f"{1000 + secrets.randbelow(10**6)}.{secrets.randbelow(1000):03d}"


@pytest.fixture(params=["auto", "never"])
async def provider(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LocalProvider]:
    prov = LocalProvider(tmp_path / "boxes", bubblewrap=request.param)
    prov.validate_credentials()
    yield prov
    for owned in await prov.list_owned():  # no test leaves a background process behind
        await prov.terminate(Envelope(backend_id="unix_local", instance_id=owned.instance_id))
    await prov.aclose()


@pytest.fixture
async def bwrap_provider(tmp_path: Path) -> AsyncIterator[LocalProvider]:
    if not HAVE_BWRAP:
        pytest.skip("bubblewrap is not installed")
    prov = LocalProvider(tmp_path / "boxes", bubblewrap="always")
    yield prov
    await prov.aclose()


@pytest.fixture
async def box(provider: LocalProvider) -> LocalBoxSession:
    return await provider.create(spec(), key())


# --- configuration ------------------------------------------------------------------------


def test_backend_id_is_unix_local(tmp_path: Path) -> None:
    prov = LocalProvider(tmp_path)
    assert prov.backend_id == "unix_local"
    assert prov.descriptor.backend_id == "unix_local"


def test_isolation_modes(tmp_path: Path) -> None:
    assert LocalProvider(tmp_path, isolation="none").isolation == "process"
    assert LocalProvider(tmp_path, bubblewrap="never").isolation == "process"  # the legacy spelling
    if HAVE_BWRAP:
        assert LocalProvider(tmp_path, bubblewrap="auto").isolation == "bubblewrap"
        assert LocalProvider(tmp_path).isolation == "bubblewrap"


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_missing_bwrap_is_a_config_error_never_a_silent_downgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxConfigError, match="apt install bubblewrap.*SANDBOX_LOCAL_ISOLATION=none"):
        LocalProvider(tmp_path, bubblewrap=mode).validate_credentials()  # type: ignore[arg-type]
    # Positive control: the explicit opt-out still works without bubblewrap.
    assert LocalProvider(tmp_path, isolation="none").isolation == "process"


def test_broken_bwrap_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: str(fake) if name == "bwrap" else real_which(name))
    for mode in ("auto", "always"):
        with pytest.raises(SandboxConfigError, match="does not work.*No permissions to create new namespace"):
            LocalProvider(tmp_path / mode, bubblewrap=mode).validate_credentials()  # type: ignore[arg-type]


def test_unknown_bubblewrap_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SandboxConfigError):
        LocalProvider(tmp_path, bubblewrap="sometimes")  # type: ignore[arg-type]


# --- create ---------------------------------------------------------------------------------


async def test_create_is_idempotent_by_key(provider: LocalProvider) -> None:
    k = key()
    first = await provider.create(spec(), k)
    await first.write_file("marker.txt", b"one")
    second = await provider.create(spec(), k)
    assert second.instance_id == first.instance_id == instance_id_for_key(k)
    assert await second.read_file("marker.txt") == b"one"
    assert [p.name for p in provider.root.iterdir() if not p.name.startswith(".")] == [first.instance_id]
    other = await provider.create(spec(), key())
    assert other.instance_id != first.instance_id


async def test_concurrent_creates_with_one_key_make_one_box(provider: LocalProvider) -> None:
    k = key()
    sessions = await asyncio.gather(*(provider.create(spec(), k) for _ in range(8)))
    assert {s.instance_id for s in sessions} == {instance_id_for_key(k)}
    assert len(await provider.list_owned()) == 1


async def test_box_metadata(provider: LocalProvider) -> None:
    k = key()
    session = await provider.create(spec(epoch=7), k)
    record = json.loads((session.path / "box.json").read_text())
    assert record["instance_id"] == session.instance_id
    assert record["lease_id"] == "lease/ws1/g1"
    assert record["idempotency_key"] == k
    assert record["epoch"] == 7
    assert record["environment"] == {"BOX_VAR": "from-box"}
    assert record["created_at"] <= time.time()
    assert {p.name for p in session.path.iterdir()} >= {"data", "box.json", "run", "private"}
    assert {p.name for p in (session.path / "data").iterdir()} >= {"workspace", "home", "tmp"}
    assert session.workspace_path == session.path / "data" / "workspace"


async def test_create_recovers_from_a_crashed_attempt(provider: LocalProvider) -> None:
    k = key()
    instance_id = instance_id_for_key(k)
    # A crash mid-create leaves a half-built staging dir, or (older layouts) a box dir without box.json.
    staging = provider.root / ".staging" / f"{instance_id}.deadbeef"
    (staging / "workspace").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(staging, (old, old))
    debris = provider.root / instance_id
    (debris / "workspace").mkdir(parents=True)
    (debris / "workspace" / "junk").write_text("half")
    session = await provider.create(spec(), k)
    assert session.instance_id == instance_id
    assert not await session.path_exists("junk")
    assert not staging.exists()
    assert (await session.exec(["true"])).exit_code == 0


@pytest.mark.parametrize(
    ("overrides", "bad_key", "error"),
    [
        ({}, "", InvalidRequest),
        ({}, "k" * 2000, InvalidRequest),
        ({"environment": {"BAD NAME": "x"}}, "k", InvalidRequest),
        ({"environment": {"X": "nul\0"}}, "k", InvalidRequest),
        ({"os": "windows"}, "k", Unsupported),
    ],
)
async def test_create_rejects_bad_input(
    provider: LocalProvider, overrides: dict[str, object], bad_key: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await provider.create(spec(**overrides), bad_key)
    assert await provider.list_owned() == []


# --- exec -----------------------------------------------------------------------------------


async def test_exec_exit_code_stdout_stderr(box: LocalBoxSession) -> None:
    result = await box.exec(["sh", "-c", "printf out; printf err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out", b"err")


async def test_exec_stdin_binary_and_large(box: LocalBoxSession) -> None:
    data = os.urandom(1 << 20)  # larger than a pipe buffer: no deadlock between stdin and stdout
    result = await box.exec(["cat"], stdin=data)
    assert result.exit_code == 0
    assert result.stdout == data
    assert (await box.exec(["cat"])).stdout == b""  # no stdin means EOF, not a hang


async def test_exec_missing_command_exits_127(box: LocalBoxSession) -> None:
    result = await box.exec(["definitely-not-a-command-xyz"])
    assert result.exit_code == 127
    assert b"definitely-not-a-command-xyz" in result.stderr


async def test_exec_signal_death_is_128_plus_signal(box: LocalBoxSession) -> None:
    assert (await box.exec(["sh", "-c", "kill -9 $$"])).exit_code == 137


async def test_exec_environment_is_minimal_plus_box_and_call(
    box: LocalBoxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SECRET_TOKEN", "hunter2")
    result = await box.exec(["env"], env={"CALL_VAR": "from-call", "BOX_VAR": "overridden"})
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert "WORKER_SECRET_TOKEN" not in env
    assert "hunter2" not in result.stdout.decode()
    assert env["CALL_VAR"] == "from-call"
    assert env["BOX_VAR"] == "overridden"
    assert env[BOX_MARKER_VAR] == box.instance_id
    assert {"PATH", "HOME", "LANG", "TERM"} <= env.keys()
    # The box environment applies when the call does not override it.
    assert (await box.exec(["sh", "-c", "printf %s $BOX_VAR"])).stdout == b"from-box"


async def test_exec_rejects_bad_input(box: LocalBoxSession) -> None:
    with pytest.raises(InvalidRequest):
        await box.exec([])
    with pytest.raises(InvalidRequest):
        await box.exec(["echo", "a\0b"])
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], env={"1BAD": "x"})
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], timeout=0)


async def test_exec_workdir(box: LocalBoxSession) -> None:
    await box.write_file("sub/dir/keep", b"")
    default = await box.exec(["sh", "-c", "echo hi > here.txt"])
    assert default.exit_code == 0
    assert await box.read_file("here.txt") == b"hi\n"
    rel = await box.exec(["sh", "-c", "echo rel > r.txt"], workdir="sub")
    assert rel.exit_code == 0
    assert await box.read_file("sub/r.txt") == b"rel\n"
    absolute = await box.exec(["sh", "-c", "echo abs > a.txt"], workdir="/workspace/sub/dir")
    assert absolute.exit_code == 0
    assert await box.read_file("sub/dir/a.txt") == b"abs\n"
    with pytest.raises(PathNotFound):
        await box.exec(["true"], workdir="missing")


async def test_exec_home_and_tmp_are_the_boxs(box: LocalBoxSession) -> None:
    result = await box.exec(["sh", "-c", 'echo h > "$HOME/h.txt" && echo t > "${TMPDIR:-/tmp}/t.txt"'])
    assert result.exit_code == 0, result.stderr
    assert (box.home_path / "h.txt").read_text() == "h\n"
    assert (box.tmp_path / "t.txt").read_text() == "t\n"


async def test_exec_timeout_kills_the_whole_process_group(box: LocalBoxSession) -> None:
    needle = unique_sleep()
    script = f"trap '' TERM INT HUP; sleep {needle} & sh -c 'sleep {needle}' & sleep {needle}"
    started = time.monotonic()
    with pytest.raises(ExecTimeout) as caught:
        await box.exec(["sh", "-c", script], timeout=0.5)
    assert caught.value.timeout == 0.5
    assert time.monotonic() - started < 5
    assert await wait_until_gone(needle) == []


async def test_exec_cancelled_at_any_point_of_its_spawn_leaves_nothing(box: LocalBoxSession) -> None:
    # Cancelled after 0, 1, 2, ... event-loop turns: some land while the child is being spawned
    # (already running, its pid not yet known), which once leaked the command.
    needle = unique_sleep()
    for turns in (0, 1, 2, 4, 8):
        task = asyncio.create_task(box.exec(["sh", "-c", f"sleep {needle}"]))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await wait_until_gone(needle) == [], turns


async def test_a_box_whose_disk_this_host_has_not_mounted_is_mounted_again_for_an_exec(tmp_path: Path) -> None:
    """As a worker finds a box taken over from one killed mid-create: its disk made, not mounted here."""
    limits = BoxLimits(pids_max=None, memory_max=None, cpu_max=None, disk_max=64 * 1024**2)
    provider = LocalProvider(tmp_path / "boxes", limits=limits)
    provider.validate_credentials()
    try:
        box = await provider.create(spec(), key())
        assert (await box.exec(["sh", "-c", "echo kept > note"])).exit_code == 0
        data = box.workspace_path.parent
        subprocess.run(["umount", "-l", str(data)], check=True)
        assert not os.path.ismount(data) and not (box.workspace_path / "note").exists()  # positive control
        out = await box.exec(["cat", "note"])
        assert (out.exit_code, out.stdout) == (0, b"kept\n")  # the same disk, nothing lost
        assert os.path.ismount(data)
    finally:
        for owned in await provider.list_owned():
            await provider.terminate(Envelope(backend_id="unix_local", instance_id=owned.instance_id))
        await provider.aclose()


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the description drops a lock this probe took


async def test_a_caller_cancelled_while_waiting_for_the_box_lock_does_not_keep_it(tmp_path: Path) -> None:
    """The wait runs in a thread that takes the lock after all; it must then let it go again."""
    (tmp_path / ".lock").touch()
    held = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CLOEXEC)
    fcntl.flock(held, fcntl.LOCK_EX)  # another worker holds the box

    async def wait_for_the_box() -> None:
        async with _box_locked(tmp_path):
            raise AssertionError("the cancelled caller must never enter")

    waiter = asyncio.create_task(wait_for_the_box())
    inode = os.stat(tmp_path / ".lock").st_ino

    async def parked() -> bool:  # /proc/locks marks a blocked waiter with "->"
        return any("->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines())

    await eventually(parked, timeout=5)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not _lock_is_free(tmp_path / ".lock")  # positive control: held, the probe sees it
    os.close(held)  # the other worker lets go; the abandoned thread takes the lock now
    await eventually(lambda: asyncio.to_thread(_lock_is_free, tmp_path / ".lock"), timeout=5)


async def test_exec_cancellation_kills_the_command(box: LocalBoxSession) -> None:
    needle = unique_sleep()
    task = asyncio.create_task(box.exec(["sh", "-c", f"sleep {needle}"]))
    deadline = time.monotonic() + 5
    while not host_processes_with(needle) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert host_processes_with(needle)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until_gone(needle) == []


async def test_exec_returns_while_a_background_process_keeps_stdout_open(box: LocalBoxSession) -> None:
    needle = unique_sleep()
    started = time.monotonic()
    result = await box.exec(["sh", "-c", f"sleep {needle} & echo started"], timeout=10)
    assert time.monotonic() - started < 3
    assert result.stdout == b"started\n"
    # The background process outlives the exec (a later exec sees it) ...
    assert host_processes_with(needle)
    pid = (await box.exec(["sh", "-c", f"sleep {needle} >/dev/null 2>&1 & echo $!"])).stdout.decode().strip()
    assert (await box.exec(["kill", "-0", pid])).exit_code == 0


async def test_files_written_by_exec_are_readable_and_vice_versa(box: LocalBoxSession) -> None:
    await box.write_file("from_api/nested/in.txt", b"api \x00\xff data")
    result = await box.exec(["cat", "from_api/nested/in.txt"])
    assert result.stdout == b"api \x00\xff data"
    await box.exec(["sh", "-c", "mkdir -p out && printf 'exec data' > out/x.txt"])
    assert await box.read_file("out/x.txt") == b"exec data"
    assert await box.read_file("/workspace/out/x.txt") == b"exec data"
    assert await box.path_exists("out")
    assert not await box.path_exists("out/nope")
    entries = {e.name: e for e in await box.list_dir("out")}
    assert entries["x.txt"].kind == "file"
    assert entries["x.txt"].size == 9
    root_entries = {e.name: e.kind for e in await box.list_dir("")}
    assert root_entries == {"from_api": "dir", "out": "dir"}


# --- bubblewrap isolation -------------------------------------------------------------------


@needs_bwrap
async def test_bwrap_root_is_read_only_and_workspace_writable(bwrap_provider: LocalProvider) -> None:
    box = await bwrap_provider.create(spec(), key())
    probe = f"sandbox-probe-{secrets.token_hex(4)}"
    result = await box.exec(["sh", "-c", f"touch /etc/{probe}; echo $?; touch /{probe}; echo $?"])
    assert result.stdout.split() == [b"1", b"1"]
    assert b"Read-only file system" in result.stderr
    assert not Path(f"/etc/{probe}").exists()
    writes = await box.exec(["sh", "-c", "touch /workspace/w /root/h /tmp/t && pwd && echo $HOME"])
    assert writes.exit_code == 0, writes.stderr
    assert writes.stdout == b"/workspace\n/root\n"
    assert await box.path_exists("w")


@needs_bwrap
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (scripts/install installs it)")
async def test_a_command_survives_a_late_exit_of_bwraps_pid_namespace_intermediate(
    bwrap_provider: LocalProvider, tmp_path: Path
) -> None:
    # bwrap joins the box's PID namespace through an intermediate process that exits at once; on a
    # loaded host that exit can come after the command armed --die-with-parent, and the reparenting
    # then SIGKILLed the command (CI: desktop-up "exit 137" with no output). strace -D (the tracee
    # keeps its pid) delays every exit_group, the intermediate's first, so the race happens every time.
    delay = 0.4
    slow = tmp_path / "nsenter-slow-exits"
    slow.write_text(
        "#!/bin/sh\n"
        f"exec strace -D -f -qq -o /dev/null -e trace=exit_group -e inject=exit_group:delay_enter={int(delay * 1e6)} "
        f'{shutil.which("nsenter")} "$@"\n'
    )
    slow.chmod(0o755)
    box = await bwrap_provider.create(spec(), key())
    bwrap_provider._nsenter = str(slow)
    for _ in range(2):
        started = time.monotonic()
        result = await box.exec(["sh", "-c", "sleep 0.2; echo alive; echo $$"])
        assert result.exit_code == 0, result
        assert result.stdout.split()[0] == b"alive"
        assert int(result.stdout.split()[1]) < 100  # still inside the box's PID namespace
        # Positive control: the exits really were held back (the intermediate's among them).
        assert time.monotonic() - started >= delay


@needs_bwrap
async def test_bwrap_box_has_its_own_pid_namespace(bwrap_provider: LocalProvider) -> None:
    box = await bwrap_provider.create(spec(), key())
    result = await box.exec(["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"])
    own_pid, visible = (int(x) for x in result.stdout.split())
    assert own_pid < 10
    assert visible < 10  # the holder, this shell and ls; never the host's processes


@needs_bwrap
async def test_bwrap_absolute_symlinks_mean_box_paths(bwrap_provider: LocalProvider) -> None:
    box = await bwrap_provider.create(spec(), key())
    await box.write_file("real/file.txt", b"content")
    (box.workspace_path / "absolute").symlink_to("/workspace/real/file.txt")
    assert (await box.exec(["cat", "absolute"])).stdout == b"content"
    assert await box.read_file("absolute") == b"content"


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory under /var/tmp: a host path that boxes would see read-only unless hidden."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-local-test-", dir="/var/tmp"))
    path.chmod(0o711)  # boxes under it run as another uid (see tests/conftest.py)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_bwrap
async def test_bwrap_box_sees_nothing_of_the_host_but_the_system(host_dir: Path) -> None:
    private = host_dir / "data"
    private.mkdir()
    (private / "sandbox.db").write_text("worker state")
    provider = LocalProvider(host_dir / "boxes", bubblewrap="always")
    try:
        a = await provider.create(spec(), key())
        b = await provider.create(spec(), key())
        await b.write_file("secret.txt", b"b's secret")
        result = await a.exec(["cat", str(b.workspace_path / "secret.txt"), str(private / "sandbox.db")])
        assert result.exit_code != 0
        assert result.stdout == b""
        for host_path in (host_dir, host_dir / "boxes", "/var/lib", "/work", "/srv", "/mnt", sys.prefix):
            assert (await a.exec(["test", "-e", str(host_path)])).exit_code != 0, host_path
        assert (await a.exec(["test", "-d", "/usr/bin"])).exit_code == 0  # positive control: the system is there
    finally:
        for owned in await provider.list_owned():
            await provider.terminate(Envelope(backend_id="unix_local", instance_id=owned.instance_id))
        await provider.aclose()


@needs_bwrap
async def test_bwrap_holder_restarts_after_it_dies(bwrap_provider: LocalProvider) -> None:
    box = await bwrap_provider.create(spec(), key())
    await box.exec(["true"])
    holder = json.loads((box.path / "holder.json").read_text())
    os.kill(holder["init_pid"], 9)
    result = await box.exec(["sh", "-c", "echo $$"])
    assert result.exit_code == 0
    assert json.loads((box.path / "holder.json").read_text())["init_pid"] != holder["init_pid"]


def _holder_processes() -> set[int]:
    return {pid for pid in host_processes_with("sleep infinity") if "--info-fd" in _cmdline(pid)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@needs_bwrap
async def test_probing_bubblewrap_leaves_no_process_behind(tmp_path: Path) -> None:
    before = _holder_processes()
    assert LocalProvider(tmp_path, bubblewrap="always").isolation == "bubblewrap"
    await asyncio.sleep(0.2)
    assert _holder_processes() - before == set()


@needs_bwrap
async def test_box_processes_die_with_the_worker(tmp_path: Path) -> None:
    needle = unique_sleep()
    script = f"""
import asyncio, os
from pathlib import Path
from sandbox.box import BoxSpec
from providers.local import LocalProvider

async def main():
    provider = LocalProvider(Path({str(tmp_path / "boxes")!r}), bubblewrap="always")
    box = await provider.create(BoxSpec(lease_id="l", workspace_id="w", group_id="g", epoch=1), "k")
    await box.exec(["sh", "-c", "setsid sleep {needle} >/dev/null 2>&1 < /dev/null &"])
    await asyncio.sleep(0.2)
    os._exit(0)  # a crash: no terminate, no aclose

asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=str(Path(__file__).resolve().parents[3])
    )
    assert await proc.wait() == 0
    assert await wait_until_gone(needle, timeout=3) == []


@needs_bwrap
async def test_aclose_stops_the_boxes_it_started(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path / "boxes", bubblewrap="always")
    box = await provider.create(spec(), key())
    needle = unique_sleep()
    await box.exec(["sh", "-c", f"sleep {needle} >/dev/null 2>&1 &"])
    assert host_processes_with(needle)
    await provider.aclose()
    assert await wait_until_gone(needle, timeout=3) == []
    assert box.path.exists()  # the workspace survives; the next exec starts a new holder
    await box.write_file("after.txt", b"x")


# --- resume ---------------------------------------------------------------------------------


async def test_resume_from_a_new_provider_instance(provider: LocalProvider, tmp_path: Path) -> None:
    session = await provider.create(spec(), key())
    await session.write_file("keep.txt", b"kept")
    envelope = Envelope.model_validate_json(session.serialize_state().model_dump_json())
    assert envelope.backend_id == "unix_local"
    assert envelope.instance_id == session.instance_id
    assert envelope.state["box_path"] == str(session.path)
    restarted = LocalProvider(provider.root, bubblewrap="auto" if provider.isolation == "bubblewrap" else "never")
    resumed = await restarted.resume(envelope)
    assert resumed.instance_id == session.instance_id
    assert (await resumed.exec(["cat", "keep.txt"])).stdout == b"kept"
    await restarted.aclose()


async def test_resume_of_a_deleted_box_is_box_not_found(provider: LocalProvider) -> None:
    gone = await provider.create(spec(), key())
    remove_box_directory(gone.path)
    with pytest.raises(BoxNotFound):
        await provider.resume(gone.serialize_state())
    no_metadata = await provider.create(spec(), key())
    (no_metadata.path / "box.json").unlink()
    with pytest.raises(BoxNotFound):
        await provider.resume(no_metadata.serialize_state())


async def test_operations_on_a_deleted_box_are_box_not_found(provider: LocalProvider) -> None:
    session = await provider.create(spec(), key())
    await session.exec(["true"])
    remove_box_directory(session.path)
    with pytest.raises(BoxNotFound):
        await session.exec(["true"])
    with pytest.raises(BoxNotFound):
        await session.read_file("x")
    with pytest.raises(BoxNotFound):
        await session.write_file("x", b"")


@pytest.mark.parametrize(
    "forge",
    [
        lambda env, root: env.model_copy(update={"backend_id": "modal"}),
        lambda env, root: env.model_copy(update={"state": {"box_path": "/etc"}}),
        lambda env, root: env.model_copy(update={"state": {"box_path": f"{root}/../{env.instance_id}"}}),
        lambda env, root: env.model_copy(update={"state": {"box_path": f"{root}/box-0000000000000000"}}),
        lambda env, root: env.model_copy(update={"state": {"box_path": 42}}),
        lambda env, root: env.model_copy(update={"instance_id": "../../etc", "state": {"box_path": "/etc"}}),
        lambda env, root: env.model_copy(update={"instance_id": "../boxes2"}),
    ],
)
async def test_forged_envelopes_are_invalid_requests(provider: LocalProvider, forge: object) -> None:
    session = await provider.create(spec(), key())
    forged = forge(session.serialize_state(), provider.root)  # type: ignore[operator]
    with pytest.raises(InvalidRequest):
        await provider.resume(forged)
    with pytest.raises(InvalidRequest):
        await provider.terminate(forged)
    assert session.path.exists()
    assert Path("/etc/passwd").exists()


# --- terminate and list ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "background",
    [
        "sleep {n} >/dev/null 2>&1 &",
        "nohup sleep {n} >/dev/null 2>&1 &",
        "env -i sleep {n} >/dev/null 2>&1 &",  # scrubs the marker variable
        "sh -c 'sleep {n} & sleep {n}' >/dev/null 2>&1 &",
    ],
)
async def test_terminate_kills_background_processes(provider: LocalProvider, background: str) -> None:
    session = await provider.create(spec(), key())
    needle = unique_sleep()
    result = await session.exec(["sh", "-c", background.format(n=needle) + " echo started"])
    assert result.stdout == b"started\n"
    assert host_processes_with(needle)
    await provider.terminate(session.serialize_state())
    assert await wait_until_gone(needle, timeout=2) == []
    assert not session.path.exists()
    with pytest.raises(BoxNotFound):
        await provider.resume(session.serialize_state())
    with pytest.raises(BoxNotFound):
        await session.exec(["true"])


@needs_bwrap
async def test_terminate_kills_a_daemon_that_left_its_session(bwrap_provider: LocalProvider) -> None:
    # setsid + env -i escapes both the session and the marker: only the PID namespace catches it.
    session = await bwrap_provider.create(spec(), key())
    needle = unique_sleep()
    await session.exec(["sh", "-c", f"setsid env -i sleep {needle} >/dev/null 2>&1 < /dev/null &"])
    deadline = time.monotonic() + 5
    while not host_processes_with(needle) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert host_processes_with(needle)
    await bwrap_provider.terminate(session.serialize_state())
    assert await wait_until_gone(needle, timeout=2) == []


async def test_terminate_is_idempotent(provider: LocalProvider) -> None:
    session = await provider.create(spec(), key())
    envelope = session.serialize_state()
    await provider.terminate(envelope)
    await provider.terminate(envelope)
    assert await provider.list_owned() == []


async def test_terminate_during_an_exec_reports_box_not_found(provider: LocalProvider) -> None:
    session = await provider.create(spec(), key())
    needle = unique_sleep()
    running = asyncio.create_task(session.exec(["sleep", needle]))
    deadline = time.monotonic() + 5
    while not host_processes_with(needle) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await provider.terminate(session.serialize_state())
    with pytest.raises(BoxNotFound):
        await running
    assert await wait_until_gone(needle) == []


async def test_list_owned(provider: LocalProvider) -> None:
    assert await provider.list_owned() == []
    a = await provider.create(spec(lease_id="lease/ws1/a"), key())
    b = await provider.create(spec(lease_id="lease/ws1/b", epoch=4), key())
    (provider.root / "not-a-box").mkdir()
    owned = {o.instance_id: o for o in await provider.list_owned()}
    assert owned.keys() == {a.instance_id, b.instance_id}
    assert owned[a.instance_id].lease_id == "lease/ws1/a"
    assert owned[b.instance_id].lease_id == "lease/ws1/b"
    assert owned[b.instance_id].labels["epoch"] == "4"
    await provider.terminate(a.serialize_state())
    assert [o.instance_id for o in await provider.list_owned()] == [b.instance_id]


async def test_list_owned_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert await LocalProvider(tmp_path / "never-created").list_owned() == []


# --- file operations: confinement -----------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "/workspace/../etc/passwd", "/workspacex/f", "a\0b"],
)
async def test_file_ops_refuse_paths_outside_the_workspace(box: LocalBoxSession, path: str) -> None:
    with pytest.raises(InvalidRequest):
        await box.read_file(path)
    with pytest.raises(InvalidRequest):
        await box.write_file(path, b"x")
    with pytest.raises(InvalidRequest):
        await box.list_dir(path)
    with pytest.raises(InvalidRequest):
        await box.path_exists(path)
    assert not (box.path / "escape.txt").exists()


async def test_file_ops_refuse_symlink_escapes(box: LocalBoxSession, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    ws = box.workspace_path
    (ws / "abs_link").symlink_to(outside / "secret")
    (ws / "dir_link").symlink_to(outside)
    (ws / "rel_link").symlink_to("../../../outside/secret")
    (ws / "etc_link").symlink_to("/etc")
    for path in ("abs_link", "dir_link/secret", "rel_link", "etc_link/passwd"):
        with pytest.raises(InvalidRequest):
            await box.read_file(path)
    with pytest.raises(InvalidRequest):
        await box.write_file("dir_link/planted", b"x")
    with pytest.raises(InvalidRequest):
        await box.list_dir("dir_link")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


async def test_symlinks_inside_the_workspace_use_the_boxs_view(box: LocalBoxSession) -> None:
    await box.write_file("real/file.txt", b"content")
    ws = box.workspace_path
    (ws / "relative").symlink_to("real/file.txt")
    (ws / "absolute").symlink_to("/workspace/real/file.txt")  # absolute in the box, not on the host
    (ws / "dir").symlink_to("real")
    assert await box.read_file("relative") == b"content"
    assert await box.read_file("absolute") == b"content"
    assert await box.read_file("dir/file.txt") == b"content"
    kinds = {e.name: e.kind for e in await box.list_dir("")}
    assert kinds == {"real": "dir", "relative": "symlink", "absolute": "symlink", "dir": "symlink"}


async def test_file_ops_errors(box: LocalBoxSession) -> None:
    with pytest.raises(PathNotFound):
        await box.read_file("missing.txt")
    with pytest.raises(PathNotFound):
        await box.list_dir("missing")
    await box.write_file("d/f", b"x")
    with pytest.raises(InvalidRequest):
        await box.read_file("d")
    with pytest.raises(InvalidRequest):
        await box.write_file("d", b"x")
    with pytest.raises(InvalidRequest):
        await box.list_dir("d/f")
    assert not await box.path_exists("d/f/g")


async def test_reading_a_fifo_does_not_hang(box: LocalBoxSession) -> None:
    assert (await box.exec(["mkfifo", "pipe"])).exit_code == 0
    with pytest.raises(InvalidRequest):
        await asyncio.wait_for(box.read_file("pipe"), 5)
    with pytest.raises(InvalidRequest):
        await asyncio.wait_for(box.write_file("pipe", b"x"), 5)


_SEGMENTS = st.sampled_from(["..", ".", "", "a", "b", "up", "root", "abs", "loop", "workspace", "f"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_SEGMENTS, min_size=1, max_size=8), absolute=st.booleans())
def test_no_path_writes_outside_the_workspace(tmp_path: Path, parts: list[str], absolute: bool) -> None:
    """Whatever the path, a write lands inside the workspace or is refused with a typed error."""
    root = tmp_path / "prop"
    prov = LocalProvider(root / "boxes", bubblewrap="never")
    session = asyncio.run(prov.create(spec(), "property-key"))
    ws = session.workspace_path
    if not (ws / "a").exists():
        (ws / "a").mkdir()
        (ws / "a" / "up").symlink_to("../..")
        (ws / "root").symlink_to("/")
        (ws / "abs").symlink_to("/workspace/a")
        (ws / "loop").symlink_to("loop")
    before = _snapshot_outside(root, ws)
    path = ("/workspace/" if absolute else "") + "/".join(parts)
    try:
        asyncio.run(session.write_file(path, b"payload"))
    except (InvalidRequest, PathNotFound):
        pass
    assert _snapshot_outside(root, ws) == before


def _snapshot_outside(root: Path, ws: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == ws or ws in Path(dirpath).parents:
            continue
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


# --- ports and state ------------------------------------------------------------------------


async def test_exposed_ports(box: LocalBoxSession, provider: LocalProvider) -> None:
    if provider.isolation == "bubblewrap":
        # The box has its own network namespace: the host cannot reach its ports (edges are host-side).
        with pytest.raises(Unsupported, match="own network namespace"):
            await box.resolve_exposed_port(6080)
    else:
        endpoint = await box.resolve_exposed_port(6080)
        assert (endpoint.host, endpoint.port, endpoint.tls) == ("127.0.0.1", 6080, False)
    with pytest.raises(InvalidRequest):
        await box.resolve_exposed_port(0)


async def test_serialize_state(box: LocalBoxSession) -> None:
    envelope = box.serialize_state()
    assert envelope.backend_id == "unix_local"
    assert envelope.instance_id == box.instance_id
    assert Path(envelope.state["box_path"]) == box.path
    assert json.loads(json.dumps(envelope.state)) == envelope.state


def test_a_reused_session_id_is_never_killed_as_ours() -> None:
    """Terminate kills by recorded session id; a pid reused by someone else's session must be spared."""
    from providers.local import _our_sessions, _Proc

    recorded = [(100, 5000), (200, 6000), (300, 7000)]
    procs = [
        _Proc(pid=100, ppid=1, sid=100, start=5000, zombie=False),  # our leader, still alive: ours
        _Proc(pid=201, ppid=1, sid=200, start=6001, zombie=False),  # leader 200 gone, member left: ours
        _Proc(pid=300, ppid=1, sid=300, start=9000, zombie=False),  # pid 300 reused by a new session: not ours
        _Proc(pid=301, ppid=300, sid=300, start=9001, zombie=False),
    ]
    assert _our_sessions(recorded, procs) == {100, 200}


# --- boxes made ahead ------------------------------------------------------------------------


async def _ready_spares(root: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [p for p in (root / ".spares").glob("*") if (p / ".ready").exists()]
        if ready:
            return ready
        await asyncio.sleep(0.02)
    return []


@needs_bwrap
async def test_a_box_made_ahead_is_handed_out_whole_and_isolated(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path / "boxes", warm_boxes=1)
    try:
        first = await provider.create(spec(), key())  # no spare yet: made on the spot, then one ahead
        (spare,) = await _ready_spares(provider.root)
        spare_holder = json.loads((spare / "holder.json").read_text())
        second = await provider.create(spec(), key())
        assert not spare.exists(), "the spare was taken"
        holder = json.loads((second.path / "holder.json").read_text())
        assert holder["init_pid"] == spare_holder["init_pid"], "its namespaces were made ahead"
        result = await second.exec(["sh", "-c", "id -u; echo hi > f; cat f; cat /proc/self/cgroup | grep pids"])
        assert result.stdout.decode().splitlines()[:2] == ["1000", "hi"]
        cgroup = result.stdout.decode().splitlines()[2].rsplit("/", 1)[1]
        assert cgroup == holder["cgroup"] and (Path("/sys/fs/cgroup/pids/sandbox") / cgroup / "pids.max").exists()
        assert (second.workspace_path / "f").stat().st_uid == DEFAULT_BOX_HOST_UID
        assert (await first.exec(["cat", "f"])).exit_code != 0, "boxes made ahead are not shared"
        # Its egress answers for this box now (an empty allowlist: a refusal that names the box).
        refused = await second.exec(["curl", "-sS", "-w", "%{http_code}", "http://192.0.2.1/"], timeout=20)
        assert refused.stdout.endswith(b"403")
        assert provider.egress_proxy is not None and provider.egress_proxy.refusals[-1][0] == second.instance_id
        await provider.terminate(second.serialize_state())
        assert not (Path("/sys/fs/cgroup/pids/sandbox") / cgroup).exists()
        (last,) = await _ready_spares(provider.root)
        last_cgroup = json.loads((last / "holder.json").read_text())["cgroup"]
        assert (Path("/sys/fs/cgroup/pids/sandbox") / last_cgroup).exists()
    finally:
        for owned in await provider.list_owned():
            await provider.terminate(Envelope(backend_id="unix_local", instance_id=owned.instance_id))
        await provider.aclose()
    # aclose leaves no spare behind: no directory, no mount, no cgroup.
    assert not list((provider.root / ".spares").glob("*"))
    assert str(provider.root) not in Path("/proc/self/mountinfo").read_text()
    assert not (Path("/sys/fs/cgroup/pids/sandbox") / last_cgroup).exists()
