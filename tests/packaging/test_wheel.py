"""What ``pip install sandbox-runtime`` gets: the runtime packages, and no test code.

The cloud SDK fakes, the conformance harnesses and every other test module live under ``tests/``;
the wheel is built from a copy of this checkout (tests included, so leaving them out is the
packaging config's doing) with the project's own build backend, offline.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

RUNTIME_PACKAGES = ("workflows", "activities", "providers", "sandbox", "daemons", "store", "client", "cli")
SHIPPED_MODULES = ("worker.py",)
TEST_TREES = ("tests", "bench")

# Run in the source copy. setuptools >= 70.1 (or the ``wheel`` package) builds the wheel itself; an
# older setuptools without ``bdist_wheel`` runs ``build_py``, the step of ``bdist_wheel`` that picks
# the packages, modules and package data the wheel holds, into a staging dir.
_BUILD = r"""
import importlib.util, json, pathlib, sys, zipfile
out = pathlib.Path(sys.argv[1])
try:
    from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401
    builds_wheels = True
except ImportError:
    builds_wheels = importlib.util.find_spec("wheel") is not None
if builds_wheels:
    from setuptools import build_meta
    name = build_meta.build_wheel(str(out / "dist"))
    files = zipfile.ZipFile(out / "dist" / name).namelist()
else:
    lib = out / "lib"
    sys.argv = ["setup.py", "-q", "build_py", "--build-lib", str(lib)]
    from setuptools import setup
    setup()
    files = [p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()]
(out / "files.json").write_text(json.dumps({"wheel": builds_wheels, "files": sorted(files)}))
"""


@dataclass
class Built:
    """The files the wheel holds (``wheel`` is False when they come from the ``build_py`` stage)."""

    files: list[str]
    wheel: bool
    source: Path


def build(tmp_path: Path) -> Built:
    """Build the distribution from a copy of the checkout (no stale ``build/`` dir, nothing written here)."""
    source = tmp_path / "src"
    # What a clone holds (tracked files, plus new ones not ignored): never a runtime's data dir, a venv or caches.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out)], cwd=source, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "files.json").read_text())
    return Built(files=data["files"], wheel=data["wheel"], source=source)


def test_the_wheel_holds_the_runtime_packages_and_no_test_code(tmp_path: Path) -> None:
    built = build(tmp_path)
    # The source handed to the backend did hold test code, fakes included: leaving it out is the config's doing.
    assert (built.source / "tests" / "fakes" / "modal_fake.py").is_file()
    assert (built.source / "tests" / "conftest.py").is_file()

    files = set(built.files)
    tops = {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")}
    assert tops == {*RUNTIME_PACKAGES, *SHIPPED_MODULES}, sorted(tops)
    for package in RUNTIME_PACKAGES:
        assert f"{package}/__init__.py" in files
        assert f"{package}/py.typed" in files
    # Modules and package data the runtime needs at run time: a provider, the migrations, the in-box scripts.
    assert {
        "providers/local.py",
        "providers/modal.py",
        "store/alembic.ini",
        "store/migrations/env.py",
        "store/migrations/script.py.mako",
        "store/migrations/versions/0001_leases.py",
        "sandbox/scripts/desktop-up",
        "sandbox/scripts/terminal-up",
    } <= files
    if built.wheel:
        assert any(f.endswith(".dist-info/entry_points.txt") for f in files)

    test_code = sorted(
        f
        for f in files
        if f.startswith(tuple(f"{t}/" for t in TEST_TREES))
        or "/testing/" in f
        or "/tests/" in f
        or f.endswith(("_fake.py", "/conftest.py"))
        or f.split("/")[-1].startswith("test_")
    )
    assert test_code == []


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, at any depth (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imports_test_code(path: Path) -> list[str]:
    """The modules of ``tests``/``bench`` that ``path`` imports."""
    return sorted(m for m in imported_modules(path) if m.split(".")[0] in TEST_TREES)


def test_no_shipped_module_imports_test_code() -> None:
    # Positive control: the scan sees a known import of test code (the provider benchmark drives the harnesses).
    assert "tests.unit.providers.harness" in imports_test_code(REPO / "bench" / "bench_providers.py")

    shipped = [REPO / m for m in SHIPPED_MODULES]
    for package in RUNTIME_PACKAGES:
        shipped += sorted((REPO / package).rglob("*.py"))
    assert len(shipped) > 100
    offenders = {str(p.relative_to(REPO)): found for p in shipped if (found := imports_test_code(p))}
    assert offenders == {}
