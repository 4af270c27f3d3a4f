"""Benchmark: the lease spine (acquire, exec, re-arm cycles) against same-run baselines.

Run ``python bench/bench_lease.py [--quick] [--json]``. One run starts its own embedded stack
(:mod:`bench.stack`: a Temporal dev server and ``python -m worker`` as a subprocess, SQLite store,
``local`` provider) under a temporary data dir and measures, in order:

1. a bare no-op Temporal update on a trivial workflow run by a worker inside this process (baseline),
   interleaved round by round with
2. a warm acquire: a new holder attaching to an already warm lease, through ``LeaseClient.acquire``
   (update-with-start) and through a plain ``execute_update`` on the lease's handle;
3. a cold acquire on the local provider: a new lease each time, and the same lease re-warmed after
   ``drain --wait``;
4. ``exec true`` through the lease next to a direct ``asyncio.create_subprocess_exec("true")`` here
   (and, to split the overhead, the local provider's own exec called in this process);
5. many leases cycling acquire → release concurrently with a long idle grace, so each acquire
   re-arms the box instead of recreating it: cycles per second and the worker's memory.

It prints p50/p99 in milliseconds, ratios, and MET/MISSED against the targets. Benchmarks are
information, never a gate: the exit status is 0 whatever the figures (130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from temporalio import workflow  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.client import Client, RPCError, WorkflowUpdateRPCTimeoutOrCancelledError  # noqa: E402
from temporalio.worker import Worker  # noqa: E402

from bench.stack import BenchStack, bench_stack, process_cpu_seconds  # noqa: E402
from client import LeaseClient  # noqa: E402
from providers.local import LocalProvider  # noqa: E402
from sandbox import errors  # noqa: E402
from sandbox.box import BoxSpec  # noqa: E402
from sandbox.settings import Settings  # noqa: E402
from worker import connect  # noqa: E402
from workflows.lease import LeaseWorkflow  # noqa: E402
from workflows.models.lease import AcquireRequest

T = TypeVar("T")
WORKSPACE = "bench"
#: Timers of every lease in the run: holders never expire and a released box stays warm for an
#: hour, so an acquire after a release re-arms the box; cold acquires force teardown with drain.
HOLDER_TTL_SECONDS = 3600.0
IDLE_GRACE_SECONDS = 3600.0
#: Concurrent cold acquires while warming the leases of the cycling test.
WARMUP_CONCURRENCY = 16
#: A phase that takes longer is stuck (a workflow task failing over and over, say): stop the run.
PHASE_TIMEOUT_SECONDS = 600.0
#: Cycling leases whose workflow histories are counted (events per cycle).
HISTORY_SAMPLE = 5


# --------------------------------------------------------------------------- the baseline workflow


@workflow.defn(name="BenchNoopWorkflow", sandboxed=False)
class NoopWorkflow:
    """The least a Temporal update can do: return its argument."""

    def __init__(self) -> None:
        self._done = False

    @workflow.run
    async def run(self) -> None:
        """Wait for ``finish``."""
        await workflow.wait_condition(lambda: self._done)

    @workflow.update
    def echo(self, arg: str) -> str:
        """Return ``arg``."""
        return arg

    @workflow.signal
    def finish(self) -> None:
        """Let the workflow complete."""
        self._done = True


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Params:
    """How much to measure."""

    n: int
    warmup: int
    cold_n: int
    exec_n: int
    leases: int
    seconds: float


FULL = Params(n=300, warmup=20, cold_n=50, exec_n=200, leases=200, seconds=20.0)
QUICK = Params(n=30, warmup=5, cold_n=6, exec_n=30, leases=20, seconds=5.0)


@dataclass(frozen=True)
class Latency:
    """Summary of one series of sequential calls, in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


def summarize(samples_ns: list[int]) -> Latency:
    """p50 (median), p99 (nearest rank), mean, min and max of samples in nanoseconds (all 0 when empty)."""
    ms = sorted(s / 1e6 for s in samples_ns)
    if not ms:
        return Latency(n=0, p50_ms=0.0, p99_ms=0.0, mean_ms=0.0, min_ms=0.0, max_ms=0.0)
    rank = max(1, math.ceil(0.99 * len(ms)))
    return Latency(
        n=len(ms),
        p50_ms=statistics.median(ms),
        p99_ms=ms[rank - 1],
        mean_ms=statistics.fmean(ms),
        min_ms=ms[0],
        max_ms=ms[-1],
    )


