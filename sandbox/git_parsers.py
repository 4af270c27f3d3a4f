"""Pure parsers for the git output Channel-A captures inside the box.

* :func:`parse_porcelain_v2` reads ``git status --porcelain=v2 --branch -z``.
* :func:`parse_numstat_z` reads ``git diff --numstat -z``.
* :func:`parse_unified_patch` reads the unified diff of one file section.

Each returns frozen pydantic models whose ``model_dump()`` is the upstream camelCase wire shape
(``headOid``, ``oldPath``, ``newStart`` ...). The parsers never raise on odd input: unknown records
are skipped and truncated ones yield empty fields, exactly as the upstream implementation does
(pinned by ``upstream-vectors/git_parsers.json``). Inputs are text decoded from git's UTF-8 output
with NUL record separators kept.

Two upstream quirks are kept on purpose because callers rely on them. ``parse_unified_patch`` is
meant for a single file section: fed a combined multi-file patch, the next file's ``---``/``+++``
header lines land in the open hunk as a deletion and an addition. And its ``status`` comes only from
``new file mode`` / ``deleted file mode`` / ``rename from|to`` lines, the last one winning, so a copy
stays ``modified``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = [
    "GitDiffHunk",
    "GitDiffLine",
    "GitDiffLineType",
    "GitFileStatus",
    "GitFileStatusCode",
    "GitPatchStatus",
    "GitStatus",
    "NumstatEntry",
    "ParsedPatch",
    "parse_numstat_z",
    "parse_porcelain_v2",
    "parse_unified_patch",
]

GitFileStatusCode = Literal[
    "added",
    "modified",
    "deleted",
    "renamed",
    "copied",
    "untracked",
    "ignored",
    "conflicted",
    "typechange",
]
GitPatchStatus = Literal["added", "modified", "deleted", "renamed"]
GitDiffLineType = Literal["context", "add", "del", "meta"]
"""``meta`` exists in the upstream schema but no parser produces it."""


class _WireModel(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class GitFileStatus(_WireModel):
    """One changed path in ``git status``: its index (staged) and worktree (unstaged) states."""

    path: str
    old_path: str | None = None
    index: GitFileStatusCode | None = None
    worktree: GitFileStatusCode | None = None
    is_conflicted: bool = False


class GitStatus(_WireModel):
    """The parsed ``git status``: branch headers plus the changed files in git's order."""

    is_repo: bool = True
    head: str | None = None
    head_oid: str | None = None
    detached: bool = False
    upstream: str | None = None
    ahead: int = 0
    behind: int = 0
    files: tuple[GitFileStatus, ...] = ()

    @classmethod
    def not_a_repo(cls) -> GitStatus:
        """The status reported for a directory that is not inside a git work tree."""
        return cls(is_repo=False)


class NumstatEntry(_WireModel):
    """One ``git diff --numstat`` record.

    ``additions``/``deletions`` are 0 for a binary file (both columns ``-``). A single ``-`` column,
    which git never writes, is ``None``: upstream yields ``NaN`` there, and ``NaN`` crosses JSON as
    ``null``. ``old_path`` is set only for renames and copies.
    """

    additions: int | None
    deletions: int | None
    binary: bool
    old_path: str | None = None
    new_path: str


class GitDiffLine(_WireModel):
    """One line of a hunk with its line numbers on the old and new side (``None`` where absent)."""

    type: GitDiffLineType
    old_no: int | None
    new_no: int | None
    text: str


class GitDiffHunk(_WireModel):
    """One ``@@ -a,b +c,d @@ header`` hunk and its lines."""

    old_start: int
    old_lines: int
    new_start: int
    new_lines: int
    header: str
    lines: tuple[GitDiffLine, ...] = ()


class ParsedPatch(_WireModel):
    """The hunks of a unified patch and the status its extended headers announce."""

    hunks: tuple[GitDiffHunk, ...] = ()
    status: GitPatchStatus = "modified"


# --------------------------------------------------------------------------- porcelain v2

