"""The computer behind every fake cloud service: fake boxes are real local boxes.

A fake service (Modal, Docker, E2B, ...) keeps its own state — ids in the service's format, tags,
status, snapshots — and asks one :class:`FakeMachine` to run commands and hold files for each of
its boxes. The machine's boxes are boxes of the :class:`~providers.local.LocalProvider`
(bubblewrap when it works: own PID namespace, host read-only, ``/tmp`` and HOME per box), so a
command in a fake box really runs, with real exit codes, output, timeouts and files, and the
workspace really sits at the service's workspace root (``/workspace``, ``/home/user``,
``/vercel/sandbox``).

File operations go through commands in the box (``cat``, ``find``), so they see exactly what
the box's processes see, absolute paths included.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path

from providers.local import WORKSPACE_ROOT, LocalBoxSession, LocalProvider
from sandbox.box import BoxSpec, DirEntry, ExecResult
from sandbox.errors import BoxNotFound

__all__ = ["FakeMachine"]

_WRITE_SCRIPT = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
_KINDS = {"f": "file", "d": "dir", "l": "symlink"}


class FakeMachine:
    """Runs the boxes of fake services as local boxes under ``root``.

    Args:
        root: Where the boxes live on the host (a temporary directory in tests).
        workspace_root: Where the workspace appears inside each box; paths that are not absolute
            are taken relative to it, and commands start there.
    """

    def __init__(self, root: Path, *, workspace_root: str = WORKSPACE_ROOT) -> None:
        self.workspace_root = posixpath.normpath(workspace_root)
        aliases = () if self.workspace_root == WORKSPACE_ROOT else (self.workspace_root,)
        self._provider = LocalProvider(root, workspace_aliases=aliases)
        self._boxes: dict[str, LocalBoxSession] = {}

    async def start(self, box_key: str, env: Mapping[str, str] | None = None) -> None:
        """Start the box for ``box_key`` (idempotent: a running box is kept as it is)."""
        if box_key in self._boxes:
            return
        spec = BoxSpec(
            lease_id=f"fake/{box_key}", workspace_id="fake", group_id=box_key, epoch=0, environment=dict(env or {})
        )
        self._boxes[box_key] = await self._provider.create(spec, box_key)

    def running(self, box_key: str) -> bool:
        """Whether the machine runs a box for ``box_key``."""
        return box_key in self._boxes

    async def exec(
        self,
        box_key: str,
        argv: Sequence[str],
        *,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the box and wait for it.

        Raises:
            BoxNotFound: no box runs for ``box_key``.
            ExecTimeout: the command ran past ``timeout`` and was killed.
        """
        box = self._box(box_key)
        return await box.exec(list(argv), workdir=self._absolute(workdir or "."), env=env, timeout=timeout, stdin=stdin)

    async def read(self, box_key: str, path: str) -> bytes:
        """The bytes of a file in the box.

        Raises:
            FileNotFoundError: no such file.
            IsADirectoryError: the path is a directory.
            BoxNotFound: no box runs for ``box_key``.
        """
        target = self._absolute(path)
        done = await self.exec(box_key, ["cat", "--", target])
        if done.exit_code != 0:
            raise _os_error(done.stderr, target)
        return done.stdout

    async def write(self, box_key: str, path: str, data: bytes) -> None:
        """Write a whole file in the box, creating its parent directories.

        Raises:
            IsADirectoryError: the path is a directory.
            PermissionError: the box may not write there.
            BoxNotFound: no box runs for ``box_key``.
        """
        target = self._absolute(path)
        done = await self.exec(box_key, ["sh", "-c", _WRITE_SCRIPT, "sh", target], stdin=data)
        if done.exit_code != 0:
            raise _os_error(done.stderr, target)

    async def list(self, box_key: str, path: str) -> list[DirEntry]:
        """One level of a directory in the box, sorted by name.

        Raises:
            FileNotFoundError: no such directory.
            NotADirectoryError: the path is not a directory.
            BoxNotFound: no box runs for ``box_key``.
        """
        target = self._absolute(path)
        done = await self.exec(
            box_key,
            ["sh", "-c", 'test -d "$1" || { test -e "$1" && echo "Not a directory" >&2; exit 2; }; '
             'find "$1" -mindepth 1 -maxdepth 1 -printf "%f\\0%y\\0%s\\0%m\\0"', "sh", target],
        )  # fmt: skip
        if done.exit_code != 0:
            raise _os_error(done.stderr or b"No such file or directory", target)
        fields = done.stdout.split(b"\0")[:-1]
        entries = [
            DirEntry(
                name=fields[i].decode(errors="surrogateescape"),
                kind=_KINDS.get(fields[i + 1].decode(), "other"),
                size=int(fields[i + 2]),
                mode=int(fields[i + 3], 8),
            )
            for i in range(0, len(fields) - 3, 4)
        ]
        return sorted(entries, key=lambda e: e.name)

    async def stop(self, box_key: str) -> None:
        """Kill every process of the box and delete it; a box that is not running is no error."""
        box = self._boxes.pop(box_key, None)
        if box is not None:
            await self._provider.terminate(box.serialize_state())

    async def aclose(self) -> None:
        """Stop every box and release the machine."""
        for key in list(self._boxes):
            await self.stop(key)
        await self._provider.aclose()

    def _box(self, box_key: str) -> LocalBoxSession:
        box = self._boxes.get(box_key)
        if box is None:
            raise BoxNotFound(f"the fake machine runs no box {box_key!r}")
        return box

    def _absolute(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.workspace_root, path))


def _os_error(stderr: bytes, path: str) -> OSError:
    text = stderr.decode(errors="replace").strip()
    if "Is a directory" in text:
        return IsADirectoryError(path)
    if "Not a directory" in text:
        return NotADirectoryError(path)
    if "Permission denied" in text or "Read-only file system" in text:
        return PermissionError(path)
    if "No such file" in text:
        return FileNotFoundError(path)
    return OSError(f"{path}: {text}")
