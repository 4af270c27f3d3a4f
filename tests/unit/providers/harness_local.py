"""The local provider in the conformance suite: the real thing (bubblewrap boxes), no fake."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from providers.local import LocalProvider
from tests.unit.providers.harness import ProviderHarness


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[ProviderHarness]:
    provider = LocalProvider(tmp_path / "boxes")
    provider.validate_credentials()
    try:
        yield ProviderHarness(provider=provider, unknown_id="box-0123456789abcdef", ports_reachable=False)
    finally:
        await provider.aclose()
