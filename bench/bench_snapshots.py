"""Benchmark: workspace capture and restore against ``tar | zstd`` (or ``tar | gzip``) of the same tree.

Run ``python bench/bench_snapshots.py [--quick] [--json] [--rounds N]``. One run builds a box of the
``local`` provider under a temporary directory holding 10,000 small files and one 100 MB file
(``--quick``: 2,000 files and 20 MB), then measures, round by round and interleaved so that load
and page cache affect both sides alike:

1. **baseline capture**: ``tar --format=pax --sort=name -cf - workspace home | zstd -3`` into a
   file, then ``fsync`` (``gzip -1`` when the zstd program is missing, or with ``--gzip``);
2. **capture**: the ``capture_workspace`` activity (fingerprint, ledger row, provider stream into the
   filesystem artifact store with SHA-256, ``fsync``, rename), as the lease's drain runs it;
3. **baseline restore**: ``zstd -dc archive | tar -xf -`` into an empty directory;
4. **restore**: ``provider.restore_workspace`` of the stored archive verified against its SHA-256
   (staging directory and swap), and the whole ``provision`` activity with that archive (create +
   restore + readiness probe).

``--dir`` puts the boxes and archives elsewhere (``/dev/shm`` takes the disk out of the figures).
It prints medians, the capture ratio against the baseline and MET/MISSED against the targets
(capture ≤ 1.2× the plain pipeline, restore ≤ 1.5 s). Benchmarks are information, never a gate: the
exit status is 0 whatever the figures (130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from temporalio.testing import ActivityEnvironment  # noqa: E402

from activities.boxes import BoxActivities  # noqa: E402
from activities.snapshots import SnapshotActivities  # noqa: E402
from providers.local import LocalBoxSession, LocalProvider  # noqa: E402
from providers.registry import ProviderRegistry  # noqa: E402
from providers.workspace_archive import ZSTD_LEVEL, zstd_available  # noqa: E402
from sandbox.box import Envelope  # noqa: E402
from sandbox.settings import Settings  # noqa: E402
from store.artifacts import FilesystemArtifactStore, artifact_root, verified  # noqa: E402
from store.database import Database  # noqa: E402
from store.snapshots import SnapshotLedger  # noqa: E402
from workflows.models.boxes import CaptureRequest, ProvisionInput
from workflows.models.lease import ArchiveRef

CAPTURE_RATIO_TARGET = 1.2
RESTORE_SECONDS_TARGET = 1.5


@dataclass(frozen=True)
class Params:
    """How big a tree and how many rounds."""

    files: int
    big_mb: int
    rounds: int


FULL = Params(files=10_000, big_mb=100, rounds=5)
QUICK = Params(files=2_000, big_mb=20, rounds=3)


@dataclass
class Report:
    """Every figure of one run (seconds unless named otherwise)."""

    params: dict[str, Any]
    host: dict[str, Any]
    tree_bytes: int = 0
    tree_entries: int = 0
    baseline_tool: str = ""
    baseline_archive_bytes: int = 0
    archive_bytes: int = 0
    archive_kind: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def build_tree(box: LocalBoxSession, files: int, big_mb: int) -> tuple[int, int]:
    """Fill the box: ``files`` small files in 100 directories, one ``big_mb`` MB file, a few links and modes."""
    ws = box.workspace_path
    total = 0
    for i in range(files):
        d = ws / "src" / f"pkg{i % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        data = (f"def f{i}():\n    return {i}\n" * (1 + i % 30)).encode()
        (d / f"mod{i}.py").write_bytes(data)
        total += len(data)
    block = os.urandom(1 << 20)
    with open(ws / "data.bin", "wb") as f:
        for i in range(big_mb):
            # Half random, half zeros: neither incompressible nor trivially compressible.
            f.write(block[: 1 << 19] + bytes(1 << 19) if i % 2 else os.urandom(1 << 20))
    total += big_mb << 20
    (ws / "empty").mkdir()
    os.symlink("data.bin", ws / "data.link")
    os.chmod(ws / "src", 0o750)
    (box.home_path / ".profile").write_text("export A=1\n")
    entries = sum(len(dirs) + len(names) for _, dirs, names in os.walk(ws))
    return total, entries


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its waited-for children (tar, zstd, sh)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def timed_shell(cmd: str) -> float:
    start = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True)
    return time.perf_counter() - start


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def measure(params: Params, use_gzip: bool, base: Path | None, progress: Callable[[str], None]) -> Report:
    report = Report(
        params=asdict(params),
        host={
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "zstandard": zstd_available(),
            "machine": platform.machine(),
            "dir": str(base or tempfile.gettempdir()),
        },
    )
    if not use_gzip and shutil.which("zstd") is None:
        use_gzip = True
    report.baseline_tool = "tar | gzip -1" if use_gzip else f"tar | zstd -{ZSTD_LEVEL}"
    compress, decompress = ("gzip -1", "gzip -dc") if use_gzip else (f"zstd -{ZSTD_LEVEL} -q", "zstd -dc -q")

    with tempfile.TemporaryDirectory(prefix="bench-snapshots-", dir=base) as tmp:
        root = Path(tmp)
        settings = Settings(data_dir=root / "data")
        db = Database.for_settings(settings)
        await db.migrate()
        providers = ProviderRegistry(settings)
        artifacts = FilesystemArtifactStore(artifact_root(settings))
        ledger = SnapshotLedger(db)
        boxes = BoxActivities(providers, artifacts)
        snapshots = SnapshotActivities(providers, ledger, artifacts)
        env = ActivityEnvironment()
        try:
            local = providers.get("local")
            assert isinstance(local, LocalProvider)
            provisioned = await env.run(
                boxes.provision,
                ProvisionInput(
                    lease_id="lease/bench/g",
                    workspace_id="bench",
                    group_id="g",
                    backend="local",
                    epoch=0,
                    idempotency_key="lease/bench/g/epoch-0",
                ),
            )
            box = await local.resume(Envelope(**provisioned.envelope.model_dump()))
            progress(f"building the tree: {params.files} files + {params.big_mb} MB")
            report.tree_bytes, report.tree_entries = await asyncio.to_thread(
                build_tree, box, params.files, params.big_mb
            )
            baseline_out = root / "baseline.archive"
            names = ("baseline_capture", "capture", "baseline_restore", "restore", "provision")
            report.samples = {k: [] for k in (*names, "baseline_capture_cpu", "capture_cpu")}
            ref: ArchiveRef | None = None
            for rnd in range(params.rounds + 1):  # round 0 warms the page cache and is not counted
                progress(f"round {rnd}/{params.rounds}")

                def baseline_capture() -> float:
                    start = time.perf_counter()
                    tar = f"tar -C {box.path} --format=pax --sort=name -cf - workspace home"
                    subprocess.run(["sh", "-c", f"{tar} | {compress} > {baseline_out}"], check=True)
                    fsync_file(baseline_out)
                    return time.perf_counter() - start

                cpu = cpu_seconds()
                b_cap = await asyncio.to_thread(baseline_capture)
                b_cap_cpu = cpu_seconds() - cpu
                report.baseline_archive_bytes = baseline_out.stat().st_size

                cpu = cpu_seconds()
                start = time.perf_counter()
                ref = await env.run(
                    snapshots.capture,
                    CaptureRequest(
                        backend="local",
                        envelope=provisioned.envelope,
                        lease_id="lease/bench/g",
                        workspace_id="bench",
                        group_id="g",
                        epoch=rnd,
                        reason="drain",
                    ),
                )
                cap = time.perf_counter() - start
                cap_cpu = cpu_seconds() - cpu
                report.archive_bytes, report.archive_kind = ref.size_bytes, ref.kind

                restore_dir = root / "baseline-restore"
                restore_dir.mkdir()
                b_res = await asyncio.to_thread(
                    timed_shell, f"{decompress} {baseline_out} | tar -C {restore_dir} -xf -"
                )
                await asyncio.to_thread(shutil.rmtree, restore_dir)

                target = await local.create(provisioned_spec(rnd), f"lease/bench/g/restore-{rnd}")
                start = time.perf_counter()
                await local.restore_workspace(
                    target.serialize_state(),
                    verified(artifacts.get(ref.key), sha256=ref.sha256, size_bytes=ref.size_bytes),
                )
                res = time.perf_counter() - start
                await local.terminate(target.serialize_state())

                start = time.perf_counter()
                restored = await env.run(
                    boxes.provision,
                    ProvisionInput(
                        lease_id="lease/bench/g",
                        workspace_id="bench",
                        group_id="g",
                        backend="local",
                        epoch=100 + rnd,
                        idempotency_key=f"lease/bench/g/epoch-{100 + rnd}",
                        restore=[ref],
                    ),
                )
                prov = time.perf_counter() - start
                assert restored.restore is not None and restored.restore.restored_from == ref.snapshot_id
                await local.terminate(Envelope(**restored.envelope.model_dump()))
                await artifacts.delete(ref.key)
                if rnd:
                    for name, value in (
                        ("baseline_capture", b_cap),
                        ("capture", cap),
                        ("baseline_restore", b_res),
                        ("restore", res),
                        ("provision", prov),
                        ("baseline_capture_cpu", b_cap_cpu),
                        ("capture_cpu", cap_cpu),
                    ):
                        report.samples[name].append(value)
        finally:
            await providers.aclose()
            await db.dispose()
    return report


def provisioned_spec(rnd: int) -> Any:
    from sandbox.box import BoxSpec

    return BoxSpec(lease_id="lease/bench/g", workspace_id="bench", group_id="g", epoch=1000 + rnd)


def render(report: Report) -> str:
    mib = 1 << 20
    ratio = report.median("capture") / report.median("baseline_capture")
    restore = report.median("restore")
    lines = [
        f"tree: {report.tree_entries} entries, {report.tree_bytes / mib:.1f} MiB; "
        f"archive {report.archive_bytes / mib:.1f} MiB ({report.archive_kind}), "
        f"baseline archive {report.baseline_archive_bytes / mib:.1f} MiB ({report.baseline_tool})",
        f"rounds: {report.params['rounds']} (medians below; first warm-up round dropped), in {report.host['dir']}",
        "",
        f"{'baseline capture (' + report.baseline_tool + ', fsync)':52} {report.median('baseline_capture'):8.3f} s",
        f"{'capture activity (stream → store, sha256, fsync)':52} {report.median('capture'):8.3f} s",
        f"{'baseline restore (decompress | tar -x)':52} {report.median('baseline_restore'):8.3f} s",
        f"{'restore_workspace (verified, staged, swapped)':52} {restore:8.3f} s",
        f"{'provision activity with restore (create+restore+probe)':52} {report.median('provision'):8.3f} s",
        "",
        f"{'capture CPU / baseline CPU (load-independent)':52} "
        f"{report.median('capture_cpu') / report.median('baseline_capture_cpu'):8.2f} x",
        f"{'capture / baseline':52} {ratio:8.2f} x  ≤ {CAPTURE_RATIO_TARGET}  "
        f"{'MET' if ratio <= CAPTURE_RATIO_TARGET else 'MISSED'}",
        f"{'restore':52} {restore:8.3f} s  ≤ {RESTORE_SECONDS_TARGET}  "
        f"{'MET' if restore <= RESTORE_SECONDS_TARGET else 'MISSED'}",
    ]
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    out = asdict(report)
    out["medians"] = {name: report.median(name) for name in report.samples}
    out["capture_ratio"] = report.median("capture") / report.median("baseline_capture")
    out["targets"] = {
        "capture_ratio": {"limit": CAPTURE_RATIO_TARGET, "met": out["capture_ratio"] <= CAPTURE_RATIO_TARGET},
        "restore_seconds": {"limit": RESTORE_SECONDS_TARGET, "met": report.median("restore") <= RESTORE_SECONDS_TARGET},
    }
    return out


def main() -> int:
    """Entry point of ``python bench/bench_snapshots.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small tree (2,000 files, 20 MB) and 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 5, quick 3)")
    parser.add_argument("--gzip", action="store_true", help="compare against tar | gzip -1 instead of zstd")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the boxes and archives live (default: the temp dir)"
    )
    args = parser.parse_args()
    params = QUICK if args.quick else FULL
    if args.rounds is not None:
        params = Params(files=params.files, big_mb=params.big_mb, rounds=max(1, args.rounds))

    def progress(message: str) -> None:
        print(f"… {message}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(measure(params, args.gzip, args.dir, progress))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(as_json(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
