"""Waiting until the NATS server has every command a connection sent so far.

nats-py 2.16's ``flush()`` writes its PING straight to the socket, while a SUB or PUB made just
before still waits in the client's pending buffer for its flusher task. The PONG can then come
back before the server has read the SUB: an agent that said "ready" after ``subscribe`` +
``flush`` was, under load, not yet subscribed, and the first request went past it (seen in the
server's trace: PING, PONG, the request, then the SUB). :func:`flush_in_order` makes two round
trips: the first PONG cannot be read before the flusher task, woken before that PING was
written, has handed the pending commands to the socket, so the second PING follows them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["flush_in_order"]


async def flush_in_order(nc: Any, timeout: int = 10) -> None:
    """Return once the server has processed every command ``nc`` sent before this call.

    Raises:
        nats.errors.FlushTimeoutError: No PONG within ``timeout`` seconds (per round trip).
        nats.errors.ConnectionClosedError: The connection is closed.
    """
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)
