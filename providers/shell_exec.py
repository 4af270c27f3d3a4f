"""Byte-exact commands through exec APIs that answer text: the wrapper script, its report, directory listings.

Why: the command APIs of Daytona (``process.exec``), E2B (``commands.run``), Runloop
(``execute_async``), Blaxel (``process.exec``) and Vercel (``run_process``) return a command's
output as JSON or UTF-8 *text*, which cannot carry arbitrary bytes (and some merge stdout into
stderr or keep only the last lines). So a provider runs every command inside the small POSIX ``sh``
script :func:`exec_script` builds: the command's stdout and stderr go to files in the box, and the
script's own stdout is one report line carrying the exit status and both streams base64-encoded,
which :func:`parse_exec_report` turns back into an :class:`~sandbox.box.ExecResult`.

The report line (the last one holding the marker; anything before it, such as a login shell's
noise, is ignored)::

    SANDBOX_EXEC_V1 <exit code> <stdout field> <stderr field>

where each field is the stream's base64 (empty for an empty stream), ``@<path>`` for a stream
larger than ``spill_over`` bytes left in a file in the box (the caller downloads it, then removes
it with :meth:`ExecReport.cleanup_command`), or contains ``!`` when ``base64`` failed in the box
(the report is then refused). The script exits 0 once it printed its report; it exits
:data:`NO_WORKDIR` (97) without a report when the working directory does not exist (unless the
caller asks for that to be the command's own failure), and 125 when it cannot make its scratch
directory.

Per-backend differences are parameters of :func:`exec_script`: where the working directory and the
environment are applied (in the script or by the API), where stdin comes from (a scratch file the
script removes, ``/dev/null``, or the script's own stdin), a ``timeout -s KILL`` guard (E2B), and
the spill threshold for large streams (Runloop, Blaxel).

Limits: the box needs ``sh``, ``mktemp``, ``base64`` and ``tr``; an inlined stream travels as one
base64 line, so without ``spill_over`` the API must carry about 4/3 of the output in one answer.
The script uses ``/tmp`` for scratch files.

:data:`LIST_DIR_SCRIPT` and :func:`dir_listing` list one directory level with GNU ``find`` in the
box, for backends without a listing API.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
import secrets
import shlex
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from sandbox.box import DirEntry, ExecResult
from sandbox.errors import InvalidRequest, PathNotFound, ProviderError

__all__ = [
    "LIST_DIR_SCRIPT",
    "MARKER",
    "NO_WORKDIR",
    "ExecReport",
    "Spilled",
    "check_env_names",
    "dir_listing",
    "exec_script",
    "parse_dir_listing",
    "parse_exec_report",
    "stage_stdin",
]

MARKER: Final = "SANDBOX_EXEC_V1"
#: Exit status of the script, with no report, when the working directory does not exist.
NO_WORKDIR: Final = 97
_SCRATCH_FAILED: Final = 125
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: ``sh -c LIST_DIR_SCRIPT sh <dir>``: NUL-separated name, ``%y`` kind, size, octal mode of every
#: entry one level down; exit 2 when the path does not exist, 3 (with a message) when it is no directory.
LIST_DIR_SCRIPT: Final = (
    'test -d "$1" || { test -e "$1" && { echo "Not a directory" >&2; exit 3; }; exit 2; }; '
    'find "$1" -mindepth 1 -maxdepth 1 -printf "%f\\0%y\\0%s\\0%m\\0"'
)
_LIST_MISSING: Final = 2
_LIST_NOT_A_DIR: Final = 3
_KINDS: Final = {"f": "file", "d": "dir", "l": "symlink"}


def check_env_names(names: Iterable[str]) -> None:
    """Refuse environment variable names a shell (and ``env NAME=value``) cannot carry.

    Raises:
        InvalidRequest: a name that is not ``[A-Za-z_][A-Za-z0-9_]*``.
    """
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise InvalidRequest(f"invalid environment variable name {name!r}")


def exec_script(
    argv: Sequence[str],
    *,
    workdir: str | None = None,
    missing_workdir_is_result: bool = False,
    stdin_file: str | None = None,
    inherit_stdin: bool = False,
    env: Mapping[str, str] | None = None,
    kill_after: int | None = None,
    spill_over: int | None = None,
) -> str:
    """The ``sh`` script that runs ``argv`` and prints its report line (format in the module docstring).

    Args:
        argv: The command; it is shell-quoted into the script.
        workdir: Directory to run in (None: wherever the API starts the script).
        missing_workdir_is_result: When True a missing ``workdir`` is the command's own failure
            (``cd``'s exit status and message in the report); otherwise the script exits
            :data:`NO_WORKDIR` with no report.
        stdin_file: A scratch file in the box holding the command's input; the script deletes it.
        inherit_stdin: Without ``stdin_file``, let the command read the script's own stdin (the API
            sends the input) instead of ``/dev/null``.
        env: Variables set for the command with ``env --`` (for APIs that take none).
        kill_after: Run the command under ``timeout -s KILL <seconds>``, so it cannot outlive the
            API's own deadline for long.
        spill_over: Leave a stream larger than this many bytes in its file and report ``@<path>``.
    """
    if not argv:
        raise InvalidRequest("exec needs a non-empty argv")
    removal = f"rm -f -- {shlex.quote(stdin_file)}" if stdin_file else ""
    command = list(argv)
    if env:
        check_env_names(env)
        command = ["env", "--", *(f"{name}={value}" for name, value in env.items()), *command]
    if kill_after is not None:
        command = ["timeout", "-s", "KILL", str(kill_after), *command]
    run = shlex.join(command)
    lines: list[str] = []
    if workdir is not None and missing_workdir_is_result:
        run = f"(cd -- {shlex.quote(workdir)} && exec {run})"
    elif workdir is not None:
        give_up = f"{removal}; exit {NO_WORKDIR}" if removal else f"exit {NO_WORKDIR}"
        lines.append(f"cd -- {shlex.quote(workdir)} 2>/dev/null || {{ {give_up}; }}")
    if stdin_file:
        run += f" <{shlex.quote(stdin_file)}"
    elif not inherit_stdin:
        run += " </dev/null"
    base64_of = "{ base64 <\"$1\" || printf '!'; } | tr -d '\\n'"
    if spill_over is None:
        emit = f'if [ -s "$1" ]; then {base64_of}; fi'
        tidy = 'rm -rf -- "$__sbx_d"'
    else:
        # A spilled stream stays in the scratch directory (the caller downloads it, then runs
        # cleanup_command); otherwise the whole directory goes with one rm.
        emit = (
            f'if [ ! -s "$1" ]; then :; elif [ "$(wc -c <"$1")" -gt {int(spill_over)} ]; then printf \'@%s\' "$1"; '
            f"__sbx_spilled=1; else {base64_of}; fi"
        )
        tidy = '[ -n "${__sbx_spilled:-}" ] || rm -rf -- "$__sbx_d"'
    lines += [
        f"__sbx_d=$(mktemp -d /tmp/.sandbox-exec.XXXXXXXX) || exit {_SCRATCH_FAILED}",
        f'{run} >"$__sbx_d/o" 2>"$__sbx_d/e"',
        "__sbx_rc=$?",
        removal or ":",
        f"__sbx_emit() {{ {emit}; }}",
        f"printf '{MARKER} %s ' \"$__sbx_rc\"",
        "__sbx_emit \"$__sbx_d/o\"; printf ' '; __sbx_emit \"$__sbx_d/e\"; printf '\\n'",
        tidy,
        "exit 0",
    ]
    return "\n".join(lines) + "\n"


async def stage_stdin(stdin: bytes | None, write_file: Callable[[str, bytes], Awaitable[None]]) -> str | None:
    """Upload ``stdin`` to a fresh scratch file in the box with ``write_file``; its path, for ``stdin_file``.

    Returns None when there is no input (the command then reads ``/dev/null``).
    """
    if stdin is None:
        return None
    path = f"/tmp/.sandbox-stdin-{secrets.token_hex(8)}"
    await write_file(path, stdin)
    return path


@dataclass(frozen=True)
class Spilled:
    """A stream too large to inline, left in a file in the box."""

    path: str


@dataclass(frozen=True)
class ExecReport:
    """The report line of :func:`exec_script`: the exit status and both streams (inline or spilled)."""

    exit_code: int
    stdout: bytes | Spilled
    stderr: bytes | Spilled

    async def result(self, read_file: Callable[[str], Awaitable[bytes]] | None = None) -> ExecResult:
        """The command's result, downloading spilled streams with ``read_file``.

        Raises:
            ProviderError: a stream spilled and there is no ``read_file``.
        """
        streams: list[bytes] = []
        for stream in (self.stdout, self.stderr):
            if isinstance(stream, Spilled):
                if read_file is None:
                    raise ProviderError(f"the exec report left output in {stream.path} but nothing can read it")
                stream = await read_file(stream.path)
            streams.append(stream)
        return ExecResult(exit_code=self.exit_code, stdout=streams[0], stderr=streams[1])

    def cleanup_command(self) -> str | None:
        """A shell command line that deletes the spilled files (and their directory); None when none spilled."""
        paths = [s.path for s in (self.stdout, self.stderr) if isinstance(s, Spilled)]
        if not paths:
            return None
        # The directory is the wrapper's own mktemp directory: it holds only this command's streams.
        return f"rm -rf -- {shlex.quote(posixpath.dirname(paths[0]))}"


def parse_exec_report(text: str) -> ExecReport | None:
    """The report in the output of :func:`exec_script`, or None when there is none or it is malformed."""
    at = text.rfind(MARKER + " ")
    if at < 0:
        return None
    fields = text[at:].split("\n", 1)[0].split(" ")
    if len(fields) != 4:
        return None
    try:
        return ExecReport(exit_code=int(fields[1]), stdout=_stream(fields[2]), stderr=_stream(fields[3]))
    except (ValueError, binascii.Error):
        return None


def _stream(field: str) -> bytes | Spilled:
    if field.startswith("@/"):
        return Spilled(field[1:])
    return base64.b64decode(field, validate=True)


def parse_dir_listing(stdout: bytes, *, backend: str) -> list[DirEntry]:
    """The entries :data:`LIST_DIR_SCRIPT` printed, sorted by name (names not UTF-8 keep their bytes escaped).

    Raises:
        ProviderError: the output is not a listing.
    """
    fields = stdout.split(b"\0")[:-1]
    try:
        entries = [
            DirEntry(
                name=fields[i].decode(errors="surrogateescape"),
                kind=_KINDS.get(fields[i + 1].decode(), "other"),
                size=int(fields[i + 2]),
                mode=int(fields[i + 3], 8),
            )
            for i in range(0, len(fields) - 3, 4)
        ]
    except ValueError as err:
        raise ProviderError(f"{backend}: malformed directory listing: {err}") from err
    return sorted(entries, key=lambda e: e.name)


def dir_listing(done: ExecResult, path: str, *, backend: str) -> list[DirEntry]:
    """The entries of a :data:`LIST_DIR_SCRIPT` run, or the typed error its exit status means.

    Raises:
        PathNotFound: no such directory.
        InvalidRequest: the path is not a directory.
        ProviderError: the listing failed otherwise.
    """
    if done.exit_code == _LIST_MISSING:
        raise PathNotFound(f"no such directory: {path}", path=path)
    if done.exit_code == _LIST_NOT_A_DIR:
        raise InvalidRequest(f"{path!r} is not a directory")
    if done.exit_code != 0:
        raise ProviderError(f"{backend}: listing {path} failed: {done.stderr.decode(errors='replace').strip()}")
    return parse_dir_listing(done.stdout, backend=backend)
