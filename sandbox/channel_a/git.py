"""The git commands Channel-A runs in the box, and the assembly of their output into results.

Every command runs inside the directory the caller named (proven inside the workspace by
:meth:`BoxRunner.run_confined`), with git's environment overrides removed and a fixed ``-c`` set
so a box's configuration cannot change the output format. A repository counts only when its
top-level directory also resolves inside the workspace: a workspace nested in a bigger repository
(or a ``.git`` pointing elsewhere) is not treated as the workspace's repository.

Paths in results are relative to the repository top, as git prints them. Parsing of the raw git
formats is in :mod:`sandbox.git_parsers`; this module only frames and pairs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sandbox.channel_a.models import (
    GIT_DIFF_MAX_TOTAL_BYTES,
    GitCommit,
    GitDiffFile,
    GitDiffFileStatus,
)
from sandbox.errors import ChannelAUnavailable, ChannelAValidationError
from sandbox.git_parsers import GitDiffHunk, GitDiffLine, NumstatEntry, parse_unified_patch
from sandbox.paths import assert_safe_rel_path_or_root, shell_quote

__all__ = [
    "DISCOVERY_PRUNE",
    "EMPTY_TREE",
    "LOG_FORMAT",
    "NOT_REPO",
    "STATUS_REPO",
    "STATUS_REPO_NOT",
    "UntrackedFile",
    "assemble_tracked",
    "bounded_wait",
    "diff_commands",
    "discovery_command",
    "git_prelude",
    "git_words",
    "is_image",
    "log_command",
    "parse_log",
    "parse_untracked",
    "show_file_command",
    "status_command",
    "untracked_file",
    "validate_ref",
]

STATUS_REPO: Final = b"__OPENGENI_GIT_STATUS_REPO_V1__\0"
STATUS_REPO_NOT: Final = b"__OPENGENI_GIT_STATUS_REPO_V1__not-repo\0"
NOT_REPO: Final = b"__CHANNEL_A_GIT_NOT_REPO__\n"
EMPTY_TREE: Final = "__CHANNEL_A_EMPTY_TREE__"
"""A ``from`` selector meaning the empty tree (diff of a root commit)."""
LOG_FORMAT: Final = "%H%x1f%h%x1f%P%x1f%an%x1f%ae%x1f%at%x1f%cn%x1f%ce%x1f%ct%x1f%s%x1f%b%x1e"
DISCOVERY_PRUNE: Final = (
    "node_modules",
    ".cache",
    ".local",
    "dist",
    "build",
    "target",
    ".venv",
    "__pycache__",
    ".next",
)

_REF_RE: Final = re.compile(r"[A-Za-z0-9_./~^@{}:+\-]{1,256}")
_IMAGE_RE: Final = re.compile(r"\.(png|jpe?g|gif|webp|bmp|ico|svg|tiff?)$", re.IGNORECASE)
# Combined diffs ("diff --cc", for unmerged paths) are sections too, never part of the previous one.
_SECTION_RE: Final = re.compile(rb"(?:^|\n)(?=diff --(?:git|cc|combined) )")
_BINARY_SNIFF_BYTES: Final = 8192

# Overrides that keep the output parseable whatever the box's git configuration says.
_GIT = (
    "git -c core.quotePath=false -c safe.directory='*' -c core.fsmonitor=false -c color.ui=false"
    " -c diff.noprefix=false -c diff.mnemonicPrefix=false -c diff.relative=false -c diff.external="
    " -c log.showSignature=false"
)


def git_words(words: Sequence[str]) -> str:
    """Shell-quote each word for a git command line."""
    return " ".join(shell_quote(word) for word in words)


def validate_ref(ref: str, *, name: str = "ref") -> str:
    """Accept a revision expression made of the characters refs use; never one starting with ``-``.

    Raises:
        ChannelAValidationError: empty, too long, an option-like value or an unexpected character.
    """
    if not _REF_RE.fullmatch(ref) or ref.startswith("-"):
        raise ChannelAValidationError(f"invalid git {name}: {ref!r}")
    return ref


def _pathspecs(pathspec: Sequence[str]) -> list[str]:
    # Literal pathspecs: a user's "*.py" names a file called *.py, never a glob or magic.
    out = []
    for item in pathspec:
        safe = assert_safe_rel_path_or_root(item)
        out.append(f":(literal){safe}" if safe else ".")
    return out


def git_prelude() -> str:
    """Shell that defines ``ca_git`` and sets ``ca_repo=1`` and ``ca_top`` for a confined repository."""
    return f"""\
unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES GIT_COMMON_DIR \
GIT_NAMESPACE GIT_CONFIG_PARAMETERS GIT_CONFIG_COUNT GIT_EXTERNAL_DIFF
export GIT_OPTIONAL_LOCKS=0 GIT_TERMINAL_PROMPT=0 GIT_PAGER=cat PAGER=cat LC_ALL=C
ca_git() {{ {_GIT} "$@"; }}
ca_repo=0
# --show-toplevel fails outside a work tree (and in a .git directory) and prints a real path.
if ca_top=$(ca_git rev-parse --show-toplevel 2>/dev/null) && [ -n "$ca_top" ] \
  && opengeni_under_root "$ca_top"; then
  ca_repo=1
fi
"""


def status_command(*, include_ignored: bool) -> str:
    """``git status --porcelain=v2 --branch -z`` behind the upstream repo/not-repo marker."""
    ignored = " --ignored" if include_ignored else ""
    return (
        git_prelude()
        + f"""\
if [ "$ca_repo" = 1 ]; then
  printf '__OPENGENI_GIT_STATUS_REPO_V1__\\0'
  ca_git status --porcelain=v2 --branch -z{ignored}
else
  printf '__OPENGENI_GIT_STATUS_REPO_V1__not-repo\\0'
fi
"""
    )


def _not_repo_guard() -> str:
    return f"""\
if [ "$ca_repo" != 1 ]; then printf '%s\\n' {NOT_REPO.rstrip().decode()}; exit 0; fi
cd -- "$ca_top" || exit 1
"""


def diff_commands(
    *,
    range_words: Sequence[str],
    head_or_cached: bool,
    pathspec: Sequence[str],
    context_lines: int,
    include_untracked: bool,
    max_bytes_per_file: int,
    max_untracked_files: int,
) -> tuple[str, list[tuple[str, str]]]:
    """The setup shell and the ``(name, command)`` captures of a diff, run from the repository top.

    ``range_words`` are the selector words (``--cached``, refs, or :data:`EMPTY_TREE` first);
    ``head_or_cached`` switches to ``--cached`` when ``HEAD`` does not resolve (unborn
    repository). Captures: ``numstat`` (``--numstat -z``), ``patch`` (unified, capped at 32 MiB)
    and, when asked, ``untracked`` (see :func:`parse_untracked`).
    """
    specs = git_words(_pathspecs(pathspec))
    words = list(range_words)
    setup = git_prelude() + _not_repo_guard()
    if words and words[0] == EMPTY_TREE:
        setup += "ca_empty=$(ca_git hash-object -t tree /dev/null) || exit 1\n"
        setup += f'ca_range=("$ca_empty" {git_words(words[1:])})\n'
    else:
        setup += f"ca_range=({git_words(words)})\n"
    if head_or_cached:
        setup += "ca_git rev-parse --verify -q 'HEAD^{commit}' >/dev/null 2>&1 || ca_range=(--cached)\n"
    base = 'ca_git diff --no-color --no-ext-diff --no-textconv -M -C "${ca_range[@]}"'
    captures = [
        ("numstat", f"{base} -z --numstat -- {specs}"),
        ("patch", f"{base} -U{int(context_lines)} -- {specs} | head -c {GIT_DIFF_MAX_TOTAL_BYTES + 1}"),
    ]
    if include_untracked:
        limit = int(max_bytes_per_file) + 1
        captures.append(
            (
                "untracked",
                f"""\
ca_git ls-files --others --exclude-standard -z -- {specs} | head -z -n {int(max_untracked_files) + 1} \
>"$opengeni_cap/list"
while IFS= read -r -d '' ca_f; do
  if [ -L "$ca_f" ]; then
    printf 'L\\0%s\\0%s\\0' "$ca_f" "$(readlink -- "$ca_f")"
  elif [ -f "$ca_f" ]; then
    head -c {limit} -- "$ca_f" >"$opengeni_cap/body" 2>/dev/null || : >"$opengeni_cap/body"
    printf 'F\\0%s\\0%s\\0%s\\0' "$ca_f" "$(stat -c %s -- "$ca_f")" "$(wc -c <"$opengeni_cap/body" | tr -d ' ')"
    cat "$opengeni_cap/body"
  fi
