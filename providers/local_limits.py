"""Resource limits of local boxes: one cgroup per box for pids, memory and CPU (v2, or v1 controllers).

A box's processes all live in ``sandbox/<instance id>`` of each controller, so a fork bomb stops at
``pids.max``, a memory hog is killed by the kernel's OOM killer inside its own cgroup (the host
and other boxes keep their memory), and CPU is capped by a CFS quota. The provider moves every
process it starts for a box (the namespace holder and each exec) into the cgroup *before* the
box's command runs (bubblewrap waits on ``--block-fd`` meanwhile), so nothing a box runs escapes
it; children inherit it.

Hosts differ: cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``) gets ``pids.max``, ``memory.max``
with ``memory.swap.max=0`` and ``cpu.max``; a v1 host (controllers mounted under
``/sys/fs/cgroup/{pids,memory,cpu}``) gets ``pids.max``, ``memory.limit_in_bytes`` (and
``memory.memsw.limit_in_bytes`` when swap accounting is on) and ``cpu.cfs_quota_us``.
:func:`probe_cgroups` says which of them this host lets us write; ``sandboxctl providers check
local`` prints it.

Disk is not a cgroup resource: see ``providers/local_disk.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from sandbox.box_limits import BoxLimits

__all__ = ["BoxCgroup", "CgroupSupport", "probe_cgroups"]

_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
_PARENT: Final = "sandbox"
_CFS_PERIOD_US: Final = 100_000

Controller = Literal["pids", "memory", "cpu"]


@dataclass(frozen=True)
class CgroupSupport:
    """What this host lets the runtime do with cgroups.

    Attributes:
        version: 2 (unified), 1 (separate controller hierarchies) or None (none usable).
        controllers: The writable controllers among pids, memory and cpu.
        swap_accounting: Whether swap can be limited too (v1: ``memory.memsw``).
        problem: Why a controller is missing, when one is.
    """

    version: Literal[1, 2] | None
    controllers: frozenset[Controller] = field(default_factory=frozenset)
    swap_accounting: bool = False
    problem: str | None = None


def probe_cgroups(root: Path = _CGROUP_ROOT) -> CgroupSupport:
    """Find out which controllers this process can create box cgroups in (creates the parent group)."""
    if (root / "cgroup.controllers").is_file():
        try:
            available = set((root / "cgroup.controllers").read_text().split())
            parent = root / _PARENT
            parent.mkdir(exist_ok=True)
            wanted = sorted({"pids", "memory", "cpu"} & available)
            # Controllers must be enabled from the root down before child groups get their files.
            for directory in (root, parent):
                enabled = set((directory / "cgroup.subtree_control").read_text().split())
                missing = [c for c in wanted if c not in enabled]
                if missing:
                    (directory / "cgroup.subtree_control").write_text(" ".join("+" + c for c in missing))
            controllers = frozenset(
                c for c in wanted if c in set((parent / "cgroup.subtree_control").read_text().split())
            )
        except OSError as err:
            return CgroupSupport(version=2, problem=f"cannot write {root}: {err.strerror or err}")
        missing_text = ", ".join(sorted({"pids", "memory", "cpu"} - controllers))
        return CgroupSupport(
            version=2,
            controllers=controllers,  # type: ignore[arg-type]
            swap_accounting=True,
            problem=f"controllers not available: {missing_text}" if missing_text else None,
        )
    found: set[Controller] = set()
    problems: list[str] = []
    controller: Controller
    for controller in ("pids", "memory", "cpu"):
        base = root / controller
        if not (base / "cgroup.procs").is_file():
            problems.append(f"{controller}: not mounted")
            continue
        try:
            (base / _PARENT).mkdir(exist_ok=True)
            found.add(controller)
        except OSError as err:
            problems.append(f"{controller}: {err.strerror or err}")
    if not found:
        return CgroupSupport(version=None, problem="; ".join(problems) or "no cgroup controllers")
    swap = (root / "memory" / _PARENT / "memory.memsw.limit_in_bytes").exists()
    return CgroupSupport(
        version=1,
        controllers=frozenset(found),
        swap_accounting=swap,
        problem="; ".join(problems) or None,
    )


class BoxCgroup:
    """The cgroup(s) of one box: create with limits, add processes, read OOM kills, remove.

    Args:
        support: What :func:`probe_cgroups` found.
        name: The box's instance id (a fixed-format name: never a path).
    """

    def __init__(self, support: CgroupSupport, name: str, root: Path = _CGROUP_ROOT) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name in (".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        self.support = support
        self.name = name
        if support.version == 2:
            self._dirs: dict[str, Path] = {c: root / _PARENT / name for c in support.controllers}
        else:
            self._dirs = {c: root / c / _PARENT / name for c in support.controllers}

    @property
    def directories(self) -> list[Path]:
        """The cgroup directories (one on v2, one per controller on v1)."""
        return sorted(set(self._dirs.values()))

    def create(self, limits: BoxLimits) -> None:
        """Create the group(s) and write the limits (idempotent: an existing group gets them again).

        Raises:
            OSError: the cgroup file system refused.
        """
        for directory in self.directories:
            directory.mkdir(exist_ok=True)
        v2 = self.support.version == 2
        if "pids" in self._dirs and limits.pids_max is not None:
            _write(self._dirs["pids"] / "pids.max", str(limits.pids_max))
        if "memory" in self._dirs and limits.memory_max is not None:
            memory = self._dirs["memory"]
            if v2:
                _write(memory / "memory.max", str(limits.memory_max))
                with contextlib.suppress(OSError):
                    _write(memory / "memory.swap.max", "0")
            else:
                _write(memory / "memory.limit_in_bytes", str(limits.memory_max))
                if self.support.swap_accounting:
                    # memsw must be >= the memory limit at every step: raise it first, then equalise.
                    with contextlib.suppress(OSError):
                        _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_max))
                with contextlib.suppress(OSError):
                    _write(memory / "memory.swappiness", "0")
        if "cpu" in self._dirs and limits.cpu_max is not None:
            quota = max(1000, int(limits.cpu_max * _CFS_PERIOD_US))
            if v2:
                _write(self._dirs["cpu"] / "cpu.max", f"{quota} {_CFS_PERIOD_US}")
            else:
                _write(self._dirs["cpu"] / "cpu.cfs_period_us", str(_CFS_PERIOD_US))
                _write(self._dirs["cpu"] / "cpu.cfs_quota_us", str(quota))

    def add(self, pids: Iterable[int]) -> None:
        """Move processes into the group(s).

        Raises:
            OSError: a process cannot be moved (gone, or the group was removed).
        """
        for pid in pids:
            for directory in self.directories:
                _write(directory / "cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this box so far (0 if unknown)."""
        memory = self._dirs.get("memory")
        if memory is None:
            return 0
        name = "memory.events" if self.support.version == 2 else "memory.oom_control"
        try:
            text = (memory / name).read_text()
        except OSError:
            return 0
        m = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        return int(m[1]) if m else 0

    def pids(self) -> set[int]:
        """The processes in the group now."""
        out: set[int] = set()
        for directory in self.directories:
            with contextlib.suppress(OSError):
                out.update(int(x) for x in (directory / "cgroup.procs").read_text().split())
        return out

    def remove(self, *, timeout: float = 5.0) -> None:
        """Remove the group(s) once empty (the caller killed the box's processes); best effort."""
        deadline = time.monotonic() + timeout
        for directory in self.directories:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
