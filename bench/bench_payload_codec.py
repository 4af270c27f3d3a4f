"""Benchmark: what history encryption (sandbox/payload_codec.py) adds per payload and per exec update.

Run ``python bench/bench_payload_codec.py [--rounds N] [--iterations N] [--exec-n N] [--json]``.

1. **Per payload** (no server): the runtime's converter turning a value into a payload and back,
   with the codec (``data_converter_for(keys)``: JSON + AES-256-GCM encrypt, decrypt + JSON) and
   without it (``pydantic_data_converter``, the baseline), for an exec request (a command and ten
   environment variables) and exec results of 200 B, 64 KiB and 1 MiB of output. Rounds
   interleave the two so machine noise hits both alike; figures are the median and p99 of the
   per-round means, plus the codec's own cost (difference of medians).
2. **End to end**: ``exec true`` and an exec printing 64 KiB through the lease
   (``LeaseClient.exec``, an update) against a real dev server (``bench/stack.py``: SQLite file,
   as ``sandboxctl up``), one worker process with encryption and one without, each on its own task
   queue and lease, calls interleaved; p50 and p99 over N sequential calls. Outputs: none, 64 KB
   of text, and 64 KiB of NUL bytes: the SDK gzips gRPC messages, which shrinks plain JSON but
   not ciphertext, so the codec's cost grows with how compressible the output is.

Targets (MET/MISSED): codec exec latency p50 ≤ 1.10× the plain one (both outputs), and the codec
costs ≤ 100 µs per typical (≤ 1 KiB) payload round trip. Information, never a gate: exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.converter import DataConverter  # noqa: E402

from bench.stack import BenchStack, _worker_env, bench_stack  # noqa: E402
from client import LeaseClient  # noqa: E402
from sandbox.payload_codec import PayloadKeys, data_converter_for  # noqa: E402
from sandbox.settings import Settings  # noqa: E402
from worker import connect  # noqa: E402
from workflows.models.lease import ExecOutcome, ExecRequest

TARGET_EXEC_RATIO = 1.10
TARGET_SMALL_PAYLOAD_US = 100.0
PLAIN_QUEUE = "bench-codec-plain"
HOLD_SECONDS = 3600.0


def samples() -> dict[str, Any]:
    """Typical exec request and result values, by name."""
    env = {f"VAR_{i}": f"value-{i}-{'x' * 24}" for i in range(10)}
    request = ExecRequest(cmd=["sh", "-c", "cd /workspace && make test 2>&1 | tail -n 50"], env=env, epoch=3)

    def result(size: int) -> ExecOutcome:
        return ExecOutcome(exit_code=0, stdout="a" * size, stderr="", epoch=3)

    return {
        "exec request (cmd + 10 env)": request,
        "exec result, 200 B out": result(200),
        "exec result, 64 KiB out": result(64 * 1024),
        "exec result, 1 MiB out": result(1024 * 1024),
    }


@dataclass(frozen=True)
class PayloadFigure:
    name: str
    payload_bytes: int
    plain_us_p50: float
    plain_us_p99: float
    codec_us_p50: float
    codec_us_p99: float
    codec_added_us: float
    ratio: float


async def round_trip_us(converter: DataConverter, value: Any, iterations: int) -> float:
    """Mean microseconds of encode + decode of ``value`` through ``converter``."""
    kind = type(value)
    started = time.perf_counter_ns()
    for _ in range(iterations):
        payloads = await converter.encode([value])
        await converter.decode(payloads, [kind])
    return (time.perf_counter_ns() - started) / iterations / 1000


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.99 * len(ordered))) - 1]


async def measure_payloads(rounds: int, iterations: int) -> list[PayloadFigure]:
    codec = data_converter_for(PayloadKeys.generate("bench"))
    figures = []
    for name, value in samples().items():
        size = len((await pydantic_data_converter.encode([value]))[0].data)
        n = max(3, iterations if size < 100_000 else iterations // 50)
        plain: list[float] = []
        coded: list[float] = []
        for _ in range(rounds):
            plain.append(await round_trip_us(pydantic_data_converter, value, n))
            coded.append(await round_trip_us(codec, value, n))
        p50_plain, p50_coded = statistics.median(plain), statistics.median(coded)
        figures.append(
            PayloadFigure(
                name=name,
                payload_bytes=size,
                plain_us_p50=p50_plain,
                plain_us_p99=p99(plain),
                codec_us_p50=p50_coded,
                codec_us_p99=p99(coded),
                codec_added_us=p50_coded - p50_plain,
                ratio=p50_coded / p50_plain,
            )
        )
    return figures


@dataclass(frozen=True)
class ExecFigure:
    name: str
    n: int
    plain_ms_p50: float
    plain_ms_p99: float
    codec_ms_p50: float
    codec_ms_p99: float
    ratio: float


def _summary(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), p99(ms)


async def measure_exec(stack: BenchStack, keys: PayloadKeys, n: int) -> list[ExecFigure]:
    base: dict[str, Any] = {
        "data_dir": stack.data_dir,
        "temporal_address": stack.temporal_address,
        "default_backend": "local",
        "holder_ttl_seconds": HOLD_SECONDS,
        "idle_grace_seconds": HOLD_SECONDS,
    }
    coded = Settings(**base, task_queue=stack.task_queue, payload_keys=keys.to_json())
    plain = Settings(**{**base, "data_dir": stack.data_dir / "plain"}, task_queue=PLAIN_QUEUE, payload_encryption=False)
    variants: dict[str, LeaseClient] = {}
    for label, settings in (("codec", coded), ("plain", plain)):
        client = await connect(settings)
        await replace(stack, task_queue=settings.task_queue).wait_for_worker(client)  # each worker polls
        leases = LeaseClient(client, settings)
        await leases.acquire("bench", label, kind="turn", holder_id="h", backend="local")
        variants[label] = leases
    commands = {
        "exec true": ["true"],
        # Text that gzip shrinks 2.7:1 (number lines), like build logs.
        "exec printing 64 KB text": ["seq", "1", "12500"],
        # The extreme: gRPC's gzip shrinks plain NULs 200:1 on every hop; ciphertext never shrinks.
        "exec printing 64 KiB NULs": ["head", "-c", "65536", "/dev/zero"],
    }
    figures = []
    for name, cmd in commands.items():
        times: dict[str, list[float]] = {"codec": [], "plain": []}
        for i in range(n + 10):
            for label in ("codec", "plain") if i % 2 else ("plain", "codec"):
                started = time.perf_counter_ns()
                await variants[label].exec("bench", label, cmd)
                if i >= 10:  # warm-up rounds are not counted
                    times[label].append((time.perf_counter_ns() - started) / 1e6)
        (c50, c99), (p50, p99_) = _summary(times["codec"]), _summary(times["plain"])
        figures.append(ExecFigure(name, n, p50, p99_, c50, c99, c50 / p50))
    for label, leases in variants.items():
        await leases.release("bench", label, "h", kind="turn")
    return figures


def run_end_to_end(n: int, *, keep_data: bool = False) -> list[ExecFigure]:
    keys = PayloadKeys.generate("bench")
    worker_env = {"SANDBOX_PAYLOAD_KEYS": keys.to_json()}
    with bench_stack(task_queue="bench-codec", worker_env=worker_env, keep_data=keep_data) as stack:
        # Its own data dir: two workers' local providers must not share boxes (nor warm spares).
        plain_dir = stack.data_dir / "plain"
        plain_dir.mkdir(mode=0o711)
        env = _worker_env(plain_dir, stack.temporal_address, PLAIN_QUEUE, {"SANDBOX_PAYLOAD_ENCRYPTION": "false"})
        stack.runner.spawn("worker-plain", [sys.executable, "-m", "worker"], env=env)
        return asyncio.run(measure_exec(stack, keys, n))


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def render(payloads: list[PayloadFigure], execs: list[ExecFigure]) -> str:
    lines = [
        "per payload: encode + decode through the converter (µs, median / p99 of per-round means)",
        f"{'value':30} {'bytes':>9} {'plain p50':>10} {'p99':>8} {'codec p50':>10} {'p99':>8} {'added':>8} "
        f"{'ratio':>6}",
    ]
    for f in payloads:
        lines.append(
            f"{f.name:30} {f.payload_bytes:9,} {f.plain_us_p50:10.1f} {f.plain_us_p99:8.1f} "
            f"{f.codec_us_p50:10.1f} {f.codec_us_p99:8.1f} {f.codec_added_us:8.1f} {f.ratio:5.2f}×"
        )
    lines += ["", "end to end: lease exec update against a dev server (ms)"]
    lines.append(f"{'call':24} {'n':>5} {'plain p50':>10} {'p99':>8} {'codec p50':>10} {'p99':>8} {'ratio':>6}")
    for e in execs:
        lines.append(
            f"{e.name:24} {e.n:5} {e.plain_ms_p50:10.2f} {e.plain_ms_p99:8.2f} "
            f"{e.codec_ms_p50:10.2f} {e.codec_ms_p99:8.2f} {e.ratio:5.2f}×"
        )
    lines += ["", "targets"]
    for e in execs:
        lines.append(
            f"  {e.name}: codec p50 {e.ratio:.2f}× plain <= {TARGET_EXEC_RATIO}×  "
            + verdict(e.ratio <= TARGET_EXEC_RATIO)
        )
    for f in payloads:
        if f.payload_bytes <= 1024:
            met = f.codec_added_us <= TARGET_SMALL_PAYLOAD_US
            lines.append(
                f"  {f.name}: codec adds {f.codec_added_us:.1f} µs <= {TARGET_SMALL_PAYLOAD_US:g} µs  {verdict(met)}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--exec-n", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep-data", action="store_true", help="keep the stack's data dir and logs")
    args = parser.parse_args()
    try:
        print("bench: per-payload codec cost...", file=sys.stderr)
        payloads = asyncio.run(measure_payloads(args.rounds, args.iterations))
        print("bench: end-to-end exec through a dev server...", file=sys.stderr)
        execs = run_end_to_end(args.exec_n, keep_data=args.keep_data)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if args.json:
        print(json.dumps({"payloads": [asdict(f) for f in payloads], "exec": [asdict(e) for e in execs]}, indent=2))
    else:
        print(render(payloads, execs))


if __name__ == "__main__":
    main()
