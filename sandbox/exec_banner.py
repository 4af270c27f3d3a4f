"""Parsing of the metadata banner that SDK-style ``exec`` responses put in front of a command's output.

A banner is a few metadata lines, the delimiter ``\\nOutput:\\n`` and then the body::

    Chunk ID: plain
    Wall time: 1.2040 seconds
    Process exited with code 0
    Output:
    42 pass

The header must carry exactly one status line: ``Process running with session ID <n>`` (the command
is still running in an exec session that stdin can be written to) or ``Process exited with code
<n>``. Anything ambiguous reads as ``invalid`` so callers fall back to other evidence rather than
trusting a spoofable line; a body that merely *contains* status text is never read as the status.

The rules reproduce the upstream behaviour pinned by ``upstream-vectors/paths_banners.json``,
including JavaScript's notion of a "safe integer" and its UTF-16 string length for the header cap.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "EXEC_BANNER_MAX_HEADER_CHARS",
    "MAX_SAFE_INTEGER",
    "ExecBanner",
    "ExecBannerAbsent",
    "ExecBannerExited",
    "ExecBannerInvalid",
    "ExecBannerRunning",
    "is_exec_session_lost_banner",
    "parse_exec_banner_exit_code",
    "parse_exec_banner_session_id",
    "parse_exec_response_banner",
    "strip_exec_banner",
]

EXEC_BANNER_MAX_HEADER_CHARS = 16384
"""A header longer than this (in UTF-16 code units, as upstream measures it) is not trusted."""

MAX_SAFE_INTEGER = 2**53 - 1
"""JavaScript's ``Number.MAX_SAFE_INTEGER``: larger ids cannot round-trip through upstream clients."""

_OUTPUT_DELIMITER = "\nOutput:\n"
_OUTPUT_LEADING = "Output:\n"
_DELIMITER_RE = re.compile(r"\r?\nOutput:\r?\n")
# Upstream reads lines with multiline (`m` flag) JavaScript regexes, whose `^` and `$` stop at every
# ECMAScript line terminator: LF, CR (alone too), U+2028 and U+2029, but not U+0085 or form feed.
_JS_LINE_TERMINATOR_RE = re.compile("[\n\r\u2028\u2029]")
# [0-9] rather than \d: Python's \d also matches non-ASCII digits such as U+0661.
_RUNNING_RE = re.compile(r"Process running with session ID ([0-9]+)")
_EXITED_RE = re.compile(r"Process exited with code (-?[0-9]+)")
_SESSION_LOST_RE = re.compile(r"(?:write_stdin failed: )?session not found: ([0-9]+)")
_METADATA_PREFIXES = (
    "Chunk ID:",
    "Wall time:",
    "Original token count:",
    "Output:",
    "Process running with session ID",
    "Process exited with code",
)
# Only these two start a status line; any other ``Process ...`` line is ordinary metadata.
_STATUS_PREFIXES = ("Process running with session ID", "Process exited with code")