_XY_CODES: dict[str, GitFileStatusCode] = {
    "A": "added",
    "M": "modified",
    "D": "deleted",
    "R": "renamed",
    "C": "copied",
    "T": "typechange",
    "U": "conflicted",
}
# JavaScript's `\s` (not Python's, which also has U+001C..U+001F and U+0085 but lacks U+FEFF).
_JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
# Upstream searches the record for `+A` and `-B` split by any run of whitespace, unanchored.
_BRANCH_AB_RE = re.compile(rf"\+([0-9]+)[{_JS_SPACE}]+-([0-9]+)")


def _xy(xy: str, position: int) -> GitFileStatusCode | None:
    return _XY_CODES.get(xy[position]) if len(xy) > position else None


def _fields_after(record: str, count: int) -> str:
    # The path is everything after the first `count` space-separated fields; it may hold spaces.
    parts = record.split(" ", count)
    return parts[count] if len(parts) > count else ""


def parse_porcelain_v2(text: str) -> GitStatus:
    """Parse ``git status --porcelain=v2 --branch -z`` output into a :class:`GitStatus`.

    Records are split on NUL. ``# branch.oid`` (``(initial)`` means no commit yet), ``# branch.head``
    (``(detached)`` sets ``detached``, which later headers do not clear), ``# branch.upstream`` and
    ``# branch.ab`` fill the branch fields; the latter is read from the first ``+A`` and ``-B``
    separated by whitespace anywhere in the record (no match leaves ahead and behind at 0).
    Entries ``1`` (path after 8 fields), ``2`` (path after 9 fields, the next record is the
    original path), ``u`` (path after 10 fields, always conflicted), ``?`` (untracked) and ``!``
    (ignored) become files; anything else is skipped.
    """
    records = text.split("\0")
    head: str | None = None
    head_oid: str | None = None
    detached = False
    upstream: str | None = None
    ahead = 0
    behind = 0
    files: list[GitFileStatus] = []
    i = 0
    while i < len(records):
        record = records[i]
        i += 1
        if record.startswith("# branch.oid "):
            oid = record[len("# branch.oid ") :]
            head_oid = None if oid == "(initial)" else oid
        elif record.startswith("# branch.head "):
            name = record[len("# branch.head ") :]
            if name == "(detached)":
                detached = True
                head = None
            else:
                head = name
        elif record.startswith("# branch.upstream "):
            upstream = record[len("# branch.upstream ") :]
        elif record.startswith("# branch.ab "):
            if ab := _BRANCH_AB_RE.search(record):
                ahead, behind = int(ab.group(1)), int(ab.group(2))
        elif record.startswith(("1 ", "2 ")):
            xy = record.split(" ", 2)[1]
            index, worktree = _xy(xy, 0), _xy(xy, 1)
            old_path: str | None = None
            if record.startswith("2 "):
                path = _fields_after(record, 9)
                if i < len(records):
                    old_path = records[i]
                    i += 1
            else:
                path = _fields_after(record, 8)
            files.append(
                GitFileStatus(
                    path=path,
                    old_path=old_path,
                    index=index,
                    worktree=worktree,
                    is_conflicted="U" in xy[:2],
                )
            )
        elif record.startswith("u "):
            files.append(
                GitFileStatus(
                    path=_fields_after(record, 10),
                    index="conflicted",
                    worktree="conflicted",
                    is_conflicted=True,
                )
            )
        elif record.startswith("? "):
            files.append(GitFileStatus(path=record[2:], worktree="untracked"))
        elif record.startswith("! "):
            files.append(GitFileStatus(path=record[2:], worktree="ignored"))
    return GitStatus(
        head=head,
        head_oid=head_oid,
        detached=detached,
        upstream=upstream,
        ahead=ahead,
        behind=behind,
        files=tuple(files),
    )


# --------------------------------------------------------------------------- numstat

# DOTALL: with -z a path may contain newlines, and upstream accepts them.
_NUMSTAT_RE = re.compile(r"([0-9]+|-)\t([0-9]+|-)\t(.*)", re.DOTALL)


