"""Benchmark: what isolating local boxes costs (bring-up and ``exec true``), against same-run baselines.

Measures, on this tree's ``LocalProvider`` with its default isolation (own namespaces, cgroups,
disk image, egress proxy):

- bring-up: ``create`` plus the first ``exec true`` (which starts the namespace holder);
- ``exec true`` on a warm box;

against a bare ``subprocess`` ``true`` measured in the same run and, with ``--baseline-tree DIR``
(a checkout of an earlier commit, e.g. ``git worktree add /tmp/before <commit>``), the same two
figures of that tree's provider, interleaved round by round so that load affects both alike.

    python bench/bench_local_isolation.py --rounds 30 --baseline-tree /tmp/before

Targets (issue 12): bring-up and ``exec true`` within 1.2x of the tree before isolation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import asyncio, json, sys, time, secrets, shutil, os
from pathlib import Path
from sandbox.box import BoxSpec, Envelope
from providers.local import LocalProvider

async def main(root, rounds, warm):
    provider = LocalProvider(Path(root), **({"warm_boxes": warm} if warm else {}))
    provider.validate_credentials()
    bring_up, execs = [], []
    for _ in range(rounds):
        spec = BoxSpec(lease_id="lease/bench/g", workspace_id="bench", group_id="g", epoch=1)
        t0 = time.perf_counter()
        box = await provider.create(spec, "bench:" + secrets.token_hex(8))
        await box.exec(["true"])
        bring_up.append(time.perf_counter() - t0)
        for _ in range(5):
            t0 = time.perf_counter()
            await box.exec(["true"])
            execs.append(time.perf_counter() - t0)
        await provider.terminate(box.serialize_state())
    await provider.aclose()
    print(json.dumps({"bring_up": bring_up, "exec": execs}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def _measure(tree: Path, rounds: int, warm: int = 0) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="bench-isolation-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o711)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(Path(tmp) / "boxes"), str(rounds), str(warm)],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def _bare(n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        times.append(time.perf_counter() - t0)
    return times


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    """Run the benchmark and print the table (or ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="boxes per variant and pass")
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout before isolation, measured the same way")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    figures: dict[str, dict[str, list[float]]] = {
        "isolated, warm box": {"bring_up": [], "exec": []},
        "isolated, cold": {"bring_up": [], "exec": []},
    }
    if args.baseline_tree:
        figures["before"] = {"bring_up": [], "exec": []}
    bare: list[float] = []
    for _ in range(args.passes):
        for name in figures:
            tree = args.baseline_tree if name == "before" else here
            assert tree is not None
            got = _measure(tree, args.rounds, warm=1 if name == "isolated, warm box" else 0)
            for key in ("bring_up", "exec"):
                figures[name][key] += got[key]
        bare += _bare(args.rounds * 5)
    summary = {
        name: {
            key: {"p50_ms": round(_p(v, 0.5), 2), "p99_ms": round(_p(v, 0.99), 2), "n": len(v)}
            for key, v in values.items()
        }
        for name, values in figures.items()
    }
    summary["bare_subprocess_true"] = {"exec": {"p50_ms": round(_p(bare, 0.5), 2), "p99_ms": round(_p(bare, 0.99), 2)}}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'variant':<24}{'bring-up p50':>14}{'p99':>10}{'exec true p50':>16}{'p99':>10}")
    for name in figures:
        s = summary[name]
        print(
            f"{name:<24}{s['bring_up']['p50_ms']:>12.1f}ms{s['bring_up']['p99_ms']:>8.1f}ms"
            f"{s['exec']['p50_ms']:>14.1f}ms{s['exec']['p99_ms']:>8.1f}ms"
        )
    print(f"{'bare subprocess true':<24}{'':>24}{summary['bare_subprocess_true']['exec']['p50_ms']:>14.1f}ms")
    if "before" in summary:
        for key, label in (("bring_up", "bring-up"), ("exec", "exec true")):
            for name in ("isolated, warm box", "isolated, cold"):
                ratio = summary[name][key]["p50_ms"] / summary["before"][key]["p50_ms"]
                verdict = "MET" if ratio <= 1.2 else "MISSED"
                print(f"{label} ({name}): {ratio:.2f}x the tree before isolation (target <= 1.2x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
