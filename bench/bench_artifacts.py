"""Benchmark: the artifact stores' put/get throughput, S3 against the bare obstore calls and the filesystem store.

Run ``python bench/bench_artifacts.py [--quick] [--json] [--rounds N] [--endpoint URL --bucket B]``.
Without ``--endpoint`` it starts moto's S3 server (``moto_server``, the dev extra) on a free port
and makes a bucket; with one it uses that server (credentials from ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``). Each round, interleaved so that load affects every side alike, moves
one object of ``--mb`` MiB (64; ``--quick``: 16) in 1 MiB chunks through:

1. **bare**: ``obstore.put_async`` of the same async chunk stream, with the store's part size and
   concurrency, then ``obstore.get_async(...).stream()`` (the same-run baseline: the library alone);
2. **s3**: :class:`store.s3_artifacts.S3ArtifactStore` ``put`` (SHA-256 while streaming, abort on
   failure), ``get`` alone (``s3_get_unverified``) and through :func:`store.artifacts.verified`
   (``s3_get``: the SHA-256 checked, as a restore does);
3. **filesystem**: :class:`store.artifacts.FilesystemArtifactStore` (``fsync`` and rename), with
   the same ``verified`` read, for scale.

It prints MiB/s p50 and the slowest round per side, the S3 store's time against the bare calls, and
MET/MISSED against the targets (S3 store put and unverified get each ≤ 1.2× the bare library). Benchmarks are
information, never a gate: the exit status is 0 whatever the figures (130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import obstore  # noqa: E402

from store.artifacts import FilesystemArtifactStore, verified  # noqa: E402
from store.s3_artifacts import _MAX_CONCURRENCY, PART_SIZE, S3ArtifactStore  # noqa: E402

RATIO_TARGET = 1.2
MiB = 1024 * 1024


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free port for the block's duration; yields its endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = Path(sys.executable).parent / "moto_server"
    found = str(binary) if binary.exists() else shutil.which("moto_server")
    if found is None:
        raise SystemExit("moto_server not found: install the dev extra (pip install -e '.[dev]') or pass --endpoint")
    proc = subprocess.Popen(
        [found, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def chunks(mb: int) -> AsyncIterator[bytes]:
    block = os.urandom(MiB)
    for i in range(mb):
        yield i.to_bytes(8, "big") + block[8:]


async def drain(stream: AsyncIterator[bytes]) -> int:
    return sum([len(chunk) async for chunk in stream])


async def measure(endpoint: str, bucket: str, key_id: str, secret: str, mb: int, rounds: int) -> dict[str, Any]:
    s3 = S3ArtifactStore(bucket, prefix="bench", endpoint=endpoint, access_key_id=key_id, secret_access_key=secret)
    raw = s3.object_store
    samples: dict[str, list[float]] = {
        f"{side}_{op}": [] for side in ("bare", "s3", "filesystem") for op in ("put", "get")
    }
    samples["s3_get_unverified"] = []
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
        fs = FilesystemArtifactStore(Path(tmp))
        for _ in range(rounds):
            key = f"round/{uuid.uuid4().hex}"
            start = time.perf_counter()
            await obstore.put_async(
                raw, key + ".bare", chunks(mb), chunk_size=PART_SIZE, max_concurrency=_MAX_CONCURRENCY
            )
            samples["bare_put"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result = await obstore.get_async(raw, key + ".bare")
            assert await drain(aiter(result.stream(min_chunk_size=MiB))) == mb * MiB
            samples["bare_get"].append(time.perf_counter() - start)

            for side, store in (("s3", s3), ("filesystem", fs)):
                start = time.perf_counter()
                stored = await store.put(key, chunks(mb))
                samples[f"{side}_put"].append(time.perf_counter() - start)
                start = time.perf_counter()
                read = verified(store.get(key), sha256=stored.sha256, size_bytes=stored.size_bytes)
                assert await drain(read) == mb * MiB
                samples[f"{side}_get"].append(time.perf_counter() - start)
                if side == "s3":
                    start = time.perf_counter()
                    assert await drain(store.get(key)) == mb * MiB
                    samples["s3_get_unverified"].append(time.perf_counter() - start)
                await store.delete(key)
            await obstore.delete_async(raw, key + ".bare")
    return {
        "params": {"mb": mb, "rounds": rounds, "part_size": PART_SIZE, "max_concurrency": _MAX_CONCURRENCY},
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "endpoint": endpoint},
        "samples": samples,
    }


def summarize(report: dict[str, Any]) -> list[str]:
    mb = report["params"]["mb"]
    samples = report["samples"]
    lines = [f"object {mb} MiB, {report['params']['rounds']} rounds, endpoint {report['host']['endpoint']}"]
    for name, values in samples.items():
        p50 = statistics.median(values)
        lines.append(
            f"  {name:<16} p50 {p50 * 1000:8.1f} ms  {mb / p50:7.1f} MiB/s   slowest {max(values) * 1000:8.1f} ms"
        )
    for mine, bare in (("s3_put", "bare_put"), ("s3_get_unverified", "bare_get")):
        ratio = statistics.median(samples[mine]) / statistics.median(samples[bare])
        verdict = "MET" if ratio <= RATIO_TARGET else "MISSED"
        lines.append(f"  {mine} / {bare}: {ratio:.2f}x (target <= {RATIO_TARGET}x): {verdict}")
    ratio = statistics.median(samples["s3_get"]) / statistics.median(samples["bare_get"])
    lines.append(f"  s3_get (SHA-256 verified, as a restore reads) / bare_get: {ratio:.2f}x (information)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB, 3 rounds")
    parser.add_argument("--mb", type=int, default=None, help="object size in MiB (default 64)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--endpoint", default=None, help="an S3 server to use instead of a local moto")
    parser.add_argument("--bucket", default=None, help="with --endpoint: an existing bucket")
    parser.add_argument("--json", action="store_true", help="print the raw samples as JSON too")
    args = parser.parse_args()
    mb = args.mb or (16 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 5)
    try:
        if args.endpoint:
            key_id = os.environ.get("AWS_ACCESS_KEY_ID", "")
            secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
            report = asyncio.run(measure(args.endpoint, args.bucket, key_id, secret, mb, rounds))
        else:
            with moto_server() as endpoint:
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10)
                report = asyncio.run(measure(endpoint, bucket, "bench", "bench-secret", mb, rounds))
    except KeyboardInterrupt:
        return 130
    print("\n".join(summarize(report)))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
