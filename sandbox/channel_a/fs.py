"""The bash that Channel-A file operations run in the box, and the parsers of what it prints.

Each builder starts from :func:`sandbox.paths.confinement_script` (which resolves the root and the
candidate with ``realpath`` and leaves ``opengeni_root`` / ``opengeni_target`` set) and appends
the operation. Reads resolve the real path of the file they opened; mutations confine the parent,
act on ``<real parent>/<name>``, and re-confine after creating directories. Paths reach these
builders already validated by :func:`normalise_rel_path`.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Final, TypeVar

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
    "NAME_MAX",
    "PATH_MAX",
    "READ_OK",
    "WRITE_OK",
    "ListedEntries",
    "ListedRecord",
    "build_tree",
    "cyclic_gc_paused",
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

NAME_MAX: Final = 255
"""Longest file name (one path component) Linux file systems hold, in bytes (UTF-8)."""
PATH_MAX: Final = 4096
"""Longest path the kernel takes, in bytes (a workspace-relative path must leave room for the root)."""

READ_OK: Final = b"__CHANNEL_A_READ_OK__\n"
WRITE_OK: Final = b"__CHANNEL_A_WRITE_OK__\n"
DELETE_OK: Final = b"__CHANNEL_A_DELETE_OK__\n"
MOVE_OK: Final = b"__CHANNEL_A_MOVE_OK__\n"
MOVE_STAGE_DEST: Final = b"__CHANNEL_A_STAGE_DEST__\n"
MKDIR_OK: Final = b"__CHANNEL_A_MKDIR_OK__\n"

_T = TypeVar("_T")
_TYPES: Final[dict[str, FsNodeType]] = {"d": "dir", "f": "file", "l": "symlink"}


def normalise_rel_path(path: str, *, allow_root: bool = False) -> str:
    """Validate a workspace-relative path and drop empty and ``.`` segments.

    Raises:
        ChannelAValidationError: absolute path, ``..`` segment, NUL, a name longer than
            :data:`NAME_MAX` bytes or a path longer than ``PATH_MAX - NAME_MAX`` bytes, or (unless
            ``allow_root``) a path naming the root itself.
    """
    safe = assert_safe_rel_path_or_root(path) if allow_root else assert_safe_rel_path(path)
    parts = [part for part in safe.split("/") if part not in ("", ".")]
    if not parts and not allow_root:
        raise ChannelAValidationError(f"path must name something below the workspace root: {path!r}", path=path)
    # Refused here, before anything runs: in the box an overlong name fails part way through a
    # script (ENAMETOOLONG), where it would read as a partial mutation or a missing file.
    for part in parts:
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX:
            raise ChannelAValidationError(
                f"the name {part[:24]!r}... is {size} bytes long; a file name may be at most {NAME_MAX} bytes "
                "(NAME_MAX): use a shorter name",
                path=path,
            )
    joined = "/".join(parts)
    size = len(joined.encode("utf-8", "surrogateescape"))
    if size > PATH_MAX - NAME_MAX:
        raise ChannelAValidationError(
            f"the path is {size} bytes long; a workspace path may be at most {PATH_MAX - NAME_MAX} bytes "
            f"(PATH_MAX {PATH_MAX}, less room for the workspace root)",
            path=path,
        )
    return joined


def _fail(mark: str, reason: str, code: int) -> str:
    return f"ca_fail {mark} {shell_quote(reason)} {code}"


def _say(marker: bytes) -> str:
    name = marker.rstrip(b"\n").decode()
    return f"printf '%s\\n' {name}"


# --------------------------------------------------------------------------- list


_FIELDS_PER_RECORD: Final = 5


def list_command(depth: int, max_entries: int, max_bytes: int, include_hidden: bool) -> str:
    """The ``find`` run inside the listed directory: records ``type\\0size\\0mtime\\0mode\\0path\\0``.

    Every field ends with a NUL (the only byte a name cannot hold), so the parser splits the whole
    answer once. The mtime is cut to 17 characters (microseconds for today's dates): enough for
    milliseconds, and such numbers convert to floats twice as fast as find's 20 digits. Output
    stops after ``max_entries + 1`` records and ``max_bytes + 1`` bytes, so the caller can tell
    that it was truncated. Hidden entries are pruned (not descended) unless asked for.
    """
    prune = "-name '.*' -prune -o " if not include_hidden else ""
    fields = (int(max_entries) + 1) * _FIELDS_PER_RECORD
    return (
        f"find . -mindepth 1 -maxdepth {int(depth)} {prune}"
        "-printf '%y\\0%s\\0%.17T@\\0%m\\0%P\\0' 2>/dev/null"
        f" | head -z -n {fields} | head -c {int(max_bytes) + 1}"
    )


ListedRecord = tuple[FsNodeType, int, int | None, int | None, str]
"""``(type, size, mtime_ms, mode, path relative to the listed directory)``."""


@dataclass
class ListedEntries:
    """Parsed listing records, column by column, and whether anything was cut off.

    Columns keep the per-entry Python work of a 20,000-entry listing small; :attr:`records` gives
    the same data row by row.
    """

    kinds: list[FsNodeType]
    sizes: list[int]
    mtimes: list[int | None]
    modes: list[int | None]
    paths: list[str]
    truncated: bool

    @classmethod
    def from_records(cls, records: Sequence[ListedRecord], truncated: bool) -> ListedEntries:
        """Entries from ``(type, size, mtime_ms, mode, path)`` rows."""
        return cls(
            [r[0] for r in records],
            [r[1] for r in records],
            [r[2] for r in records],
            [r[3] for r in records],
            [r[4] for r in records],
            truncated,
        )

    @property
    def records(self) -> list[ListedRecord]:
        """The entries as ``(type, size, mtime_ms, mode, path)`` rows."""
        return list(zip(self.kinds, self.sizes, self.mtimes, self.modes, self.paths, strict=True))

    def __len__(self) -> int:
        return len(self.paths)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a listing's objects are built.

    A 20,000-entry listing allocates some 60,000 containers that all survive, which triggers
    collections of every generation; in a worker with a large heap those full collections cost
    about as much as building the tree. Nothing built here forms a cycle, so pausing is safe; the
    collector's previous state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _slow_records(fields: list[str]) -> list[ListedRecord]:
    """Record by record, for answers with an unparsable number or an empty name."""
    records: list[ListedRecord] = []
    for at in range(0, len(fields), _FIELDS_PER_RECORD):
        kind, size, mtime, mode, sub = fields[at : at + _FIELDS_PER_RECORD]
        if not sub:
            continue
        try:
            records.append((_TYPES.get(kind, "other"), int(size), round(float(mtime) * 1000), int(mode, 8), sub))
        except ValueError:
            records.append((_TYPES.get(kind, "other"), 0, None, None, sub))
    return records


def parse_list_output(data: bytes, max_entries: int, max_bytes: int) -> ListedEntries:
    """Parse :func:`list_command` output; an incomplete last record is dropped and means truncation.

    Names that are not valid UTF-8 are shown with U+FFFD replacement characters. The answer is
    split once and, in the common case (every number well formed), converted column by column
    with C-level ``map`` calls: this is what keeps a 20,000-entry listing close to ``find`` itself.
    """
    truncated = len(data) > max_bytes
    fields = data.decode("utf-8", "replace").split("\0")
    if fields.pop():
        truncated = True  # cut inside a field
    count = len(fields) // _FIELDS_PER_RECORD
    if len(fields) % _FIELDS_PER_RECORD:
        truncated = True  # cut inside a record
    if count > max_entries:
        truncated = True
        count = max_entries
    del fields[count * _FIELDS_PER_RECORD :]
    paths = fields[4::_FIELDS_PER_RECORD]
    try:
        if "" in paths:
            raise ValueError("an empty name")
        sizes = list(map(int, fields[1::_FIELDS_PER_RECORD]))
        # round(seconds * 1000), as upstream: float, multiply and round are all builtins here.
        mtimes: list[int | None] = list(
            map(round, map(operator.mul, map(float, fields[2::_FIELDS_PER_RECORD]), repeat(1000.0)))
        )
        modes: list[int | None] = list(map(int, fields[3::_FIELDS_PER_RECORD], repeat(8)))
    except ValueError:
        return ListedEntries.from_records(_slow_records(fields), truncated)
    other: FsNodeType = "other"
    kinds: list[FsNodeType] = list(map(_TYPES.get, fields[0::_FIELDS_PER_RECORD], repeat(other)))
    return ListedEntries(kinds, sizes, mtimes, modes, paths, truncated)


# Every trusted node shares this set of set fields: it holds every field already, and pydantic only
# ever adds to it in place (model_copy adds to a copy), so sharing it changes nothing.
_ALL_FS_NODE_FIELDS: Final = set(FsNode.model_fields)
_new_object = object.__new__
_set_slot = object.__setattr__


def _trusted_nodes(fields: list[dict[str, Any]]) -> tuple[FsNode, ...]:
    """:class:`FsNode` objects from values that are valid by construction, without validating them.

    This is what ``FsNode.model_construct`` does minus its per-field Python loop (and with C-level
    ``map`` calls instead of a Python loop): validating (or ``model_construct``-ing) 20,000 nodes
    costs more than listing them in the box. The values come from :func:`build_tree` only;
    ``tests/unit/sandbox/test_channel_a.py`` checks that such a node equals, dumps, copies and
    hashes like a validated one. Listed directories' ``children`` (lists of dicts) become nodes
    first.
    """
    for node_fields in fields:
        children = node_fields["children"]
        if children is not None and not isinstance(children, tuple):
            node_fields["children"] = _trusted_nodes(children)
    nodes = list(map(_new_object, repeat(FsNode, len(fields))))
    for slot, values in (
        ("__dict__", fields),
        ("__pydantic_fields_set__", repeat(_ALL_FS_NODE_FIELDS)),
        ("__pydantic_extra__", repeat(None)),
        ("__pydantic_private__", repeat(None)),
    ):
        deque(map(_set_slot, nodes, repeat(slot), values), maxlen=0)
    return tuple(nodes)


def _listing_order(kinds: Sequence[str], names: Sequence[str]) -> list[int]:
    """Indices in listing order: directories first, then by case-folded name, then by name.

    Three stable sorts with C-level keys instead of one with a Python key function: sorting is
    the biggest single cost of a large listing after building the nodes.
    """
    order = sorted(range(len(names)), key=names.__getitem__)
    order.sort(key=list(map(str.casefold, names)).__getitem__)
    order.sort(key=list(map("dir".__ne__, kinds)).__getitem__)
    return order


def _in_order(order: list[int], column: Sequence[_T]) -> Sequence[_T]:
    return [column[order[0]]] if len(order) == 1 else operator.itemgetter(*order)(column)


def build_tree(rel: str, depth: int, entries: ListedEntries) -> FsNode:
    """Turn listing records (paths relative to ``rel``) into a tree rooted at ``rel``.

    Directories above the depth limit get (possibly empty) ``children``; directories at the limit
    keep ``children=None`` because they were not listed. Each level is sorted directories first,
    then by name. Records whose parent was not listed hang off the root.
    """
    root: dict[str, Any] = {
        "name": rel.rsplit("/", 1)[-1],
        "path": rel,
        "type": "dir",
        "size_bytes": None,
        "mtime_ms": None,
        "mode": None,
        "children": [],
    }
    subs = entries.paths
    if subs:
        flat = "/" not in "\0".join(subs)
        names = subs if flat else [sub[sub.rfind("/") + 1 :] for sub in subs]
        order = _listing_order(entries.kinds, names)
        prefix = f"{rel}/" if rel else ""
        listed = depth > 1  # whether directories of the first level were listed
        # In listing order, so that every children list below is filled already sorted.
        nodes = [
            {
                "name": name,
                "path": path,
                "type": kind,
                "size_bytes": None if kind == "dir" else size,
                "mtime_ms": mtime,
                "mode": mode,
                "children": [] if listed and kind == "dir" else None,
            }
            for name, path, kind, size, mtime, mode in zip(
                _in_order(order, names),
                map(prefix.__add__, _in_order(order, subs)),
                _in_order(order, entries.kinds),
                _in_order(order, entries.sizes),
                _in_order(order, entries.mtimes),
                _in_order(order, entries.modes),
                strict=True,
            )
        ]
        if flat:
            root["children"] = nodes
        else:
            _nest(root, nodes, len(prefix), depth)
    return _trusted_nodes([root])[0]


def _nest(root: dict[str, Any], nodes: list[dict[str, Any]], cut: int, depth: int) -> None:
    """Hang each node (in listing order) under its parent directory's node."""
    dirs: dict[str, dict[str, Any]] = {}
    for node in nodes:
        if node["type"] == "dir":
            sub: str = node["path"][cut:]
            if sub.count("/") + 1 >= depth:
                node["children"] = None  # at the depth limit: not listed
            dirs[sub] = node
    for node in nodes:
        sub = node["path"][cut:]
        slash = sub.rfind("/")
        parent = root if slash < 0 else dirs.get(sub[:slash], root)
        if parent["children"] is None:
            parent["children"] = []
        parent["children"].append(node)


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
