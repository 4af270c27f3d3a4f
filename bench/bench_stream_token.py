"""Benchmark: stream-token mint and verify throughput against a bare HMAC in the same run.

Run ``python bench/bench_stream_token.py [--rounds N] [--iterations N]``. Each round times every
operation once, interleaved so that machine noise hits them alike; the figures are the median over
rounds (the best round is shown too). The baseline is the least any HMAC token check must do: ``hmac.new(key, msg,
sha256).digest()`` plus ``hmac.compare_digest``, over a message the size of a real token payload.
Target: at least 50,000 mint+verify per second.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sandbox.stream_token import (  # noqa: E402
    StreamTokenKey,
    derive_lease_key,
    mint_stream_token,
    verify_stream_token,
)

TARGET_MINT_VERIFY_PER_SECOND = 50_000
NOW = 1_700_000_000
FIELDS: dict[str, object] = {
    "workspace_id": "0b3f6a1e-7c2d-4e5f-8a9b-0c1d2e3f4a5b",
    "session_id": "1c4e7b2f-8d3e-4f60-9b0c-1d2e3f4a5b6c",
    "viewer_id": "2d5f8c3a-9e4f-4a71-ac1d-2e3f4a5b6c7d",
    "lease_epoch": 7,
}


def operations() -> dict[str, Callable[[], object]]:
    lease_key = derive_lease_key(b"r" * 32, "lease-bench", 7)
    key = StreamTokenKey(lease_key)
    token = key.mint_for(FIELDS, now=NOW)
    assert key.verify(token, now=NOW) is not None
    payload = token[4 : token.rfind(".")].encode("ascii")
    expected = hmac.new(lease_key, payload, hashlib.sha256).digest()

    def baseline() -> object:
        return hmac.compare_digest(hmac.new(lease_key, payload, hashlib.sha256).digest(), expected)

    def mint() -> object:
        return key.mint_for(FIELDS, now=NOW)

    def verify() -> object:
        return key.verify(token, now=NOW)

    def mint_verify() -> object:
        return key.verify(key.mint_for(FIELDS, now=NOW), now=NOW)

    def mint_verify_functions() -> object:
        # The module-level API with the raw key bytes (cached key object).
        return verify_stream_token(mint_stream_token(FIELDS, lease_key, now=NOW), lease_key, now=NOW)

    return {
        "baseline hmac+compare": baseline,
        "mint": mint,
        "verify": verify,
        "mint+verify (StreamTokenKey)": mint_verify,
        "mint+verify (functions)": mint_verify_functions,
    }


def per_second(op: Callable[[], object], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        op()
    return iterations / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()

    ops = operations()
    for op in ops.values():  # warm up
        per_second(op, 1_000)
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.rounds):
        for name, op in ops.items():
            samples[name].append(per_second(op, args.iterations))

    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["baseline hmac+compare"]
    print(f"python {sys.version.split()[0]}; median of {args.rounds} rounds x {args.iterations} ops")
    # The best round shows what the code does when the machine is not busy with something else.
    print(f"{'operation':32} {'ops/s':>12} {'us/op':>8} {'baseline/op':>12} {'best ops/s':>12}")
    for name, rate in medians.items():
        print(f"{name:32} {rate:12,.0f} {1e6 / rate:8.2f} {baseline / rate:11.1f}x {max(samples[name]):12,.0f}")
    combined = medians["mint+verify (StreamTokenKey)"]
    verdict = "meets" if combined >= TARGET_MINT_VERIFY_PER_SECOND else "MISSES"
    print(f"mint+verify: {combined:,.0f}/s {verdict} the target of {TARGET_MINT_VERIFY_PER_SECOND:,}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
