"""Git output parsers: upstream conformance on real git output, fuzzing, and format round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.git_parsers import (
    GitDiffLine,
    GitFileStatus,
    GitStatus,
    NumstatEntry,
    ParsedPatch,
    parse_numstat_z,
    parse_porcelain_v2,
    parse_unified_patch,
)
from tests.upstream_vectors import vectors_dir

# --------------------------------------------------------------------------- upstream vectors

VECTOR_FILE = "git_parsers.json"
EXPECTED_COUNTS = {"parsePorcelainV2": 51, "parseNumstatZ": 41, "parseUnifiedPatch": 140}


def vector_params(file: str, fn: str) -> list[Any]:
    """One pytest param per vector of ``fn``; a single failing param when the file is missing."""
    path = vectors_dir() / file
    if not path.is_file():
        return [pytest.param(None, id=f"{file}-missing")]
    vectors = [v for v in json.loads(path.read_text(encoding="utf-8")) if v["fn"] == fn]
    return [pytest.param(v, id=f"{i:03d}-{v['note'][:70]}") for i, v in enumerate(vectors)]


def require_vector(vector: dict[str, Any] | None) -> dict[str, Any]:
    if vector is None:
        pytest.fail(
            f"upstream vectors not found: {vectors_dir() / VECTOR_FILE} is missing. Point "
            "SANDBOX_VECTORS_DIR at the folder holding the upstream-vectors JSON files."
        )
    return vector


def decode(value: Any) -> Any:
    """Decode the vector markers this file uses. NaN becomes None: that is how NaN crosses JSON."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if isinstance(value, dict):
        if "$number" in value:
            assert value == {"$number": "NaN"}, f"unexpected marker {value}"
            return None
        assert not any(key.startswith("$") for key in value), f"unexpected marker {value}"
        return {key: decode(item) for key, item in value.items()}
    return value


def wire(value: Any) -> Any:
    """What our result looks like on the wire: JSON text parsed back."""
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("vector", vector_params(VECTOR_FILE, "parsePorcelainV2"))
def test_parse_porcelain_v2_matches_upstream(vector: dict[str, Any] | None) -> None:
    vector = require_vector(vector)
    assert wire(parse_porcelain_v2(*vector["args"]).model_dump(mode="json")) == decode(vector["expect"]["ok"])


@pytest.mark.parametrize("vector", vector_params(VECTOR_FILE, "parseNumstatZ"))
def test_parse_numstat_z_matches_upstream(vector: dict[str, Any] | None) -> None:
    vector = require_vector(vector)
    got = [entry.model_dump(mode="json") for entry in parse_numstat_z(*vector["args"])]
    assert wire(got) == decode(vector["expect"]["ok"])


@pytest.mark.parametrize("vector", vector_params(VECTOR_FILE, "parseUnifiedPatch"))
def test_parse_unified_patch_matches_upstream(vector: dict[str, Any] | None) -> None:
    vector = require_vector(vector)
    assert wire(parse_unified_patch(*vector["args"]).model_dump(mode="json")) == decode(vector["expect"]["ok"])


