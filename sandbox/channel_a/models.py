"""The request limits and result shapes of Channel-A.

Results are frozen pydantic models whose ``model_dump()`` is the upstream camelCase wire shape
(``sizeBytes``, ``leaseEpoch``, ``oldPath`` ...), like the parser models of
:mod:`sandbox.git_parsers`, which they embed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from sandbox.git_parsers import GitDiffHunk, GitStatus

__all__ = [
    "FS_LIST_DEFAULT_ENTRIES",
    "FS_LIST_MAX_DEPTH",
    "FS_LIST_MAX_ENTRIES",
    "FS_LIST_MAX_OUTPUT_BYTES",
    "FS_READ_DEFAULT_BYTES",
    "FS_READ_MAX_BYTES",
    "GIT_DIFF_DEFAULT_FILE_BYTES",
    "GIT_DIFF_MAX_CONTEXT",
    "GIT_DIFF_MAX_FILE_BYTES",
    "GIT_DIFF_MAX_TOTAL_BYTES",
    "GIT_LOG_MAX_COUNT",
    "GIT_METADATA_MAX_BYTES",
    "PTY_MAX_COLS",
    "PTY_MAX_ROWS",
    "REPO_DISCOVERY_LIMIT",
    "TERMINAL_DEFAULT_TIMEOUT_MS",
    "TERMINAL_MAX_OUTPUT_BYTES",
    "TERMINAL_MAX_TIMEOUT_MS",
    "FsChange",
    "FsChangeKind",
    "FsListResult",
    "FsMutationResult",
    "FsNode",
    "FsNodeType",
    "FsReadResult",
    "FsWriteResult",
    "GitCommit",
    "GitDiffFile",
    "GitDiffFileStatus",
    "GitDiffResult",
    "GitLogResult",
    "GitShowFileResult",
    "GitShowResult",
    "GitStatus",
    "PtyCloseResult",
    "PtyExitReason",
    "PtyOpenResult",
    "PtyWriteResult",
    "RepoDiscovery",
    "TerminalExecResult",
]

FS_LIST_MAX_DEPTH = 8
FS_LIST_DEFAULT_ENTRIES = 2000
FS_LIST_MAX_ENTRIES = 20_000
FS_LIST_MAX_OUTPUT_BYTES = 8 * 1024 * 1024
"""Upstream caps a listing at 768 KiB of transport; 20,000 entries with long paths need more."""
FS_READ_DEFAULT_BYTES = 5 * 1024 * 1024
FS_READ_MAX_BYTES = 25 * 1024 * 1024
GIT_METADATA_MAX_BYTES = 2 * 1024 * 1024
GIT_DIFF_MAX_TOTAL_BYTES = 32 * 1024 * 1024
GIT_DIFF_DEFAULT_FILE_BYTES = 512 * 1024
GIT_DIFF_MAX_FILE_BYTES = 2 * 1024 * 1024
GIT_DIFF_MAX_CONTEXT = 10
GIT_LOG_MAX_COUNT = 1000
REPO_DISCOVERY_LIMIT = 256
TERMINAL_DEFAULT_TIMEOUT_MS = 30_000
TERMINAL_MAX_TIMEOUT_MS = 120_000
TERMINAL_MAX_OUTPUT_BYTES = 1024 * 1024
PTY_MAX_COLS = 500
PTY_MAX_ROWS = 300

FsNodeType = Literal["file", "dir", "symlink", "other"]
FsChangeKind = Literal["created", "modified", "deleted", "renamed"]
GitDiffFileStatus = Literal[
    "added", "modified", "deleted", "renamed", "copied", "typechange", "untracked", "conflicted"
]
PtyExitReason = Literal["exit", "killed", "owner_gone", "timeout", "lost"]


class _WireModel(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


# --------------------------------------------------------------------------- files


class FsNode(_WireModel):
    """One entry of a listing; directories listed below the depth limit carry their ``children``.

    ``path`` is relative to the workspace root (``""`` is the root). ``children`` is ``None`` for
    anything that is not a directory and for directories at the depth limit (not listed).
    """

    name: str
    path: str
    type: FsNodeType
    size_bytes: int | None = None
    mtime_ms: int | None = None
    mode: int | None = None
    children: tuple[FsNode, ...] | None = None


class FsListResult(_WireModel):
    """A listing: the listed directory as a tree, whether entries were left out, the revision."""

    root: FsNode
    truncated: bool
    entry_count: int
    revision: int


class FsReadResult(_WireModel):
    """A file's content (``utf8`` text or ``base64``), with binary detection and truncation."""

    path: str
    encoding: Literal["utf8", "base64"]
    content: str
    size_bytes: int
    truncated: bool
    is_binary: bool
    revision: int


