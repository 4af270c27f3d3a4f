"""Planned failures and latency for fake services: what a flaky cloud does to a provider."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FaultPlan"]

ErrorFactory = Callable[[], BaseException]


@dataclass
class FaultPlan:
    """Failures to raise on named operations of a fake service, and a latency added to every call.

    A fake calls :meth:`before` at the start of each operation (``create``, ``get``, ``exec``,
    ``read``, ``write``, ``list``, ``terminate``, ``list_boxes``, ...); planned errors are raised
    in the order they were planned, each for as many calls as its ``times``.
    """

    latency: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    _planned: dict[str, deque[ErrorFactory]] = field(default_factory=dict)

    def fail(self, operation: str, error: BaseException | ErrorFactory, *, times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` raise ``error`` (an instance or a factory)."""
        if isinstance(error, BaseException):
            instance = error

            def factory() -> BaseException:
                return instance
        else:
            factory = error
        queue = self._planned.setdefault(operation, deque())
        queue.extend([factory] * times)

    def clear(self) -> None:
        """Forget every planned failure (latency is kept)."""
        self._planned.clear()

    async def before(self, operation: str) -> None:
        """Count the call, wait the latency, and raise the next planned error for ``operation``."""
        self.calls[operation] = self.calls.get(operation, 0) + 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        queue = self._planned.get(operation)
        if queue:
            raise queue.popleft()()
