"""``sandboxctl fs ...``, ``sandboxctl git ...`` and ``sandboxctl pty``: Channel-A from a terminal.

Each command holds the lease as a ``direct`` holder for as long as it runs (a cold lease gets its
box first), resumes the box from the grant's envelope with the provider of the grant's backend,
runs one Channel-A operation and releases the lease on exit (all of it is
:class:`client.box_access.BoxAccess`, whose docstring says what this needs from the worker's host).
Change events go to the stack's NATS (best effort). ``--json`` prints the result document;
without it the output is for people (``fs cat`` and ``git show --file`` print the raw file).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer

from cli.exits import EXIT_TRUNCATED, connected, load_settings, run
from cli.lease import DataDir, Json
from cli.output import emit, fail, progress
from client.box_access import BoxAccess
from client.connection import connect_leases
from sandbox.channel_a import ChannelA
from sandbox.channel_a.models import (
    FS_READ_DEFAULT_BYTES,
    FS_READ_MAX_BYTES,
    FsMutationResult,
    FsNode,
    GitDiffFile,
    GitShowFileResult,
)

T = TypeVar("T")

fs_app = typer.Typer(help="Files in a lease's box: ls, cat, put, rm, mv, mkdir.", no_args_is_help=True)
git_app = typer.Typer(help="Read-only git in a lease's box: status, diff, log, show.", no_args_is_help=True)

Workspace = typer.Argument(..., help="Workspace id.")
Group = typer.Argument(..., help="Sandbox group id.")


def register(app: typer.Typer) -> None:
    """Attach ``fs``, ``git`` and ``pty`` to the root app."""
    app.add_typer(fs_app, name="fs")
    app.add_typer(git_app, name="git")
    app.command("pty", help="An interactive shell in the lease's box: sandboxctl pty WORKSPACE GROUP.")(pty_command)


def _with_channel(
    workspace: str,
    group: str,
    data_dir: Path | None,
    action: Callable[[ChannelA], Awaitable[T]],
    *,
    quiet: bool = False,
) -> T:
    """Run ``action(ChannelA)`` on the lease's box (:class:`client.box_access.BoxAccess`); clear exits."""
    settings = load_settings(data_dir)

    async def main() -> T:
        label = f"attaching to {workspace}/{group} (a cold lease creates its box first)"
        boxes = BoxAccess(await connected(connect_leases(settings)), settings)
        async with contextlib.AsyncExitStack() as stack:
            with progress(label) if not quiet else contextlib.nullcontext():
                grant = await stack.enter_async_context(boxes.hold(workspace, group))
            channel = await stack.enter_async_context(boxes.open(grant))
            return await action(channel)

    return run(settings, main)


# --------------------------------------------------------------------------- fs