@dataclass
class Cycling:
    """Result of the concurrent acquire → release test."""

    leases: int
    seconds: float
    cycles: int
    cycles_per_second: float
    cycle: Latency
    roles: dict[str, int]
    errors: dict[str, int]
    worker_rss_end_mb: float
    worker_hwm_mb: float
    worker_rss_peak_sampled_mb: float
    history_per_cycle: dict[str, float]
    """History events per cycle, by type, over a sample of the leases."""
    cpu_ms_per_cycle: dict[str, float]
    """CPU time per completed cycle of the worker, the Temporal server and this (client) process."""
    box_processes: int
    box_processes_rss_mb: float
    box_dirs: int
    leases_with_one_box: int
    epochs: dict[str, int]


@dataclass
class Report:
    """Everything one run measured."""

    meta: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Latency] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)
    cycling: Cycling | None = None
    history: dict[str, float] = field(default_factory=dict)
    """History events per operation: ``warm_attach_release`` (a lease kept warm by another holder),
    ``held_per_check`` (one deadline check of a held lease) and ``held_per_hour`` (projected)."""

    def note_anomaly(self, what: str) -> None:
        """Count something that should not happen (an unexpected role, a failed command)."""
        self.anomalies[what] = self.anomalies.get(what, 0) + 1


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the figures)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def timed(call: Awaitable[T]) -> tuple[int, T]:
    """Await ``call`` (a coroutine does nothing until awaited); its duration in nanoseconds and its result."""
    start = time.perf_counter_ns()
    result = await call
    return time.perf_counter_ns() - start, result


# --------------------------------------------------------------------------- measurements


async def measure_warm(client: Client, leases: LeaseClient, params: Params, report: Report) -> None:
    """Baseline no-op update, warm acquire by update-with-start and by plain update, interleaved."""
    queue = f"bench-noop-{uuid.uuid4()}"
    samples: dict[str, list[int]] = {"noop": [], "uws": [], "plain": []}
    group = "warm"
    async with Worker(client, task_queue=queue, workflows=[NoopWorkflow]):
        noop = await client.start_workflow(NoopWorkflow.run, id=f"bench-noop-{uuid.uuid4()}", task_queue=queue)
        await leases.acquire(WORKSPACE, group, holder_id="base")  # the holder that keeps the lease warm
        handle = leases.handle(WORKSPACE, group)
        await _quiet(leases, group)
        events_before = sum((await history_counts(leases, group)).values())
        for i in range(params.warmup + params.n):
            keep = i >= params.warmup
            elapsed, _ = await timed(noop.execute_update(NoopWorkflow.echo, f"ping-{i}"))
            if keep:
                samples["noop"].append(elapsed)

            holder = f"uws-{i}"
            elapsed, grant = await timed(leases.acquire(WORKSPACE, group, holder_id=holder))
            if grant.role != "attached":
                report.note_anomaly(f"warm acquire (update-with-start) got role {grant.role}")
            await leases.release(WORKSPACE, group, holder)
            if keep:
                samples["uws"].append(elapsed)

            holder = f"plain-{i}"
            request = AcquireRequest(kind="turn", holder_id=holder)
            elapsed, grant = await timed(handle.execute_update(LeaseWorkflow.acquire, request))
            if grant.role != "attached":
                report.note_anomaly(f"warm acquire (plain update) got role {grant.role}")
            await leases.release(WORKSPACE, group, holder)
            if keep:
                samples["plain"].append(elapsed)
        await noop.signal(NoopWorkflow.finish)
        await noop.result()
    await _quiet(leases, group)
    cycles = 2 * (params.warmup + params.n)
    report.history["warm_attach_release"] = (
        sum((await history_counts(leases, group)).values()) - events_before
    ) / cycles
    await leases.drain(WORKSPACE, group, reason="bench", wait=True)
    report.latency["baseline_noop_update"] = summarize(samples["noop"])
    report.latency["warm_acquire_update_with_start"] = summarize(samples["uws"])
    report.latency["warm_acquire_plain_update"] = summarize(samples["plain"])


async def _quiet(leases: LeaseClient, group: str, settle: float = 0.5) -> None:
    """Until the lease's history stops growing for ``settle`` seconds (its projection written, say)."""
    last = -1
    while True:
        now = sum((await history_counts(leases, group)).values())
        if now == last:
            return
        last = now
        await asyncio.sleep(settle)


#: The held-lease measurement: a short TTL so that deadline checks happen within the run, and the
#: default ratio of heartbeat interval to TTL (a turn: 10 s of 90 s).
HELD_TTL_SECONDS = 4.5
HELD_SECONDS = 27.0
DEFAULT_TTL_SECONDS = 90.0


