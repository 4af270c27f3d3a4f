"""The bash that Channel-A file operations run in the box, and the parsers of what it prints.

Each builder starts from :func:`sandbox.paths.confinement_script` (which resolves the root and the
candidate with ``realpath`` and leaves ``opengeni_root`` / ``opengeni_target`` set) and appends
the operation. Reads resolve the real path of the file they opened; mutations confine the parent,
act on ``<real parent>/<name>``, and re-confine after creating directories. Paths reach these
builders already validated by :func:`normalise_rel_path`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from sandbox.channel_a.models import FsNode, FsNodeType
from sandbox.channel_a.runner import (
    EXIT_CONFLICT,
    EXIT_INVALID,
    EXIT_OP_FAILED,
    EXIT_PARTIAL,
    MARK_CONFLICT,
    MARK_INVALID,
    MARK_OP_FAILED,
    MARK_PARTIAL,
    SCRIPT_PRELUDE,
    SCRIPT_ROOT,
)
from sandbox.errors import ChannelAUnavailable, ChannelAValidationError
from sandbox.paths import (
    FS_ESCAPE_EXIT,
    FS_NOT_FOUND_EXIT,
    assert_safe_rel_path,
    assert_safe_rel_path_or_root,
    confinement_script,
    shell_quote,
)

__all__ = [
    "DELETE_OK",
    "MKDIR_OK",
    "MOVE_OK",
    "MOVE_STAGE_DEST",
    "READ_OK",
    "WRITE_OK",
    "ListedEntries",
    "ListedRecord",
    "build_tree",
    "delete_script",
    "list_command",
    "mkdir_script",
    "move_script",
    "normalise_rel_path",
    "parse_list_output",
    "parse_ok_lines",
    "read_script",
    "write_script",
]

READ_OK: Final = b"__CHANNEL_A_READ_OK__\n"
WRITE_OK: Final = b"__CHANNEL_A_WRITE_OK__\n"
DELETE_OK: Final = b"__CHANNEL_A_DELETE_OK__\n"
MOVE_OK: Final = b"__CHANNEL_A_MOVE_OK__\n"
MOVE_STAGE_DEST: Final = b"__CHANNEL_A_STAGE_DEST__\n"
MKDIR_OK: Final = b"__CHANNEL_A_MKDIR_OK__\n"

_TYPES: Final[dict[str, FsNodeType]] = {"d": "dir", "f": "file", "l": "symlink"}


def normalise_rel_path(path: str, *, allow_root: bool = False) -> str:
    """Validate a workspace-relative path and drop empty and ``.`` segments.

    Raises:
        ChannelAValidationError: absolute path, ``..`` segment, NUL, or (unless ``allow_root``) a
            path naming the root itself.
    """
    safe = assert_safe_rel_path_or_root(path) if allow_root else assert_safe_rel_path(path)
    parts = [part for part in safe.split("/") if part not in ("", ".")]
    if not parts and not allow_root:
        raise ChannelAValidationError(f"path must name something below the workspace root: {path!r}", path=path)
    return "/".join(parts)


def _fail(mark: str, reason: str, code: int) -> str:
    return f"ca_fail {mark} {shell_quote(reason)} {code}"


def _say(marker: bytes) -> str:
    name = marker.rstrip(b"\n").decode()
    return f"printf '%s\\n' {name}"


# --------------------------------------------------------------------------- list


def list_command(depth: int, max_entries: int, max_bytes: int, include_hidden: bool) -> str:
    """The ``find`` run inside the listed directory: NUL records ``type\\tsize\\tmtime\\tmode\\tpath``.

    Output stops after ``max_entries + 1`` records and ``max_bytes + 1`` bytes, so the caller can
    tell that it was truncated. Hidden entries are pruned (not descended) unless asked for.
    """
    prune = "-name '.*' -prune -o " if not include_hidden else ""
    return (
        f"find . -mindepth 1 -maxdepth {int(depth)} {prune}"
        "-printf '%y\\t%s\\t%T@\\t%m\\t%P\\0' 2>/dev/null"
        f" | head -z -n {int(max_entries) + 1} | head -c {int(max_bytes) + 1}"
    )


ListedRecord = tuple[FsNodeType, int, int | None, int | None, str]
"""``(type, size, mtime_ms, mode, path relative to the listed directory)``."""


@dataclass
class ListedEntries:
    """Parsed listing records and whether anything was cut off."""

    records: list[ListedRecord]
    truncated: bool


def parse_list_output(data: bytes, max_entries: int, max_bytes: int) -> ListedEntries:
    """Parse :func:`list_command` output; an incomplete last record is dropped and means truncation.

    Names that are not valid UTF-8 are shown with U+FFFD replacement characters.
    """
    truncated = len(data) > max_bytes
    raw = data.decode("utf-8", "replace").split("\0")
    if raw[-1]:
        truncated = True  # cut inside a record
    del raw[-1]
    if len(raw) > max_entries:
        truncated = True
        del raw[max_entries:]
    records: list[ListedRecord] = []
    append = records.append
    for record in raw:
        fields = record.split("\t", 4)
        if len(fields) != 5 or not fields[4]:
            continue
        kind, size, mtime, mode, sub = fields
        try:
            append((_TYPES.get(kind, "other"), int(size), round(float(mtime) * 1000), int(mode, 8), sub))
        except ValueError:
            append((_TYPES.get(kind, "other"), 0, None, None, sub))
    return ListedEntries(records, truncated)


def _order(node: dict[str, Any]) -> tuple[bool, str, str]:
    return (node["type"] != "dir", node["name"].casefold(), node["name"])


def build_tree(rel: str, depth: int, entries: ListedEntries) -> FsNode:
    """Turn listing records (paths relative to ``rel``) into a tree rooted at ``rel``.

    Directories above the depth limit get (possibly empty) ``children``; directories at the limit
    keep ``children=None`` because they were not listed. Each level is sorted directories first,
    then by name.
    """
    root: dict[str, Any] = {"name": rel.rsplit("/", 1)[-1], "path": rel, "type": "dir", "children": []}
    dirs: dict[str, dict[str, Any]] = {"": root}
    prefix = f"{rel}/" if rel else ""
    for kind, size, mtime_ms, mode, sub in entries.records:
        slash = sub.rfind("/")
        is_dir = kind == "dir"
        node: dict[str, Any] = {
            "name": sub[slash + 1 :],
            "path": prefix + sub,
            "type": kind,
            "size_bytes": None if is_dir else size,
            "mtime_ms": mtime_ms,
            "mode": mode,
            "children": [] if is_dir and sub.count("/") + 1 < depth else None,
        }
        if is_dir:
            dirs[sub] = node
        parent = root if slash < 0 else dirs.get(sub[:slash], root)
        if parent["children"] is None:
            parent["children"] = []
        parent["children"].append(node)
    for node in dirs.values():
        if node["children"]:
            node["children"].sort(key=_order)
    # One validation of the whole tree: far cheaper than a model per node for 20,000 entries.
    return FsNode.model_validate(root)


# --------------------------------------------------------------------------- read


def read_script(rel: str, max_bytes: int) -> str:
    """Read up to ``max_bytes + 1`` bytes of a regular file, proving the opened file is inside.

    The file is opened on fd 3 first; on Linux the real path of that open file
    (``/proc/$$/fd/3``) must resolve under the root, so a symlink swapped in after the check
    cannot redirect the read. Prints ``READ_OK``, the file size on a line, then the bytes.
    """
    return (
        SCRIPT_PRELUDE
        + confinement_script(SCRIPT_ROOT, rel)
        + f"""\
