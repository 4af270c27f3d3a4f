"""The exec primitive of Channel-A: run generated bash in the box and read its answer.

Every operation is one bash script run through :meth:`BoxSession.exec` with the workspace root as
working directory, so the same code works on any box that can run bash. Scripts refer to the
root as ``.`` (it is resolved in the box with ``realpath``), which keeps them independent of where
the backend mounts the workspace.

Scripts report through *frames*: a marker line the script prints once it has proven what it needs,
followed by the payload. Output is bytes end to end; text is decoded only where a caller needs it.

Some links cap one exec's request and reply (a selfhosted machine answers over NATS, 1 MiB per
message). With a *reply budget* the runner spills instead: the script's stdout goes to a temp file
in the box and comes back in budget-sized ranges, and a large stdin is uploaded in pieces first,
so the script itself still runs exactly once (mutations are never repeated).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sandbox.box import BoundedExecReplies, BoxSession, ExecResult
from sandbox.control_protocol import NATS_DEFAULT_MAX_PAYLOAD, max_chunk_bytes
from sandbox.errors import (
    BoxNotFound,
    ChannelAConflict,
    ChannelANotFound,
    ChannelAPartialMutation,
    ChannelAUnavailable,
    ChannelAUnsupported,
    ChannelAValidationError,
    ExecTimeout,
    PathNotFound,
    ProviderError,
    Unsupported,
)
from sandbox.paths import (
    ConfinementOutcome,
    classify_confinement,
    confined_directory_script,
    new_confinement_nonce,
    parse_confined_output,
)

__all__ = [
    "DEFAULT_REPLY_BUDGET",
    "EXIT_CONFLICT",
    "EXIT_INVALID",
    "EXIT_OP_FAILED",
    "EXIT_PARTIAL",
    "MARK_CONFLICT",
    "MARK_INVALID",
    "MARK_OP_FAILED",
    "MARK_PARTIAL",
    "SCRIPT_PRELUDE",
    "SCRIPT_ROOT",
    "BoxRunner",
    "Capture",
    "capture_script",
    "parse_captures",
    "raise_for_confinement",
    "reply_budget_for",
]

SCRIPT_ROOT: Final = "."
"""How scripts name the workspace root: the exec's working directory."""

# Channel-A's own outcomes, next to the confinement codes 66/67/68 of sandbox.paths.
EXIT_CONFLICT: Final = 69
EXIT_INVALID: Final = 70
EXIT_OP_FAILED: Final = 71
EXIT_PARTIAL: Final = 72
MARK_CONFLICT: Final = "__CHANNEL_A_CONFLICT__"
MARK_INVALID: Final = "__CHANNEL_A_INVALID__"
MARK_OP_FAILED: Final = "__CHANNEL_A_OP_FAILED__"
MARK_PARTIAL: Final = "__CHANNEL_A_PARTIAL__"
_REASON_MARKS: Final = (MARK_CONFLICT, MARK_INVALID, MARK_OP_FAILED, MARK_PARTIAL)

SCRIPT_PRELUDE: Final = """\
ca_fail() {
  printf '%s\\t%s\\n' "$1" "$2"
  exit "$3"
}
"""
"""Shell helper for Channel-A scripts: ``ca_fail MARK 'reason' CODE`` reports an outcome and exits."""

_CAPTURE_HEADER: Final = b"__CHANNEL_A_CAPTURE_V1__\t"
_CAPTURE_RE: Final = re.compile(rb"__CHANNEL_A_CAPTURE_V1__\t([a-z_]+)\t(-?[0-9]+)\t([0-9]+)\n")
_REASON_RE: Final = re.compile(rb"^(__CHANNEL_A_[A-Z_]+__)\t?(.*)$", re.MULTILINE)
_DEFAULT_TIMEOUT: Final = 60.0
_CONFINED_ATTEMPTS: Final = 2

DEFAULT_REPLY_BUDGET: Final = max_chunk_bytes(NATS_DEFAULT_MAX_PAYLOAD)
"""Raw bytes one exec may carry each way over a NATS link at the server's default max payload."""
_SPILL_ERR_BYTES: Final = 16 * 1024  # stderr is only read for diagnostics
_SPILL_MARGIN: Final = 4096  # headers, the script in the request, JSON around the base64
_SPILL_RE: Final = re.compile(rb"__CHANNEL_A_SPILL_V1__\t(-?[0-9]+)\t([0-9]+)\t([0-9]+)\t([^\n]+)\n")

