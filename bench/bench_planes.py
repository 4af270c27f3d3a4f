"""Benchmark: desktop-stack bring-up in a local box, cold and already up; ``attach_viewer`` on a warm lease.

Run ``python bench/bench_planes.py [--rounds N] [--warm N] [--attach N]``.

**Display stack** (``--rounds``, ``--warm``; ``--rounds 0`` skips it). Each round creates a fresh local box
(bubblewrap when available), times the first ``ensure_display_stack`` (cold: Xvfb, x11vnc and the
websockify edge come up) and then ``--warm`` ensures of the healthy stack (one exec of
``desktop-up`` that answers from its lock-free health check), then terminates the box. Figures are
medians over rounds (p50 and max of the warm calls over all rounds). As a baseline the bench also
times a bare ``true`` exec in the same box: the floor of any in-box operation.
Targets: cold bring-up <= 2 s, already-up ensure <= 100 ms.

**attach_viewer** (``--attach N``, default 200; ``0`` skips it). An embedded stack
(:mod:`bench.stack`: a Temporal dev server and ``python -m worker`` as separate processes, local
provider) holds one warm lease (a turn holder keeps it warm). After one untimed attach per plane
(which brings the desktop and the terminal up), N rounds interleave, so that machine noise hits all
alike: a warm ``acquire`` of the turn holder (update-with-start, the floor of any update on the
lease), ``attach_viewer`` of the desktop and of the terminal by the same viewer (what ``open``
does to renew its token), and ``attach_viewer`` of the desktop by a new viewer each round (released
again, untimed). Each attach is the whole client call: update-with-start, the ``ensure_plane``
activity (one exec of the plane's health check, answered by the healthy stack) and minting the
token. p50/p99 in ms and the ratio to the acquire floor. Target: attach_viewer p50 <= 150 ms.

Benchmarks are information, never a gate: the exit status is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from activities.planes import PlaneActivities  # noqa: E402
from bench.stack import BenchStack, bench_stack  # noqa: E402
from providers.registry import ProviderRegistry  # noqa: E402
from sandbox.box import BoxSpec, Envelope  # noqa: E402
from sandbox.settings import Settings  # noqa: E402
from workflows.models.planes import DisplayStackRequest

TARGET_COLD_SECONDS = 2.0
TARGET_WARM_SECONDS = 0.100
TARGET_ATTACH_P50_SECONDS = 0.150
WORKSPACE = "bench-planes"


async def run(rounds: int, warm_calls: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-planes-") as tmp:
        settings = Settings(data_dir=Path(tmp), stream_token_secret="bench-root")
        registry = ProviderRegistry(settings)
        planes = PlaneActivities(registry, settings)
        provider = registry.get("local")
        cold: list[float] = []
        warm: list[float] = []
        floor: list[float] = []
        try:
            for i in range(rounds):
                lease_id = f"lease/bench/g{i}"
                spec = BoxSpec(lease_id=lease_id, workspace_id="bench", group_id=f"g{i}", epoch=1)
                session = await provider.create(spec, f"{lease_id}#{uuid.uuid4().hex}")
                envelope = Envelope(**session.serialize_state().model_dump())
                await session.exec(["true"])  # the box's namespace holder is up before timing
                request = DisplayStackRequest(backend="local", envelope=envelope, lease_id=lease_id, epoch=1)
                started = time.perf_counter()
                first = await planes.ensure_display_stack(request)
                cold.append(time.perf_counter() - started)
                assert not first.already_up
                for _ in range(warm_calls):
                    started = time.perf_counter()
                    again = await planes.ensure_display_stack(request)
                    warm.append(time.perf_counter() - started)
                    assert again.already_up and again.port == first.port
                    started = time.perf_counter()
                    await session.exec(["true"])
                    floor.append(time.perf_counter() - started)
                await provider.terminate(Envelope(**envelope.model_dump()))
        finally:
            await registry.aclose()
    cold_p50 = statistics.median(cold)
    warm_p50 = statistics.median(warm)
    print(f"isolation: {provider.isolation}  rounds: {rounds}  warm calls per round: {warm_calls}")  # type: ignore[attr-defined]
    print(f"cold bring-up     p50 {cold_p50 * 1000:8.1f} ms  max {max(cold) * 1000:8.1f} ms  (target <= 2000 ms)")
    print(f"already-up ensure p50 {warm_p50 * 1000:8.1f} ms  max {max(warm) * 1000:8.1f} ms  (target <= 100 ms)")
    print(f"baseline `true`   p50 {statistics.median(floor) * 1000:8.1f} ms  (one exec in the same box)")
    ok = cold_p50 <= TARGET_COLD_SECONDS and warm_p50 <= TARGET_WARM_SECONDS
    print("targets met" if ok else "TARGETS MISSED")
    return 0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def measure_attach(stack: BenchStack, n: int, warmup: int) -> int:
    """attach_viewer on a warm lease against a same-run warm acquire, through a worker in its own process."""
    from client import LeaseClient
    from worker import connect

    settings = Settings(
        data_dir=stack.data_dir,  # the worker's root secret: tokens minted here verify at the edges
        temporal_address=stack.temporal_address,
        task_queue=stack.task_queue,
        default_backend="local",
        holder_ttl_seconds=3600,
        idle_grace_seconds=3600,
        snapshots_enabled=False,
    )
    client = await connect(settings)
    await stack.wait_for_worker(client)
    leases = LeaseClient(client, settings)
    group = f"g-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    await leases.acquire(WORKSPACE, group, holder_id="turn-base")
    cold_lease = time.perf_counter() - started
    started = time.perf_counter()
    await leases.attach_viewer(WORKSPACE, group, viewer_id="viewer-1", plane="desktop")
    cold_desktop = time.perf_counter() - started
    started = time.perf_counter()
    await leases.attach_viewer(WORKSPACE, group, viewer_id="viewer-1", plane="terminal")
    cold_terminal = time.perf_counter() - started

    async def new_viewer() -> Any:
        viewer = f"viewer-{uuid.uuid4().hex[:8]}"
        cell = await leases.attach_viewer(WORKSPACE, group, viewer_id=viewer, plane="desktop")
        return cell

    ops: dict[str, Callable[[], Awaitable[Any]]] = {
        "acquire (warm, floor)": lambda: leases.acquire(WORKSPACE, group, holder_id="turn-base"),
        "attach desktop (same viewer)": lambda: leases.attach_viewer(
            WORKSPACE, group, viewer_id="viewer-1", plane="desktop"
        ),
        "attach terminal (same viewer)": lambda: leases.attach_viewer(
            WORKSPACE, group, viewer_id="viewer-1", plane="terminal"
        ),
        "attach desktop (new viewer)": new_viewer,
    }
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for i in range(warmup + n):
        for name, op in ops.items():
            started = time.perf_counter()
            result = await op()
            elapsed = time.perf_counter() - started
            if i >= warmup:
                samples[name].append(elapsed)
            if name.endswith("(new viewer)"):
                await leases.release(WORKSPACE, group, result.viewer_id, kind="viewer")
    await leases.drain(WORKSPACE, group, wait=True)
    floor = statistics.median(samples["acquire (warm, floor)"])
    print(f"attach_viewer on a warm lease: {n} rounds after {warmup} warm-up rounds, worker in its own process")
    print(
        f"first attach (untimed above): lease cold {cold_lease * 1000:.0f} ms, desktop plane up "
        f"{cold_desktop * 1000:.0f} ms, terminal plane up {cold_terminal * 1000:.0f} ms"
    )
    print(f"{'operation':32} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'x floor':>8}")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(
            f"{name:32} {p50 * 1000:8.1f} {_pct(values, 0.99) * 1000:8.1f} {max(values) * 1000:8.1f} "
            f"{p50 / floor:7.1f}x"
        )
    attach_p50 = statistics.median(samples["attach desktop (same viewer)"])
    verdict = "MET" if attach_p50 <= TARGET_ATTACH_P50_SECONDS else "MISSED"
    print(f"attach_viewer p50 {attach_p50 * 1000:.1f} ms <= {TARGET_ATTACH_P50_SECONDS * 1000:.0f} ms: {verdict}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="display-stack rounds (0: skip)")
    parser.add_argument("--warm", type=int, default=20, help="already-up ensures per round")
    parser.add_argument("--attach", type=int, default=200, help="attach_viewer rounds (0: skip)")
    parser.add_argument("--attach-warmup", type=int, default=10)
    args = parser.parse_args()
    try:
        if args.rounds > 0:
            asyncio.run(run(args.rounds, args.warm))
        if args.attach > 0:
            if args.rounds > 0:
                print()
            with bench_stack(task_queue="bench-planes") as stack:
                asyncio.run(measure_attach(stack, args.attach, args.attach_warmup))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
