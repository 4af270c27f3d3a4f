from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.planes.harness import PlaneHarness, plane_harness


@pytest.fixture(scope="module")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PlaneHarness]:
    """Plane activities over local boxes under a private data dir (boxes terminated at the end)."""
    async with plane_harness(tmp_path_factory.mktemp("planes")) as harness:
        yield harness