async def measure_held(settings: Settings, params: Params, report: Report) -> None:
    """History events of a lease held by one turn heartbeating at the default interval/TTL ratio.

    Measured over ``HELD_SECONDS`` with a ``HELD_TTL_SECONDS`` TTL (heartbeat every TTL/9, as a turn
    at the defaults), then projected to an hour at the default TTL of 90 s: the events of a held
    lease come from its deadline checks, one per TTL, whatever the heartbeat rate.
    """
    leases = LeaseClient(await connect(settings), settings.model_copy(update={"holder_ttl_seconds": HELD_TTL_SECONDS}))
    group = "held"
    grant = await leases.acquire(WORKSPACE, group, holder_id="turn-1")
    await _quiet(leases, group)
    before = sum((await history_counts(leases, group)).values())
    beats = 0
    stop_at = time.monotonic() + HELD_SECONDS
    while time.monotonic() < stop_at:
        await leases.heartbeat(WORKSPACE, group, "turn-1", grant.epoch)
        beats += 1
        await asyncio.sleep(HELD_TTL_SECONDS / 9)
    events = sum((await history_counts(leases, group)).values()) - before
    view = await leases.describe(WORKSPACE, group)
    if [h.holder_id for h in view.holders] != ["turn-1"]:
        report.note_anomaly("held lease: the heartbeating holder expired")
    checks = HELD_SECONDS / HELD_TTL_SECONDS
    report.history["held_heartbeats"] = beats
    report.history["held_events"] = events
    report.history["held_per_check"] = events / checks
    report.history["held_per_hour"] = events / checks * 3600 / DEFAULT_TTL_SECONDS
    await leases.drain(WORKSPACE, group, reason="bench", wait=True)


async def measure_cold(leases: LeaseClient, params: Params, report: Report) -> None:
    """Cold acquire on the local provider: a new lease each time, and one lease re-warmed after drain."""
    fresh: list[int] = []
    rewarm: list[int] = []
    for i in range(params.cold_n):
        group = f"cold-{i:03d}"
        elapsed, grant = await timed(leases.acquire(WORKSPACE, group, holder_id="h"))
        if grant.role != "spawner":
            report.note_anomaly(f"cold acquire (new lease) got role {grant.role}")
        fresh.append(elapsed)
        await leases.drain(WORKSPACE, group, reason="bench", wait=True)
        await leases.stop(WORKSPACE, group)

        elapsed, grant = await timed(leases.acquire(WORKSPACE, "rewarm", holder_id="h"))
        if grant.role != "spawner":
            report.note_anomaly(f"cold acquire (re-warm) got role {grant.role}")
        rewarm.append(elapsed)
        await leases.drain(WORKSPACE, "rewarm", reason="bench", wait=True)
    report.latency["cold_acquire_new_lease"] = summarize(fresh)
    report.latency["cold_acquire_rewarm_after_drain"] = summarize(rewarm)


