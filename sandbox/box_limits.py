"""Per-box resource limits of local boxes, as settings give them (pure: no cgroup I/O here).

``providers/local_limits.py`` enforces them with cgroups, ``providers/local_disk.py`` the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sandbox.errors import SandboxConfigError

__all__ = ["BoxLimits", "parse_size"]

_SIZE_RE: Final = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]i?b?|b)?", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str | int, *, setting: str) -> int | None:
    """Bytes from ``512M``, ``2G``, ``1.5GiB``, ``1048576``; ``0``, ``none`` or ``max`` mean no limit (None).

    Raises:
        SandboxConfigError: not a size.
    """
    if isinstance(text, int):
        return text or None
    raw = text.strip().lower()
    if raw in ("", "0", "none", "max", "unlimited"):
        return None
    m = _SIZE_RE.fullmatch(raw)
    if m is None:
        raise SandboxConfigError(f"{setting} must be a size such as 512M, 2G or 0 (no limit), not {text!r}")
    unit = (m["unit"] or "").rstrip("b").rstrip("i")
    return int(float(m["n"]) * _UNITS[unit])


@dataclass(frozen=True)
class BoxLimits:
    """The limits every local box gets (None = not limited).

    Attributes:
        pids_max: Processes and threads at once (``SANDBOX_LOCAL_PIDS_MAX``).
        memory_max: Bytes of memory, swap included (``SANDBOX_LOCAL_MEMORY_MAX``).
        cpu_max: CPUs' worth of time per second, e.g. 1.5 (``SANDBOX_LOCAL_CPU_MAX``).
        disk_max: Bytes of the box's workspace, home and /tmp together (``SANDBOX_LOCAL_DISK_MAX``).
    """

    pids_max: int | None = 512
    memory_max: int | None = 2 * 1024**3
    cpu_max: float | None = 2.0
    disk_max: int | None = 10 * 1024**3

    def __post_init__(self) -> None:
        if self.pids_max is not None and self.pids_max < 8:
            raise SandboxConfigError("SANDBOX_LOCAL_PIDS_MAX must be at least 8 (or 0: no limit)")
        if self.memory_max is not None and self.memory_max < 32 * 1024**2:
            raise SandboxConfigError("SANDBOX_LOCAL_MEMORY_MAX must be at least 32M (or 0: no limit)")
        if self.cpu_max is not None and not self.cpu_max >= 0.01:
            raise SandboxConfigError("SANDBOX_LOCAL_CPU_MAX must be at least 0.01 CPUs (or 0: no limit)")
        if self.disk_max is not None and self.disk_max < 64 * 1024**2:
            raise SandboxConfigError("SANDBOX_LOCAL_DISK_MAX must be at least 64M (or 0: no limit)")

    @property
    def needs_cgroups(self) -> bool:
        """Whether any cgroup controller is needed."""
        return any(v is not None for v in (self.pids_max, self.memory_max, self.cpu_max))

    def describe(self) -> dict[str, str]:
        """Human-readable values for ``providers check``."""

        def size(n: int | None) -> str:
            return "unlimited" if n is None else f"{n / 1024**2:.0f} MiB"

        return {
            "pids": "unlimited" if self.pids_max is None else str(self.pids_max),
            "memory": size(self.memory_max),
            "cpu": "unlimited" if self.cpu_max is None else f"{self.cpu_max:g} CPUs",
            "disk": size(self.disk_max),
        }