if [ ! -e "$opengeni_target" ]; then opengeni_fail {FS_NOT_FOUND_EXIT}; fi
if [ -d "$opengeni_target" ]; then {_fail(MARK_INVALID, "is a directory", EXIT_INVALID)}; fi
if [ ! -f "$opengeni_target" ]; then {_fail(MARK_INVALID, "not a regular file", EXIT_INVALID)}; fi
exec 3<"$opengeni_target" || opengeni_fail {FS_NOT_FOUND_EXIT}
if [ -e "/proc/$$/fd/3" ]; then
  opengeni_resolve "/proc/$$/fd/3" || opengeni_fail {FS_NOT_FOUND_EXIT}
  opengeni_under_root "$opengeni_resolved" || opengeni_fail {FS_ESCAPE_EXIT}
  [ -f "/proc/$$/fd/3" ] || {_fail(MARK_INVALID, "not a regular file", EXIT_INVALID)}
fi
{_say(READ_OK)}
stat -Lc %s "/proc/$$/fd/3" 2>/dev/null || wc -c <"$opengeni_target" | tr -d ' '
head -c {int(max_bytes) + 1} <&3
"""
    )


# --------------------------------------------------------------------------- mutations


def _prepare_parent(create_parents: bool) -> str:
    """Shell that sets ``ca_dest`` to ``<real parent>/<name>`` of ``opengeni_rel``, creating parents."""
    failed = _fail(MARK_OP_FAILED, "cannot create the parent directory", EXIT_OP_FAILED)
    mkdir = f'mkdir -p -- "$ca_dir" 2>/dev/null || {failed}\n' if create_parents else ""
    return f"""\