def _flatten(node: FsNode, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for child in node.children or ():
        out.append({"type": child.type, "size": child.size_bytes, "path": child.path})
        _flatten(child, out)
    return out


def _size(value: int | None) -> str:
    return "-" if value is None else str(value)


@fs_app.command("ls")
def fs_ls(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument("", help="Directory relative to the workspace (default: the root)."),
    depth: int = typer.Option(1, "--depth", "-d", help="Levels to list (1..8)."),
    max_entries: int = typer.Option(2000, "--max-entries", help="Stop after this many entries (max 20000)."),
    no_hidden: bool = typer.Option(False, "--no-hidden", help="Leave out dot files and dot directories."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """List a directory of the workspace."""
    result = _with_channel(
        workspace,
        group,
        data_dir,
        lambda ca: ca.fs_list(path, depth=depth, max_entries=max_entries, include_hidden=not no_hidden),
    )
    if json_out:
        emit(result, True)
        return
    suffix = {"dir": "/", "symlink": "@", "other": "|"}
    for row in _flatten(result.root, []):
        print(f"{_size(row['size']):>10}  {row['path']}{suffix.get(row['type'], '')}")
    if result.truncated:
        print(f"(truncated after {result.entry_count} entries)", file=sys.stderr)


@fs_app.command("cat")
def fs_cat(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument(..., help="File relative to the workspace."),
    max_bytes: int | None = typer.Option(
        None,
        "--max-bytes",
        help="Read at most this many bytes and exit 0 when the file is longer (default: 5 MiB, and a "
        "longer file exits 8 after printing its first 5 MiB).",
    ),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Print a file of the workspace (raw bytes; --json for the read document).

    A file longer than the limit is cut: its start is printed and a note on stderr says so. Cut by
    the default limit, the command exits 8 (the output is not the whole file); cut by a
    --max-bytes you gave, it exits 0 (you asked for a prefix).
    """
    limit = FS_READ_DEFAULT_BYTES if max_bytes is None else max_bytes
    result = _with_channel(workspace, group, data_dir, lambda ca: ca.fs_read(path, max_bytes=limit), quiet=True)
    if json_out:
        emit(result, True)
    else:
        data = base64.b64decode(result.content) if result.encoding == "base64" else result.content.encode("utf-8")
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    if result.truncated:
        asked = max_bytes is not None
        hint = "" if asked else f"; pass --max-bytes N (up to {FS_READ_MAX_BYTES}) to read more or to accept a prefix"
        print(
            f"\n(truncated: printed the first {limit} of {result.size_bytes} bytes{hint})",
            file=sys.stderr,
        )
        if not asked:
            raise typer.Exit(code=EXIT_TRUNCATED)


@fs_app.command("put")
def fs_put(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument(..., help="File relative to the workspace."),
    source: Path | None = typer.Option(None, "--from", help="Local file to upload (default: standard input)."),
    no_overwrite: bool = typer.Option(False, "--no-overwrite", help="Fail if the file exists."),
    no_parents: bool = typer.Option(False, "--no-parents", help="Fail if the parent directory is missing."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Write a file of the workspace from a local file or standard input."""
    try:
        data = source.read_bytes() if source is not None else sys.stdin.buffer.read()
    except OSError as err:
        fail(f"cannot read {source}: {err.strerror}")
    result = _with_channel(
        workspace,
        group,
        data_dir,
        lambda ca: ca.fs_write(path, data, overwrite=not no_overwrite, create_parents=not no_parents),
    )
    emit(
        result if json_out else f"wrote {result.size_bytes} bytes to {result.path} (revision {result.revision})",
        json_out,
    )


@fs_app.command("rm")
def fs_rm(
    workspace: str = Workspace,
    group: str = Group,
    paths: list[str] = typer.Argument(..., help="Paths relative to the workspace."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Delete directories with their content."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Delete files, links or directories of the workspace."""

    async def action(ca: ChannelA) -> list[FsMutationResult]:
        return [await ca.fs_delete(p, recursive=recursive) for p in paths]

    results = _with_channel(workspace, group, data_dir, action)
    emit(results if json_out else f"deleted {len(results)} path(s) (revision {results[-1].revision})", json_out)


@fs_app.command("mv")
def fs_mv(
    workspace: str = Workspace,
    group: str = Group,
    source: str = typer.Argument(..., help="Path to move."),
    destination: str = typer.Argument(..., help="New path."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing destination."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Move or rename a path of the workspace."""
    result = _with_channel(workspace, group, data_dir, lambda ca: ca.fs_move(source, destination, overwrite=overwrite))
    emit(result if json_out else f"moved {source} to {destination} (revision {result.revision})", json_out)


@fs_app.command("mkdir")
def fs_mkdir(
    workspace: str = Workspace,
    group: str = Group,
    paths: list[str] = typer.Argument(..., help="Directories relative to the workspace."),
    no_parents: bool = typer.Option(False, "--no-parents", help="Fail if a parent is missing or the path exists."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Create directories in the workspace (with their parents by default)."""

    async def action(ca: ChannelA) -> list[FsMutationResult]:
        return [await ca.fs_mkdir(p, recursive=not no_parents) for p in paths]

    results = _with_channel(workspace, group, data_dir, action)
    emit(results if json_out else f"created {sum(r.changed for r in results)} director(ies)", json_out)


# --------------------------------------------------------------------------- git

_CODES = {
    "added": "A",
    "modified": "M",
    "deleted": "D",
    "renamed": "R",
    "copied": "C",
    "typechange": "T",
    "conflicted": "U",
    "untracked": "?",
    "ignored": "!",
}


@git_app.command("status")
def git_status(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument("", help="Directory in the repository (default: the workspace root)."),
    ignored: bool = typer.Option(False, "--ignored", help="Also list ignored files."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show the status of the repository at PATH."""
    status = _with_channel(workspace, group, data_dir, lambda ca: ca.git_status(path, include_ignored=ignored))
    if json_out:
        emit(status, True)
        return
    if not status.is_repo:
        emit(f"{path or 'the workspace root'} is not in a git repository", False)
        return
    branch = "HEAD (detached)" if status.detached else (status.head or "?")
    tracking = f" ... {status.upstream} [ahead {status.ahead}, behind {status.behind}]" if status.upstream else ""
    print(f"## {branch}{tracking}")
    for f in status.files:
        xy = _CODES.get(f.index or "", ".") + _CODES.get(f.worktree or "", ".")
        if f.worktree in ("untracked", "ignored"):
            xy = _CODES[f.worktree] * 2
        print(f"{xy} {f.old_path + ' -> ' if f.old_path else ''}{f.path}")


_MARKS = {"add": "+", "del": "-", "context": " ", "meta": "\\"}


def _print_files(files: Sequence[GitDiffFile]) -> None:
    for f in files:
        name = f"{f.old_path} -> {f.path}" if f.old_path else f.path
        print(f"--- {f.status} {name} (+{f.additions} -{f.deletions}){' binary' if f.is_binary else ''}")
        for hunk in f.hunks:
            # Untracked files carry the whole "@@ ... @@" line as header (upstream); others the tail.
            span = f"@@ -{hunk.old_start},{hunk.old_lines} +{hunk.new_start},{hunk.new_lines} @@"
            print(hunk.header if hunk.header.startswith("@@") else f"{span} {hunk.header}".rstrip())
            for line in hunk.lines:
                print(_MARKS[line.type] + line.text)


@git_app.command("diff")
def git_diff(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument("", help="Directory in the repository (default: the workspace root)."),
    staged: bool = typer.Option(False, "--staged", "--cached", help="Diff the index against HEAD."),
    untracked: bool = typer.Option(False, "--untracked", help="Include untracked files (worktree diffs)."),
    from_ref: str | None = typer.Option(None, "--from", help="Diff from this revision."),
    to_ref: str | None = typer.Option(None, "--to", help="Diff to this revision (needs --from)."),
    context: int = typer.Option(3, "--unified", "-U", help="Context lines (0..10)."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show the changes of the repository at PATH (worktree by default)."""
    result = _with_channel(
        workspace,
        group,
        data_dir,
        lambda ca: ca.git_diff(
            path,
            staged=staged,
            include_untracked=untracked,
            from_ref=from_ref,
            to_ref=to_ref,
            context_lines=context,
        ),
    )
    if json_out:
        emit(result, True)
    elif not result.is_repo:
        emit(f"{path or 'the workspace root'} is not in a git repository", False)
    else:
        _print_files(result.files)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


@git_app.command("log")
def git_log(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument("", help="Directory in the repository (default: the workspace root)."),
    ref: str = typer.Option("HEAD", "--ref", help="Start from this revision."),
    max_count: int = typer.Option(20, "--max-count", "-n", help="Commits to show (1..1000)."),
    skip: int = typer.Option(0, "--skip", help="Skip this many commits first."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show the commits of the repository at PATH."""
    result = _with_channel(
        workspace, group, data_dir, lambda ca: ca.git_log(path, ref=ref, max_count=max_count, skip=skip)
    )
    if json_out:
        emit(result, True)
        return
    for c in result.commits:
        print(f"{c.short_hash} {_when(c.author_time_ms)} {c.author_name}: {c.subject}")
    if result.has_more:
        print("(more: use --skip)", file=sys.stderr)


@git_app.command("show")
def git_show(
    workspace: str = Workspace,
    group: str = Group,
    path: str = typer.Argument("", help="Directory in the repository (default: the workspace root)."),
    ref: str = typer.Option("HEAD", "--ref", help="The commit."),
    file_path: str | None = typer.Option(None, "--file", help="Print this file as it is at --ref instead."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show a commit and its changes, or one file as it is in a commit."""
    result = _with_channel(
        workspace,
        group,
        data_dir,
        lambda ca: ca.git_show(path, ref=ref, file_path=file_path),
        quiet=file_path is not None,
    )
    if json_out:
        emit(result, True)
        return
    if isinstance(result, GitShowFileResult):
        data = base64.b64decode(result.content) if result.encoding == "base64" else result.content.encode("utf-8")
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    c = result.commit
    print(f"commit {c.hash}\nAuthor: {c.author_name} <{c.author_email}>\nDate:   {_when(c.author_time_ms)}\n")
    print(f"    {c.subject}\n")
    _print_files(result.files)


# --------------------------------------------------------------------------- pty


def pty_command(
    workspace: str = Workspace,
    group: str = Group,
    cwd: str = typer.Option("", "--cwd", help="Start directory relative to the workspace."),
    shell: str | None = typer.Option(None, "--shell", help="Shell program in the box (default /bin/bash)."),
    data_dir: Path | None = DataDir,
    json_out: bool = typer.Option(
        False, "--json", help="Print the session's details as one JSON line on stdout before the terminal's output."
    ),
) -> None:
    """Open an interactive shell in the box on a real terminal; exits with the shell's exit code."""
    details = {"workspace": workspace, "group": group} if json_out else None
    code = _with_channel(workspace, group, data_dir, lambda ca: _interactive(ca, cwd, shell, details), quiet=True)
    raise typer.Exit(code=code if code is not None else 1)


async def _interactive(ca: ChannelA, cwd: str, shell: str | None, details: dict[str, Any] | None = None) -> int | None:
    """Relay this terminal to a PTY in the box until the shell exits.

    With ``details`` (``pty --json``) one JSON line describing the session goes out first.
    """
    import termios
    import tty

    loop = asyncio.get_running_loop()
    stdin = sys.stdin.fileno()
    is_tty = os.isatty(stdin)
    cols, rows = (os.get_terminal_size(stdin) if is_tty else os.terminal_size((80, 24)))[:2]
    opened = await ca.pty_open(cols=cols, rows=rows, cwd=cwd, shell=shell)
    pty_id = opened.pty_id
    if details is not None:
        emit({"event": "pty_open", **details, "pty_id": pty_id, "cols": cols, "rows": rows, "cwd": cwd}, True)
    out = sys.stdout.buffer
    out.write(opened.initial_output.encode("utf-8"))
    out.flush()
    saved = termios.tcgetattr(stdin) if is_tty else None
    pending: set[asyncio.Task[Any]] = set()

    def forward(data: bytes) -> None:
        task = loop.create_task(ca.pty_write(pty_id, data, yield_ms=0))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_input() -> None:
        data = os.read(stdin, 4096)
        if not data:
            loop.remove_reader(stdin)
            forward(b"\x04")  # end of piped input: end of file for the shell
            return
        forward(data)

    def on_resize() -> None:
        size = os.get_terminal_size(stdin)
        loop.create_task(ca.pty_resize(pty_id, size.columns, size.lines))

    try:
        if saved is not None:
            tty.setraw(stdin)
            loop.add_signal_handler(signal.SIGWINCH, on_resize)
        loop.add_reader(stdin, on_input)
        while not ca.pty_exited(pty_id):
            data = await ca.pty_read(pty_id, timeout=0.2)
            if data:
                out.write(data)
                out.flush()
        out.write(await ca.pty_read(pty_id))
        out.flush()
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(stdin)
        if saved is not None:
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for task in list(pending):
            with contextlib.suppress(Exception):
                await task
    closed = await ca.pty_close(pty_id)
    code: int | None = closed.exit_code
    return code