async def _direct_true() -> int:
    proc = await asyncio.create_subprocess_exec(
        "true", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    await proc.communicate()
    return proc.returncode or 0


async def measure_exec(stack: BenchStack, leases: LeaseClient, params: Params, report: Report) -> None:
    """``exec true`` through the lease, a direct subprocess here, and the provider's exec in this process."""
    group = "exec"
    grant = await leases.acquire(WORKSPACE, group, holder_id="base")
    provider = LocalProvider(stack.data_dir / "bench-provider-boxes")
    spec = BoxSpec(lease_id="lease/bench/provider", workspace_id=WORKSPACE, group_id="provider", epoch=1)
    session = await provider.create(spec, "bench-provider-box")
    report.meta["isolation_bench_process"] = provider.isolation
    report.meta["isolation_worker"] = (
        "bubblewrap" if any(stack.boxes_dir().glob("box-*/holder.json")) else "process (no holder.json)"
    )
    samples: dict[str, list[int]] = {"lease": [], "direct": [], "provider": []}
    try:
        for i in range(params.warmup + params.exec_n):
            keep = i >= params.warmup
            elapsed, out = await timed(leases.exec(WORKSPACE, group, ["true"], epoch=grant.epoch))
            if out.exit_code != 0:
                report.note_anomaly(f"lease exec true exited {out.exit_code}")
            if keep:
                samples["lease"].append(elapsed)
            elapsed, code = await timed(_direct_true())
            if code != 0:
                report.note_anomaly(f"direct true exited {code}")
            if keep:
                samples["direct"].append(elapsed)
            elapsed, result = await timed(session.exec(["true"], timeout=30))
            if result.exit_code != 0:
                report.note_anomaly(f"provider exec true exited {result.exit_code}")
            if keep:
                samples["provider"].append(elapsed)
    finally:
        await provider.terminate(session.serialize_state())
        await provider.aclose()
    await leases.drain(WORKSPACE, group, reason="bench", wait=True)
    report.latency["exec_true_lease"] = summarize(samples["lease"])
    report.latency["exec_true_direct_subprocess"] = summarize(samples["direct"])
    report.latency["exec_true_provider_in_process"] = summarize(samples["provider"])


def _boxes_by_lease(stack: BenchStack) -> Counter[str]:
    """How many box directories each lease has under ``<data>/boxes`` (staging and trash excluded)."""
    per_lease: Counter[str] = Counter()
    root = stack.boxes_dir()
    for box in root.iterdir() if root.is_dir() else ():
        if box.name.startswith("."):
            continue
        try:
            per_lease[json.loads((box / "box.json").read_bytes())["lease_id"]] += 1
        except (OSError, ValueError, KeyError):
            per_lease["<unreadable box.json>"] += 1
    return per_lease


async def history_counts(leases: LeaseClient, group: str) -> Counter[str]:
    """How many events of each type the lease's workflow history holds (current run)."""
    counts: Counter[str] = Counter()
    async for event in leases.handle(WORKSPACE, group).fetch_history_events():
        counts[EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()] += 1
    return counts


def cpu_now(stack: BenchStack) -> dict[str, float]:
    """CPU seconds used so far by the worker, the Temporal server and this process."""
    return {
        "worker": process_cpu_seconds(stack.worker_pid),
        "temporal": process_cpu_seconds(stack.temporal_pid),
        "bench client": time.process_time(),
    }


async def measure_cycling(stack: BenchStack, leases: LeaseClient, params: Params, report: Report) -> None:
    """``params.leases`` tasks, one per lease, each cycling acquire → release for ``params.seconds``."""
    groups = [f"cycle-{i:03d}" for i in range(params.leases)]
    gate = asyncio.Semaphore(WARMUP_CONCURRENCY)

    async def warm(group: str) -> None:
        async with gate:
            await leases.acquire(WORKSPACE, group, holder_id="warmup")
            await leases.release(WORKSPACE, group, "warmup")

    started = time.monotonic()
    await asyncio.gather(*(warm(g) for g in groups))
    progress(f"  {len(groups)} leases warm in {time.monotonic() - started:.1f}s; cycling for {params.seconds:g}s")

    sample = groups[:HISTORY_SAMPLE]
    events_before = [await history_counts(leases, g) for g in sample]
    cycles_per_group: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    latencies: list[int] = []
    peak = 0.0
    stop_at = time.monotonic() + params.seconds

    async def cycle(group: str) -> None:
        k = 0
        while time.monotonic() < stop_at:
            holder = f"{group}-{k}"
            k += 1
            start = time.perf_counter_ns()
            try:
                grant = await leases.acquire(WORKSPACE, group, holder_id=holder)
                await leases.release(WORKSPACE, group, holder)
            except (errors.SandboxError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as err:
                # Under overload an update's RPC can time out; count it and go on cycling.
                failures[type(err).__name__] += 1
                await asyncio.sleep(0.05)  # an error that comes back at once must not spin
                continue
            latencies.append(time.perf_counter_ns() - start)
            roles[grant.role] += 1
            cycles_per_group[group] += 1

    async def sample_memory() -> None:
        nonlocal peak
        while True:
            peak = max(peak, stack.worker_memory().rss_mb)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_memory())
    cpu_before = cpu_now(stack)
    started = time.monotonic()
    try:
        await asyncio.gather(*(cycle(g) for g in groups))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    elapsed = time.monotonic() - started
    cpu_after = cpu_now(stack)
    done = max(1, len(latencies))
    memory = stack.worker_memory()
    processes, processes_rss = stack.worker_children_rss_mb()
    per_lease = _boxes_by_lease(stack)
    events: Counter[str] = Counter()
    for group, before in zip(sample, events_before, strict=True):
        events.update(await history_counts(leases, group))
        events.subtract(before)
    sampled_cycles = max(1, sum(cycles_per_group[g] for g in sample))
    history = {name: count / sampled_cycles for name, count in sorted(events.items()) if count}
    history["total"] = sum(events.values()) / sampled_cycles
    epochs: Counter[str] = Counter()
    for group in groups:
        epochs[str((await leases.describe(WORKSPACE, group)).epoch)] += 1
    report.cycling = Cycling(
        leases=params.leases,
        seconds=elapsed,
        cycles=len(latencies),
        cycles_per_second=len(latencies) / elapsed,
        cycle=summarize(latencies),
        roles=dict(roles),
        errors=dict(failures),
        history_per_cycle=history,
        cpu_ms_per_cycle={name: (cpu_after[name] - cpu_before[name]) * 1000 / done for name in cpu_before},
        worker_rss_end_mb=memory.rss_mb,
        worker_hwm_mb=memory.hwm_mb,
        worker_rss_peak_sampled_mb=max(peak, memory.rss_mb),
        box_processes=processes,
        box_processes_rss_mb=processes_rss,
        box_dirs=sum(per_lease.values()),
        leases_with_one_box=sum(1 for g in groups if per_lease[f"lease/{WORKSPACE}/{g}"] == 1),
        epochs=dict(epochs),
    )


async def run(stack: BenchStack, params: Params, report: Report, *, snapshots: bool) -> None:
    """Every measurement, in order, against the running stack."""
    settings = Settings(
        snapshots_enabled=snapshots,
        data_dir=stack.data_dir,
        temporal_address=stack.temporal_address,
        task_queue=stack.task_queue,
        default_backend="local",
        holder_ttl_seconds=HOLDER_TTL_SECONDS,
        idle_grace_seconds=IDLE_GRACE_SECONDS,
    )
    client = await connect(settings)
    await stack.wait_for_worker(client)
    leases = LeaseClient(client, settings)
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        (
            f"baseline + warm acquire ({params.warmup} warm-up + {params.n} rounds)",
            lambda: measure_warm(client, leases, params, report),
        ),
        (f"cold acquire ({params.cold_n} x 2 variants)", lambda: measure_cold(leases, params, report)),
        (f"held lease ({HELD_SECONDS:g}s, TTL {HELD_TTL_SECONDS:g}s)", lambda: measure_held(settings, params, report)),
        (f"exec true ({params.warmup} warm-up + {params.exec_n})", lambda: measure_exec(stack, leases, params, report)),
        (
            f"cycling ({params.leases} leases, {params.seconds:g}s)",
            lambda: measure_cycling(stack, leases, params, report),
        ),
    ]
    for title, step in steps:
        progress(title)
        started = time.monotonic()
        try:
            async with asyncio.timeout(PHASE_TIMEOUT_SECONDS):
                await step()
        except TimeoutError:
            tail = "\n".join(f"  | {line}" for line in stack.worker.log_tail())
            raise RuntimeError(
                f"{title}: not done after {PHASE_TIMEOUT_SECONDS:.0f}s; last lines of {stack.worker.log_path}:\n{tail}"
            ) from None
        except errors.SandboxError as err:
            # One broken phase (a provider refusing exec, say) must not hide the others' figures.
            report.note_anomaly(f"{title.split(' (')[0]} failed: {type(err).__name__}: {err.message[:100]}")
            progress(f"  FAILED: {type(err).__name__}: {err.message}")
            continue
        stack.check_alive()
        progress(f"  done in {time.monotonic() - started:.1f}s")


