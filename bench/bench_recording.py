"""Benchmark: finalizing a recording (streaming the box file into the artifact store) next to ``cp``.

Run ``python bench/bench_recording.py [--mib 256] [--exec-mib 32] [--rounds 5] [--json]``. One run
creates a local box (bubblewrap when available) under a temporary data dir, writes a ``--mib`` file
of incompressible bytes as a recording's box file (``<box>/tmp/og-rec-<id>.mp4``), and measures, per
round and interleaved:

1. ``cp`` of that file to a new file on the same file system (the baseline), then
2. the recording ``upload`` activity (called in this process, as the worker runs it) streaming the
   same file into the filesystem artifact store (durable: ``fsync`` + atomic rename), and
3. the process's peak RSS growth during (2) (``VmHWM`` after ``clear_refs`` reset it to ``VmRSS``),

and, for context, ``cp`` followed by an ``fsync`` of the copy: the store hashes (SHA-256) and
fsyncs every object before it renames it into place, which a plain ``cp`` does not, so the disk's
write speed bounds the upload while ``cp`` only fills the page cache; and the same upload into a
store that skips the ``fsync`` (``durable=False``, never used by the worker), which shows the
copy and hash themselves next to ``cp``.

Then the path non-local boxes take (``dd`` one chunk per exec) on a ``--exec-mib`` file, for
information. It prints MiB/s, the ratio upload/cp, and MET/MISSED against the targets (ratio ≥ 0.5,
RSS growth ≤ 64 MB). Benchmarks are information, never a gate: the exit status is 0 whatever the
figures (130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from activities.recording import RecordingActivities  # noqa: E402
from providers.local import LocalBoxSession, LocalProvider  # noqa: E402
from providers.registry import ProviderRegistry  # noqa: E402
from sandbox.box import (
    BoxSpec,  # noqa: E402
    Envelope,
)
from sandbox.settings import Settings  # noqa: E402
from store.artifacts import FilesystemArtifactStore, artifact_root  # noqa: E402
from store.database import Database  # noqa: E402
from store.recordings import RecordingStore  # noqa: E402
from workflows.models.recording import UploadInput, box_file_name

TARGET_RATIO = 0.5
TARGET_RSS_MB = 64.0
MIB = 1024 * 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _write_file(path: Path, mib: int) -> None:
    block = os.urandom(MIB)  # incompressible; repeating one random MiB is enough for a copy benchmark
    with path.open("wb") as f:
        for i in range(mib):
            f.write(block[i % 7 :] + block[: i % 7])
        f.flush()
        os.fsync(f.fileno())


async def _box(provider: LocalProvider) -> LocalBoxSession:
    spec = BoxSpec(lease_id="lease/bench/rec", workspace_id="bench", group_id="rec", epoch=1)
    session = await provider.create(spec, f"bench-recording-{uuid.uuid4().hex}")
    assert isinstance(session, LocalBoxSession)
    return session


async def run(mib: int, exec_mib: int, rounds: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-recording-", dir="/var/tmp"))
    settings = Settings(data_dir=root / "data")
    registry = ProviderRegistry(settings)
    db = Database.for_settings(settings)
    await db.migrate()
    artifacts = FilesystemArtifactStore(artifact_root(settings))
    activities = RecordingActivities(registry, RecordingStore(db), artifacts)
    volatile = FilesystemArtifactStore(root / "volatile-artifacts", durable=False)
    volatile_activities = RecordingActivities(registry, RecordingStore(db), volatile)
    provider = registry.get("local")
    assert isinstance(provider, LocalProvider)
    try:
        session = await _box(provider)
        envelope = Envelope(**session.serialize_state().model_dump())
        rid = f"bench-{uuid.uuid4().hex[:8]}"
        box_file = session.tmp_path / box_file_name(rid, "h264-mp4")
        log(f"writing a {mib} MiB box file (isolation: {provider.isolation})")
        await asyncio.to_thread(_write_file, box_file, mib)
        size = box_file.stat().st_size
        inp = UploadInput(
            backend="local",
            envelope=envelope,
            recording_id=rid,
            codec="h264-mp4",
            key=f"recordings/bench/s/{rid}.mp4",
            size_bytes=size,
        )
        cp_s: list[float] = []
        cp_sync_s: list[float] = []
        up_s: list[float] = []
        volatile_s: list[float] = []
        rss_mb: list[float] = []
        for r in range(rounds):
            target = root / f"cp-{r}.bin"
            started = time.perf_counter()
            subprocess.run(["cp", str(box_file), str(target)], check=True)
            cp_s.append(time.perf_counter() - started)
            target.unlink()
            # The store makes every object durable (fsync, then rename): cp followed by the same fsync.
            started = time.perf_counter()
            subprocess.run(["cp", str(box_file), str(target)], check=True)
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            cp_sync_s.append(time.perf_counter() - started)
            target.unlink()

            before = _status_kb("VmRSS")
            reset = _reset_peak_rss()
            started = time.perf_counter()
            result = await activities.upload(inp)
            up_s.append(time.perf_counter() - started)
            assert result.size_bytes == size
            if reset:
                rss_mb.append(max(0, _status_kb("VmHWM") - before) / 1024)
            await artifacts.delete(inp.key)

            started = time.perf_counter()
            result = await volatile_activities.upload(inp)
            volatile_s.append(time.perf_counter() - started)
            assert result.size_bytes == size
            await volatile.delete(inp.key)
            log(
                f"round {r + 1}: cp {cp_s[-1]:.3f}s, cp+fsync {cp_sync_s[-1]:.3f}s, upload {up_s[-1]:.3f}s, "
                f"upload without fsync {volatile_s[-1]:.3f}s"
            )

        exec_rate = None
        if exec_mib > 0:
            # The path of boxes whose files the worker cannot see: one `dd` chunk per exec.
            small_rid = f"{rid}-x"
            small = session.tmp_path / box_file_name(small_rid, "h264-mp4")
            await asyncio.to_thread(_write_file, small, exec_mib)
            chunks = activities._exec_chunks(inp.model_copy(update={"recording_id": small_rid}), exec_mib * MIB)
            started = time.perf_counter()
            got = 0
            async for chunk in chunks:
                got += len(chunk)
            elapsed = time.perf_counter() - started
            assert got == exec_mib * MIB
            exec_rate = exec_mib / elapsed
            log(f"exec-chunk path: {exec_mib} MiB in {elapsed:.2f}s")

        cp_med, up_med = statistics.median(cp_s), statistics.median(up_s)
        ratio = cp_med / up_med
        rss = max(rss_mb) if rss_mb else None
        return {
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
            "isolation": provider.isolation,
            "file_mib": mib,
            "rounds": rounds,
            "cp_mib_s": mib / cp_med,
            "cp_fsync_mib_s": mib / statistics.median(cp_sync_s),
            "ratio_upload_to_cp_fsync": statistics.median(cp_sync_s) / up_med,
            # What any upload that fsyncs could reach against cp on this disk.
            "durable_ceiling_ratio": cp_med / statistics.median(cp_sync_s),
            "upload_mib_s": mib / up_med,
            "upload_no_fsync_mib_s": mib / statistics.median(volatile_s),
            "ratio_upload_no_fsync_to_cp": cp_med / statistics.median(volatile_s),
            "ratio_upload_to_cp": ratio,
            "ratio_target": TARGET_RATIO,
            "ratio_met": ratio >= TARGET_RATIO,
            "rss_growth_mb": rss,
            "rss_target_mb": TARGET_RSS_MB,
            "rss_met": rss is not None and rss <= TARGET_RSS_MB,
            "exec_chunk_mib_s": exec_rate,
        }
    finally:
        await registry.aclose()
        await db.dispose()
        shutil.rmtree(root, ignore_errors=True)


def render(report: dict[str, Any]) -> str:
    def met(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    rss = report["rss_growth_mb"]
    lines = [
        f"recording finalize benchmark ({report['machine']}, isolation {report['isolation']})",
        f"  file                       {report['file_mib']} MiB, median of {report['rounds']} rounds",
        f"  cp (baseline)              {report['cp_mib_s']:8.1f} MiB/s",
        f"  upload to artifact store   {report['upload_mib_s']:8.1f} MiB/s",
        f"  ratio upload/cp            {report['ratio_upload_to_cp']:8.2f}x   target >= {TARGET_RATIO}x  "
        f"{met(report['ratio_met'])}",
        f"  cp + fsync (durable, info) {report['cp_fsync_mib_s']:8.1f} MiB/s  "
        f"ratio upload/(cp+fsync) {report['ratio_upload_to_cp_fsync']:.2f}x",
        f"  durable ceiling (info)     {report['durable_ceiling_ratio']:8.2f}x   (cp+fsync vs cp: the most any "
        "fsyncing upload can reach on this disk)",
        f"  upload without fsync (info){report['upload_no_fsync_mib_s']:8.1f} MiB/s  "
        f"ratio to cp {report['ratio_upload_no_fsync_to_cp']:.2f}x",
        "  peak RSS growth            "
        + (f"{rss:8.1f} MB    target <= {TARGET_RSS_MB:g} MB  {met(report['rss_met'])}" if rss is not None else "n/a"),
    ]
    if report["exec_chunk_mib_s"] is not None:
        lines.append(f"  exec-chunk path (info)     {report['exec_chunk_mib_s']:8.1f} MiB/s  (non-local boxes)")
    return "\n".join(lines)


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256, help="size of the box file (MiB)")
    parser.add_argument("--exec-mib", type=int, default=32, help="size for the exec-chunk path (0: skip)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        report = asyncio.run(run(args.mib, args.exec_mib, args.rounds))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
