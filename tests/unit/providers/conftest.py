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
from typing import Any

import pytest

from tests.unit.providers.harness import ProviderHarness

HERE = Path(__file__).parent
BACKENDS: tuple[str, ...] = tuple(sorted(p.stem.removeprefix("harness_") for p in HERE.glob("harness_*.py")))


def _has_fake_service(backend: str) -> bool:
    # A harness module says ``FAKE_SERVICE = False`` when it runs the real thing (local boxes).
    return bool(getattr(importlib.import_module(f"tests.unit.providers.harness_{backend}"), "FAKE_SERVICE", True))


def needs_container_engine(backend: str) -> bool:
    """Whether the backend's harness runs on the real container engine (``NEEDS_CONTAINER_ENGINE``)."""
    module = importlib.import_module(f"tests.unit.providers.harness_{backend}")
    return bool(getattr(module, "NEEDS_CONTAINER_ENGINE", False))


def backend_param(backend: str) -> Any:
    """``backend`` as a parameter, marked ``container_engine`` when its harness needs the real engine."""
    if needs_container_engine(backend):
        return pytest.param(backend, marks=pytest.mark.container_engine)
    return backend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Only the suite's tests (those taking ``harness``): the other tests of this folder parametrize their
    # own ``backend`` (descriptors, registry) over every backend, harness or not. A test marked
    # ``needs_fake_service`` injects faults into a fake, so it runs only for backends that have one
    # (left out of the parametrisation, not skipped).
    if "harness" in metafunc.fixturenames:
        backends = BACKENDS
        if metafunc.definition.get_closest_marker("needs_fake_service") is not None:
            backends = tuple(b for b in BACKENDS if _has_fake_service(b))
        metafunc.parametrize("backend", [backend_param(b) for b in backends])


@pytest.fixture
async def harness(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ProviderHarness]:
    """The backend's provider wired to its fake (or to the real engine), torn down after the test."""
    if needs_container_engine(backend):
        request.getfixturevalue("container_engine")
    module = importlib.import_module(f"tests.unit.providers.harness_{backend}")
    async with module.harness(tmp_path) as h:
        yield h