def test_vector_file_has_every_git_vector() -> None:
    path = vectors_dir() / VECTOR_FILE
    assert path.is_file(), f"{path} is missing; set SANDBOX_VECTORS_DIR"
    fns = [v["fn"] for v in json.loads(path.read_text(encoding="utf-8"))]
    assert {fn: fns.count(fn) for fn in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert len(fns) == 232


# --------------------------------------------------------------------------- documented behaviour


def test_not_a_repo_status_has_the_upstream_shape() -> None:
    assert GitStatus.not_a_repo().model_dump(mode="json") == {
        "isRepo": False,
        "head": None,
        "headOid": None,
        "detached": False,
        "upstream": None,
        "ahead": 0,
        "behind": 0,
        "files": [],
    }


def test_models_accept_wire_names_and_python_names() -> None:
    by_alias = GitFileStatus.model_validate({"path": "a", "oldPath": "b", "isConflicted": True})
    by_name = GitFileStatus(path="a", old_path="b", is_conflicted=True)
    assert by_alias == by_name
    assert by_alias.model_dump()["oldPath"] == "b"


@pytest.mark.parametrize(
    ("record", "ahead", "behind"),
    [
        ("# branch.ab +2 -3", 2, 3),
        ("# branch.ab +2  -3", 2, 3),
        ("# branch.ab +2\t-3", 2, 3),
        ("# branch.ab +2\u00a0\u3000-3", 2, 3),  # JavaScript's \s is Unicode-aware
        ("# branch.ab +2\ufeff-3", 2, 3),
        ("# branch.ab +2 -3 trailing", 2, 3),
        ("# branch.ab  +2 -3", 2, 3),
        ("# branch.ab x+2 -3", 2, 3),
        ("# branch.ab +2-3", 0, 0),  # no whitespace between
        ("# branch.ab +2\x85-3", 0, 0),  # Python's \s has U+0085, JavaScript's has not
        ("# branch.ab +2\x1f-3", 0, 0),
        ("# branch.ab -3 +2", 0, 0),
    ],
)
def test_branch_ab_is_found_anywhere_across_any_whitespace(record: str, ahead: int, behind: int) -> None:
    status = parse_porcelain_v2(record + "\0")
    assert (status.ahead, status.behind) == (ahead, behind)


def test_numstat_rename_cut_off_before_its_old_path_has_no_old_path() -> None:
    # The text ends right after the rename record: upstream has no old path at all (null).
    (entry,) = parse_numstat_z("3\t4\t")
    assert entry == NumstatEntry(additions=3, deletions=4, binary=False, old_path=None, new_path="")
    assert entry.model_dump(mode="json")["oldPath"] is None
    # A present but empty old-path record is kept as it is.
    (empty,) = parse_numstat_z("3\t4\t\0")
    assert (empty.old_path, empty.new_path) == ("", "")


def test_one_sided_numstat_dash_is_null_on_the_wire() -> None:
    (entry,) = parse_numstat_z("-\t5\tmixed\0")
    assert entry == NumstatEntry(additions=None, deletions=5, binary=False, new_path="mixed")
    assert json.loads(entry.model_dump_json())["additions"] is None


def test_patch_status_from_headers_only_so_a_copy_stays_modified() -> None:
    patch = "diff --git a/x b/y\nsimilarity index 100%\ncopy from x\ncopy to y\n"
    assert parse_unified_patch(patch) == ParsedPatch(hunks=(), status="modified")


def test_hunk_header_ending_in_carriage_return_is_not_a_hunk() -> None:
    # Upstream's `(.*)$` cannot match a trailing \r (JavaScript `.` excludes it); we keep that.
    assert parse_unified_patch("@@ -1 +1 @@ tail\r\n-a\n+b\n").hunks == ()


# --------------------------------------------------------------------------- fuzz: never crash

FRAGMENTS = [
    "\0", "\n", "\r", "\t", " ", "1 ", "2 ", "u ", "? ", "! ", "# branch.oid ", "# branch.head ",
    "# branch.upstream ", "# branch.ab +", " -", "(initial)", "(detached)", "R100 ", "N... ", "XY",
    ".M", "UU", "-\t-\t", "-\t", "\t-", "12", "007", "@@ -", " +", ",", " @@", "@@@ ", "+", "-",
    "\\ No newline at end of file", "new file mode 100644", "deleted file mode 100644",
    "rename from ", "rename to ", "diff --git a/x b/x", "ü", "\u2028", "\ufeff", "🔑",
]  # fmt: skip
noisy_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join),
)


