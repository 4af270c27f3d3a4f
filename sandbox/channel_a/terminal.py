"""Bounded terminal exec: run a user command in the box and buffer its output.

The command runs as a background job of the script, with output going to temp files, and the
script waits for it at most the timeout. On timeout the script answers at once with what the
command wrote so far and leaves it running (upstream behaviour: the caller gets exit code 124
while the tail goes on); the box's exec never kills it because the exec itself ends in time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sandbox.channel_a.git import bounded_wait
from sandbox.errors import ChannelAUnavailable
from sandbox.paths import shell_quote

__all__ = ["TERMINAL_FRAME", "TerminalOutput", "parse_terminal_output", "terminal_command"]

TERMINAL_FRAME: Final = b"__CHANNEL_A_TERMINAL_V1__\t"
_FRAME_RE: Final = re.compile(
    rb"__CHANNEL_A_TERMINAL_V1__\t([01])\t(-?[0-9]+)\t([0-9]+)\t([0-9]+)\t([0-9]+)\t([0-9]+)\n"
)


def terminal_command(command: str, *, timeout_seconds: float, max_output_bytes: int) -> str:
    """Shell that runs ``command`` with ``bash -c`` in the current directory, bounded in time.

    Prints one frame ``TERMINAL_V1\\t<timed_out>\\t<status>\\t<out size>\\t<err size>\\t<out n>\\t<err n>``
    followed by the first ``n`` bytes of stdout and of stderr (at most ``max_output_bytes`` each).
    """
    cap = int(max_output_bytes)
    return f"""\
ca_tmp=$(mktemp -d 2>/dev/null || mktemp -d -t channel-a) || exit 1
env -u BASH_ENV bash -c {shell_quote(command)} </dev/null >"$ca_tmp/out" 2>"$ca_tmp/err" &
ca_pid=$!
{bounded_wait("ca_pid", timeout_seconds)}head -c {cap} "$ca_tmp/out" >"$ca_tmp/out.snap"
head -c {cap} "$ca_tmp/err" >"$ca_tmp/err.snap"
printf '__CHANNEL_A_TERMINAL_V1__\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' "$ca_timed_out" "$ca_st" \
  "$(wc -c <"$ca_tmp/out" | tr -d ' ')" "$(wc -c <"$ca_tmp/err" | tr -d ' ')" \
  "$(wc -c <"$ca_tmp/out.snap" | tr -d ' ')" "$(wc -c <"$ca_tmp/err.snap" | tr -d ' ')"
cat "$ca_tmp/out.snap" "$ca_tmp/err.snap"
rm -rf "$ca_tmp"
"""


@dataclass(frozen=True)
class TerminalOutput:
    """What :func:`terminal_command` reported."""

    timed_out: bool
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool


def parse_terminal_output(payload: bytes) -> TerminalOutput:
    """Parse the frame of :func:`terminal_command`.

    Raises:
        ChannelAUnavailable: the frame is missing or cut short.
    """
    match = _FRAME_RE.search(payload)
    if match is None:
        raise ChannelAUnavailable("the terminal command's answer is missing its frame")
    timed_out = match.group(1) == b"1"
    status, out_size, err_size, out_n, err_n = (int(match.group(i)) for i in range(2, 7))
    body = payload[match.end() :]
    if len(body) < out_n + err_n:
        raise ChannelAUnavailable("the terminal command's answer was cut short")
    return TerminalOutput(
        timed_out=timed_out,
        exit_code=status,
        stdout=body[:out_n],
        stderr=body[out_n : out_n + err_n],
        stdout_truncated=out_size > out_n,
        stderr_truncated=err_size > err_n,
    )
