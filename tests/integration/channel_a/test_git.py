"""Channel-A git against real repositories built by the tests, each checked against git itself.

The repositories live in one box per provider (see the conftest). ``git`` on the host (same repository, same
neutral configuration) is the oracle: statuses, numstat counts, patch lines, logs and blobs must
match what it prints.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox.channel_a import ChannelA
from sandbox.channel_a.models import GitDiffFile, GitShowFileResult, GitShowResult
from sandbox.errors import ChannelANotFound, ChannelAValidationError
from sandbox.git_parsers import parse_numstat_z, parse_porcelain_v2
from tests.integration.channel_a.conftest import Boxes, TestBox, git

ODD = ["space name.txt", "tab\tname.txt", "new\nline.txt", "ünïcødé.txt"]
BINARY = bytes(range(256)) * 4


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def build_rich(repo: Path) -> None:
    """Commits, an upstream one ahead/one behind, then staged, unstaged, untracked and ignored changes."""
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo / "keep.txt", "".join(f"line {i}\n" for i in range(1, 21)))
    write(repo / "rename_me.txt", "".join(f"rename {i}\n" for i in range(30)))
    write(repo / "delete_me.txt", "bye\n")
    write(repo / "copy_src.txt", "".join(f"copy {i}\n" for i in range(40)))
    write(repo / "bin.dat", BINARY)
    write(repo / "mode.sh", "#!/bin/sh\necho hi\n")
    write(repo / ".gitignore", "*.log\n")
    for name in ODD:
        write(repo / name, f"{name}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first commit", "-m", "with a body\nof two lines")
    git(repo, "branch", "upstream-base")
    write(repo / "keep.txt", (repo / "keep.txt").read_text() + "line 21\n")
    git(repo, "commit", "-q", "-am", "second commit")
    git(repo, "checkout", "-q", "upstream-base")
    write(repo / "other.txt", "upstream only\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-q", "-m", "upstream commit")
    git(repo, "checkout", "-q", "main")
    git(repo, "branch", "-q", "-u", "upstream-base")
    # staged: rename, delete, copy (with its source modified), binary change, mode change
    git(repo, "mv", "rename_me.txt", "renamed.txt")
    git(repo, "rm", "-q", "delete_me.txt")
    write(repo / "copied.txt", (repo / "copy_src.txt").read_text())
    write(repo / "copy_src.txt", (repo / "copy_src.txt").read_text().replace("copy 5\n", "copy five\n"))
    write(repo / "bin.dat", BINARY[::-1])
    os.chmod(repo / "mode.sh", 0o755)
    git(repo, "add", "-A")
    # unstaged: modifications, odd names
    text = (repo / "keep.txt").read_text().replace("line 3\n", "line three\n").replace("line 18\n", "")
    write(repo / "keep.txt", text)
    write(repo / "ünïcødé.txt", "ünïcødé changed\n")
    write(repo / "tab\tname.txt", "tab changed\n")
    # untracked and ignored
    write(repo / "untracked file.txt", "u1\nu2\n")
    write(repo / "odd\tuntracked\n.txt", "odd\n")
    write(repo / "untracked.bin", b"\x00\x01\x02")
    (repo / "untracked-link").symlink_to("keep.txt")
    write(repo / "debug.log", "ignored\n")


def build_conflict(repo: Path) -> None:
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo / "c.txt", "base\n")
    git(repo, "add", "c.txt")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "checkout", "-q", "-b", "theirs")
    write(repo / "c.txt", "theirs\n")
    git(repo, "commit", "-q", "-am", "theirs")
    git(repo, "checkout", "-q", "main")
    write(repo / "c.txt", "ours\n")
    git(repo, "commit", "-q", "-am", "ours")
    git(repo, "merge", "-q", "theirs")  # conflicts: exit 1, c.txt unmerged


@pytest.fixture(scope="module")
def git_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repositories, built once and copied into each isolation mode's box."""
    ws = tmp_path_factory.mktemp("git-template")
    build_rich(ws / "rich")
    build_conflict(ws / "conflict")
    (ws / "unborn").mkdir()
    git(ws / "unborn", "init", "-q")
    write(ws / "unborn" / "first.txt", "a\nb\n")
    git(ws / "unborn", "add", "first.txt")
    (ws / "detached").mkdir()
    git(ws / "detached", "init", "-q")
    for i in range(3):
        write(ws / "detached" / "f.txt", f"v{i}\n")
        git(ws / "detached", "add", "f.txt")
        git(ws / "detached", "commit", "-q", "-m", f"c{i}")
    git(ws / "detached", "checkout", "-q", "HEAD~1")
    (ws / "plain").mkdir()
    write(ws / "plain" / "x.txt", "x")
    (ws / "node_modules" / "dep").mkdir(parents=True)
    git(ws / "node_modules" / "dep", "init", "-q")
    return ws