@settings(max_examples=150)
@given(noisy_text)
def test_parsers_never_crash_and_results_serialise(text: str) -> None:
    status = parse_porcelain_v2(text)
    assert GitStatus.model_validate_json(status.model_dump_json()) == status
    for entry in parse_numstat_z(text):
        assert NumstatEntry.model_validate_json(entry.model_dump_json()) == entry
        if entry.binary:
            assert entry.additions == entry.deletions == 0
    patch = parse_unified_patch(text)
    assert ParsedPatch.model_validate_json(patch.model_dump_json()) == patch
    for hunk in patch.hunks:
        olds = [line.old_no for line in hunk.lines if line.old_no is not None]
        news = [line.new_no for line in hunk.lines if line.new_no is not None]
        assert olds == list(range(hunk.old_start, hunk.old_start + len(olds)))
        assert news == list(range(hunk.new_start, hunk.new_start + len(news)))


# --------------------------------------------------------------------------- round trip: porcelain v2

no_nul = st.text(st.characters(exclude_characters="\0"), max_size=12)
paths = st.text(st.characters(exclude_characters="\0"), min_size=1, max_size=12)
oids = st.text("0123456789abcdef", min_size=40, max_size=40)
xy_chars = st.sampled_from(".AMDRCTU")
CODES = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed", "C": "copied", "T": "typechange"}
CODES["U"] = "conflicted"


@st.composite
def porcelain_entries(draw: st.DrawFn) -> tuple[str, GitFileStatus]:
    kind = draw(st.sampled_from("12u?!"))
    path = draw(paths)
    oid = draw(oids)
    if kind in "?!":
        worktree = "untracked" if kind == "?" else "ignored"
        return f"{kind} {path}", GitFileStatus(path=path, worktree=worktree)
    xy = draw(xy_chars) + draw(xy_chars)
    if kind == "u":
        record = f"u {xy} N... 100644 100644 100644 100644 {oid} {oid} {oid} {path}"
        return record, GitFileStatus(path=path, index="conflicted", worktree="conflicted", is_conflicted=True)
    expected = GitFileStatus(
        path=path,
        index=CODES.get(xy[0]),
        worktree=CODES.get(xy[1]),
        is_conflicted="U" in xy,
    )
    if kind == "1":
        return f"1 {xy} N... 100644 100644 100755 {oid} {oid} {path}", expected
    orig = draw(paths)
    record = f"2 {xy} N... 100644 100644 100644 {oid} {oid} R{draw(st.integers(0, 100))} {path}\0{orig}"
    return record, expected.model_copy(update={"old_path": orig})


@settings(max_examples=80)
@given(
    oid=st.one_of(st.none(), st.just("(initial)"), oids),
    head=st.one_of(st.none(), st.just("(detached)"), no_nul.filter(lambda h: h != "(detached)")),
    upstream=st.one_of(st.none(), no_nul),
    ab=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))),
    entries=st.lists(porcelain_entries(), max_size=8),
)
def test_porcelain_v2_round_trip(
    oid: str | None,
    head: str | None,
    upstream: str | None,
    ab: tuple[int, int] | None,
    entries: list[tuple[str, GitFileStatus]],
) -> None:
    records = []
    if oid is not None:
        records.append(f"# branch.oid {oid}")
    if head is not None:
        records.append(f"# branch.head {head}")
    if upstream is not None:
        records.append(f"# branch.upstream {upstream}")
    if ab is not None:
        records.append(f"# branch.ab +{ab[0]} -{ab[1]}")
    records.extend(record for record, _ in entries)
    text = "".join(record + "\0" for record in records)

    assert parse_porcelain_v2(text) == GitStatus(
        head=None if head == "(detached)" else head,
        head_oid=None if oid == "(initial)" else oid,
        detached=head == "(detached)",
        upstream=upstream,
        ahead=ab[0] if ab else 0,
        behind=ab[1] if ab else 0,
        files=tuple(expected for _, expected in entries),
    )


# --------------------------------------------------------------------------- round trip: numstat