done <"$opengeni_cap/list"
printf 'E\\0'""",
            )
        )
    return setup, captures


def log_command(*, ref: str, max_count: int, skip: int, pathspec: Sequence[str]) -> str:
    """``git log`` of ``ref`` in the upstream US/RS-separated format, one more than asked."""
    specs = git_words(_pathspecs(pathspec))
    return (
        git_prelude()
        + _not_repo_guard()
        + f"ca_git log --no-color -n{int(max_count) + 1} --skip={int(skip)} --format={shell_quote(LOG_FORMAT)}"
        f" --end-of-options {shell_quote(ref)} -- {specs}\n"
    )


def show_file_command(*, ref: str, file_path: str, max_bytes: int) -> str:
    """A blob at ``<ref>:<file_path>``: prints ``OK``, its size, then up to ``max_bytes + 1`` bytes."""
    spec = shell_quote(f"{ref}:{file_path}")
    return (
        git_prelude()
        + _not_repo_guard()
        + f"""\
ca_type=$(ca_git cat-file -t {spec} 2>/dev/null) || {{ printf '%s\\n' __CHANNEL_A_GIT_NO_OBJECT__; exit 0; }}
if [ "$ca_type" != blob ]; then printf '%s\\n' __CHANNEL_A_GIT_NOT_BLOB__; exit 0; fi
ca_size=$(ca_git cat-file -s {spec}) || exit 1
printf '%s\\n%s\\n' __CHANNEL_A_GIT_BLOB__ "$ca_size"
ca_git cat-file blob {spec} | head -c {int(max_bytes) + 1}
"""
    )


def bounded_wait(pid_var: str, seconds: float) -> str:
    """Shell that waits for the background job in ``$<pid_var>`` at most ``seconds``.

    Sets ``ca_timed_out=1`` (and leaves the job running) when time ran out, else sets ``ca_st``
    to the job's exit status. Uses a ``sleep`` watchdog and ``wait -n`` (bash 4.3+), without GNU
    ``timeout``, which would kill the job.
    """
    return f"""\
sleep {seconds:.3f} &
ca_wd=$!
wait -n 2>/dev/null
ca_timed_out=0
if kill -0 "${pid_var}" 2>/dev/null; then
  ca_timed_out=1
  ca_st=124
else
  kill "$ca_wd" 2>/dev/null
  wait "${pid_var}"
  ca_st=$?
fi
"""


def discovery_command(*, limit: int, timeout_seconds: float) -> str:
    """Find ``.git`` directories and files below the root, pruning dependency and build folders.

    Prints ``STATUS:<n>`` (124 on the watchdog) and then the NUL-separated paths (``limit + 1`` at
    most, so the caller can tell the limit was hit).
    """
    prune = " -o ".join(f"-name {shell_quote(name)}" for name in DISCOVERY_PRUNE)
    return f"""\
