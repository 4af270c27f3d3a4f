from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.planes.harness import PlaneHarness, plane_harness

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


@pytest.fixture(scope="module")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PlaneHarness]:
    """Plane activities over local boxes under a private data dir (boxes terminated at the end)."""
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
