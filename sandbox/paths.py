"""Path safety for Channel-A: what is refused before anything runs, and the in-box confinement scripts.

Two layers keep Channel-A inside the workspace:

1. :func:`assert_safe_rel_path` (and :func:`assert_safe_rel_path_or_root`) refuse, without touching
   the box, any path that is absolute, has a ``..`` segment or contains NUL. Accepted paths are
   returned with leading and trailing ``/`` removed and are otherwise unchanged.
2. The command run in the box proves confinement itself, because a lexically clean path can still
   leave the root through a symlink. :func:`confinement_script` and :func:`confined_directory_script`
   generate that bash text: resolve the candidate with ``realpath`` and require it to be the root or
   under ``<root>/``. Failures exit with the upstream codes and print the upstream markers
   (66 not found, 67 escape, 68 symlink), which :func:`classify_confinement` maps back.

Everything here is pure text in, text out; the caller runs the scripts through its exec primitive,
wrapped with :func:`bash_command`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sandbox.errors import ChannelAValidationError

__all__ = [
    "FS_CONFINED_OK_MARKER",
    "FS_ESCAPE_EXIT",
    "FS_ESCAPE_MARKER",
    "FS_NOT_FOUND_EXIT",
    "FS_NOT_FOUND_MARKER",
    "FS_SYMLINK_EXIT",
    "FS_SYMLINK_MARKER",
    "ConfinedOutput",
    "ConfinementOutcome",
    "assert_safe_rel_path",
    "assert_safe_rel_path_or_root",
    "bash_command",
    "classify_confinement",
    "confined_directory_script",
    "confinement_script",
    "join_root",
    "new_confinement_nonce",
    "parse_confined_output",
    "shell_quote",
]

FS_NOT_FOUND_EXIT = 66
FS_ESCAPE_EXIT = 67
FS_SYMLINK_EXIT = 68
FS_NOT_FOUND_MARKER = "__OPENGENI_FS_NOT_FOUND__"
FS_ESCAPE_MARKER = "__OPENGENI_FS_ESCAPE__"
FS_SYMLINK_MARKER = "__OPENGENI_FS_SYMLINK__"
FS_CONFINED_OK_MARKER = "__OPENGENI_FS_CONFINED_OK__"

_NONCE_RE = re.compile(r"[A-Za-z0-9]{1,64}")


# --------------------------------------------------------------------------- lexical checks


def assert_safe_rel_path_or_root(path: str) -> str:
    """Validate a workspace-relative path and return it normalised; ``""`` means the workspace root.

    A leading ``/`` (checked on the raw input, so ``/`` and ``//x`` too) raises
    :class:`ChannelAValidationError` "absolute paths are not allowed"; so does any ``..`` segment
    ("path traversal is not allowed") and, stricter than upstream, a NUL character, which no POSIX
    path can hold. Leading and trailing slashes are then stripped; ``.`` segments, doubled slashes,
    backslashes, ``~`` and whitespace are kept as they are, since the box resolves them itself.
    """
    if not isinstance(path, str):
        raise ChannelAValidationError(f"path must be a string, not {type(path).__name__}")
    if "\0" in path:
        raise ChannelAValidationError(f"path must not contain NUL characters: {path!r}", path=path)
    if path.startswith("/"):
        raise ChannelAValidationError(f"absolute paths are not allowed: {path}", path=path)
    normalised = path.strip("/")
    if ".." in normalised.split("/"):
        raise ChannelAValidationError(f"path traversal is not allowed: {path}", path=path)
    return normalised


def assert_safe_rel_path(path: str) -> str:
    """Validate a workspace-relative path that must name something below the root.

    Same rules as :func:`assert_safe_rel_path_or_root`, and additionally an empty path raises
    :class:`ChannelAValidationError` "path is required". The result never starts or ends with
    ``/``, never has a ``..`` segment, and validating it again returns it unchanged.
    """
    if path == "":
        raise ChannelAValidationError("path is required", path=path)
    return assert_safe_rel_path_or_root(path)


def join_root(root: str, rel: str) -> str:
    """Join a validated relative path onto the workspace root as the box should see it.

    Without a root the relative path is used as is (``"."`` for the root itself); otherwise the
    result is ``root`` or ``<root>/<rel>``, with a trailing slash on ``root`` not doubled.
    """
    if not root:
        return rel or "."
    if not rel:
        return root
    return f"{root.rstrip('/')}/{rel}"


# --------------------------------------------------------------------------- shell text


def shell_quote(value: str) -> str:
    """Quote ``value`` as one single-quoted bash word (``'`` becomes ``'\\''``).

    Raises:
        ChannelAValidationError: ``value`` contains NUL, which no shell argument can carry.
    """
    if "\0" in value:
        raise ChannelAValidationError(f"shell arguments cannot contain NUL characters: {value!r}")
    return "'" + value.replace("'", "'\\''") + "'"


def bash_command(script: str) -> str:
    """Wrap ``script`` the way Channel-A runs internal scripts: a bash that reads no profile or rc file."""
    return f"env -u BASH_ENV bash --noprofile --norc -c {shell_quote(script)}"


# Helpers shared by the generated scripts. They pass results in variables, and `opengeni_parent`
# trims with parameter expansion instead of `$(dirname ...)`, because `$(...)` drops trailing
# newlines, which are legal in file names and would let the check look at a different path.
# Every path handled is absolute (under the resolved root), so `opengeni_parent` ends at `/`.
_SHELL_PRELUDE = f"""\
opengeni_resolve() {{
  opengeni_resolved=$(realpath -- "$1" && printf x) || return 1
  opengeni_resolved=${{opengeni_resolved%x}}
  opengeni_resolved=${{opengeni_resolved%$'\\n'}}
}}
opengeni_under_root() {{
  case "$1/" in "${{opengeni_root%/}}"/*) return 0 ;; esac
  return 1
}}
opengeni_realpath_existing() {{
  if [ ! -e "$1" ] && [ ! -L "$1" ]; then return {FS_NOT_FOUND_EXIT}; fi
  opengeni_resolve "$1" || return {FS_NOT_FOUND_EXIT}
  opengeni_under_root "$opengeni_resolved" || return {FS_ESCAPE_EXIT}
}}
opengeni_parent() {{
  opengeni_path=${{opengeni_path%/*}}
  [ -n "$opengeni_path" ] || opengeni_path=/
}}
opengeni_fail() {{
  case "$1" in
    {FS_NOT_FOUND_EXIT}) printf '%s\\n' {FS_NOT_FOUND_MARKER} ;;
    {FS_ESCAPE_EXIT}) printf '%s\\n' {FS_ESCAPE_MARKER} ;;
    {FS_SYMLINK_EXIT}) printf '%s\\n' {FS_SYMLINK_MARKER} ;;
  esac
  exit "$1"
}}
"""


def _confinement_preamble(
    root: str, rel: str, *, parent: bool, allow_missing_parents: bool, reject_symlink: bool
) -> str:
    safe_rel = assert_safe_rel_path_or_root(rel)
    lines = [
        _SHELL_PRELUDE,
        f"opengeni_resolve {shell_quote(root or '.')} || opengeni_fail {FS_NOT_FOUND_EXIT}",
        "opengeni_root=$opengeni_resolved",
        f"opengeni_rel={shell_quote(safe_rel)}",
        'if [ -n "$opengeni_rel" ]; then opengeni_path=${opengeni_root%/}/$opengeni_rel; '
        "else opengeni_path=$opengeni_root; fi",
    ]
    if reject_symlink:
        lines.append(f'if [ -n "$opengeni_rel" ] && [ -L "$opengeni_path" ]; then opengeni_fail {FS_SYMLINK_EXIT}; fi')
    if parent:
        lines.append('if [ -n "$opengeni_rel" ]; then opengeni_parent; fi')
    if allow_missing_parents:
        # Walk up to the first existing ancestor; the root itself exists, so this stops there at worst.
        lines.append('while [ ! -e "$opengeni_path" ] && [ ! -L "$opengeni_path" ]; do opengeni_parent; done')
    lines.append('opengeni_realpath_existing "$opengeni_path" || opengeni_fail $?')
    lines.append("opengeni_target=$opengeni_resolved")
    return "\n".join(lines) + "\n"


def confinement_script(
    root: str,
    rel: str,
    *,
    parent: bool = False,
    allow_missing_parents: bool = False,
    reject_symlink: bool = False,
) -> str:
    """Return a bash script proving that ``rel`` resolves inside ``root`` in the box.

    ``rel`` is validated with :func:`assert_safe_rel_path_or_root` first (raising
    :class:`ChannelAValidationError`). The script resolves the root and the candidate with
    ``realpath`` and requires the candidate to exist (a dangling link counts) and to be the root or
    under ``<root>/``. For a mutation pass ``parent=True`` to check the containing directory,
    ``allow_missing_parents=True`` to check the first existing ancestor instead, and
    ``reject_symlink=True`` to refuse when ``rel`` itself is a symlink. It exits 66 printing
    ``__OPENGENI_FS_NOT_FOUND__``, 67 with ``__OPENGENI_FS_ESCAPE__`` or 68 with
    ``__OPENGENI_FS_SYMLINK__``; on success it prints ``__OPENGENI_FS_CONFINED_OK__`` and exits 0.
    """
    preamble = _confinement_preamble(
        root, rel, parent=parent, allow_missing_parents=allow_missing_parents, reject_symlink=reject_symlink
    )
    return preamble + f"printf '%s\\n' {FS_CONFINED_OK_MARKER}\n"


def _frame_markers(nonce: str) -> tuple[str, str]:
    if not _NONCE_RE.fullmatch(nonce):
        raise ValueError(f"confinement nonce must be 1-64 ASCII letters or digits, got {nonce!r}")
    return f"__OPENGENI_FS_CONFINED_{nonce}_OK__", f"__OPENGENI_FS_CONFINED_{nonce}_END__:"


def new_confinement_nonce() -> str:
    """A fresh random nonce for one :func:`confined_directory_script` attempt."""
    return secrets.token_hex(8)


def confined_directory_script(root: str, rel: str, command: str, nonce: str) -> str:
    """Return a bash script that runs ``command`` in the directory ``rel``, proven to be inside ``root``.

    Confinement is checked as in :func:`confinement_script`, then the script enters the directory
    with ``cd -P`` and re-checks the physical working directory, so a symlink swapped in between
    cannot move it outside. It prints ``__OPENGENI_FS_CONFINED_<nonce>_OK__`` and a newline, runs
    ``( command )``, and ends with ``__OPENGENI_FS_CONFINED_<nonce>_END__:<status>__`` right after the
    payload; :func:`parse_confined_output` reads that frame. Use a fresh nonce per attempt. A path
    that is missing or not a directory exits 66 before ``command`` runs.
    """
    ok_marker, end_prefix = _frame_markers(nonce)
    preamble = _confinement_preamble(root, rel, parent=False, allow_missing_parents=False, reject_symlink=False)
    return (
        preamble
        + "\n".join(
            [
                f'cd -P -- "$opengeni_target" 2>/dev/null || opengeni_fail {FS_NOT_FOUND_EXIT}',
                f"opengeni_resolve . || opengeni_fail {FS_NOT_FOUND_EXIT}",
                f'opengeni_under_root "$opengeni_resolved" || opengeni_fail {FS_ESCAPE_EXIT}',
                f"printf '%s\\n' {ok_marker}",
                f"( {command}\n)",
                "opengeni_status=$?",
                f"printf '%s' \"{end_prefix}${{opengeni_status}}__\"",
            ]
        )
        + "\n"
    )


@dataclass(frozen=True)
class ConfinedOutput:
    """The payload and exit status of a command run by :func:`confined_directory_script`."""

    payload: str
    status: int


def parse_confined_output(output: str, nonce: str) -> ConfinedOutput | None:
    """Extract the framed payload and status from the output of :func:`confined_directory_script`.

    Returns ``None`` when the frame for ``nonce`` is incomplete (the command never started, was
    cut off, or the output belongs to another attempt); only whitespace may follow the end marker.
    """
    ok_marker, end_prefix = _frame_markers(nonce)
    start = output.find(ok_marker + "\n")
    if start < 0:
        return None
    body_start = start + len(ok_marker) + 1
    end = output.rfind(end_prefix)
    if end < body_start:
        return None
    trailer = re.fullmatch(r"(-?[0-9]+)__\s*", output[end + len(end_prefix) :])
    if trailer is None:
        return None
    return ConfinedOutput(payload=output[body_start:end], status=int(trailer.group(1)))


class ConfinementOutcome(StrEnum):
    """What a confinement check reported; ``http_status`` is the Channel-A status it maps to."""

    CONFINED = "confined"
    NOT_FOUND = "not_found"
    ESCAPE = "escape"
    SYMLINK = "symlink"
    UNKNOWN = "unknown"

    @property
    def http_status(self) -> int | None:
        """404 for not found, 400 for an escape or symlink, ``None`` when no error applies or is known."""
        return {"not_found": 404, "escape": 400, "symlink": 400}.get(self.value)

    @property
    def message(self) -> str:
        """The user-facing error text upstream uses for this outcome."""
        return {
            "confined": "path is inside the workspace",
            "not_found": "path not found",
            "escape": "path resolves outside workspace",
            "symlink": "path must not be a symbolic link",
            "unknown": "workspace confinement check gave no answer",
        }[self.value]


_EXIT_OUTCOMES: dict[int | None, ConfinementOutcome] = {
    FS_NOT_FOUND_EXIT: ConfinementOutcome.NOT_FOUND,
    FS_ESCAPE_EXIT: ConfinementOutcome.ESCAPE,
    FS_SYMLINK_EXIT: ConfinementOutcome.SYMLINK,
}
_MARKER_OUTCOMES = {
    FS_NOT_FOUND_MARKER: ConfinementOutcome.NOT_FOUND,
    FS_ESCAPE_MARKER: ConfinementOutcome.ESCAPE,
    FS_SYMLINK_MARKER: ConfinementOutcome.SYMLINK,
    FS_CONFINED_OK_MARKER: ConfinementOutcome.CONFINED,
}


def classify_confinement(exit_code: int | None, output: str) -> ConfinementOutcome:
    """Map the exit code and output of a confinement script to a :class:`ConfinementOutcome`.

    A structured exit code wins: 66, 67 and 68 map directly, and 0 counts as confined only when the
    OK marker was printed. Without an exit code (some backends lose it) the first marker printed on
    a line of its own decides. Anything else is ``UNKNOWN``, which callers treat as unavailable.
    """
    if (by_exit := _EXIT_OUTCOMES.get(exit_code)) is not None:
        return by_exit
    lines = output.splitlines()
    if exit_code == 0:
        return ConfinementOutcome.CONFINED if FS_CONFINED_OK_MARKER in lines else ConfinementOutcome.UNKNOWN
    if exit_code is None:
        for line in lines:
            if line in _MARKER_OUTCOMES:
                return _MARKER_OUTCOMES[line]
    return ConfinementOutcome.UNKNOWN
