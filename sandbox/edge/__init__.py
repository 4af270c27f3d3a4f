"""The stream edge: what stands between a viewer and a box's desktop or terminal.

Both planes listen on one TCP port each and admit a WebSocket upgrade only when it offers a valid
stream token as a WebSocket subprotocol (never in the URL). Tokens are checked with the box's
derived key (:func:`sandbox.stream_token.derive_lease_key`), read from a 0600 key file the control
plane writes into the box, so a token of another lease or of an older epoch is refused, and the
refusal is an HTTP 403 before anything reaches the VNC server or the PTY.

- :mod:`sandbox.edge.admission`: the token check shared by both planes.
- :mod:`sandbox.edge.desktop`: the websockify auth plugin and the desktop edge launcher.
- :mod:`sandbox.edge.terminal`: a small proxy in front of ttyd.
- ``python -m sandbox.edge desktop|terminal ...`` starts an edge (the in-box scripts do).
"""

from __future__ import annotations

from sandbox.edge.admission import (
    DESKTOP_TOKEN_PORT,
    TERMINAL_TOKEN_PORT,
    Admission,
    EdgeGate,
    EdgeKey,
    offered_protocols,
)

__all__ = [
    "DESKTOP_TOKEN_PORT",
    "TERMINAL_TOKEN_PORT",
    "Admission",
    "EdgeGate",
    "EdgeKey",
    "offered_protocols",
]
