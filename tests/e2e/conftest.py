from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.planes.harness import PlaneHarness, engine_plane_harness, plane_harness

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


ENGINE = "docker_engine"
"""The viewer tests' second backend: docker boxes on the session's real engine (podman)."""


@pytest.fixture(scope="module", params=["local", pytest.param(ENGINE, marks=pytest.mark.container_engine)])
async def planes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PlaneHarness]:
    """Plane activities over local boxes, or docker boxes on the real engine (boxes terminated at the end)."""
    if request.param == ENGINE:
        engine = request.getfixturevalue("container_engine")
        async with engine_plane_harness(tmp_path_factory.mktemp("e2e-engine-planes"), engine) as harness:
            yield harness
        return
    async with plane_harness(tmp_path_factory.mktemp("e2e-planes")) as harness:
        yield harness


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """Debian's headless Chromium driven by Playwright (never a downloaded browser)."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield instance
        finally:
            await instance.close()