# Runs script $1 with stdout and stderr in a temp dir (given as $3 when stdin was uploaded to
# $3/in), prints a header and the first $2 bytes of stdout, and removes the dir unless more is left.
_SPILL_SCRIPT: Final = """\
ca_sp=$3
if [ -n "$ca_sp" ]; then
  exec 0<"$ca_sp/in" || exit 1
else
  ca_sp=$(mktemp -d 2>/dev/null || mktemp -d -t channel-a) || exit 1
fi
bash --noprofile --norc -c "$1" >"$ca_sp/out" 2>"$ca_sp/err"
ca_st=$?
exec 0</dev/null
ca_o=$(wc -c <"$ca_sp/out" | tr -d ' ')
ca_e=$(wc -c <"$ca_sp/err" | tr -d ' ')
printf '__CHANNEL_A_SPILL_V1__\\t%s\\t%s\\t%s\\t%s\\n' "$ca_st" "$ca_o" "$ca_e" "$ca_sp"
head -c "$2" "$ca_sp/out"
head -c ERR_BYTES "$ca_sp/err"
if [ "$ca_o" -le "$2" ]; then rm -rf -- "$ca_sp"; else rm -f -- "$ca_sp/err" "$ca_sp/in"; fi
""".replace("ERR_BYTES", str(_SPILL_ERR_BYTES))
_SPILL_READ: Final = 'tail -c +"$2" -- "$1/out" | head -c "$3"; if [ "$4" = 1 ]; then rm -rf -- "$1"; fi'
_UPLOAD_FIRST: Final = (
    'ca_sp=$(mktemp -d 2>/dev/null || mktemp -d -t channel-a) || exit 1; cat >"$ca_sp/in" || exit 1; printf %s "$ca_sp"'
)
_UPLOAD_MORE: Final = 'cat >>"$1/in"'
_DISCARD: Final = 'rm -rf -- "$1"'


def _bash_argv(script: str, *args: str) -> list[str]:
    # Internal scripts must not source a profile, an rc file or $BASH_ENV of the box.
    return [
        "env",
        "-u",
        "BASH_ENV",
        "bash",
        "--noprofile",
        "--norc",
        "-c",
        script,
        *(("channel-a", *args) if args else ()),
    ]


def reply_budget_for(session: BoxSession) -> int | None:
    """The reply budget Channel-A needs for a session: None (no cap) unless it answers in bounded messages.

    Selfhosted machines, and routed sessions (which may land on one), say so with
    :class:`~sandbox.box.BoundedExecReplies`; local boxes have no cap.
    """
    return session.exec_reply_budget if isinstance(session, BoundedExecReplies) else None


@dataclass(frozen=True)
class Capture:
    """The output and exit status of one command run by :func:`capture_script`."""

    status: int
    data: bytes


def capture_script(commands: Sequence[tuple[str, str]]) -> str:
    """Bash that runs each ``(name, command)`` into a temp file, then prints them length-framed.

    Each command's stdout is kept whole (stderr is dropped), then printed as
    ``__CHANNEL_A_CAPTURE_V1__\\t<name>\\t<status>\\t<bytes>\\n<bytes of output>``, so binary output
    and NUL-separated records need no escaping. Names are lowercase letters and ``_``.
    """
    lines = [
        "opengeni_cap=$(mktemp -d 2>/dev/null || mktemp -d -t channel-a) || exit 1",
        "trap 'rm -rf \"$opengeni_cap\"' EXIT",
    ]
    for name, command in commands:
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"capture name must be lowercase letters and _, not {name!r}")
        # A subshell, so that an `exit` in one command ends only that capture.
        lines.append(f'( {command}\n) >"$opengeni_cap/{name}" 2>/dev/null </dev/null')
        lines.append(f"opengeni_st_{name}=$?")
    for name, _ in commands:
        lines.append(
            f"printf '__CHANNEL_A_CAPTURE_V1__\\t{name}\\t%s\\t%s\\n' \"$opengeni_st_{name}\" "
            f'"$(wc -c <"$opengeni_cap/{name}" | tr -d " ")"'
        )
        lines.append(f'cat "$opengeni_cap/{name}"')
    return "\n".join(lines)


