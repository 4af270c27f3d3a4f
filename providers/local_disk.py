"""The disk quota of local boxes: a sparse ext4 image per box, loop-mounted on the box's ``data/``.

A box's workspace, home and /tmp all live on one file system of ``SANDBOX_LOCAL_DISK_MAX`` bytes,
so a disk fill inside the box ends with ``ENOSPC`` there while the host keeps its free space (the
image is sparse and mounted with ``discard``: it takes on the host what the box stores, at most
the quota). It is mounted ``nosuid,nodev``: a setuid file or a device node a box makes is inert.

The image lives next to the mount point (``<box>/disk.img`` and ``<box>/data``), so the box
directory's rename into ``.trash`` carries both; unmounting is lazy (``umount -l``), so a box
process still holding a file cannot keep ``terminate`` from finishing. A host that rebooted has
the images but not the mounts: :meth:`BoxDisk.ensure_mounted` mounts again before anything uses
the box.

Needs root, ``mkfs.ext4`` (e2fsprogs) and loop devices; :func:`disk_support` says whether this
host has them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

__all__ = ["BoxDisk", "disk_support"]

_MOUNT_OPTIONS: Final = "loop,nosuid,nodev,noatime,discard"


def disk_support() -> str | None:
    """None when disk quotas can be enforced here, else what is missing."""
    if os.geteuid() != 0:
        return "the worker is not root (loop mounts need root)"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt install e2fsprogs mount)"
    if not os.path.exists("/dev/loop-control"):
        return "the kernel offers no loop devices (/dev/loop-control is missing)"
    return None


class BoxDisk:
    """The image and mount point of one box.

    Args:
        box: The box directory (``disk.img`` and ``data/`` are inside it).
    """

    def __init__(self, box: Path) -> None:
        self.image = box / "disk.img"
        self.mount_point = box / "data"

    def make(self, size: int, owner: tuple[int, int]) -> None:
        """Create the sparse image with an ext4 file system whose root belongs to ``owner``.

        Raises:
            OSError: the image cannot be created or mkfs failed.
        """
        fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        _run(
            [
                "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "sandbox-box",
                "-E", f"lazy_itable_init=1,lazy_journal_init=1,root_owner={owner[0]}:{owner[1]}",
                str(self.image),
            ]
        )  # fmt: skip
        self.mount_point.mkdir(mode=0o755, exist_ok=True)

    def ensure_mounted(self) -> None:
        """Mount the image on ``data/`` unless it already is (after a reboot, or a crash mid-create).

        Raises:
            OSError: mount failed.
        """
        if os.path.ismount(self.mount_point):
            return
        self.mount_point.mkdir(mode=0o755, exist_ok=True)
        _run(["mount", "-o", _MOUNT_OPTIONS, str(self.image), str(self.mount_point)])

    def unmount(self) -> None:
        """Detach the file system (lazily: processes still holding files do not block it); best effort."""
        if os.path.ismount(self.mount_point):
            subprocess.run(["umount", "-l", str(self.mount_point)], capture_output=True, check=False)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        raise OSError(f"{argv[0]} failed: {message}")
