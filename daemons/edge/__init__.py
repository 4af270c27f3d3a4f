"""The stream edge: what stands between a viewer and a box's desktop or terminal.

Both planes listen on one TCP port each and admit a WebSocket upgrade only when it offers a valid
stream token as a WebSocket subprotocol (never in the URL). Tokens are checked with the box's
derived key (:func:`sandbox.stream_token.derive_lease_key`), read from a 0600 key file, and must
carry the lease epoch the edge was started for, so a token of another lease or of another epoch
is refused, and the refusal is an HTTP 403 before anything reaches the VNC server or the PTY. An
admitted token is routed by its mode: ``control`` to the server that takes input, ``view`` to
the view-only one (``x11vnc -viewonly``, ``ttyd`` without ``--writable``).

A remote box runs its edges itself (the in-box scripts start them, the key file is in the box);
a local box's edges run on the worker host (:mod:`daemons.edge.host`), the key in the box's
private directory, out of the box's sight.

- :mod:`daemons.edge.admission`: the token check shared by both planes.
- :mod:`daemons.edge.desktop`: websockify with the token check, routing by mode.
- :mod:`daemons.edge.terminal`: a small proxy in front of ttyd.
- :mod:`daemons.edge.target`: connecting to a plane's socket without following links.
- :mod:`daemons.edge.host`: starting, reusing and stopping local boxes' edges on the host.
- ``python -m daemons.edge desktop|terminal ...`` starts an edge.
"""

from __future__ import annotations

from daemons.edge.admission import (
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