# --------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Target:
    """One target and whether this run met it."""

    name: str
    value: float
    limit: float
    unit: str
    at_most: bool

    @property
    def met(self) -> bool:
        """Whether the measured value is on the right side of the limit."""
        return self.value <= self.limit if self.at_most else self.value >= self.limit


def targets(report: Report) -> list[Target]:
    """The lease spine's targets, evaluated on this run."""
    lat = _latencies(report)
    base = lat["baseline_noop_update"].p50_ms or math.nan
    warm = lat["warm_acquire_update_with_start"].p50_ms
    overhead = lat["exec_true_lease"].p50_ms - lat["exec_true_direct_subprocess"].p50_ms
    if not lat["exec_true_lease"].n:
        overhead = math.nan  # the phase failed: no figure, so no MET
    found = [
        Target("warm acquire p50 (LeaseClient.acquire)", warm, 20.0, "ms", True),
        Target("warm acquire p50 / bare update p50", warm / base, 1.5, "x", True),
        Target("cold acquire p50, new lease", lat["cold_acquire_new_lease"].p50_ms, 250.0, "ms", True),
        Target(
            "cold acquire p50, re-warm after drain", lat["cold_acquire_rewarm_after_drain"].p50_ms, 250.0, "ms", True
        ),
        Target("exec true overhead p50 (lease - direct)", overhead, 15.0, "ms", True),
    ]
    if report.cycling is not None:
        c = report.cycling
        found += [
            Target(f"acquire/release cycles per second ({c.leases} leases)", c.cycles_per_second, 50.0, "/s", False),
            Target("worker peak RSS (VmHWM)", c.worker_hwm_mb, 500.0, "MB", True),
        ]
    h = report.history
    # Issue 16's table ("a lease costs almost nothing while it waits").
    if "warm_attach_release" in h:
        found.append(Target("#16 history events per warm attach + release", h["warm_attach_release"], 10, "ev", True))
    if "held_per_hour" in h:
        found.append(Target("#16 history events per held lease-hour (1 turn)", h["held_per_hour"], 60, "ev", True))
    found.append(Target("#16 warm acquire p50 / bare update p50", warm / base, 1.3, "x", True))
    if report.cycling is not None:
        c = report.cycling
        timeouts = c.history_per_cycle.get("workflow_task_timed_out", 0.0)
        found += [
            Target(f"#16 cycles per second ({c.leases} leases)", c.cycles_per_second, 50.0, "/s", False),
            Target("#16 cycling errors", float(sum(c.errors.values())), 0, "", True),
            Target("#16 workflow task timeouts per cycle (sampled)", timeouts, 0, "", True),
            Target("#16 worker peak RSS (VmHWM)", c.worker_hwm_mb, 300.0, "MB", True),
        ]
    return found