ca_tmp=$(mktemp -d 2>/dev/null || mktemp -d -t channel-a) || exit 1
trap 'rm -rf "$ca_tmp"' EXIT
find . -xdev \\( {prune} \\) -prune -o -name .git \\( -type d -o -type f \\) -print0 -prune \
>"$ca_tmp/out" 2>/dev/null </dev/null &
ca_pid=$!
{bounded_wait("ca_pid", timeout_seconds)}if [ "$ca_timed_out" = 1 ]; then kill -TERM "$ca_pid" 2>/dev/null; fi
printf 'STATUS:%s\\n' "$ca_st"
head -z -n {int(limit) + 1} "$ca_tmp/out"
"""


# --------------------------------------------------------------------------- log


def parse_log(data: bytes) -> list[GitCommit]:
    """Parse :data:`LOG_FORMAT` records (fields split on US, records on RS)."""
    commits: list[GitCommit] = []
    for raw in data.split(b"\x1e"):
        record = raw.lstrip(b"\n")
        if not record:
            continue
        fields = record.decode("utf-8", "replace").split("\x1f")
        if len(fields) != 11:
            continue
        full, short, parents, an, ae, at, cn, ce, ct, subject, body = fields
        try:
            author_ms, commit_ms = int(at) * 1000, int(ct) * 1000
        except ValueError:
            continue
        commits.append(
            GitCommit(
                hash=full,
                short_hash=short,
                parents=tuple(parents.split()),
                author_name=an,
                author_email=ae,
                author_time_ms=author_ms,
                committer_name=cn,
                committer_email=ce,
                commit_time_ms=commit_ms,
                subject=subject,
                body=body.rstrip("\n"),
            )
        )
    return commits


# --------------------------------------------------------------------------- diff assembly


def is_image(path: str) -> bool:
    """Whether the path looks like an image (by extension, as upstream)."""
    return _IMAGE_RE.search(path) is not None


def _c_quote(name: str) -> str:
    """Quote a path the way git does in patch headers (with ``core.quotePath=false``)."""
    special = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v"}
    special |= {"\f": "\\f", "\r": "\\r"}
    if not any(ch in special or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return name
    out = []
    for ch in name:
        if ch in special:
            out.append(special[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _expected_header(entry: NumstatEntry, conflicted: bool) -> str:
    if conflicted:
        return f"diff --cc {_c_quote(entry.new_path)}"
    old = entry.old_path if entry.old_path is not None else entry.new_path
    return f"diff --git {_c_quote('a/' + old)} {_c_quote('b/' + entry.new_path)}"


def _merge_unmerged(entries: Sequence[NumstatEntry]) -> list[tuple[NumstatEntry, bool]]:
    # git lists an unmerged path twice in --numstat (a 0/0 marker, then the combined counts).
    out: list[tuple[NumstatEntry, bool]] = []
    index: dict[str, int] = {}
    for entry in entries:
        at = index.get(entry.new_path)
        if at is not None and entry.old_path is None and out[at][0].old_path is None:
            out[at] = (entry, True)
        else:
            index[entry.new_path] = len(out)
            out.append((entry, False))
    return out


def _sections(patch: bytes) -> list[bytes]:
    starts = [m.end() for m in _SECTION_RE.finditer(patch)]
    return [patch[start : starts[i + 1] - 1 if i + 1 < len(starts) else len(patch)] for i, start in enumerate(starts)]


def _header_lines(section: str) -> list[str]:
    lines: list[str] = []
    for line in section.split("\n")[1:]:
        if line.startswith(("@@ ", "Binary files ", "--- ", "+++ ")):
            break
        lines.append(line)
    return lines


def _status_and_modes(header: list[str], entry: NumstatEntry) -> tuple[GitDiffFileStatus, str | None, str | None]:
    old_mode = new_mode = None
    has_new = has_deleted = False
    status: GitDiffFileStatus = "modified"
    for line in header:
        if line.startswith("old mode "):
            old_mode = line[9:]
        elif line.startswith("new mode "):
            new_mode = line[9:]
        elif line.startswith("new file mode "):
            new_mode, has_new = line[14:], True
        elif line.startswith("deleted file mode "):
            old_mode, has_deleted = line[18:], True
        elif line.startswith("copy from "):
            status = "copied"
        elif line.startswith("rename from ") and status != "copied":
            status = "renamed"
    if has_new and has_deleted:
        status = "typechange"
    elif has_new:
        status = "added"
    elif has_deleted:
        status = "deleted"
    elif status == "modified" and entry.old_path is not None and entry.old_path != entry.new_path:
        status = "renamed"
    return status, old_mode, new_mode


def _cut(section: bytes, limit: int) -> tuple[bytes, bool]:
    if len(section) <= limit:
        return section, False
    head = section[:limit]
    newline = head.rfind(b"\n")
    return (head[:newline] if newline >= 0 else b""), True


def assemble_tracked(
    entries: Sequence[NumstatEntry], patch: bytes, *, max_bytes_per_file: int
) -> tuple[list[GitDiffFile], bool]:
    """Pair numstat entries with their patch sections and parse the hunks.

    Sections are matched by their ``diff --git`` header, so a type change (printed as two
    sections) or a missing section cannot shift the pairing. A section above
    ``max_bytes_per_file`` keeps only the hunks that fit and is marked ``truncated``; an entry
    whose section is missing (the combined patch hit its cap) is ``truncated`` with no hunks. An
    unmerged path (listed twice by numstat, shown as a combined ``diff --cc``) becomes one
    ``conflicted`` file without hunks.
    Returns the files and whether the combined patch itself was cut.
    """
    patch_truncated = len(patch) > GIT_DIFF_MAX_TOTAL_BYTES
    if patch_truncated:
        patch = patch[:GIT_DIFF_MAX_TOTAL_BYTES]
    by_header: dict[str, list[bytes]] = {}
    for section in _sections(patch):
        first = section.split(b"\n", 1)[0].decode("utf-8", "replace")
        by_header.setdefault(first, []).append(section)
    files: list[GitDiffFile] = []
    for entry, conflicted in _merge_unmerged(entries):
        chunks = by_header.pop(_expected_header(entry, conflicted), [])
        budget = max_bytes_per_file
        truncated = not chunks
        header: list[str] = []
        hunks: list[GitDiffHunk] = []
        for chunk in chunks:
            # Each section is parsed on its own: the parser must never see two file headers.
            cut, was_cut = _cut(chunk, budget)
            truncated = truncated or was_cut
            budget = max(0, budget - len(chunk))
            text = cut.decode("utf-8", "replace")
            header += _header_lines(text)
            if not entry.binary and not conflicted:
                hunks += parse_unified_patch(text).hunks
        status, old_mode, new_mode = _status_and_modes(header, entry)
        if conflicted:
            status = "conflicted"
        files.append(
            GitDiffFile(
                path=entry.new_path,
                old_path=entry.old_path,
                status=status,
                additions=entry.additions or 0,
                deletions=entry.deletions or 0,
                is_binary=entry.binary,
                is_image=is_image(entry.new_path),
                truncated=truncated,
                old_mode=old_mode,
                new_mode=new_mode,
                hunks=tuple(hunks),
            )
        )
    return files, patch_truncated


@dataclass(frozen=True)
class UntrackedFile:
    """One untracked file of the snapshot: a regular file's sampled bytes or a link's target."""

    path: str
    is_link: bool
    size: int
    body: bytes


def parse_untracked(data: bytes) -> tuple[list[UntrackedFile], bool]:
    """Parse the untracked snapshot: ``F\\0path\\0size\\0n\\0<n bytes>`` / ``L\\0path\\0target\\0`` / ``E\\0``.

    Returns the files and whether the snapshot was complete (its ``E`` terminator arrived).

    Raises:
        ChannelAUnavailable: a path is not valid UTF-8 (it could not be named back losslessly).
    """
    files: list[UntrackedFile] = []
    pos = 0

    def field() -> bytes | None:
        nonlocal pos
        end = data.find(b"\0", pos)
        if end < 0:
            return None
        value = data[pos:end]
        pos = end + 1
        return value

    while True:
        tag = field()
        if tag is None:
            return files, False
        if tag == b"E":
            return files, True
        path = field()
        if path is None:
            return files, False
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            raise ChannelAUnavailable("an untracked path is not valid UTF-8") from None
        if tag == b"L":
            target = field()
            if target is None:
                return files, False
            files.append(UntrackedFile(name, True, len(target), target))
            continue
        size_raw, count_raw = field(), field()
        if size_raw is None or count_raw is None:
            return files, False
        try:
            size, count = int(size_raw or b"0"), int(count_raw)
        except ValueError:
            return files, False
        body = data[pos : pos + count]
        pos += count
        files.append(UntrackedFile(name, False, size, body))


def untracked_file(item: UntrackedFile, *, max_bytes_per_file: int) -> GitDiffFile:
    """An untracked file as a diff entry: one hunk adding every line, unless binary or too large."""
    truncated = item.size > max_bytes_per_file or len(item.body) > max_bytes_per_file
    binary = b"\0" in item.body[:_BINARY_SNIFF_BYTES]
    hunks: tuple[GitDiffHunk, ...] = ()
    additions = 0
    if not binary and not truncated:
        text = item.body.decode("utf-8", "replace")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        additions = len(lines)
        if lines:
            hunks = (
                GitDiffHunk(
                    old_start=0,
                    old_lines=0,
                    new_start=1,
                    new_lines=len(lines),
                    header=f"@@ -0,0 +1,{len(lines)} @@",
                    lines=tuple(
                        GitDiffLine(type="add", old_no=None, new_no=i + 1, text=line) for i, line in enumerate(lines)
                    ),
                ),
            )
    return GitDiffFile(
        path=item.path,
        old_path=None,
        status="untracked",
        additions=additions,
        deletions=0,
        is_binary=binary,
        is_image=is_image(item.path),
        truncated=truncated,
        new_mode="120000" if item.is_link else None,
        hunks=hunks,
    )