ca_name=${{opengeni_rel##*/}}
ca_dir=${{opengeni_root%/}}/$opengeni_rel
ca_dir=${{ca_dir%/*}}
{mkdir}opengeni_resolve "$ca_dir" || opengeni_fail {FS_NOT_FOUND_EXIT}
opengeni_under_root "$opengeni_resolved" || opengeni_fail {FS_ESCAPE_EXIT}
[ -d "$opengeni_resolved" ] || {_fail(MARK_INVALID, "the parent is not a directory", EXIT_INVALID)}
ca_dest=${{opengeni_resolved%/}}/$ca_name
"""


def write_script(rel: str, *, overwrite: bool, create_parents: bool) -> str:
    """Write stdin to ``rel``: confine the parent, create parents, refuse conflicts, then ``cat``.

    A symbolic link at ``rel`` is written through only when its target stays inside the root.
    Prints ``WRITE_OK``, ``1`` if the file existed before (else ``0``), and the new size.
    """
    conflict = "" if overwrite else f"  {_fail(MARK_CONFLICT, 'already exists', EXIT_CONFLICT)}\n"
    return (
        SCRIPT_PRELUDE
        + confinement_script(SCRIPT_ROOT, rel, parent=True, allow_missing_parents=create_parents)
        + _prepare_parent(create_parents)
        + f"""\
ca_existed=0
if [ -e "$ca_dest" ] || [ -L "$ca_dest" ]; then
  ca_existed=1
{conflict}fi
if [ -L "$ca_dest" ]; then
  opengeni_resolve "$ca_dest" || opengeni_fail {FS_NOT_FOUND_EXIT}
  opengeni_under_root "$opengeni_resolved" || opengeni_fail {FS_ESCAPE_EXIT}
  ca_dest=$opengeni_resolved
fi
if [ -d "$ca_dest" ]; then {_fail(MARK_INVALID, "is a directory", EXIT_INVALID)}; fi
if [ -e "$ca_dest" ] && [ ! -f "$ca_dest" ]; then {_fail(MARK_INVALID, "not a regular file", EXIT_INVALID)}; fi
cat >"$ca_dest" || {_fail(MARK_PARTIAL, "the write failed part way", EXIT_PARTIAL)}
{_say(WRITE_OK)}
printf '%s\\n' "$ca_existed"
stat -c %s -- "$ca_dest"
"""
    )


def delete_script(rel: str, *, recursive: bool) -> str:
    """Delete ``rel`` (a link itself, never its target); a non-empty directory needs ``recursive``.

    Prints ``DELETE_OK`` and ``1`` if a directory was removed (else ``0``).
    """
    if recursive:
        remove_dir = f'rm -rf -- "$ca_dest" || {_fail(MARK_PARTIAL, "the delete failed part way", EXIT_PARTIAL)}'
    else:
        remove_dir = (
            f'rmdir -- "$ca_dest" 2>/dev/null || '
            f"{_fail(MARK_CONFLICT, 'the directory is not empty (delete it recursively)', EXIT_CONFLICT)}"
        )
    return (
        SCRIPT_PRELUDE
        + confinement_script(SCRIPT_ROOT, rel, parent=True)
        + f"""\
ca_dest=${{opengeni_target%/}}/${{opengeni_rel##*/}}
if [ ! -e "$ca_dest" ] && [ ! -L "$ca_dest" ]; then opengeni_fail {FS_NOT_FOUND_EXIT}; fi
ca_is_dir=0
if [ -d "$ca_dest" ] && [ ! -L "$ca_dest" ]; then
  ca_is_dir=1
  {remove_dir}
else
  rm -f -- "$ca_dest" || {_fail(MARK_OP_FAILED, "the delete failed", EXIT_OP_FAILED)}
fi
{_say(DELETE_OK)}
printf '%s\\n' "$ca_is_dir"
"""
    )


def move_script(src: str, dst: str, *, overwrite: bool, create_parents: bool) -> str:
    """Move ``src`` to ``dst`` (``mv -T``): both parents confined, ``dst`` parents created if asked.

    Prints ``MOVE_STAGE_DEST`` once the source is proven, so a failure after it is about the
    destination; then ``MOVE_OK`` and ``1`` if a directory moved (else ``0``).
    """
    conflict = "" if overwrite else _fail(MARK_CONFLICT, "the destination already exists", EXIT_CONFLICT)
    force = "-f " if overwrite else ""
    return (
        SCRIPT_PRELUDE
        + confinement_script(SCRIPT_ROOT, src, parent=True)
        + f"""\
ca_src=${{opengeni_target%/}}/${{opengeni_rel##*/}}
if [ ! -e "$ca_src" ] && [ ! -L "$ca_src" ]; then opengeni_fail {FS_NOT_FOUND_EXIT}; fi
ca_src_dir=0
if [ -d "$ca_src" ] && [ ! -L "$ca_src" ]; then ca_src_dir=1; fi
{_say(MOVE_STAGE_DEST)}
"""
        + confinement_script(SCRIPT_ROOT, dst, parent=True, allow_missing_parents=create_parents)
        + _prepare_parent(create_parents)
        + f"""\
if [ -e "$ca_dest" ] || [ -L "$ca_dest" ]; then :; {conflict}
fi
mv -T {force}-- "$ca_src" "$ca_dest" || {_fail(MARK_OP_FAILED, "the move failed", EXIT_OP_FAILED)}
{_say(MOVE_OK)}
printf '%s\\n' "$ca_src_dir"
"""
    )


def mkdir_script(rel: str, *, recursive: bool) -> str:
    """Create the directory ``rel`` (``mkdir -p`` when ``recursive``) and prove it is inside.

    Without ``recursive`` an existing path is refused (400, as upstream). Prints ``MKDIR_OK`` and
    ``1`` if the directory already existed (else ``0``).
    """
    exists = "" if recursive else f"  {_fail(MARK_INVALID, 'already exists', EXIT_INVALID)}\n"
    flag = "-p " if recursive else ""
    return (
        SCRIPT_PRELUDE
        + confinement_script(SCRIPT_ROOT, rel, parent=True, allow_missing_parents=recursive)
        + f"""\
ca_path=${{opengeni_root%/}}/$opengeni_rel
ca_existed=0
if [ -e "$ca_path" ] || [ -L "$ca_path" ]; then
  ca_existed=1
{exists}  [ -d "$ca_path" ] || {_fail(MARK_INVALID, "exists and is not a directory", EXIT_INVALID)}
fi
mkdir {flag}-- "$ca_path" || {_fail(MARK_OP_FAILED, "cannot create the directory", EXIT_OP_FAILED)}
opengeni_resolve "$ca_path" || opengeni_fail {FS_NOT_FOUND_EXIT}
opengeni_under_root "$opengeni_resolved" || opengeni_fail {FS_ESCAPE_EXIT}
[ -d "$opengeni_resolved" ] || {_fail(MARK_INVALID, "not a directory", EXIT_INVALID)}
{_say(MKDIR_OK)}
printf '%s\\n' "$ca_existed"
"""
    )


_LINE_RE: Final = re.compile(rb"([^\n]*)\n")


def parse_ok_lines(stdout: bytes, marker: bytes, count: int) -> tuple[list[str], bytes]:
    """The ``count`` lines after ``marker`` and the bytes after them.

    Raises:
        ChannelAUnavailable: the marker or the lines are missing (the answer was lost or cut).
    """
    at = stdout.find(marker)
    if at < 0:
        raise ChannelAUnavailable("the box's answer is missing its completion marker")
    pos = at + len(marker)
    lines: list[str] = []
    for _ in range(count):
        match = _LINE_RE.match(stdout, pos)
        if match is None:
            raise ChannelAUnavailable("the box's answer was cut short")
        lines.append(match.group(1).decode("ascii", "replace").strip())
        pos = match.end()
    return lines, stdout[pos:]
