"""Every way out of the workspace is refused, and nothing outside it is read or written.

The "outside" is a directory next to the workspace that commands in the box can reach and write
(a local box's HOME: ``/root`` in bubblewrap isolation, the box's ``home`` directory in process
isolation; a directory next to a selfhosted agent's root): a missing check would show up as a
changed file there. Lexical refusals must happen before anything reaches the box.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from sandbox.channel_a import ChannelA
from sandbox.errors import ChannelAError, ChannelAValidationError
from tests.integration.channel_a.conftest import CountingSession, TestBox

SECRET = "top secret: never leaves home"


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its content (and every directory)."""
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def outside(box: TestBox) -> Path:
    """A directory outside with a secret in it, plus escape links in the workspace pointing there."""
    home = box.outside
    (home / "secret.txt").write_text(SECRET)
    (home / "sub").mkdir()
    ws = box.workspace
    (ws / "keep.txt").write_text("inside")
    (ws / "out").symlink_to(box.view(home))  # absolute link to a directory outside
    (ws / "secretlink").symlink_to(box.view(home / "secret.txt"))  # to a file outside
    (ws / "up").symlink_to("../../../../../../../..")  # relative link climbing to /
    (ws / "dangling-out").symlink_to(box.view(home / "not-yet.txt"))
    (ws / "inner").mkdir()
    (ws / "inner" / "back").symlink_to("../out")  # a link chain through an inside link
    return home


LEXICAL = ["../x", "/etc/passwd", "a/../../x", "..", "/", "//etc", "a/..", "x\0y"]


@pytest.mark.parametrize("bad", LEXICAL)
async def test_lexical_escapes_are_refused_before_anything_runs(box: TestBox, bad: str) -> None:
    counting = CountingSession(box.session)
    ca = ChannelA(counting)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: ca.fs_list(bad),
        lambda: ca.fs_read(bad),
        lambda: ca.fs_write(bad, "x"),
        lambda: ca.fs_delete(bad, recursive=True),
        lambda: ca.fs_move(bad, "y"),
        lambda: ca.fs_move("keep.txt", bad),
        lambda: ca.fs_mkdir(bad),
        lambda: ca.git_status(bad),
        lambda: ca.git_diff(bad),
        lambda: ca.git_diff(pathspec=[bad]),
        lambda: ca.git_log(bad),
        lambda: ca.git_show(file_path=bad),
        lambda: ca.terminal_exec("true", cwd=bad),
        lambda: ca.pty_open(cwd=bad),
    ]
    for call in calls:
        with pytest.raises(ChannelAValidationError):
            await call()
    assert counting.calls == 0
    assert ca.revision == 0


ESCAPING_READS = ["out", "out/secret.txt", "secretlink", "up/etc/passwd", "inner/back/secret.txt", "up"]


async def test_reads_through_links_out_are_refused_and_reveal_nothing(
    ca: ChannelA, box: TestBox, outside: Path
) -> None:
    before = snapshot(outside)
    calls = [
        call
        for path in ESCAPING_READS
        for call in (
            partial(ca.fs_read, path),
            partial(ca.fs_list, path, depth=2),
            partial(ca.git_status, path),
            partial(ca.git_log, path),
            partial(ca.terminal_exec, "cat secret.txt", cwd=path),
        )
    ]
    outcomes = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
    for call, outcome in zip(calls, outcomes, strict=True):
        assert isinstance(outcome, ChannelAError | ChannelAValidationError), (call, outcome)
        assert SECRET not in str(outcome)
    with pytest.raises(ChannelAValidationError, match="outside"):
        await ca.fs_read("out/secret.txt")
    with pytest.raises(ChannelAValidationError, match="outside"):
        await ca.pty_open(cwd="out")
    # The links themselves are listed (not followed) and nothing of home shows up.
    listing = await ca.fs_list(depth=8)
    assert "secret" not in listing.model_dump_json().replace("secretlink", "")
    assert snapshot(outside) == before


async def test_mutations_through_links_out_change_nothing_outside(ca: ChannelA, box: TestBox, outside: Path) -> None:
    before = snapshot(outside)
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: ca.fs_write("out/new.txt", "pwned"),
        lambda: ca.fs_write("out/secret.txt", "pwned"),
        lambda: ca.fs_write("secretlink", "pwned"),  # write through a link to a file outside
        lambda: ca.fs_write("dangling-out", "pwned"),  # through a dangling link that would create outside
        lambda: ca.fs_write("out/deeper/new.txt", "pwned"),  # missing parents below a link out
        lambda: ca.fs_write("inner/back/new.txt", "pwned"),
        lambda: ca.fs_write("up/tmp/pwned.txt", "pwned"),
        lambda: ca.fs_mkdir("out/newdir"),
        lambda: ca.fs_mkdir("out/a/b/c"),
        lambda: ca.fs_mkdir("out/sub", recursive=False),
        lambda: ca.fs_delete("out/secret.txt"),
        lambda: ca.fs_delete("out/sub", recursive=True),
        lambda: ca.fs_move("keep.txt", "out/moved.txt"),
        lambda: ca.fs_move("keep.txt", "out/x/y/moved.txt"),
        lambda: ca.fs_move("out/secret.txt", "stolen.txt"),
        lambda: ca.fs_move("out/sub", "stolen-dir"),
        lambda: ca.terminal_exec("echo pwned > pwned.txt", cwd="out"),
    ]
    # Concurrently: each is refused on its own, whatever the others do.
    outcomes = await asyncio.gather(*(attempt() for attempt in attempts), return_exceptions=True)
    for attempt, outcome in zip(attempts, outcomes, strict=True):
        assert isinstance(outcome, ChannelAValidationError) and "outside" in str(outcome), (attempt, outcome)
    assert snapshot(outside) == before
    assert (box.workspace / "keep.txt").read_text() == "inside"
    assert not (box.workspace / "stolen.txt").exists()
    assert ca.revision == 0


async def test_deleting_or_moving_a_link_out_touches_only_the_link(ca: ChannelA, box: TestBox, outside: Path) -> None:
    before = snapshot(outside)
    await ca.fs_move("secretlink", "renamed-link")
    assert (box.workspace / "renamed-link").is_symlink()
    await ca.fs_delete("renamed-link")
    await ca.fs_delete("out", recursive=True)  # removes the link, never the directory it points to
    assert not (box.workspace / "out").is_symlink()
    assert snapshot(outside) == before
    assert ca.revision == 3


async def test_a_parent_swapped_for_a_link_is_caught(ca: ChannelA, box: TestBox, outside: Path) -> None:
    ws = box.workspace
    (ws / "dir").mkdir()
    (ws / "dir" / "f.txt").write_text("inside")
    assert (await ca.fs_read("dir/f.txt")).content == "inside"
    (ws / "dir" / "f.txt").unlink()
    (ws / "dir").rmdir()
    (ws / "dir").symlink_to("out")  # now dir -> out -> home
    (outside / "f.txt").write_text(SECRET)
    before = snapshot(outside)
    with pytest.raises(ChannelAValidationError, match="outside"):
        await ca.fs_read("dir/f.txt")
    with pytest.raises(ChannelAValidationError, match="outside"):
        await ca.fs_write("dir/f.txt", "pwned")
    assert snapshot(outside) == before