class FsChange(_WireModel):
    """One change in an ``fs.changed`` event."""

    path: str
    kind: FsChangeKind
    is_dir: bool
    size_bytes: int | None = None
    old_path: str | None = None


class FsWriteResult(_WireModel):
    """A completed write: the bytes now in the file and whether it was created."""

    path: str
    size_bytes: int
    created: bool
    revision: int


class FsMutationResult(_WireModel):
    """A completed delete, move or mkdir; ``changed`` is false for a no-op ``mkdir -p``."""

    changes: tuple[FsChange, ...]
    changed: bool
    revision: int


# --------------------------------------------------------------------------- git


class GitDiffFile(_WireModel):
    """One file of a diff, paths relative to the repository top."""

    path: str
    old_path: str | None = None
    status: GitDiffFileStatus
    additions: int
    deletions: int
    is_binary: bool
    is_image: bool
    truncated: bool = False
    old_mode: str | None = None
    new_mode: str | None = None
    hunks: tuple[GitDiffHunk, ...] = ()


class GitDiffResult(_WireModel):
    """A diff: the selector used (``worktree``, ``staged`` or ``refs``) and the files."""

    is_repo: bool
    mode: Literal["worktree", "staged", "refs"]
    files: tuple[GitDiffFile, ...] = ()
    truncated: bool = False


class GitCommit(_WireModel):
    """One commit of a log; times are Unix milliseconds."""

    hash: str
    short_hash: str
    parents: tuple[str, ...]
    author_name: str
    author_email: str
    author_time_ms: int
    committer_name: str
    committer_email: str
    commit_time_ms: int
    subject: str
    body: str
    refs: tuple[str, ...] = ()


class GitLogResult(_WireModel):
    """A page of commits and whether more follow."""

    commits: tuple[GitCommit, ...] = ()
    has_more: bool = False


class GitShowResult(_WireModel):
    """A commit and its diff against its first parent (the empty tree for a root commit)."""

    commit: GitCommit
    files: tuple[GitDiffFile, ...] = ()
    truncated: bool = False


class GitShowFileResult(_WireModel):
    """A file as it is in a commit."""

    ref: str
    path: str
    encoding: Literal["utf8", "base64"]
    content: str
    size_bytes: int
    truncated: bool
    is_binary: bool


class RepoDiscovery(_WireModel):
    """Git repositories found under the workspace (``""`` is the root itself)."""

    repos: tuple[str, ...]
    complete: bool
    degraded_reason: Literal["command_failed", "command_timed_out", "result_limit_exceeded"] | None = None


# --------------------------------------------------------------------------- terminal


class TerminalExecResult(_WireModel):
    """A finished (or timed out) terminal command with its buffered output.

    On timeout ``exitCode`` is 124, ``timedOut`` is true and the command keeps running in the box;
    the output is what it wrote until then. ``running`` is always false, as upstream.
    """

    command_id: str
    stdout: str
    stderr: str
    exit_code: int | None
    wall_time_seconds: float
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    running: bool = False


class PtyOpenResult(_WireModel):
    """A PTY that was opened; its output arrives as ``terminal.pty.output.delta`` events and via reads."""

    pty_id: str
    stream_via: str = "sse-events"
    supports_input: bool = True
    shell: str
    cwd: str
    cols: int
    rows: int
    exec_session_id: str | None = None
    initial_output: str = ""


class PtyWriteResult(_WireModel):
    """What the PTY printed within the yield window after a write."""

    pty_id: str
    output: str


class PtyCloseResult(_WireModel):
    """How a PTY ended."""

    pty_id: str
    exit_code: int | None
    reason: PtyExitReason
