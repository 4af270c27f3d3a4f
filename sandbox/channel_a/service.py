"""``ChannelA``: files, git, terminal exec and PTYs against one box, with change events.

Every operation validates its input first (an absolute path, a ``..`` segment or an out-of-range
limit raises :class:`ChannelAValidationError` before anything runs), then runs one generated bash
script in the box through :meth:`BoxSession.exec`. The script proves confinement itself (real
path under the workspace root, no symlink escape), so the same service works on every backend
that can run bash. Successful mutations increment :attr:`ChannelA.revision` once each and publish
``fs.changed``; git and PTY events are published as upstream does.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final, Literal

from sandbox.box import BoxSession
from sandbox.channel_a import fs as fs_scripts
from sandbox.channel_a import git as git_scripts
from sandbox.channel_a.events import ChannelAEvent, EventSink, EventType
from sandbox.channel_a.models import (
    FS_LIST_DEFAULT_ENTRIES,
    FS_LIST_MAX_DEPTH,
    FS_LIST_MAX_ENTRIES,
    FS_LIST_MAX_OUTPUT_BYTES,
    FS_READ_DEFAULT_BYTES,
    FS_READ_MAX_BYTES,
    GIT_DIFF_DEFAULT_FILE_BYTES,
    GIT_DIFF_MAX_CONTEXT,
    GIT_DIFF_MAX_FILE_BYTES,
    GIT_LOG_MAX_COUNT,
    PTY_MAX_COLS,
    PTY_MAX_ROWS,
    REPO_DISCOVERY_LIMIT,
    TERMINAL_DEFAULT_TIMEOUT_MS,
    TERMINAL_MAX_OUTPUT_BYTES,
    TERMINAL_MAX_TIMEOUT_MS,
    FsChange,
    FsListResult,
    FsMutationResult,
    FsReadResult,
    FsWriteResult,
    GitDiffFile,
    GitDiffResult,
    GitLogResult,
    GitShowFileResult,
    GitShowResult,
    PtyCloseResult,
    PtyExitReason,
    PtyOpenResult,
    PtyWriteResult,
    RepoDiscovery,
    TerminalExecResult,
)
from sandbox.channel_a.pty import Pty, PtyHost, PtyLauncher, default_pty_host
from sandbox.channel_a.runner import (
    EXIT_INVALID,
    SCRIPT_ROOT,
    BoxRunner,
    capture_script,
    parse_captures,
    raise_for_confinement,
    reply_budget_for,
)
from sandbox.channel_a.terminal import parse_terminal_output, terminal_command
from sandbox.errors import (
    BoxNotFound,
    ChannelANotFound,
    ChannelAUnavailable,
    ChannelAUnsupported,
    ChannelAValidationError,
    InvalidRequest,
    PathNotFound,
    ProviderError,
)
from sandbox.git_parsers import GitStatus, parse_numstat_z, parse_porcelain_v2
from sandbox.paths import confinement_script

__all__ = ["ChannelA", "Encoding", "GitChangeReason"]

log = logging.getLogger("sandbox.channel_a")

Encoding = Literal["utf8", "base64"]
GitChangeReason = Literal["commit", "checkout", "stage", "worktree", "fetch", "unknown"]

_BINARY_SNIFF_BYTES: Final = 8192
_GIT_TIMEOUT: Final = 120.0
_MAX_UNTRACKED_FILES: Final = 1000
_EXEC_MARGIN_SECONDS: Final = 30.0
_PTY_YIELD_MS: Final = 250


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ChannelAValidationError(f"{name} must be an integer in {low}..{high}, not {value!r}")
    return value


def _check_encoding(encoding: str) -> Encoding:
    if encoding == "utf8":
        return "utf8"
    if encoding == "base64":
        return "base64"
    raise ChannelAValidationError(f"encoding must be utf8 or base64, not {encoding!r}")


def _encode_content(data: bytes, encoding: Encoding, truncated: bool) -> tuple[Encoding, str, bool]:
    """Text when asked and possible; base64 for binary (NUL in the first 8 KiB) or invalid UTF-8."""
    is_binary = b"\0" in data[:_BINARY_SNIFF_BYTES]
    if encoding == "utf8" and not is_binary:
        # A cut can split a multi-byte character: accept an incomplete tail only when truncated.
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        try:
            return "utf8", decoder.decode(data, final=not truncated), False
        except UnicodeDecodeError:
            pass
    return "base64", base64.b64encode(data).decode("ascii"), is_binary


class ChannelA:
    """Channel-A operations against one box.

    Args:
        session: The box.
        workspace_root: Where the workspace is in the box; every path is relative to it.
        events: Where change events go (none are published without a sink).
        lease_epoch: The lease epoch of the box, carried by every event.
        revision: Starting value of the mutation counter (to continue a persisted one).
        pty_launcher: How PTYs reach the box (a :class:`PtyHost`, or a :class:`PtyLauncher` that
            starts processes on a PTY held here); by default the session itself when it is either
            (local boxes are launchers, selfhosted sessions hosts), else none (``pty_open`` then
            raises :class:`ChannelAUnsupported`).
        command_timeout: Seconds any internal file or git command may take.
        max_reply_bytes: The most bytes one exec of the session may carry each way; larger
            inputs and answers move in pieces through a temp file in the box. ``"auto"`` picks
            the NATS message budget for sessions that may reach a selfhosted machine and no cap
            otherwise; ``None`` means no cap.
    """

    def __init__(
        self,
        session: BoxSession,
        *,
        workspace_root: str = "/workspace",
        events: EventSink | None = None,
        lease_epoch: int = 0,
        revision: int = 0,
        pty_launcher: PtyHost | PtyLauncher | None = None,
        command_timeout: float = 60.0,
        max_reply_bytes: int | Literal["auto"] | None = "auto",
    ) -> None:
        self.session = session
        self.workspace_root = workspace_root
        self.events = events
        self.lease_epoch = lease_epoch
        self._revision = revision
        budget = reply_budget_for(session) if max_reply_bytes == "auto" else max_reply_bytes
        self._runner = BoxRunner(session, workspace_root, reply_budget=budget)
        self._pty_host = default_pty_host(session if pty_launcher is None else pty_launcher)
        self._command_timeout = command_timeout
        self._ptys: dict[str, Pty] = {}
        self._pty_seq: dict[str, int] = {}

    @property
    def revision(self) -> int:
        """How many mutations succeeded through this service (plus the seed)."""
        return self._revision

    # ----------------------------------------------------------------------- events

    async def _emit(self, event_type: EventType, payload: dict[str, Any]) -> None:
        if self.events is None:
            return
        event = ChannelAEvent(
            type=event_type,
            payload={**payload, "revision": self._revision, "leaseEpoch": self.lease_epoch},
            lease_epoch=self.lease_epoch,
            revision=self._revision,
        )
        try:
            await self.events.publish(event)
        except Exception as err:  # events are best effort: never fail the operation
            log.warning("dropped %s event: %s", event_type, err)

    async def _mutated(self, changes: Sequence[FsChange], source: str = "write") -> None:
        self._revision += 1
        await self._emit(
            "fs.changed",
            {"changes": [change.model_dump() for change in changes], "source": source},
        )

    # ----------------------------------------------------------------------- files

    async def fs_list(
        self,
        path: str = "",
        *,
        depth: int = 1,
        max_entries: int = FS_LIST_DEFAULT_ENTRIES,
        include_hidden: bool = True,
    ) -> FsListResult:
        """List a directory as a tree, ``depth`` levels deep (0 counts as 1), at most ``max_entries``.

        Raises:
            ChannelAValidationError: bad path or limits, or the directory resolves outside.
            ChannelANotFound: no such directory.
        """
        rel = fs_scripts.normalise_rel_path(path, allow_root=True)
        effective = max(1, _check_int("depth", depth, 0, FS_LIST_MAX_DEPTH))
        _check_int("maxEntries", max_entries, 1, FS_LIST_MAX_ENTRIES)
        command = fs_scripts.list_command(effective, max_entries, FS_LIST_MAX_OUTPUT_BYTES, include_hidden)
        _, payload = await self._runner.run_confined(rel, command, timeout=self._command_timeout, display=path)
        with fs_scripts.cyclic_gc_paused():
            entries = fs_scripts.parse_list_output(payload, max_entries, FS_LIST_MAX_OUTPUT_BYTES)
            root = fs_scripts.build_tree(rel, effective, entries)
        # The tree is not validated again: pydantic keeps a model instance as it is.
        return FsListResult(root=root, truncated=entries.truncated, entry_count=len(entries), revision=self._revision)

    async def fs_read(
        self, path: str, *, encoding: Encoding = "utf8", max_bytes: int = FS_READ_DEFAULT_BYTES
    ) -> FsReadResult:
        """Read a regular file: text (``utf8``) or ``base64``; binary content is always base64.

        Raises:
            ChannelAValidationError: bad path or limit, a directory or special file, or an escape.
            ChannelANotFound: no such file.
        """
        rel = fs_scripts.normalise_rel_path(path)
        wanted = _check_encoding(encoding)
        _check_int("maxBytes", max_bytes, 0, FS_READ_MAX_BYTES)
        result = await self._runner.run(fs_scripts.read_script(rel, max_bytes), timeout=self._command_timeout)
        if result.exit_code != 0:
            raise_for_confinement(result, path)
            raise ChannelAUnavailable(f"reading {path!r} failed in the box (exit {result.exit_code})", path=path)
        (size_line,), data = fs_scripts.parse_ok_lines(result.stdout, fs_scripts.READ_OK, 1)
        truncated = len(data) > max_bytes
        content = data[:max_bytes]
        used, text, is_binary = _encode_content(content, wanted, truncated)
        size = int(size_line) if size_line.isdigit() else len(data)
        return FsReadResult(
            path=rel,
            encoding=used,
            content=text,
            size_bytes=size,
            truncated=truncated,
            is_binary=is_binary,
            revision=self._revision,
        )

    async def fs_write(
        self,
        path: str,
        content: str | bytes,
        *,
        encoding: Encoding = "utf8",
        overwrite: bool = True,
        create_parents: bool = True,
    ) -> FsWriteResult:
        """Write a whole file; ``content`` is text, base64 text (``encoding="base64"``) or bytes.

        Raises:
            ChannelAValidationError: bad path or base64, a directory at the path, or an escape.
            ChannelAConflict: the file exists and ``overwrite`` is false.
            ChannelANotFound: the parent is missing and ``create_parents`` is false.
            ChannelAPartialMutation: the write failed after the file was truncated.
        """
        rel = fs_scripts.normalise_rel_path(path)
        data = self._content_bytes(content, _check_encoding(encoding))
        script = fs_scripts.write_script(rel, overwrite=overwrite, create_parents=create_parents)
        result = await self._runner.run(script, stdin=data, timeout=self._command_timeout)
        if result.exit_code != 0:
            raise_for_confinement(result, path)
            raise ChannelAUnavailable(f"writing {path!r} failed in the box (exit {result.exit_code})", path=path)
        (existed, size), _ = fs_scripts.parse_ok_lines(result.stdout, fs_scripts.WRITE_OK, 2)
        size_bytes = int(size) if size.isdigit() else len(data)
        created = existed != "1"
        await self._mutated(
            [FsChange(path=rel, kind="created" if created else "modified", is_dir=False, size_bytes=size_bytes)]
        )
        return FsWriteResult(path=rel, size_bytes=size_bytes, created=created, revision=self._revision)

    @staticmethod
    def _content_bytes(content: str | bytes, encoding: Encoding) -> bytes:
        if isinstance(content, bytes):
            return content
        if not isinstance(content, str):
            raise ChannelAValidationError(f"content must be text or bytes, not {type(content).__name__}")
        if encoding == "base64":
            try:
                return base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise ChannelAValidationError("content is not valid base64") from None
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:
            raise ChannelAValidationError("content is not valid Unicode text (lone surrogate)") from None

    async def fs_delete(self, path: str, *, recursive: bool = False) -> FsMutationResult:
        """Delete a file, a link (never its target) or a directory (non-empty ones need ``recursive``).

        Raises:
            ChannelAValidationError: bad path, the root, or an escape.
            ChannelANotFound: nothing at the path.
            ChannelAConflict: a non-empty directory without ``recursive``.
        """
        rel = fs_scripts.normalise_rel_path(path)
        result = await self._runner.run(
            fs_scripts.delete_script(rel, recursive=recursive), timeout=self._command_timeout
        )
        if result.exit_code != 0:
            raise_for_confinement(result, path)
            raise ChannelAUnavailable(f"deleting {path!r} failed in the box (exit {result.exit_code})", path=path)
        (is_dir,), _ = fs_scripts.parse_ok_lines(result.stdout, fs_scripts.DELETE_OK, 1)
        changes = (FsChange(path=rel, kind="deleted", is_dir=is_dir == "1"),)
        await self._mutated(changes)
        return FsMutationResult(changes=changes, changed=True, revision=self._revision)

    async def fs_move(
        self, path: str, new_path: str, *, overwrite: bool = False, create_parents: bool = True
    ) -> FsMutationResult:
        """Move or rename ``path`` to ``new_path`` (emitted as ``deleted`` + ``created``, as upstream).

        Raises:
            ChannelAValidationError: a bad path or an escape, on either side.
            ChannelANotFound: the source is missing (or the destination's parent, without
                ``create_parents``).
            ChannelAConflict: the destination exists and ``overwrite`` is false, or ``mv`` refused.
        """
        src = fs_scripts.normalise_rel_path(path)
        dst = fs_scripts.normalise_rel_path(new_path)
        script = fs_scripts.move_script(src, dst, overwrite=overwrite, create_parents=create_parents)
        result = await self._runner.run(script, timeout=self._command_timeout)
        if result.exit_code != 0:
            failing = new_path if fs_scripts.MOVE_STAGE_DEST in result.stdout else path
            raise_for_confinement(result, failing)
            raise ChannelAUnavailable(f"moving {path!r} failed in the box (exit {result.exit_code})", path=path)
        (is_dir,), _ = fs_scripts.parse_ok_lines(result.stdout, fs_scripts.MOVE_OK, 1)
        changes = (
            FsChange(path=src, kind="deleted", is_dir=is_dir == "1"),
            FsChange(path=dst, kind="created", is_dir=is_dir == "1"),
        )
        await self._mutated(changes)
        return FsMutationResult(changes=changes, changed=True, revision=self._revision)

    async def fs_mkdir(self, path: str, *, recursive: bool = True) -> FsMutationResult:
        """Create a directory (and its parents when ``recursive``); an existing one is a no-op then.

        Raises:
            ChannelAValidationError: bad path, an escape, or an existing path without ``recursive``.
            ChannelANotFound: the parent is missing and ``recursive`` is false.
        """
        rel = fs_scripts.normalise_rel_path(path)
        result = await self._runner.run(
            fs_scripts.mkdir_script(rel, recursive=recursive), timeout=self._command_timeout
        )
        if result.exit_code != 0:
            raise_for_confinement(result, path)
            raise ChannelAUnavailable(f"creating {path!r} failed in the box (exit {result.exit_code})", path=path)
        (existed,), _ = fs_scripts.parse_ok_lines(result.stdout, fs_scripts.MKDIR_OK, 1)
        if existed == "1":
            return FsMutationResult(changes=(), changed=False, revision=self._revision)
        changes = (FsChange(path=rel, kind="created", is_dir=True),)
        await self._mutated(changes)
        return FsMutationResult(changes=changes, changed=True, revision=self._revision)

    # ----------------------------------------------------------------------- git

    async def git_status(self, path: str = "", *, include_ignored: bool = False) -> GitStatus:
        """``git status`` of the repository containing ``path`` (a not-a-repo status if there is none).

        Raises:
            ChannelAUnavailable: git failed, or a path in the output is not valid UTF-8.
        """
        rel = fs_scripts.normalise_rel_path(path, allow_root=True)
        status, payload = await self._runner.run_confined(
            rel, git_scripts.status_command(include_ignored=include_ignored), timeout=_GIT_TIMEOUT, display=path
        )
        if payload.startswith(git_scripts.STATUS_REPO_NOT):
            return GitStatus.not_a_repo()
        if status != 0 or not payload.startswith(git_scripts.STATUS_REPO):
            raise ChannelAUnavailable(f"git status failed in {path!r} (exit {status})", path=path)
        try:
            text = payload[len(git_scripts.STATUS_REPO) :].decode("utf-8")
        except UnicodeDecodeError:
            raise ChannelAUnavailable("git status printed a path that is not valid UTF-8", path=path) from None
        return parse_porcelain_v2(text)

    async def git_diff(
        self,
        path: str = "",
        *,
        staged: bool = False,
        include_untracked: bool = False,
        from_ref: str | None = None,
        to_ref: str | None = None,
        pathspec: Sequence[str] = (),
        context_lines: int = 3,
        max_bytes_per_file: int = GIT_DIFF_DEFAULT_FILE_BYTES,
    ) -> GitDiffResult:
        """A parsed diff: between refs, of the index (``staged``), or of the worktree (default).

        Refs win over ``staged``. ``from_ref="HEAD"`` falls back to the index in an unborn
        repository. ``include_untracked`` (worktree only) adds untracked files as all-added.
        Pathspecs are literal paths relative to the repository top.

        Raises:
            ChannelAValidationError: bad path, ref, pathspec or limit.
            ChannelANotFound: git refused the refs (unknown revision).
        """
        rel = fs_scripts.normalise_rel_path(path, allow_root=True)
        _check_int("contextLines", context_lines, 0, GIT_DIFF_MAX_CONTEXT)
        _check_int("maxBytesPerFile", max_bytes_per_file, 1, GIT_DIFF_MAX_FILE_BYTES)
        if to_ref is not None and from_ref is None:
            raise ChannelAValidationError("toRef needs a fromRef")
        mode: Literal["worktree", "staged", "refs"]
        if from_ref is not None:
            mode = "refs"
            words = [git_scripts.validate_ref(from_ref, name="fromRef")]
            if to_ref is not None:
                words.append(git_scripts.validate_ref(to_ref, name="toRef"))
        elif staged:
            mode, words = "staged", ["--cached"]
        else:
            mode, words = "worktree", []
        files, truncated, is_repo = await self._diff(
            rel,
            path,
            words,
            head_or_cached=from_ref == "HEAD",
            pathspec=pathspec,
            context_lines=context_lines,
            include_untracked=include_untracked and mode == "worktree",
            max_bytes_per_file=max_bytes_per_file,
            refs=mode == "refs",
        )
        return GitDiffResult(is_repo=is_repo, mode=mode, files=tuple(files), truncated=truncated)

    async def _diff(
        self,
        rel: str,
        shown: str,
        words: list[str],
        *,
        head_or_cached: bool,
        pathspec: Sequence[str],
        context_lines: int,
        include_untracked: bool,
        max_bytes_per_file: int,
        refs: bool,
    ) -> tuple[list[GitDiffFile], bool, bool]:
        setup, captures = git_scripts.diff_commands(
            range_words=words,
            head_or_cached=head_or_cached,
            pathspec=pathspec,
            context_lines=context_lines,
            include_untracked=include_untracked,
            max_bytes_per_file=max_bytes_per_file,
            max_untracked_files=_MAX_UNTRACKED_FILES,
        )
        status, payload = await self._runner.run_confined(
            rel, setup + capture_script(captures), timeout=_GIT_TIMEOUT, display=shown
        )
        if payload.startswith(git_scripts.NOT_REPO):
            return [], False, False
        if status != 0:
            raise ChannelAUnavailable(f"git diff failed in {shown!r} (exit {status})", path=shown)
        parts = parse_captures(payload)
        numstat = parts.get("numstat")
        patch = parts.get("patch")
        if numstat is None or patch is None:
            raise ChannelAUnavailable("git diff gave an incomplete answer", path=shown)
        if numstat.status != 0:
            if refs:
                raise ChannelANotFound(f"git cannot diff {' '.join(words)!r}: unknown revision?", path=shown)
            raise ChannelAUnavailable(f"git diff failed (exit {numstat.status})", path=shown)
        try:
            entries = parse_numstat_z(numstat.data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ChannelAUnavailable("git diff printed a path that is not valid UTF-8", path=shown) from None
        files, truncated = git_scripts.assemble_tracked(entries, patch.data, max_bytes_per_file=max_bytes_per_file)
        if include_untracked and (untracked := parts.get("untracked")) is not None:
            items, complete = git_scripts.parse_untracked(untracked.data)
            truncated = truncated or not complete or len(items) > _MAX_UNTRACKED_FILES
            files += [
                git_scripts.untracked_file(item, max_bytes_per_file=max_bytes_per_file)
                for item in items[:_MAX_UNTRACKED_FILES]
            ]
        return files, truncated, True

    async def git_log(
        self,
        path: str = "",
        *,
        ref: str = "HEAD",
        max_count: int = 100,
        skip: int = 0,
        pathspec: Sequence[str] = (),
    ) -> GitLogResult:
        """Commits reachable from ``ref``, newest first; empty when git fails (unborn HEAD, bad ref).

        Raises:
            ChannelAValidationError: bad path, ref, pathspec or limits.
        """
        rel = fs_scripts.normalise_rel_path(path, allow_root=True)
        git_scripts.validate_ref(ref)
        _check_int("maxCount", max_count, 1, GIT_LOG_MAX_COUNT)
        _check_int("skip", skip, 0, 2**31 - 1)
        command = git_scripts.log_command(ref=ref, max_count=max_count, skip=skip, pathspec=pathspec)
        status, payload = await self._runner.run_confined(rel, command, timeout=_GIT_TIMEOUT, display=path)
        if status != 0 or payload.startswith(git_scripts.NOT_REPO):
            return GitLogResult()
        commits = git_scripts.parse_log(payload)
        return GitLogResult(commits=tuple(commits[:max_count]), has_more=len(commits) > max_count)

    async def git_show(
        self,
        path: str = "",
        *,
        ref: str = "HEAD",
        file_path: str | None = None,
        encoding: Encoding = "utf8",
        max_bytes_per_file: int = GIT_DIFF_DEFAULT_FILE_BYTES,
    ) -> GitShowResult | GitShowFileResult:
        """A commit with its diff against its first parent, or with ``file_path`` that file at ``ref``.

        Raises:
            ChannelAValidationError: bad path, ref or limit; ``file_path`` is not a file at ``ref``.
            ChannelANotFound: no such commit, or no such file at ``ref``.
        """
        rel = fs_scripts.normalise_rel_path(path, allow_root=True)
        git_scripts.validate_ref(ref)
        _check_int("maxBytesPerFile", max_bytes_per_file, 1, GIT_DIFF_MAX_FILE_BYTES)
        if file_path is not None:
            return await self._show_file(rel, path, ref, file_path, _check_encoding(encoding), max_bytes_per_file)
        found = await self.git_log(path, ref=ref, max_count=1)
        if not found.commits:
            raise ChannelANotFound(f"no commit {ref!r} in {path!r}", path=path)
        commit = found.commits[0]
        parent = commit.parents[0] if commit.parents else git_scripts.EMPTY_TREE
        files, truncated, _ = await self._diff(
            rel,
            path,
            [parent, commit.hash],
            head_or_cached=False,
            pathspec=(),
            context_lines=3,
            include_untracked=False,
            max_bytes_per_file=max_bytes_per_file,
            refs=True,
        )
        return GitShowResult(commit=commit, files=tuple(files), truncated=truncated)

    async def _show_file(
        self, rel: str, shown: str, ref: str, file_path: str, encoding: Encoding, max_bytes: int
    ) -> GitShowFileResult:
        file_rel = fs_scripts.normalise_rel_path(file_path)
        command = git_scripts.show_file_command(ref=ref, file_path=file_rel, max_bytes=max_bytes)
        status, payload = await self._runner.run_confined(rel, command, timeout=_GIT_TIMEOUT, display=shown)
        if payload.startswith(git_scripts.NOT_REPO):
            raise ChannelANotFound(f"{shown!r} is not in a git repository", path=shown)
        if payload.startswith(b"__CHANNEL_A_GIT_NO_OBJECT__"):
            raise ChannelANotFound(f"no file {file_rel!r} at {ref!r}", path=file_rel)
        if payload.startswith(b"__CHANNEL_A_GIT_NOT_BLOB__"):
            raise ChannelAValidationError(f"{file_rel!r} at {ref!r} is not a file", path=file_rel)
        (size_line,), data = fs_scripts.parse_ok_lines(payload, b"__CHANNEL_A_GIT_BLOB__\n", 1)
        truncated = len(data) > max_bytes
        used, text, is_binary = _encode_content(data[:max_bytes], encoding, truncated)
        return GitShowFileResult(
            ref=ref,
            path=file_rel,
            encoding=used,
            content=text,
            size_bytes=int(size_line) if size_line.isdigit() else len(data),
            truncated=truncated,
            is_binary=is_binary,
        )

    async def detect_repos(self, *, timeout: float = 15.0) -> RepoDiscovery:
        """Git repositories under the workspace, skipping dependency and build folders.

        A search that runs past ``timeout`` or fails still returns what it found, with
        ``complete=false`` and the reason; more than 256 repositories are cut to 256.
        """
        command = git_scripts.discovery_command(limit=REPO_DISCOVERY_LIMIT, timeout_seconds=timeout)
        _, payload = await self._runner.run_confined("", command, timeout=timeout + _EXEC_MARGIN_SECONDS)
        head, _, body = payload.partition(b"\n")
        code = int(head[len(b"STATUS:") :]) if head.startswith(b"STATUS:") and head[7:].isdigit() else 1
        found = [item.decode("utf-8", "replace") for item in body.split(b"\0") if item]
        repos = sorted(
            {item[2:].rpartition("/")[0] if item != "./.git" else "" for item in found if item.startswith("./")}
        )
        reason: Literal["command_failed", "command_timed_out", "result_limit_exceeded"] | None = None
        if len(found) > REPO_DISCOVERY_LIMIT:
            reason, repos = "result_limit_exceeded", repos[:REPO_DISCOVERY_LIMIT]
        if code == 124:
            reason = "command_timed_out"
        elif code != 0:
            reason = "command_failed"
        return RepoDiscovery(repos=tuple(repos), complete=reason is None, degraded_reason=reason)

    async def emit_git_changed(self, path: str = "", reason: GitChangeReason = "unknown") -> GitStatus:
        """Re-read ``git status`` of ``path`` and publish ``git.changed``; returns the status."""
        status = await self.git_status(path)
        await self._emit(
            "git.changed",
            {
                "repo": fs_scripts.normalise_rel_path(path, allow_root=True),
                "head": status.head,
                "dirty": len(status.files) > 0,
                "ahead": status.ahead,
                "behind": status.behind,
                "changedFileCount": len(status.files),
                "reason": reason,
            },
        )
        return status

    # ----------------------------------------------------------------------- terminal

    def _cwd_rel(self, cwd: str) -> str:
        # The box's own path of the workspace passes through (upstream's selfhosted virtual root).
        root = self.workspace_root.rstrip("/")
        if root and (cwd == root or cwd.startswith(root + "/")):
            cwd = cwd[len(root) :]
            cwd = cwd.lstrip("/")
        return fs_scripts.normalise_rel_path(cwd, allow_root=True)

    async def terminal_exec(
        self,
        command: str,
        *,
        cwd: str = "",
        timeout_ms: int = TERMINAL_DEFAULT_TIMEOUT_MS,
        emit_stream: bool = True,
    ) -> TerminalExecResult:
        """Run a shell command in ``cwd`` and return its buffered output (1 MiB per stream at most).

        After ``timeout_ms`` the call returns exit code 124 with the output so far and the message
        ``Terminal command exceeded <ms>ms`` on stderr, and the command keeps running in the box.
        With ``emit_stream`` the output is also published as ``sandbox.command.output.delta``.

        Raises:
            ChannelAValidationError: empty command, bad cwd or timeout.
            ChannelANotFound: the cwd does not exist.
        """
        if not isinstance(command, str) or not command.strip():
            raise ChannelAValidationError("command must be a non-empty string")
        _check_int("timeoutMs", timeout_ms, 1, TERMINAL_MAX_TIMEOUT_MS)
        rel = self._cwd_rel(cwd)
        script = terminal_command(
            command, timeout_seconds=timeout_ms / 1000, max_output_bytes=TERMINAL_MAX_OUTPUT_BYTES
        )
        started = time.monotonic()
        _, payload = await self._runner.run_confined(
            rel, script, timeout=timeout_ms / 1000 + _EXEC_MARGIN_SECONDS, display=cwd
        )
        wall = time.monotonic() - started
        out = parse_terminal_output(payload)
        stdout = out.stdout.decode("utf-8", "replace")
        stderr = out.stderr.decode("utf-8", "replace")
        if out.timed_out:
            stderr += (
                "\n" if stderr and not stderr.endswith("\n") else ""
            ) + f"Terminal command exceeded {timeout_ms}ms"
        result = TerminalExecResult(
            command_id=str(uuid.uuid4()),
            stdout=stdout,
            stderr=stderr,
            exit_code=124 if out.timed_out else out.exit_code,
            wall_time_seconds=round(timeout_ms / 1000 if out.timed_out else wall, 4),
            timed_out=out.timed_out,
            stdout_truncated=out.stdout_truncated,
            stderr_truncated=out.stderr_truncated,
        )
        if emit_stream:
            for seq, (stream, chunk) in enumerate((("stdout", stdout), ("stderr", stderr))):
                if chunk:
                    await self._emit(
                        "sandbox.command.output.delta",
                        {"stream": stream, "chunk": chunk, "commandId": result.command_id, "seq": seq},
                    )
        return result

    # ----------------------------------------------------------------------- PTY

    async def _confined_dir(self, rel: str, shown: str) -> str:
        script = (
            confinement_script(SCRIPT_ROOT, rel)
            + f'[ -d "$opengeni_target" ] || exit {EXIT_INVALID}\n'
            + "printf '__CHANNEL_A_DIR__%s\\0' \"$opengeni_target\"\n"
        )
        result = await self._runner.run(script, timeout=self._command_timeout)
        if result.exit_code == EXIT_INVALID:
            raise ChannelAValidationError(f"not a directory: {shown}", path=shown)
        if result.exit_code != 0:
            raise_for_confinement(result, shown)
            raise ChannelAUnavailable(f"cannot check the directory {shown!r} (exit {result.exit_code})", path=shown)
        marker = b"__CHANNEL_A_DIR__"
        at = result.stdout.find(marker)
        end = result.stdout.find(b"\0", at)
        if at < 0 or end < 0:
            raise ChannelAUnavailable("the box's answer is missing the directory", path=shown)
        return result.stdout[at + len(marker) : end].decode("utf-8", "surrogateescape")

    def _pty(self, pty_id: str) -> Pty:
        pty = self._ptys.get(pty_id)
        if pty is None:
            raise ChannelANotFound(f"no PTY {pty_id!r}")
        return pty

    async def pty_open(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        cwd: str = "",
        shell: str | None = None,
        env: dict[str, str] | None = None,
    ) -> PtyOpenResult:
        """Start a login shell on a new pseudo-terminal in the box; output streams as events.

        Raises:
            ChannelAValidationError: size out of range, bad cwd or shell.
            ChannelANotFound: the directory does not exist.
            ChannelAUnsupported: this box has no PTY support.
            ChannelAUnavailable: the box could not start the shell.
        """
        _check_int("cols", cols, 1, PTY_MAX_COLS)
        _check_int("rows", rows, 1, PTY_MAX_ROWS)
        program = shell or "/bin/bash"
        if not program.startswith("/") or "\0" in program or any(ch.isspace() for ch in program):
            raise ChannelAValidationError(f"shell must be an absolute path to a program, not {program!r}")
        rel = self._cwd_rel(cwd)
        if self._pty_host is None:
            raise ChannelAUnsupported(f"{type(self.session).__name__} boxes have no PTY support")
        box_cwd = await self._confined_dir(rel, cwd)
        try:
            # The callbacks name ``pty``, bound when open_pty returns (a host never calls them before).
            pty = await self._pty_host.open_pty(
                [program, "-l"],
                cwd=box_cwd,
                env={"TERM": "xterm-256color", **(env or {})},
                cols=cols,
                rows=rows,
                on_output=lambda chunk: self._pty_output(pty.pty_id, chunk),
                on_exit=lambda code, reason: self._pty_exited(pty.pty_id, code, reason),
            )
        except BoxNotFound:
            raise
        except PathNotFound as err:
            raise ChannelANotFound(f"the directory {cwd!r} is gone: {err.message}", path=cwd) from err
        except InvalidRequest as err:
            raise ChannelAValidationError(f"cannot start {program}: {err.message}") from err
        except ProviderError as err:
            raise ChannelAUnavailable(f"cannot start the PTY shell: {err.message}") from err
        except OSError as err:
            raise ChannelAUnavailable(f"cannot start the PTY shell: {err}") from err
        self._ptys[pty.pty_id] = pty
        await self._emit(
            "terminal.pty.started",
            {"ptyId": pty.pty_id, "cols": cols, "rows": rows, "shell": program, "cwd": rel},
        )
        initial = await pty.read(timeout=_PTY_YIELD_MS / 1000)
        return PtyOpenResult(
            pty_id=pty.pty_id,
            shell=program,
            cwd=rel,
            cols=cols,
            rows=rows,
            initial_output=initial.decode("utf-8", "replace"),
        )

    async def _pty_output(self, pty_id: str, chunk: str) -> None:
        seq = self._pty_seq.get(pty_id, 0)
        self._pty_seq[pty_id] = seq + 1
        await self._emit("terminal.pty.output.delta", {"ptyId": pty_id, "stream": "stdout", "chunk": chunk, "seq": seq})

    async def _pty_exited(self, pty_id: str, exit_code: int | None, reason: PtyExitReason) -> None:
        await self._emit("terminal.pty.exited", {"ptyId": pty_id, "exitCode": exit_code, "reason": reason})

    async def pty_write(self, pty_id: str, data: str | bytes, *, yield_ms: int = _PTY_YIELD_MS) -> PtyWriteResult:
        """Type ``data`` into the PTY and return what it printed within ``yield_ms`` (0: do not wait).

        Raises:
            ChannelANotFound: no such PTY.
            ChannelAConflict: the shell has exited ("pty session lost").
        """
        pty = self._pty(pty_id)
        _check_int("yieldMs", yield_ms, 0, 60_000)
        await pty.write(data.encode("utf-8") if isinstance(data, str) else data)
        output = await pty.read(timeout=yield_ms / 1000) if yield_ms else b""
        return PtyWriteResult(pty_id=pty_id, output=output.decode("utf-8", "replace"))

    async def pty_read(self, pty_id: str, *, timeout: float = 0.0) -> bytes:
        """Unread PTY output, waiting up to ``timeout`` seconds for some (``b""`` if none came).

        Raises:
            ChannelANotFound: no such PTY.
        """
        return await self._pty(pty_id).read(timeout=timeout)

    async def pty_read_until(self, pty_id: str, needle: str | bytes, *, timeout: float = 5.0) -> bytes:
        """Read PTY output until ``needle`` shows up or ``timeout`` passes; returns what was read."""
        wanted = needle.encode("utf-8") if isinstance(needle, str) else needle
        return await self._pty(pty_id).read_until(wanted, timeout)

    async def pty_resize(self, pty_id: str, cols: int, rows: int) -> None:
        """Resize the PTY; the program in it gets ``SIGWINCH``.

        Raises:
            ChannelANotFound: no such PTY.
            ChannelAValidationError: size out of range.
        """
        _check_int("cols", cols, 1, PTY_MAX_COLS)
        _check_int("rows", rows, 1, PTY_MAX_ROWS)
        await self._pty(pty_id).resize(cols, rows)

    def pty_exited(self, pty_id: str) -> bool:
        """Whether the shell on the PTY has ended (it stays listed until closed)."""
        return self._pty(pty_id).exited

    async def pty_close(self, pty_id: str) -> PtyCloseResult:
        """Hang up the PTY and end its shell (killed after a second); publishes ``terminal.pty.exited``.

        Raises:
            ChannelANotFound: no such PTY.
        """
        pty = self._pty(pty_id)
        code, reason = await pty.close()
        self._ptys.pop(pty_id, None)
        self._pty_seq.pop(pty_id, None)
        return PtyCloseResult(pty_id=pty_id, exit_code=code, reason=reason)

    async def aclose(self) -> None:
        """Close every PTY this service opened."""
        for pty_id in list(self._ptys):
            with contextlib.suppress(Exception):
                await self.pty_close(pty_id)
