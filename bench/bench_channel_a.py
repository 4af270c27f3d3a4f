"""Benchmark: Channel-A ``fs_list`` and ``git_status`` next to ``find`` / ``git status`` run directly in the same box.

Run ``python bench/bench_channel_a.py [--rounds N] [--isolation auto|bubblewrap|process] [--json]``.
One run creates a ``local`` provider box (under ``/dev/shm`` when there is one, so file creation
is fast and disk noise stays out) and fills its workspace with:

- ``list/``: 20,000 empty files in one directory;
- ``repo/``: a git repository of 10,000 committed files in 100 directories, then 1,000 changes
  (600 modified, 100 deleted, 100 staged, 200 untracked).

Then, interleaved round by round (the order rotates every round) so that machine noise hits all
of them alike, it times four calls through the box's own ``exec``:

- ``find . -mindepth 1 -maxdepth 1 -printf '%y\\0%s\\0%.17T@\\0%m\\0%P\\0'`` in ``list/`` (the
  listing ``fs_list`` runs, printed directly) and ``ChannelA.fs_list("list", max_entries=20000)``
  (confinement checks, the listing, parsing, the sorted ``FsNode`` tree);
- ``git status --porcelain=v2 --branch -z`` in ``repo/`` and ``ChannelA.git_status("repo")``
  (confinement, repository checks, the same status, parsed into ``GitStatus``).

Reported: p50 and p90 per call in ms, the ratio of the Channel-A p50 to the direct p50, and the
median CPU per call split into this process (parsing, building results) and the box (the commands,
bwrap included, from the rusage of reaped children): CPU does not depend on how loaded the host is,
wall time does. Target (issue 7): both wall-time ratios <= 1.5. Information, never a gate: exit 0
whatever the figures (130 when interrupted).
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
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from providers.local import LocalBoxSession, LocalProvider  # noqa: E402
from sandbox.box import BoxSpec  # noqa: E402
from sandbox.channel_a import ChannelA  # noqa: E402

TARGET_RATIO = 1.5
LIST_ENTRIES = 20_000
REPO_FILES = 10_000
REPO_DIRS = 100
CHANGES = {"modified": 600, "deleted": 100, "staged": 100, "untracked": 200}
FIND_PRINTF = "%y\\0%s\\0%.17T@\\0%m\\0%P\\0"  # exactly what fs_list runs
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _git(repo: Path, *args: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(repo), **GIT_ENV}
    subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=repo, env=env, check=True, capture_output=True)


def fill_workspace(workspace: Path) -> None:
    """The flat listing directory and the repository with its 1,000 changes (see the module docstring)."""
    listing = workspace / "list"
    listing.mkdir()
    for i in range(LIST_ENTRIES):
        (listing / f"file-{i:05}.txt").touch()
    repo = workspace / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    paths = [repo / f"dir{i % REPO_DIRS:03}" / f"file-{i:05}.txt" for i in range(REPO_FILES)]
    for d in range(REPO_DIRS):
        (repo / f"dir{d:03}").mkdir()
    for i, path in enumerate(paths):
        path.write_text(f"line one of {i}\nline two\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "ten thousand files")
    at = 0
    for kind, count in CHANGES.items():
        for path in paths[at : at + count]:
            if kind == "deleted":
                path.unlink()
            elif kind == "untracked":
                path.with_name(path.stem + "-new.txt").write_text("new\n")
            else:
                path.write_text(path.read_text() + f"{kind}\n")
        if kind == "staged":
            _git(repo, "add", "--", *(str(p.relative_to(repo)) for p in paths[at : at + count]))
        at += count


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p90_ms": _pct(ms, 0.9), "min_ms": min(ms)}


async def measure(box: LocalBoxSession, rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved timings of the four calls, after checking that each returns what it should."""
    ca = ChannelA(box)

    async def direct_find() -> object:
        done = await box.exec(["find", ".", "-mindepth", "1", "-maxdepth", "1", "-printf", FIND_PRINTF], workdir="list")
        assert done.exit_code == 0 and done.stdout.count(b"\0") == 5 * LIST_ENTRIES
        return done

    async def fs_list() -> object:
        listed = await ca.fs_list("list", max_entries=LIST_ENTRIES)
        assert listed.entry_count == LIST_ENTRIES and not listed.truncated
        return listed

    async def direct_status() -> object:
        done = await box.exec(["git", "status", "--porcelain=v2", "--branch", "-z"], workdir="repo")
        assert done.exit_code == 0 and done.stdout.count(b"\0") > sum(CHANGES.values())
        return done

    async def git_status() -> object:
        status = await ca.git_status("repo")
        assert status.is_repo and len(status.files) == sum(CHANGES.values())
        return status

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "find": direct_find,
        "fs_list": fs_list,
        "git status": direct_status,
        "git_status": git_status,
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}
    own_cpu: dict[str, list[float]] = {name: [] for name in calls}
    box_cpu: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for n in range(warmup + rounds):
        if n == warmup:
            _note(f"measuring {rounds} rounds")
        for name in names[n % len(names) :] + names[: n % len(names)]:
            own, box_before = _cpu()
            started = time.perf_counter()
            result = await calls[name]()
            wall = time.perf_counter() - started
            own_after, box_after = _cpu()
            del result  # freeing it is the caller's cost, after the call, as in real use
            if n >= warmup:
                timings[name].append(wall)
                own_cpu[name].append(own_after - own)
                box_cpu[name].append(box_after - box_before)
    return {
        name: {
            **_summary(values),
            "own_cpu_ms": statistics.median(own_cpu[name]) * 1000,
            "box_cpu_ms": statistics.median(box_cpu[name]) * 1000,
        }
        for name, values in timings.items()
    }


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process and of its reaped children (the box's commands)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    box = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, box.ru_utime + box.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    base = Path(tempfile.mkdtemp(prefix="bench-channel-a-", dir=args.dir or base_dir))
    bubblewrap = {"auto": "auto", "bubblewrap": "always", "process": "never"}[args.isolation]
    provider = LocalProvider(base / "boxes", bubblewrap=bubblewrap)  # type: ignore[arg-type]
    try:
        spec = BoxSpec(lease_id="lease/bench/g", workspace_id="bench", group_id="g", epoch=1)
        box = await provider.create(spec, f"bench-channel-a:{uuid.uuid4()}")
        _note(f"filling {box.workspace_path} ({LIST_ENTRIES} entries, {REPO_FILES} files, 1000 changes)")
        started = time.monotonic()
        await asyncio.to_thread(fill_workspace, box.workspace_path)
        _note(f"filled in {time.monotonic() - started:.1f} s; isolation {provider.isolation}")
        figures = await measure(box, args.rounds, args.warmup)
        await provider.terminate(box.serialize_state())
    finally:
        await provider.aclose()
        shutil.rmtree(base, ignore_errors=True)
    return {"isolation": provider.isolation, "directory": str(base.parent), "calls": figures}


def _table(report: dict[str, Any]) -> str:
    calls = report["calls"]
    lines = [
        f"Channel-A vs direct commands in one local box ({report['isolation']} isolation, "
        f"{report['meta']['rounds']} interleaved rounds, workspace under {report['directory']})",
        f"host: {report['meta']['cores']} cores, Python {report['meta']['python']}; load average (1 min) "
        f"{report['meta']['loadavg_start']:.2f} at start, {report['meta']['loadavg_end']:.2f} at end",
        "",
        f"{'call':<46}{'p50 ms':>9}{'p90 ms':>9}{'min ms':>9}{'CPU here':>10}{'CPU box':>9}",
    ]
    labels = {
        "find": f"find -printf, {LIST_ENTRIES} entries (direct)",
        "fs_list": f"fs_list, {LIST_ENTRIES} entries",
        "git status": f"git status, {REPO_FILES} files / 1000 changes (direct)",
        "git_status": f"git_status, {REPO_FILES} files / 1000 changes",
    }
    for name, label in labels.items():
        s = calls[name]
        lines.append(
            f"{label:<46}{s['p50_ms']:>9.1f}{s['p90_ms']:>9.1f}{s['min_ms']:>9.1f}"
            f"{s['own_cpu_ms']:>10.1f}{s['box_cpu_ms']:>9.1f}"
        )
    lines.append("")
    for ours, direct in (("fs_list", "find"), ("git_status", "git status")):
        ratio = report["ratios"][ours]
        verdict = "MET" if ratio <= TARGET_RATIO else "MISSED"
        lines.append(f"{ours} / {direct} p50: {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    parser.add_argument("--isolation", choices=["auto", "bubblewrap", "process"], default="auto")
    parser.add_argument("--dir", type=Path, default=None, help="where the box lives (default /dev/shm, else $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    meta: dict[str, Any] = {
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg()[0],
    }
    try:
        report = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    meta["loadavg_end"] = os.getloadavg()[0]
    report["meta"] = meta
    calls = report["calls"]
    report["ratios"] = {
        "fs_list": calls["fs_list"]["p50_ms"] / calls["find"]["p50_ms"],
        "git_status": calls["git_status"]["p50_ms"] / calls["git status"]["p50_ms"],
    }
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