@st.composite
def numstat_entries(draw: st.DrawFn) -> tuple[str, NumstatEntry]:
    binary = draw(st.booleans())
    added = 0 if binary else draw(st.integers(0, 10**9))
    deleted = 0 if binary else draw(st.integers(0, 10**9))
    counts = "-\t-" if binary else f"{added}\t{deleted}"
    new_path = draw(paths)
    old_path = draw(st.one_of(st.none(), paths))
    entry = NumstatEntry(additions=added, deletions=deleted, binary=binary, old_path=old_path, new_path=new_path)
    if old_path is None:
        return f"{counts}\t{new_path}\0", entry
    return f"{counts}\t\0{old_path}\0{new_path}\0", entry


@settings(max_examples=60)
@given(st.lists(numstat_entries(), max_size=8))
def test_numstat_round_trip(entries: list[tuple[str, NumstatEntry]]) -> None:
    text = "".join(record for record, _ in entries)
    assert parse_numstat_z(text) == tuple(entry for _, entry in entries)


# --------------------------------------------------------------------------- round trip: unified patch

line_text = st.text(st.characters(exclude_characters="\n"), max_size=10)
diff_lines = st.lists(st.tuples(st.sampled_from(["context", "add", "del"]), line_text), max_size=8)


@st.composite
def hunks(draw: st.DrawFn) -> tuple[str, int, int, str, list[tuple[str, str]]]:
    lines = draw(diff_lines)
    old_start = draw(st.integers(0, 10**6))
    new_start = draw(st.integers(0, 10**6))
    tail = draw(st.text("abc xyz()", max_size=12))
    return f"@@ -{old_start}{{old}} +{new_start}{{new}} @@{tail}", old_start, new_start, tail.strip(), lines


STATUS_HEADERS = {
    "modified": "index 1111111..2222222 100644\n",
    "added": "new file mode 100644\nindex 0000000..2222222\n",
    "deleted": "deleted file mode 100644\nindex 1111111..0000000\n",
    "renamed": "similarity index 90%\nrename from old name\nrename to new name\n",
}
MARKERS = {"context": " ", "add": "+", "del": "-"}


@settings(max_examples=80)
@given(
    status=st.sampled_from(sorted(STATUS_HEADERS)),
    generated=st.lists(hunks(), max_size=4),
    no_newline_marker=st.booleans(),
)
def test_unified_patch_round_trip(
    status: str, generated: list[tuple[str, int, int, str, list[tuple[str, str]]]], no_newline_marker: bool
) -> None:
    text = f"diff --git a/f b/f\n{STATUS_HEADERS[status]}--- a/f\n+++ b/f\n"
    for template, _, _, _, lines in generated:
        old_count = sum(kind != "add" for kind, _ in lines)
        new_count = sum(kind != "del" for kind, _ in lines)
        # Git leaves out a count of 1; the parser must read that back as 1.
        text += template.format(
            old="" if old_count == 1 else f",{old_count}", new="" if new_count == 1 else f",{new_count}"
        )
        text += "\n" + "".join(MARKERS[kind] + body + "\n" for kind, body in lines)
        if no_newline_marker and lines:
            text += "\\ No newline at end of file\n"

    parsed = parse_unified_patch(text)

    assert parsed.status == status
    assert len(parsed.hunks) == len(generated)
    for hunk, (_, old_start, new_start, header, lines) in zip(parsed.hunks, generated, strict=True):
        assert (hunk.old_start, hunk.new_start, hunk.header) == (old_start, new_start, header)
        assert hunk.old_lines == sum(kind != "add" for kind, _ in lines)
        assert hunk.new_lines == sum(kind != "del" for kind, _ in lines)
        assert [(line.type, line.text) for line in hunk.lines] == lines
        old_no, new_no = old_start, new_start
        for line in hunk.lines:
            expected_old = None if line.type == "add" else old_no
            expected_new = None if line.type == "del" else new_no
            assert line == GitDiffLine(type=line.type, old_no=expected_old, new_no=expected_new, text=line.text)
            old_no += expected_old is not None
            new_no += expected_new is not None