def parse_captures(data: bytes) -> dict[str, Capture]:
    """Read the frames printed by :func:`capture_script`.

    Raises:
        ChannelAUnavailable: a frame is malformed or cut short.
    """
    out: dict[str, Capture] = {}
    pos = data.find(_CAPTURE_HEADER)
    while 0 <= pos < len(data):
        match = _CAPTURE_RE.match(data, pos)
        if match is None:
            raise ChannelAUnavailable("malformed capture frame in the box's answer")
        size = int(match.group(3))
        start = match.end()
        if start + size > len(data):
            raise ChannelAUnavailable("the box's answer was cut short")
        out[match.group(1).decode()] = Capture(int(match.group(2)), data[start : start + size])
        pos = start + size
        if pos < len(data) and not data.startswith(_CAPTURE_HEADER, pos):
            raise ChannelAUnavailable("unexpected bytes between capture frames")
    return out


class BoxRunner:
    """Runs Channel-A scripts in one box and turns failures into Channel-A errors.

    Args:
        session: The box.
        workspace_root: Where the workspace is in the box; every script runs there.
        reply_budget: The most bytes one exec may carry each way (None: no cap); larger stdin and
            stdout are moved in pieces (see the module docstring).
    """

    def __init__(self, session: BoxSession, workspace_root: str, *, reply_budget: int | None = None) -> None:
        if reply_budget is not None and reply_budget < _SPILL_ERR_BYTES + 2 * _SPILL_MARGIN:
            raise ValueError(f"reply budget must be at least {_SPILL_ERR_BYTES + 2 * _SPILL_MARGIN} bytes")
        self.session = session
        self.workspace_root = workspace_root
        self.reply_budget = reply_budget

    async def run(self, script: str, *, stdin: bytes | None = None, timeout: float | None = None) -> ExecResult:
        """Run ``script`` with bash in the workspace root.

        Raises:
            ChannelAUnavailable: the command timed out or the provider failed transiently.
            ChannelAUnsupported: the box cannot run commands.
            BoxNotFound: the box is gone (passed through unchanged: it is typed proof).
        """
        if self.reply_budget is None:
            return await self._exec(_bash_argv(script), stdin, timeout)
        return await self._run_spilled(script, stdin, timeout, self.reply_budget)

    async def _run_spilled(self, script: str, stdin: bytes | None, timeout: float | None, budget: int) -> ExecResult:
        spill = ""
        try:
            if stdin and len(stdin) + len(script) + _SPILL_MARGIN > budget:
                spill = await self._upload(stdin, timeout, budget - _SPILL_MARGIN)
                stdin = None
            cap = budget - _SPILL_ERR_BYTES - _SPILL_MARGIN
            first = await self._exec(_bash_argv(_SPILL_SCRIPT, script, str(cap), spill), stdin, timeout)
            match = _SPILL_RE.match(first.stdout)
            if match is None:
                raise ChannelAUnavailable(f"the box could not run the command (exit {first.exit_code})")
            status, out_size, err_size = (int(match.group(i)) for i in (1, 2, 3))
            spill = match.group(4).decode("utf-8", "surrogateescape")
            body = first.stdout[match.end() :]
            shown = min(out_size, cap)
            out = bytearray(body[:shown])
            err = body[shown : shown + min(err_size, _SPILL_ERR_BYTES)]
            if len(out) != shown:
                raise ChannelAUnavailable("the box's answer was cut short")
            if out_size <= cap:
                spill = ""  # the box removed it
            while len(out) < out_size:
                step = budget - _SPILL_MARGIN
                last = len(out) + step >= out_size
                more = await self._exec(
                    _bash_argv(_SPILL_READ, spill, str(len(out) + 1), str(step), "1" if last else "0"), None, timeout
                )
                if last:
                    spill = ""
                if not more.stdout:
                    raise ChannelAUnavailable("the box's spilled answer vanished before it was read")
                out += more.stdout
            return ExecResult(exit_code=status, stdout=bytes(out[:out_size]), stderr=err)
        finally:
            if spill:
                with contextlib.suppress(Exception):
                    await self._exec(_bash_argv(_DISCARD, spill), None, timeout)

    async def _upload(self, data: bytes, timeout: float | None, step: int) -> str:
        """Store ``data`` as ``<new temp dir>/in`` in the box, ``step`` bytes per exec; the dir."""
        first = await self._exec(_bash_argv(_UPLOAD_FIRST), data[:step], timeout)
        spill = first.stdout.decode("utf-8", "surrogateescape")
        if first.exit_code != 0 or not spill.startswith("/"):
            raise ChannelAUnavailable(f"the box could not stage the input (exit {first.exit_code})")
        try:
            for at in range(step, len(data), step):
                more = await self._exec(_bash_argv(_UPLOAD_MORE, spill), data[at : at + step], timeout)
                if more.exit_code != 0:
                    raise ChannelAUnavailable(f"the box could not stage the input (exit {more.exit_code})")
        except BaseException:
            with contextlib.suppress(Exception):
                await self._exec(_bash_argv(_DISCARD, spill), None, timeout)
            raise
        return spill

    async def _exec(self, argv: list[str], stdin: bytes | None, timeout: float | None) -> ExecResult:
        try:
            return await self.session.exec(
                argv,
                workdir=self.workspace_root,
                timeout=timeout or _DEFAULT_TIMEOUT,
                stdin=stdin,
            )
        except BoxNotFound:
            raise
        except ExecTimeout as err:
            raise ChannelAUnavailable(f"the box did not answer within {err.timeout:g} s") from err
        except Unsupported as err:
            raise ChannelAUnsupported(f"this box cannot run commands: {err.message}") from err
        except PathNotFound as err:
            raise ChannelAUnavailable(f"the workspace root {self.workspace_root} is missing in the box") from err
        except ProviderError as err:
            raise ChannelAUnavailable(f"the box failed to run the command: {err.message}") from err

    async def run_confined(
        self, rel: str, command: str, *, timeout: float | None = None, display: str | None = None
    ) -> tuple[int, bytes]:
        """Run ``command`` inside the directory ``rel``, proven to be inside the workspace.

        Returns the command's exit status and its stdout (bytes). A frame lost on the way is
        retried once with a fresh nonce, as upstream does.

        Raises:
            ChannelANotFound: ``rel`` is missing or not a directory.
            ChannelAValidationError: ``rel`` resolves outside the workspace.
            ChannelAUnavailable: no complete answer after two attempts.
        """
        shown = rel if display is None else display
        for _ in range(_CONFINED_ATTEMPTS):
            nonce = new_confinement_nonce()
            result = await self.run(confined_directory_script(SCRIPT_ROOT, rel, command, nonce), timeout=timeout)
            # latin-1 maps every byte to one code point, so the payload converts back losslessly.
            text = result.stdout.decode("latin-1")
            framed = parse_confined_output(text, nonce)
            if framed is not None:
                return framed.status, framed.payload.encode("latin-1")
            raise_for_confinement(result, shown)
        raise ChannelAUnavailable(f"no complete answer from the box for {shown!r}")


