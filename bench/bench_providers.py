"""Benchmark: what our provider layer adds over the cloud SDK call itself, per backend, against each fake
(and, as ``docker_engine``, the docker backend on a real engine: podman's Docker Engine API).

Run ``python bench/bench_providers.py [--rounds N] [--backends modal,docker,...] [--json]``.

For every backend with a conformance harness (``tests/unit/providers/harness_<backend>.py``) that
supplies the SDK-direct hooks, one box is created and then, interleaved round by round (the order
alternates every round so machine noise hits both alike), it times:

- ``exec``: ``BoxSession.exec(["true"])`` through our provider (argv handling, error translation,
  result shaping) next to ``harness.sdk_exec(instance_id)``, the very SDK call(s) the provider
  wraps, against the same fake;
- ``create``: ``Provider.create(spec, key)`` (lookup of an existing box by key, tags, readiness)
  next to ``harness.sdk_create()``; each created box is terminated outside the timed section.

Both sides pay for the fake service and its box (a bubblewrap process per command), so the ratio
of the medians isolates our layer: 1.00 means no measurable overhead. ``docker_engine`` starts its
own ``podman system service`` (and builds the box image if it is not current; needs podman, else
its row says so); there both sides pay for the real engine and runc. Reported per backend and op:
p50 / p99 in ms for ours and for the SDK, the ratio of the p50s, and the absolute difference.
Target (issue 8): no measurable latency added, i.e. exec ratio ≤ 1.10. Information, never a gate:
exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from sandbox.box import BoxSpec, Envelope  # noqa: E402
from tests.container_engine import podman  # noqa: E402
from tests.unit.providers.conftest import BACKENDS, needs_container_engine  # noqa: E402
from tests.unit.providers.harness import ProviderHarness  # noqa: E402

TARGET_EXEC_RATIO = 1.10


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(ms), "p99_ms": _pct(ms, 0.99), "n": len(ms)}


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = await call()
    return (time.perf_counter() - started) * 1000, value


def _spec() -> BoxSpec:
    group = f"bench-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/bench/{group}", workspace_id="bench", group_id=group, epoch=1)


async def bench_backend(backend: str, rounds: int, create_rounds: int) -> dict[str, Any] | None:
    module = importlib.import_module(f"tests.unit.providers.harness_{backend}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-") as tmp:
        # The fakes run real local boxes as an unprivileged uid, which must pass through (not list) it.
        os.chmod(tmp, 0o711)
        async with module.harness(Path(tmp)) as h:
            harness: ProviderHarness = h
            if harness.sdk_exec is None:
                return None
            provider = harness.provider
            spec = _spec()
            box = await provider.create(spec, f"{spec.lease_id}#1")
            sdk_exec = harness.sdk_exec
            for _ in range(3):  # warm both paths (imports, connections, caches)
                await box.exec(["true"])
                await sdk_exec(box.instance_id)
            ours: list[float] = []
            sdk: list[float] = []
            for i in range(rounds):
                order = [("ours", lambda: box.exec(["true"])), ("sdk", lambda: sdk_exec(box.instance_id))]
                for name, call in order if i % 2 == 0 else reversed(order):
                    ms, _ = await _timed(call)
                    (ours if name == "ours" else sdk).append(ms)
            result: dict[str, Any] = {
                "exec": {"ours": _summary(ours), "sdk": _summary(sdk)},
            }
            if harness.sdk_create is not None and create_rounds > 0:
                c_ours: list[float] = []
                c_sdk: list[float] = []
                sdk_create = harness.sdk_create
                for i in range(create_rounds):
                    s = _spec()

                    async def via_provider(s: BoxSpec = s) -> str:
                        return (await provider.create(s, f"{s.lease_id}#1")).instance_id

                    order2: list[tuple[str, Callable[[], Awaitable[str]]]] = [
                        ("ours", via_provider),
                        ("sdk", sdk_create),
                    ]
                    for name, call in order2 if i % 2 == 0 else reversed(order2):
                        ms, instance_id = await _timed(call)
                        (c_ours if name == "ours" else c_sdk).append(ms)
                        with contextlib.suppress(Exception):
                            await provider.terminate(
                                Envelope(backend_id=provider.backend_id, instance_id=instance_id, state={})
                            )
                result["create"] = {"ours": _summary(c_ours), "sdk": _summary(c_sdk)}
            for op in result.values():
                op["ratio_p50"] = op["ours"]["p50_ms"] / op["sdk"]["p50_ms"]
                op["added_p50_ms"] = op["ours"]["p50_ms"] - op["sdk"]["p50_ms"]
            return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [b for b in (args.backends.split(",") if args.backends else BACKENDS) if b != "local"]
    report: dict[str, Any] = {"rounds": args.rounds, "create_rounds": args.create_rounds, "backends": {}}
    for backend in wanted:
        if needs_container_engine(backend) and podman() is None:
            report["backends"][backend] = "podman is not installed (bash scripts/install)"
            if not args.json:
                _print(backend, report["backends"][backend])
            continue
        figures = await bench_backend(backend, args.rounds, args.create_rounds)
        report["backends"][backend] = figures if figures is not None else "no SDK-direct hooks in its harness"
        if not args.json:
            _print(backend, report["backends"][backend])
    return report


def _print(backend: str, figures: Any) -> None:
    if not isinstance(figures, dict):
        print(f"{backend:<13} {figures}")
        return
    for op, f in figures.items():
        verdict = ""
        if op == "exec":
            verdict = "MET" if f["ratio_p50"] <= TARGET_EXEC_RATIO else "MISSED"
        print(
            f"{backend:<13} {op:<7} ours p50 {f['ours']['p50_ms']:7.2f} ms p99 {f['ours']['p99_ms']:7.2f} | "
            f"sdk p50 {f['sdk']['p50_ms']:7.2f} ms p99 {f['sdk']['p99_ms']:7.2f} | "
            f"ratio {f['ratio_p50']:.2f}× (+{f['added_p50_ms']:.2f} ms) {verdict}",
            flush=True,
        )


def main() -> None:
    # Some SDKs log every HTTP request at INFO; the figures are what this prints.
    for name in ("httpx", "httpx2", "httpcore", "e2b", "daytona", "blaxel", "vercel"):
        logging.getLogger(name).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=60, help="exec calls per side (default 60)")
    parser.add_argument("--create-rounds", type=int, default=8, help="creates per side (default 8)")
    parser.add_argument("--backends", default="", help="comma-separated backends (default: every harness)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    try:
        report = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        sys.exit(130)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