def _latencies(report: Report) -> dict[str, Latency]:
    """The report's latencies, an empty series (n = 0) for a phase that failed."""
    keys = [
        "baseline_noop_update",
        "warm_acquire_update_with_start",
        "warm_acquire_plain_update",
        "cold_acquire_new_lease",
        "cold_acquire_rewarm_after_drain",
        "exec_true_direct_subprocess",
        "exec_true_lease",
        "exec_true_provider_in_process",
    ]
    return {key: report.latency.get(key) or summarize([]) for key in keys} | report.latency


def cpu_bound_rate(c: Cycling, report: Report) -> float:
    """Cycles per second the measured CPU cost per cycle allows on this machine's cores, if nothing else ran."""
    total_ms = sum(c.cpu_ms_per_cycle.values())
    return (report.meta["cores"] or 1) * 1000 / total_ms if total_ms > 0 else math.inf


def render(report: Report) -> str:
    """The human-readable table of figures and targets."""
    lat = _latencies(report)
    base = lat["baseline_noop_update"].p50_ms
    direct = lat["exec_true_direct_subprocess"].p50_ms or math.nan
    m = report.meta
    lines = [
        f"lease spine benchmark  {m['date']}  {m['mode']} run",
        f"machine: {m['cores']} cores, {m['platform']}, python {m['python']}, temporal CLI {m['temporal_cli']}",
        f"load average (1 min): {m['loadavg_start']:.2f} at start, {m['loadavg_end']:.2f} at end (this run included)"
        + ("  <- other work competed for the CPU; absolute figures are inflated" if busy(m) else ""),
        f"stack: temporal dev server ({m['temporal_db']} SQLite), worker subprocess `python -m worker`, "
        f"SQLite store, local provider (isolation: worker {m.get('isolation_worker', '?')})"
        + (f"; dev server dynamic config {', '.join(m['dynamic_config'])}" if m["dynamic_config"] else ""),
        f"snapshots: {'on (capture on drain, restore on re-warm)' if m['snapshots'] else 'off'}; "
        f"timers: holder TTL {HOLDER_TTL_SECONDS:g}s, idle grace {IDLE_GRACE_SECONDS:g}s -> a released box stays "
        "warm and the next acquire RE-ARMS it (not recreated); cold acquires force teardown with drain --wait",
        "baseline: no-op update on a trivial unsandboxed workflow, worker in the bench process",
        "",
        f"{'measurement':52} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}  ratio (p50)",
    ]

    def row(label: str, key: str, ratio_to: float | None = None, ratio_name: str = "") -> None:
        s = lat[key]
        ratio = f"{s.p50_ms / ratio_to:5.2f}x {ratio_name}" if ratio_to else ""
        lines.append(f"{label:52} {s.n:5d} {s.p50_ms:9.2f} {s.p99_ms:9.2f}  {ratio}")

    row("bare no-op update (baseline)", "baseline_noop_update")
    row("warm acquire, LeaseClient.acquire (upd-with-start)", "warm_acquire_update_with_start", base, "baseline")
    row("warm acquire, plain execute_update", "warm_acquire_plain_update", base, "baseline")
    row("cold acquire, new lease", "cold_acquire_new_lease", base, "baseline")
    row("cold acquire, same lease re-warmed after drain", "cold_acquire_rewarm_after_drain", base, "baseline")
    row("direct create_subprocess_exec('true')", "exec_true_direct_subprocess")
    row("exec true through the lease (LeaseClient.exec)", "exec_true_lease", direct, "direct")
    row("  local provider exec true in-process (no Temporal)", "exec_true_provider_in_process", direct, "direct")
    overhead = lat["exec_true_lease"].p50_ms - direct
    temporal_part = lat["exec_true_lease"].p50_ms - lat["exec_true_provider_in_process"].p50_ms
    lines.append(
        f"exec overhead p50: {overhead:.2f} ms over direct ({lat['exec_true_lease'].p50_ms / direct:.1f}x); "
        f"of which Temporal+activity {temporal_part:.2f} ms, provider isolation "
        f"{lat['exec_true_provider_in_process'].p50_ms - direct:.2f} ms"
    )
    uws, plain = lat["warm_acquire_update_with_start"].p50_ms, lat["warm_acquire_plain_update"].p50_ms
    lines.append(f"update-with-start vs plain update, warm acquire p50: {uws - plain:+.2f} ms")
    c = report.cycling
    if c is not None:
        lines += [
            "",
            f"cycling: {c.leases} leases, one task each, acquire -> release for {c.seconds:.1f}s (boxes re-armed)",
            f"  {c.cycles} cycles = {c.cycles_per_second:.1f} cycles/s; "
            f"cycle p50 {c.cycle.p50_ms:.1f} ms, p99 {c.cycle.p99_ms:.1f} ms",
            f"  roles {c.roles}; errors {c.errors or 'none'}",
            "  CPU per cycle: "
            + ", ".join(f"{name} {ms:.1f} ms" for name, ms in c.cpu_ms_per_cycle.items())
            + f" -> at most ~{cpu_bound_rate(c, report):.0f} cycles/s on {report.meta['cores']} idle cores",
            f"  history events per cycle ({min(HISTORY_SAMPLE, c.leases)} leases sampled): "
            f"{c.history_per_cycle.get('total', 0):.1f} = "
            + ", ".join(f"{name} {n:.2f}" for name, n in c.history_per_cycle.items() if name != "total"),
            f"  worker RSS: end {c.worker_rss_end_mb:.0f} MB, peak VmHWM {c.worker_hwm_mb:.0f} MB "
            f"(sampled peak {c.worker_rss_peak_sampled_mb:.0f} MB); "
            f"{c.box_processes} box processes under it, {c.box_processes_rss_mb:.0f} MB RSS together",
            f"  boxes: {c.leases_with_one_box}/{c.leases} leases with exactly one box; "
            f"{c.box_dirs} box dirs under <data>/boxes; lease epochs {c.epochs}",
        ]
    h = report.history
    if h:
        lines += [
            "",
            f"history events per warm attach + release (lease kept warm by another holder): "
            f"{h.get('warm_attach_release', float('nan')):.1f}",
        ]
        if "held_per_hour" in h:
            lines.append(
                f"held lease, one turn heartbeating every TTL/9: {h['held_events']:.0f} events for "
                f"{h['held_heartbeats']:.0f} heartbeats over {HELD_SECONDS:g}s at TTL {HELD_TTL_SECONDS:g}s = "
                f"{h['held_per_check']:.1f} per deadline check -> {h['held_per_hour']:.0f} events/hour "
                f"at the default TTL {DEFAULT_TTL_SECONDS:g}s"
            )
    if report.anomalies:
        lines += ["", f"ANOMALIES: {report.anomalies}"]
    lines += ["", f"{'target':52} {'measured':>12} {'limit':>10}  verdict"]
    for t in targets(report):
        sign = "<=" if t.at_most else ">="
        lines.append(
            f"{t.name:52} {t.value:10.2f}{t.unit:>2} {sign} {t.limit:g}{t.unit:<3}  {'MET' if t.met else 'MISSED'}"
        )
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    """The report as one JSON-ready object."""
    return {
        "meta": report.meta,
        "latency_ms": {key: asdict(value) for key, value in report.latency.items()},
        "cycling": asdict(report.cycling) if report.cycling is not None else None,
        "history": report.history,
        "anomalies": report.anomalies,
        "targets": [{**asdict(t), "met": t.met} for t in targets(report)],
    }