@pytest.fixture(scope="module")
async def git_box(provider: Boxes, git_template: Path) -> AsyncIterator[TestBox]:
    made = await provider.new()
    shutil.copytree(git_template, made.workspace, symlinks=True, dirs_exist_ok=True)
    yield made
    await provider.drop(made)


@pytest.fixture
def ca(git_box: TestBox) -> ChannelA:
    return ChannelA(git_box.session)


def repo_path(box: TestBox, name: str) -> Path:
    return box.workspace / name


def by_path(files: tuple[GitDiffFile, ...]) -> dict[str, GitDiffFile]:
    return {f.path: f for f in files}


def oracle_lines(repo: Path, *args: str) -> dict[str, list[str]]:
    """Per file (new path), the +/-/space lines of ``git diff`` as git prints them."""
    patch = git(repo, "diff", "--no-color", "-M", "-C", *args).decode("utf-8", "replace")
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in patch.split("\n"):
        if line.startswith("diff --git "):
            current = None
        elif line.startswith("+++ "):
            target = line[4:]
            if target.startswith('"'):
                target = target[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
                target = target.encode("latin-1").decode("utf-8")
            current = out.setdefault(target[2:] if target != "/dev/null" else "", [])
        elif current is not None and line[:1] in ("+", "-", " ") and not line.startswith(("--- ", "+++ ")):
            current.append(line)
    return out


def our_lines(f: GitDiffFile) -> list[str]:
    marks = {"add": "+", "del": "-", "context": " "}
    return [marks[line.type] + line.text for hunk in f.hunks for line in hunk.lines]


# --------------------------------------------------------------------------- status


async def test_status_matches_git_for_every_kind_of_change(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "rich")
    ours = await ca.git_status("rich")
    oracle = parse_porcelain_v2(git(repo, "status", "--porcelain=v2", "--branch", "-z").decode())
    assert ours == oracle
    assert (ours.head, ours.upstream, ours.ahead, ours.behind, ours.detached) == ("main", "upstream-base", 1, 1, False)
    assert ours.head_oid == git(repo, "rev-parse", "HEAD").decode().strip()
    files = {f.path: f for f in ours.files}
    assert (files["renamed.txt"].index, files["renamed.txt"].old_path) == ("renamed", "rename_me.txt")
    assert files["delete_me.txt"].index == "deleted"
    assert files["copied.txt"].index == "added"
    assert files["mode.sh"].index == "modified"
    assert (files["keep.txt"].index, files["keep.txt"].worktree) == (None, "modified")
    assert files["tab\tname.txt"].worktree == "modified"
    assert files["ünïcødé.txt"].worktree == "modified"
    assert files["odd\tuntracked\n.txt"].worktree == "untracked"
    assert files["untracked-link"].worktree == "untracked"
    assert "debug.log" not in files

    with_ignored = await ca.git_status("rich", include_ignored=True)
    assert {f.path for f in with_ignored.files if f.worktree == "ignored"} == {"debug.log"}
    # From a subdirectory of the repository: the same repository.
    (repo / "subdir").mkdir(exist_ok=True)
    assert (await ca.git_status("rich/subdir")).head == "main"


async def test_status_of_conflict_unborn_detached_and_plain_directories(ca: ChannelA, git_box: TestBox) -> None:
    conflict = await ca.git_status("conflict")
    assert conflict == parse_porcelain_v2(
        git(repo_path(git_box, "conflict"), "status", "--porcelain=v2", "--branch", "-z").decode()
    )
    (entry,) = conflict.files
    assert (entry.path, entry.is_conflicted, entry.index, entry.worktree) == ("c.txt", True, "conflicted", "conflicted")

    unborn = await ca.git_status("unborn")
    assert (unborn.is_repo, unborn.head, unborn.head_oid) == (True, "main", None)
    assert [(f.path, f.index) for f in unborn.files] == [("first.txt", "added")]

    detached = await ca.git_status("detached")
    assert detached.detached and detached.head is None
    assert detached.head_oid == git(repo_path(git_box, "detached"), "rev-parse", "HEAD").decode().strip()

    plain = await ca.git_status("plain")
    assert plain.is_repo is False and plain.files == ()
    assert (await ca.git_status()).is_repo is False  # the workspace root is not a repository


async def test_a_repository_above_the_workspace_is_not_the_workspaces(provider: Boxes) -> None:
    made = await provider.new()
    try:
        git(made.parent, "init", "-q")  # a directory holding the workspace
        ca = ChannelA(made.session)
        assert (await ca.git_status()).is_repo is False
        assert (await ca.git_log()).commits == ()
        assert (await ca.git_diff()).is_repo is False
    finally:
        await provider.drop(made)


# --------------------------------------------------------------------------- diff


async def test_staged_diff_has_renames_copies_deletes_binary_and_modes(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "rich")
    diff = await ca.git_diff("rich", staged=True)
    assert diff.is_repo and diff.mode == "staged" and not diff.truncated
    oracle = parse_numstat_z(git(repo, "diff", "--cached", "-M", "-C", "-z", "--numstat").decode())
    assert [(f.path, f.old_path, f.additions, f.deletions, f.is_binary) for f in diff.files] == [
        (e.new_path, e.old_path, e.additions, e.deletions, e.binary) for e in oracle
    ]
    files = by_path(diff.files)
    assert (files["renamed.txt"].status, files["renamed.txt"].old_path) == ("renamed", "rename_me.txt")
    assert files["copied.txt"].status == "copied" and files["copied.txt"].old_path == "copy_src.txt"
    assert files["delete_me.txt"].status == "deleted" and files["delete_me.txt"].old_mode == "100644"
    assert files["bin.dat"].is_binary and files["bin.dat"].hunks == () and files["bin.dat"].additions == 0
    assert (files["mode.sh"].old_mode, files["mode.sh"].new_mode, files["mode.sh"].hunks) == ("100644", "100755", ())
    lines = oracle_lines(repo, "--cached")
    assert our_lines(files["copy_src.txt"]) == lines["copy_src.txt"]
    assert our_lines(files["delete_me.txt"]) == ["-bye"]


async def test_worktree_diff_with_untracked_matches_git_lines(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "rich")
    diff = await ca.git_diff("rich", include_untracked=True, context_lines=1)
    files = by_path(diff.files)
    lines = oracle_lines(repo, "-U1")
    for name in ("keep.txt", "ünïcødé.txt", "tab\tname.txt"):
        assert our_lines(files[name]) == lines[name], name
        assert files[name].status == "modified"
    keep = files["keep.txt"]
    assert (keep.additions, keep.deletions) == (1, 2)
    assert [h.old_start for h in keep.hunks] == [2, 17]
    first = keep.hunks[0].lines
    assert [(ln.type, ln.old_no, ln.new_no) for ln in first] == [
        ("context", 2, 2),
        ("del", 3, None),
        ("add", None, 3),
        ("context", 4, 4),
    ]
    untracked = {f.path: f for f in diff.files if f.status == "untracked"}
    assert set(untracked) == {"untracked file.txt", "odd\tuntracked\n.txt", "untracked.bin", "untracked-link"}
    u = untracked["untracked file.txt"]
    assert (u.additions, u.deletions, u.hunks[0].header) == (2, 0, "@@ -0,0 +1,2 @@")
    assert [ln.text for ln in u.hunks[0].lines] == ["u1", "u2"]
    assert untracked["untracked.bin"].is_binary and untracked["untracked.bin"].hunks == ()
    assert [ln.text for ln in untracked["untracked-link"].hunks[0].lines] == ["keep.txt"]
    assert "debug.log" not in files

    without = await ca.git_diff("rich")
    assert not any(f.status == "untracked" for f in without.files)
    assert [f.path for f in without.files] == [f.path for f in diff.files if f.status != "untracked"]
    only = await ca.git_diff("rich", pathspec=["keep.txt"])
    assert [f.path for f in only.files] == ["keep.txt"]


async def test_ref_diffs_unborn_fallback_and_bad_refs(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "rich")
    refs = await ca.git_diff("rich", from_ref="HEAD~1", to_ref="HEAD")
    assert refs.mode == "refs"
    assert [(f.path, f.additions) for f in refs.files] == [("keep.txt", 1)]
    assert our_lines(refs.files[0]) == oracle_lines(repo, "HEAD~1", "HEAD")["keep.txt"]
    against_upstream = await ca.git_diff("rich", from_ref="upstream-base", to_ref="main")
    assert {f.path: f.status for f in against_upstream.files} == {"keep.txt": "modified", "other.txt": "deleted"}

    unborn = await ca.git_diff("unborn", from_ref="HEAD")  # no HEAD yet: the index instead
    assert [(f.path, f.status, f.additions) for f in unborn.files] == [("first.txt", "added", 2)]

    with pytest.raises(ChannelANotFound):
        await ca.git_diff("rich", from_ref="no-such-branch")
    for bad in ("--output=/tmp/x", "a b", "x;rm", ""):
        with pytest.raises(ChannelAValidationError):
            await ca.git_diff("rich", from_ref=bad)
    with pytest.raises(ChannelAValidationError):
        await ca.git_diff("rich", to_ref="HEAD")
    with pytest.raises(ChannelAValidationError):
        await ca.git_diff("rich", context_lines=11)


async def test_per_file_byte_cap_truncates_hunks(ca: ChannelA, git_box: TestBox) -> None:
    capped = await ca.git_diff("rich", from_ref="upstream-base~1", to_ref="main", max_bytes_per_file=200)
    assert not capped.truncated
    files = by_path(capped.files)
    assert files["keep.txt"].truncated is False
    full = await ca.git_show("rich", ref="HEAD~1")
    root = await ca.git_show("rich", ref="HEAD~1", max_bytes_per_file=200)
    assert isinstance(full, GitShowResult) and isinstance(root, GitShowResult)
    big, small = by_path(full.files)["copy_src.txt"], by_path(root.files)["copy_src.txt"]
    assert not big.truncated and len(our_lines(big)) == 40
    assert small.truncated and 0 < len(our_lines(small)) < 40  # 40 added lines do not fit in 200 bytes
    assert our_lines(small) == our_lines(big)[: len(our_lines(small))]
    assert small.additions == 40  # the counts still come from numstat
    assert not by_path(root.files)["delete_me.txt"].truncated


async def test_conflicted_paths_are_one_conflicted_entry(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "conflict")
    write(repo / "later.txt", "x\n")  # an untracked file next to the conflict
    try:
        diff = await ca.git_diff("conflict", include_untracked=True)
    finally:
        (repo / "later.txt").unlink()
    assert [(f.path, f.status) for f in diff.files] == [("c.txt", "conflicted"), ("later.txt", "untracked")]
    assert diff.files[0].hunks == () and diff.files[0].additions == 4


# --------------------------------------------------------------------------- log, show, discovery


async def test_log_pages_and_matches_git(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "rich")
    log = await ca.git_log("rich")
    assert [c.hash for c in log.commits] == git(repo, "log", "--format=%H").decode().split()
    assert not log.has_more
    first, root = log.commits
    assert (first.subject, first.author_name, first.author_email) == (
        "second commit",
        "Ada Lovelace",
        "ada@example.com",
    )
    assert root.parents == () and first.parents == (root.hash,)
    assert root.body == "with a body\nof two lines"
    assert first.author_time_ms == 1704164645000 and first.short_hash == first.hash[: len(first.short_hash)]
    page = await ca.git_log("rich", max_count=1)
    assert page.has_more and [c.hash for c in page.commits] == [first.hash]
    assert [c.hash for c in (await ca.git_log("rich", max_count=1, skip=1)).commits] == [root.hash]
    assert [c.subject for c in (await ca.git_log("rich", ref="upstream-base")).commits][0] == "upstream commit"
    assert (await ca.git_log("rich", pathspec=["other.txt"])).commits == ()
    assert (await ca.git_log("unborn")).commits == ()  # no commits yet: empty, not an error
    assert (await ca.git_log("rich", ref="no-such-ref")).commits == ()


async def test_show_commit_root_commit_and_files(ca: ChannelA, git_box: TestBox) -> None:
    repo = repo_path(git_box, "rich")
    shown = await ca.git_show("rich", ref="HEAD")
    assert isinstance(shown, GitShowResult)
    assert shown.commit.subject == "second commit"
    assert [(f.path, f.additions, f.deletions) for f in shown.files] == [("keep.txt", 1, 0)]

    root = await ca.git_show("rich", ref="HEAD~1")  # root commit: everything added
    assert isinstance(root, GitShowResult)
    expected = set(git(repo, "ls-tree", "-r", "--name-only", "-z", "HEAD~1").decode().split("\0")) - {""}
    assert {f.path for f in root.files} == expected
    assert all(f.status == "added" for f in root.files)

    text = await ca.git_show("rich", ref="HEAD~1", file_path="keep.txt")
    assert isinstance(text, GitShowFileResult)
    assert text.content == git(repo, "show", "HEAD~1:keep.txt").decode() and text.encoding == "utf8"
    odd = await ca.git_show("rich", ref="HEAD", file_path="new\nline.txt")
    assert isinstance(odd, GitShowFileResult) and odd.content == "new\nline.txt\n"
    binary = await ca.git_show("rich", ref="HEAD", file_path="bin.dat")
    assert isinstance(binary, GitShowFileResult)
    assert binary.is_binary and base64.b64decode(binary.content) == BINARY and binary.size_bytes == len(BINARY)
    cut = await ca.git_show("rich", ref="HEAD", file_path="bin.dat", max_bytes_per_file=10)
    assert isinstance(cut, GitShowFileResult) and cut.truncated and base64.b64decode(cut.content) == BINARY[:10]

    with pytest.raises(ChannelANotFound):
        await ca.git_show("rich", ref="HEAD", file_path="renamed.txt")  # only staged, not committed
    with pytest.raises(ChannelANotFound):
        await ca.git_show("rich", ref="no-such-ref")
    with pytest.raises(ChannelAValidationError):
        await ca.git_show("rich", ref="HEAD", file_path="../etc/passwd")


async def test_repository_discovery(ca: ChannelA) -> None:
    found = await ca.detect_repos()
    assert found.complete and found.degraded_reason is None
    assert found.repos == ("conflict", "detached", "rich", "unborn")  # node_modules is pruned


async def test_git_changed_event_reports_the_status(git_box: TestBox) -> None:
    from sandbox.channel_a import MemoryEventSink

    sink = MemoryEventSink()
    ca = ChannelA(git_box.session, events=sink, lease_epoch=4)
    status = await ca.emit_git_changed("rich", "stage")
    (event,) = sink.of_type("git.changed")
    assert event.payload == {
        "repo": "rich",
        "head": "main",
        "dirty": True,
        "ahead": 1,
        "behind": 1,
        "changedFileCount": len(status.files),
        "reason": "stage",
        "revision": 0,
        "leaseEpoch": 4,
    }


def test_oracle_helper_reads_quoted_paths(tmp_path: Path) -> None:
    """The test oracle itself decodes git's C-quoted names (so the comparisons above are real)."""
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo / "a\tb.txt", "1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "x")
    write(repo / "a\tb.txt", "2\n")
    assert oracle_lines(repo) == {"a\tb.txt": ["-1", "+2"]}
    assert subprocess.run(["git", "--version"], capture_output=True).returncode == 0
