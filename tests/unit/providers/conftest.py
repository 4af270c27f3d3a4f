"""The provider conformance suite runs once per backend that has a ``harness_<backend>.py`` here.

A harness module exposes ``harness(tmp_path)``: an async context manager yielding a
:class:`~tests.unit.providers.harness.ProviderHarness` (the provider wired to its fake service, or to the
real thing for ``local``). Adding a backend to the suite is adding its harness module.

``selfhosted`` is not in this suite on purpose: its "box" is the user's own machine, which
terminate never destroys and whose workspace is never archived (snapshot kind ``none``); its
behaviour is covered by ``tests/integration/selfhosted`` and the Channel-A suite.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.providers.harness import ProviderHarness

HERE = Path(__file__).parent
BACKENDS: tuple[str, ...] = tuple(sorted(p.stem.removeprefix("harness_") for p in HERE.glob("harness_*.py")))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Only the suite's tests (those taking ``harness``): the other tests of this folder parametrize their
    # own ``backend`` (descriptors, registry) over every backend, harness or not.
    if "harness" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
async def harness(backend: str, tmp_path: Path) -> AsyncIterator[ProviderHarness]:
    """The backend's provider wired to its fake, torn down after the test."""
    module = importlib.import_module(f"tests.unit.providers.harness_{backend}")
    async with module.harness(tmp_path) as h:
        yield h
