"""Benchmark: desktop-stack bring-up in a local box, cold and already up.

Run ``python bench/bench_planes.py [--rounds N] [--warm N]``. Each round creates a fresh local box
(bubblewrap when available), times the first ``ensure_display_stack`` (cold: Xvfb, x11vnc and the
websockify edge come up) and then ``--warm`` ensures of the healthy stack (one exec of
``desktop-up`` that answers from its lock-free health check), then terminates the box. Figures are
medians over rounds (p50 and max of the warm calls over all rounds). As a baseline the bench also
times a bare ``true`` exec in the same box: the floor of any in-box operation.
Targets: cold bring-up <= 2 s, already-up ensure <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from activities.models import DisplayStackRequest  # noqa: E402
from activities.planes import PlaneActivities  # noqa: E402
from providers.base import BoxSpec, Envelope  # noqa: E402
from providers.registry import ProviderRegistry  # noqa: E402
from sandbox.settings import Settings  # noqa: E402
from workflows.models import BoxEnvelope  # noqa: E402

TARGET_COLD_SECONDS = 2.0
TARGET_WARM_SECONDS = 0.100


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
                envelope = BoxEnvelope(**session.serialize_state().model_dump())
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
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm", type=int, default=20)
    args = parser.parse_args()
    return asyncio.run(run(args.rounds, args.warm))


if __name__ == "__main__":
    sys.exit(main())