def _temporal_version() -> str:
    binary = Path(sys.executable).parent / "temporal"
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().removeprefix("temporal version ")


def busy(meta: dict[str, Any]) -> bool:
    """Whether the machine carried other load during the run (1-min load above half the cores at start)."""
    return bool(meta["loadavg_start"] > 0.5 * (meta["cores"] or 1))


_INTERRUPTS: list[int] = []
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    # Outside the event loop (starting or stopping the stack): unwind through the stack's cleanup.
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def _install_interrupt_handlers() -> None:
    for signum in _STOP_SIGNALS:  # SIGTERM stops the run as Ctrl-C does, with cleanup
        signal.signal(signum, _interrupt)


async def run_interruptible(stack: BenchStack, params: Params, report: Report, *, snapshots: bool) -> bool:
    """:func:`run`, cancelled by SIGINT/SIGTERM; False when interrupted."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel(signum: int) -> None:
        _INTERRUPTS.append(signum)
        task.cancel()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Calls cut short by an interrupt leave cancelled futures nobody reads; an update-with-start
        # whose RPC timed out (counted by the cycling test) leaves its start operation's future
        # unread too. Neither is news.
        exc = context.get("exception")
        if _INTERRUPTS and isinstance(exc, asyncio.CancelledError):
            return
        if isinstance(exc, RPCError) and str(context.get("message", "")).startswith("Future exception was never"):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, cancel, signum)
    try:
        await run(stack, params, report, snapshots=snapshots)
    except BaseException:
        # A cancelled Temporal call surfaces as its own exception type, not CancelledError.
        if _INTERRUPTS:
            return False
        raise
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        _install_interrupt_handlers()
    return True


def main() -> int:
    """Entry point: parse options, run everything on a fresh stack, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with small N (well under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--n", type=int, help="rounds of baseline and warm acquire")
    parser.add_argument("--cold-n", type=int, help="cold acquires per variant")
    parser.add_argument("--exec-n", type=int, help="exec rounds")
    parser.add_argument("--leases", type=int, help="leases in the cycling test")
    parser.add_argument("--seconds", type=float, help="duration of the cycling test")
    parser.add_argument(
        "--temporal-db", choices=("file", "memory"), default="file", help="dev server SQLite (default: file)"
    )
    parser.add_argument(
        "--dynamic-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dev server dynamic config value, repeatable (e.g. system.enableActivityEagerExecution=true)",
    )
    parser.add_argument(
        "--no-snapshots",
        dest="snapshots",
        action="store_false",
        help="leases without workspace snapshots (default: on, capture on drain and restore on re-warm)",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the data dir and logs for inspection")
    args = parser.parse_args()
    base = QUICK if args.quick else FULL
    params = Params(
        n=args.n or base.n,
        warmup=base.warmup,
        cold_n=args.cold_n or base.cold_n,
        exec_n=args.exec_n or base.exec_n,
        leases=args.leases or base.leases,
        seconds=args.seconds or base.seconds,
    )
    report = Report(
        meta={
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "quick" if args.quick else "full",
            "cores": os.cpu_count(),
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
            "python": platform.python_version(),
            "temporal_cli": _temporal_version(),
            "temporal_db": args.temporal_db,
            "dynamic_config": args.dynamic_config,
            "snapshots": args.snapshots,
            "params": asdict(params),
            "holder_ttl_seconds": HOLDER_TTL_SECONDS,
            "idle_grace_seconds": IDLE_GRACE_SECONDS,
            "loadavg_start": os.getloadavg()[0],
        }
    )
    _install_interrupt_handlers()
    started = time.monotonic()
    worker_env = {"SANDBOX_IDLE_GRACE_SECONDS": str(IDLE_GRACE_SECONDS), "SANDBOX_HOLDER_TTL_SECONDS": "3600"}
    try:
        progress("starting temporal dev server and worker")
        with bench_stack(
            temporal_db=args.temporal_db,
            worker_env=worker_env,
            dynamic_config=args.dynamic_config,
            keep_data=args.keep_data,
        ) as stack:
            completed = asyncio.run(run_interruptible(stack, params, report, snapshots=args.snapshots))
            progress("stopping the stack")
            stopping = time.monotonic()
        progress(f"  stopped in {time.monotonic() - stopping:.1f}s")
        if not completed:
            progress("interrupted; the stack was stopped")
            return 130
    except BaseException:
        # An interrupt may surface as another exception (a Temporal call cancelled under it).
        if not _INTERRUPTS:
            raise
        progress("interrupted; the stack was stopped")
        return 130
    report.meta["total_seconds"] = round(time.monotonic() - started, 1)
    report.meta["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(as_json(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