class _BannerModel(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class ExecBannerAbsent(_BannerModel):
    """The text has no banner at all: it is plain output."""

    kind: Literal["absent"] = "absent"


class ExecBannerInvalid(_BannerModel):
    """The text looks like a banner but cannot be trusted (ambiguous, malformed or oversized)."""

    kind: Literal["invalid"] = "invalid"


class ExecBannerRunning(_BannerModel):
    """The command is still running in exec session ``session_id``."""

    kind: Literal["running"] = "running"
    session_id: int


class ExecBannerExited(_BannerModel):
    """The command finished with ``exit_code``."""

    kind: Literal["exited"] = "exited"
    exit_code: int


ExecBanner = Annotated[
    ExecBannerAbsent | ExecBannerInvalid | ExecBannerRunning | ExecBannerExited,
    Field(discriminator="kind"),
]
"""What :func:`parse_exec_response_banner` found; serialises as upstream ``{kind, sessionId|exitCode}``."""


def _utf16_length(text: str) -> int:
    # Upstream compares JavaScript string lengths, which count UTF-16 code units.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _js_lines(text: str) -> list[str]:
    # The lines a JavaScript multiline regex sees; "\r\n" yields an empty line between, as in JS.
    return _JS_LINE_TERMINATOR_RE.split(text)


def strip_exec_banner(raw: str, *, split_at: Literal["first", "last"] = "first") -> str:
    """Return the body of an exec response with its metadata banner removed.

    The banner ends at an LF-only ``\\nOutput:\\n`` delimiter. Channel A cuts at the first one
    (``split_at="first"``) so a body that itself prints ``Output:`` survives; recording cuts at the
    last one. Only a text with no such delimiter anywhere falls back to a leading ``Output:\\n``, so
    ``"Output:\\nA\\nOutput:\\nB"`` gives ``"B"`` as upstream does. CRLF delimiters are deliberately
    not recognised, so such text passes through unchanged, as does text without any delimiter.
    """
    index = raw.find(_OUTPUT_DELIMITER) if split_at == "first" else raw.rfind(_OUTPUT_DELIMITER)
    if index >= 0:
        return raw[index + len(_OUTPUT_DELIMITER) :]
    if raw.startswith(_OUTPUT_LEADING):
        return raw[len(_OUTPUT_LEADING) :]
    return raw


def parse_exec_response_banner(raw: str) -> ExecBanner:
    """Classify the banner at the start of an exec response as absent, invalid, running or exited.

    The header is everything before the first ``\\r?\\nOutput:\\r?\\n``. Without a delimiter the text
    is ``invalid`` when any line starts like banner metadata and ``absent`` otherwise. With one,
    the header must be at most 16384 UTF-16 units and contain exactly one well-formed status line;
    a line that starts ``Process running with session ID`` or ``Process exited with code`` but is
    not well formed makes it invalid (other ``Process ...`` lines are plain metadata). The number
    must be a JavaScript safe integer, and a running session id cannot be negative. Leading zeros
    are accepted (``007`` is 7). Lines end at LF, CR, U+2028 or U+2029, as in a JavaScript
    multiline regex.
    """
    match = _DELIMITER_RE.search(raw)
    if match is None:
        if any(line.startswith(_METADATA_PREFIXES) for line in _js_lines(raw)):
            return ExecBannerInvalid()
        return ExecBannerAbsent()
    header = raw[: match.start()]
    if _utf16_length(header) > EXEC_BANNER_MAX_HEADER_CHARS:
        return ExecBannerInvalid()
    found: list[ExecBannerRunning | ExecBannerExited] = []
    for line in _js_lines(header):
        if not line.startswith(_STATUS_PREFIXES):
            continue
        if running := _RUNNING_RE.fullmatch(line):
            session_id = int(running.group(1))
            if session_id > MAX_SAFE_INTEGER:
                return ExecBannerInvalid()
            found.append(ExecBannerRunning(session_id=session_id))
        elif exited := _EXITED_RE.fullmatch(line):
            exit_code = int(exited.group(1))
            if abs(exit_code) > MAX_SAFE_INTEGER:
                return ExecBannerInvalid()
            found.append(ExecBannerExited(exit_code=exit_code))
        else:
            return ExecBannerInvalid()
    if len(found) != 1:
        return ExecBannerInvalid()
    return found[0]


def parse_exec_banner_session_id(raw: str) -> int | None:
    """Return the exec session id when the banner says the process is still running, else ``None``."""
    banner = parse_exec_response_banner(raw)
    return banner.session_id if isinstance(banner, ExecBannerRunning) else None


def parse_exec_banner_exit_code(raw: str) -> int | None:
    """Return the exit code when the banner says the process exited, else ``None``."""
    banner = parse_exec_response_banner(raw)
    return banner.exit_code if isinstance(banner, ExecBannerExited) else None


def is_exec_session_lost_banner(output: str, session_id: int) -> bool:
    """Say whether ``output`` is exactly the "session not found" answer for ``session_id``.

    The whole text must be ``session not found: <n>``, optionally prefixed with ``write_stdin
    failed: ``, with no surrounding whitespace or newline, and ``<n>`` must be the decimal spelling
    of ``session_id`` (so ``01`` does not match 1). An id that is not a JavaScript safe integer
    (a non-integer, or beyond ±(2**53 - 1)) never matches, as upstream's ``Number.isSafeInteger``.
    """
    if isinstance(session_id, bool) or not isinstance(session_id, int):
        return False
    if abs(session_id) > MAX_SAFE_INTEGER:
        return False
    match = _SESSION_LOST_RE.fullmatch(output)
    return match is not None and match.group(1) == str(session_id)