def raise_for_confinement(result: ExecResult, path: str) -> None:
    """Raise the Channel-A error a failed confinement check or script outcome stands for.

    Confinement codes come first (66 not found, 67 escape, 68 symlink); then Channel-A's own
    codes (69 conflict, 70 invalid, 71 operation failed). Returns when the result shows none.
    """
    text = result.stdout.decode("utf-8", "replace")
    outcome = classify_confinement(result.exit_code, text)
    if outcome is ConfinementOutcome.NOT_FOUND:
        raise ChannelANotFound(f"{outcome.message}: {path}", path=path)
    if outcome in (ConfinementOutcome.ESCAPE, ConfinementOutcome.SYMLINK):
        raise ChannelAValidationError(f"{outcome.message}: {path}", path=path)
    reason = _reason(result)
    if result.exit_code == EXIT_CONFLICT:
        raise ChannelAConflict(f"{reason or 'conflict'}: {path}", path=path)
    if result.exit_code == EXIT_INVALID:
        raise ChannelAValidationError(f"{reason or 'invalid request'}: {path}", path=path)
    if result.exit_code in (EXIT_OP_FAILED, EXIT_PARTIAL):
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        message = f"{reason or 'operation failed'}: {path}" + (f" ({lines[-1]})" if lines else "")
        if result.exit_code == EXIT_PARTIAL:
            raise ChannelAPartialMutation(message, path=path, retryable=False)
        raise ChannelAConflict(message, path=path)


def _reason(result: ExecResult) -> str | None:
    for match in _REASON_RE.finditer(result.stdout):
        if match.group(1).decode() in _REASON_MARKS:
            return match.group(2).decode("utf-8", "replace") or None
    return None