def parse_numstat_z(text: str) -> tuple[NumstatEntry, ...]:
    """Parse ``git diff --numstat -z`` output into one :class:`NumstatEntry` per file.

    Each NUL record must look like ``<added>\\t<deleted>\\t<path>`` (counts are digits or ``-``);
    other records are skipped. An empty path marks a rename or copy whose old and new paths are
    the next two records; when the text ends before them, a missing old path is ``None`` and a
    missing new path ``""``, as upstream. ``-\\t-`` is a binary file.
    """
    records = text.split("\0")
    entries: list[NumstatEntry] = []
    i = 0
    while i < len(records):
        match = _NUMSTAT_RE.fullmatch(records[i])
        i += 1
        if match is None:
            continue
        added, deleted, path = match.groups()
        old_path: str | None = None
        if path == "":
            old_path = records[i] if i < len(records) else None
            path = records[i + 1] if i + 1 < len(records) else ""
            i += 2
        binary = added == "-" and deleted == "-"
        entries.append(
            NumstatEntry(
                additions=0 if binary else (None if added == "-" else int(added)),
                deletions=0 if binary else (None if deleted == "-" else int(deleted)),
                binary=binary,
                old_path=old_path,
                new_path=path,
            )
        )
    return tuple(entries)


# --------------------------------------------------------------------------- unified patch

# `[^\n\r\u2028\u2029]` is JavaScript's `.`: upstream's hunk header cannot end in a carriage return.
_HUNK_RE = re.compile(r"@@ -([0-9]+)(?:,([0-9]+))? \+([0-9]+)(?:,([0-9]+))? @@([^\n\r\u2028\u2029]*)")
# The characters JavaScript's String.prototype.trim removes.
_JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_STATUS_LINES: tuple[tuple[str, GitPatchStatus], ...] = (
    ("new file mode", "added"),
    ("deleted file mode", "deleted"),
    ("rename from", "renamed"),
    ("rename to", "renamed"),
)


class _HunkBuilder:
    __slots__ = ("old_start", "old_lines", "new_start", "new_lines", "header", "lines", "old_no", "new_no")

    def __init__(self, match: re.Match[str]) -> None:
        old_start, old_lines, new_start, new_lines, header = match.groups()
        self.old_start = int(old_start)
        self.old_lines = 1 if old_lines is None else int(old_lines)
        self.new_start = int(new_start)
        self.new_lines = 1 if new_lines is None else int(new_lines)
        self.header = header.strip(_JS_WHITESPACE)
        self.lines: list[GitDiffLine] = []
        self.old_no = self.old_start
        self.new_no = self.new_start

    def build(self) -> GitDiffHunk:
        return GitDiffHunk(
            old_start=self.old_start,
            old_lines=self.old_lines,
            new_start=self.new_start,
            new_lines=self.new_lines,
            header=self.header,
            lines=tuple(self.lines),
        )


def parse_unified_patch(text: str) -> ParsedPatch:
    """Parse the unified diff of one file into hunks with old/new line numbers and a status.

    Lines are split on LF only, so CRLF content keeps its ``\\r``. A line matching
    ``@@ -a[,b] +c[,d] @@ tail`` opens a hunk (a missing count means 1; ``header`` is the trimmed
    tail). Inside a hunk, ``+`` is an addition, ``-`` a deletion, a space a context line, and ``\\``
    (no newline at end of file) and anything else are skipped. The status starts as ``modified``
    and each ``new file mode``, ``deleted file mode`` or ``rename from|to`` line overrides it.
    """
    hunks: list[_HunkBuilder] = []
    current: _HunkBuilder | None = None
    status: GitPatchStatus = "modified"
    for line in text.split("\n"):
        if line.startswith("@@ "):
            if match := _HUNK_RE.fullmatch(line):
                current = _HunkBuilder(match)
                hunks.append(current)
                continue
        for prefix, line_status in _STATUS_LINES:
            if line.startswith(prefix):
                status = line_status
        if current is None or not line:
            continue
        marker = line[0]
        if marker == "+":
            current.lines.append(GitDiffLine(type="add", old_no=None, new_no=current.new_no, text=line[1:]))
            current.new_no += 1
        elif marker == "-":
            current.lines.append(GitDiffLine(type="del", old_no=current.old_no, new_no=None, text=line[1:]))
            current.old_no += 1
        elif marker == " ":
            current.lines.append(
                GitDiffLine(type="context", old_no=current.old_no, new_no=current.new_no, text=line[1:])
            )
            current.old_no += 1
            current.new_no += 1
    return ParsedPatch(hunks=tuple(hunk.build() for hunk in hunks), status=status)
