"""Channel-A file operations against real boxes of every provider (see the conftest)."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from providers.local import LocalProvider
from sandbox.channel_a import ChannelA, MemoryEventSink
from sandbox.channel_a.models import FsNode
from sandbox.errors import (
    ChannelAConflict,
    ChannelANotFound,
    ChannelAUnavailable,
    ChannelAValidationError,
)
from tests.conftest import session_scratch_dir
from tests.integration.channel_a.conftest import Boxes, TestBox

ON_DOCKER_ENGINE = (
    "test_list_builds_a_sorted_tree_with_types_sizes_and_depth",
    "test_read_text_base64_binary_and_truncation",
    "test_write_creates_overwrites_and_counts_revisions",
    "test_delete_files_links_and_directories",
    "test_move_renames_and_respects_overwrite",
    "test_mkdir_recursive_is_idempotent_and_strict_mode_refuses",
)
"""The main file operations, also on a docker box of the real engine (see the conftest)."""
ODD_NAMES = ["with space.txt", "tab\there.txt", "new\nline.txt", "ünïcødé ✓.txt", "quote'\"$(x).txt", "-dash.txt"]


def flat(node: FsNode) -> dict[str, FsNode]:
    out: dict[str, FsNode] = {}
    for child in node.children or ():
        out[child.path] = child
        out.update(flat(child))
    return out


def ws(box: TestBox) -> Path:
    return box.workspace


# --------------------------------------------------------------------------- list


async def test_list_builds_a_sorted_tree_with_types_sizes_and_depth(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "deep.py").write_text("x = 1\n")
    (root / "src" / "b.py").write_text("print(1)\n")
    (root / "A.md").write_text("# a\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret").write_text("s")
    (root / "link").symlink_to("src/b.py")
    os.chmod(root / "A.md", 0o640)

    one = await ca.fs_list()
    names = [child.name for child in one.root.children or ()]
    assert names == [".hidden", "src", "A.md", "link"]  # directories first, then by name
    nodes = flat(one.root)
    assert nodes["A.md"].size_bytes == 4 and nodes["A.md"].mode == 0o640 and nodes["A.md"].type == "file"
    assert nodes["link"].type == "symlink"
    assert nodes["src"].type == "dir" and nodes["src"].size_bytes is None
    assert nodes["src"].children is None  # at the depth limit: not listed
    assert abs(nodes["A.md"].mtime_ms - (root / "A.md").stat().st_mtime * 1000) < 2  # type: ignore[operator]
    assert not one.truncated and one.entry_count == 4

    deep = await ca.fs_list("src", depth=2, include_hidden=False)
    assert deep.root.path == "src"
    assert set(flat(deep.root)) == {"src/pkg", "src/b.py", "src/pkg/deep.py"}

    no_hidden = await ca.fs_list(depth=8, include_hidden=False)
    assert not any(".hidden" in path for path in flat(no_hidden.root))
    assert "src/pkg/deep.py" in flat(no_hidden.root)
    assert (await ca.fs_list(depth=0)).entry_count == 4  # depth 0 counts as 1


async def test_list_names_odd_paths_exactly(ca: ChannelA, box: TestBox) -> None:
    for name in ODD_NAMES:
        (ws(box) / name).write_text(name)
    listed = {child.name: child for child in (await ca.fs_list()).root.children or ()}
    assert set(listed) == set(ODD_NAMES)
    for name in ODD_NAMES:
        assert listed[name].size_bytes == len(name.encode())
        read = await ca.fs_read(name)
        assert read.content == name


@pytest.fixture(params=["local", "selfhosted"])
async def tmpfs_box(request: pytest.FixtureRequest) -> AsyncIterator[TestBox]:
    """A box on tmpfs when there is one: 20,000 files are created far faster in memory than on disk.

    One local isolation mode is enough here (bubblewrap when available): the listing is the same
    command either way, and this is the slowest test of the suite. On selfhosted the 8 MiB of
    listing cannot come back in one NATS reply, so it checks the spilled read-back.
    """
    shm = Path("/dev/shm")
    base = session_scratch_dir("channel-a-", shm if shm.is_dir() else None)
    if request.param == "local":
        boxes = Boxes("bubblewrap", base, local=LocalProvider(base / "boxes", bubblewrap="auto"))
    else:
        boxes = Boxes("selfhosted", base, nats_url=request.getfixturevalue("nats_url"))
    made = await boxes.new()
    try:
        yield made
    finally:
        await boxes.drop(made)
        await boxes.aclose()


async def test_list_truncates_at_max_entries_and_handles_twenty_thousand(tmpfs_box: TestBox) -> None:
    ca = ChannelA(tmpfs_box.session)
    big = ws(tmpfs_box) / "big"
    big.mkdir()
    subprocess.run(["bash", "-c", "touch f{00000..20000}"], cwd=big, check=True)
    full = await ca.fs_list("big", max_entries=20_000)
    assert full.truncated and full.entry_count == 20_000
    assert len(full.root.children or ()) == 20_000
    names = [c.name for c in full.root.children or ()]
    assert names == sorted(names) and len(set(names)) == 20_000 and set(names) <= {f"f{i:05}" for i in range(20_001)}
    small = await ca.fs_list("big", max_entries=10)
    assert small.truncated and small.entry_count == 10
    with pytest.raises(ChannelAValidationError):
        await ca.fs_list("big", max_entries=20_001)
    with pytest.raises(ChannelAValidationError):
        await ca.fs_list(depth=9)


async def test_list_of_missing_or_file_path_is_not_found(ca: ChannelA, box: TestBox) -> None:
    (ws(box) / "file.txt").write_text("x")
    with pytest.raises(ChannelANotFound):
        await ca.fs_list("nope")
    with pytest.raises(ChannelANotFound):
        await ca.fs_list("file.txt")


# --------------------------------------------------------------------------- read


async def test_read_text_base64_binary_and_truncation(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    (root / "t.txt").write_text("héllo\n")
    (root / "bin.dat").write_bytes(b"\x89PNG\x00\x01\x02" * 10)
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))

    text = await ca.fs_read("t.txt")
    assert (text.encoding, text.content, text.size_bytes, text.is_binary, text.truncated) == (
        "utf8",
        "héllo\n",
        7,
        False,
        False,
    )
    as_b64 = await ca.fs_read("t.txt", encoding="base64")
    assert base64.b64decode(as_b64.content) == "héllo\n".encode()

    binary = await ca.fs_read("bin.dat")
    assert binary.is_binary and binary.encoding == "base64"
    assert base64.b64decode(binary.content) == (root / "bin.dat").read_bytes()

    latin = await ca.fs_read("latin1.txt")
    assert latin.encoding == "base64" and not latin.is_binary
    assert base64.b64decode(latin.content) == "café".encode("latin-1")

    cut = await ca.fs_read("t.txt", max_bytes=2)  # cuts inside "é": the incomplete tail is dropped
    assert cut.truncated and cut.size_bytes == 7 and cut.content == "h"
    exact = await ca.fs_read("t.txt", max_bytes=7)
    assert not exact.truncated and exact.content == "héllo\n"


async def test_big_files_round_trip_whatever_the_link(ca: ChannelA, box: TestBox) -> None:
    """3 MiB each way: over a selfhosted link that is several NATS messages (uploaded, spilled)."""
    data = os.urandom(3 * 1024 * 1024)
    written = await ca.fs_write("big/blob.bin", data)
    assert written.size_bytes == len(data) and (ws(box) / "big/blob.bin").read_bytes() == data
    read = await ca.fs_read("big/blob.bin", encoding="base64")
    assert base64.b64decode(read.content) == data and not read.truncated and read.size_bytes == len(data)
    assert ca.revision == 1


async def test_read_refuses_directories_special_files_and_missing(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    (root / "dangling").symlink_to("nowhere")
    with pytest.raises(ChannelAValidationError, match="directory"):
        await ca.fs_read("dir")
    with pytest.raises(ChannelAValidationError, match="regular file"):
        await ca.fs_read("fifo")  # must not hang on the pipe
    with pytest.raises(ChannelANotFound):
        await ca.fs_read("missing.txt")
    with pytest.raises(ChannelANotFound):
        await ca.fs_read("dangling")
    with pytest.raises(ChannelAValidationError):
        await ca.fs_read("")


# --------------------------------------------------------------------------- mutations


async def test_write_creates_overwrites_and_counts_revisions(ca: ChannelA, box: TestBox, sink: MemoryEventSink) -> None:
    root = ws(box)
    created = await ca.fs_write("a/b/new.txt", "one\n")
    assert created.created and created.size_bytes == 4 and created.revision == 1
    assert (root / "a/b/new.txt").read_text() == "one\n"

    replaced = await ca.fs_write("a/b/new.txt", b"\x00\x01two")
    assert not replaced.created and replaced.size_bytes == 5 and replaced.revision == 2
    assert (root / "a/b/new.txt").read_bytes() == b"\x00\x01two"

    from_b64 = await ca.fs_write("b64.bin", base64.b64encode(b"\xff\xfe").decode(), encoding="base64")
    assert (root / "b64.bin").read_bytes() == b"\xff\xfe" and from_b64.revision == 3

    empty = await ca.fs_write("empty.txt", "")
    assert empty.size_bytes == 0 and (root / "empty.txt").read_bytes() == b""

    with pytest.raises(ChannelAConflict):
        await ca.fs_write("a/b/new.txt", "x", overwrite=False)
    with pytest.raises(ChannelANotFound):
        await ca.fs_write("missing/dir/x.txt", "x", create_parents=False)
    with pytest.raises(ChannelAValidationError, match="directory"):
        await ca.fs_write("a/b", "x")
    with pytest.raises(ChannelAValidationError, match="base64"):
        await ca.fs_write("x.txt", "not base64!", encoding="base64")
    (root / "file").write_text("f")
    with pytest.raises(ChannelAConflict):
        await ca.fs_write("file/child.txt", "x")  # a file where a parent directory must be
    assert not (root / "missing").exists()
    assert ca.revision == 4  # failures do not count

    changed = sink.of_type("fs.changed")
    assert [e.revision for e in changed] == [1, 2, 3, 4]
    assert changed[0].payload == {
        "changes": [{"path": "a/b/new.txt", "kind": "created", "isDir": False, "sizeBytes": 4, "oldPath": None}],
        "source": "write",
        "revision": 1,
        "leaseEpoch": 7,
    }
    assert changed[1].payload["changes"][0]["kind"] == "modified"
    assert all(e.lease_epoch == 7 for e in changed)


async def test_write_through_an_inner_symlink_writes_its_target(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    (root / "real.txt").write_text("old")
    (root / "alias.txt").symlink_to("real.txt")
    box.hand_over()
    await ca.fs_write("alias.txt", "new")
    assert (root / "real.txt").read_text() == "new" and (root / "alias.txt").is_symlink()


async def test_an_overlong_name_is_refused_naming_the_limit_and_writes_nothing(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    for name in ("n" * 300, "é" * 128):  # 300 bytes; 256 bytes in UTF-8
        with pytest.raises(ChannelAValidationError, match=r"at most 255 bytes \(NAME_MAX\)") as info:
            await ca.fs_write(f"dir/{name}", "x")
        assert info.value.path == f"dir/{name}"
        with pytest.raises(ChannelAValidationError, match="NAME_MAX"):
            await ca.fs_read(name)
    assert not (root / "dir").exists() and ca.revision == 0
    # Positive control: the longest name the file system holds is written.
    written = await ca.fs_write("dir/" + "n" * 255, "x")
    assert written.size_bytes == 1 and (root / "dir" / ("n" * 255)).read_text() == "x"


async def test_delete_files_links_and_directories(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    (root / "d/sub").mkdir(parents=True)
    (root / "d/sub/f.txt").write_text("x")
    (root / "empty").mkdir()
    (root / "f.txt").write_text("x")
    (root / "link").symlink_to("d")
    box.hand_over()

    assert (await ca.fs_delete("f.txt")).changes[0].is_dir is False
    assert not (root / "f.txt").exists()
    await ca.fs_delete("link")
    assert not (root / "link").is_symlink() and (root / "d/sub/f.txt").exists()  # the link, not its target
    with pytest.raises(ChannelAConflict, match="not empty"):
        await ca.fs_delete("d")
    assert (await ca.fs_delete("empty")).changes[0].is_dir is True
    result = await ca.fs_delete("d", recursive=True)
    assert result.changes[0].is_dir and not (root / "d").exists()
    with pytest.raises(ChannelANotFound):
        await ca.fs_delete("d")
    with pytest.raises(ChannelAValidationError):
        await ca.fs_delete("")
    with pytest.raises(ChannelAValidationError):
        await ca.fs_delete(".")
    assert ca.revision == 4


async def test_move_renames_and_respects_overwrite(ca: ChannelA, box: TestBox, sink: MemoryEventSink) -> None:
    root = ws(box)
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    (root / "dir").mkdir()
    (root / "dir/x").write_text("x")

    moved = await ca.fs_move("a.txt", "deep/er/c.txt")
    assert [(c.path, c.kind) for c in moved.changes] == [("a.txt", "deleted"), ("deep/er/c.txt", "created")]
    assert (root / "deep/er/c.txt").read_text() == "a" and not (root / "a.txt").exists()

    with pytest.raises(ChannelAConflict):
        await ca.fs_move("b.txt", "deep/er/c.txt")
    await ca.fs_move("b.txt", "deep/er/c.txt", overwrite=True)
    assert (root / "deep/er/c.txt").read_text() == "b"

    dir_move = await ca.fs_move("dir", "dir2")
    assert dir_move.changes[1].is_dir and (root / "dir2/x").exists()
    with pytest.raises(ChannelANotFound):
        await ca.fs_move("nope", "x")
    with pytest.raises(ChannelANotFound):
        await ca.fs_move("dir2", "missing/parent/x", create_parents=False)
    with pytest.raises(ChannelAConflict):
        await ca.fs_move("dir2", "dir2/inside")  # into itself: mv refuses
    assert ca.revision == 3 and len(sink.of_type("fs.changed")) == 3


async def test_mkdir_recursive_is_idempotent_and_strict_mode_refuses(ca: ChannelA, box: TestBox) -> None:
    root = ws(box)
    made = await ca.fs_mkdir("x/y/z")
    assert made.changed and made.revision == 1 and (root / "x/y/z").is_dir()
    again = await ca.fs_mkdir("x/y/z")
    assert not again.changed and again.revision == 1 and ca.revision == 1
    with pytest.raises(ChannelAValidationError, match="exists"):
        await ca.fs_mkdir("x/y/z", recursive=False)
    with pytest.raises(ChannelANotFound):
        await ca.fs_mkdir("no/parent", recursive=False)
    assert (await ca.fs_mkdir("x/single", recursive=False)).changed
    (root / "file").write_text("f")
    with pytest.raises(ChannelAValidationError):
        await ca.fs_mkdir("file")


async def test_a_missing_workspace_is_unavailable_not_a_bad_path(ca: ChannelA, box: TestBox) -> None:
    ws(box).rename(ws(box).parent / "moved-away")
    with pytest.raises(ChannelAUnavailable):
        await ca.fs_list()
