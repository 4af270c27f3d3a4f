"""Admission at the edge: does a WebSocket upgrade carry a valid stream token for this plane?

The token travels as one of the offered WebSocket subprotocols (``Sec-WebSocket-Protocol:
binary, ogs_...``). It is verified with the box's derived key, which the control plane writes as
64 hex digits into a key file; the file is re-read whenever it changes (a rewritten key takes
effect for the next connection). Without a readable key the edge admits nothing.

The ``port`` claim names the plane a token was minted for (6080 desktop, 7681 terminal, as
upstream), so a desktop token does not open the terminal. The ``leaseEpoch`` claim must be the
epoch the edge was started for (``--epoch``): the key is derived per (lease, epoch) already, so
this only matters when the key file and the edge disagree (a key rewritten for a new epoch under
an edge of the old one), and then the edge refuses rather than trusting either; whoever starts
edges restarts them for a new epoch. The ``mode`` claim
(``view`` or ``control``) is returned with the claims; the planes route on it (a view-only VNC
server, a read-only ttyd for ``view``).

Reasons are short fixed words; neither a token nor a key is ever part of a reason or a log line.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from sandbox.stream_token import (
    DEFAULT_STREAM_PORT,
    STREAM_TOKEN_PREFIX,
    StreamMode,
    StreamTokenClaims,
    StreamTokenKey,
)

__all__ = [
    "DESKTOP_TOKEN_PORT",
    "TERMINAL_TOKEN_PORT",
    "Admission",
    "AdmissionReason",
    "EdgeGate",
    "EdgeKey",
    "offered_protocols",
]

DESKTOP_TOKEN_PORT: Final = DEFAULT_STREAM_PORT
"""The ``port`` claim of a desktop token (6080)."""
TERMINAL_TOKEN_PORT: Final = 7681
"""The ``port`` claim of a terminal token (7681)."""

AdmissionReason = Literal["ok", "no_token", "no_key", "invalid_token", "wrong_plane", "wrong_epoch"]

_KEY_HEX_LENGTH: Final = 64
_MAX_KEY_FILE_BYTES: Final = 4096
# A client offers one token; looking at a few bounds the HMAC work one request can cause.
_MAX_TOKENS_CHECKED: Final = 4
_MAX_HEADER_CHARS: Final = 16384


def offered_protocols(header_values: Iterable[str]) -> list[str]:
    """The subprotocols offered in one or more ``Sec-WebSocket-Protocol`` header values, trimmed, in order."""
    out: list[str] = []
    total = 0
    for value in header_values:
        total += len(value)
        if total > _MAX_HEADER_CHARS:
            break
        out.extend(item.strip() for item in value.split(",") if item.strip())
    return out


@dataclass(frozen=True)
class Admission:
    """The verdict on one upgrade request.

    Attributes:
        admitted: Whether the request may reach the plane.
        reason: ``ok`` or why not: ``no_token``, ``no_key`` (the edge has no usable key),
            ``invalid_token`` (bad signature, malformed, expired, another lease or epoch),
            ``wrong_plane`` (a valid token minted for the other plane), ``wrong_epoch`` (a valid
            token whose ``leaseEpoch`` is not the epoch this edge serves).
        protocols: The offered subprotocols without any token, to forward upstream.
        claims: The verified claims when admitted.
    """

    admitted: bool
    reason: AdmissionReason
    protocols: tuple[str, ...]
    claims: StreamTokenClaims | None = None

    @property
    def mode(self) -> StreamMode | None:
        """The admitted token's mode (``view`` or ``control``); ``None`` when refused."""
        return self.claims.mode if self.admitted and self.claims is not None else None


class EdgeKey:
    """The box's derived stream-token key, read from a key file and reloaded when the file changes.

    The file holds the 32-byte key as 64 hex digits (surrounding whitespace allowed). A missing,
    unreadable or malformed file means no key: the edge then refuses every connection.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._key: StreamTokenKey | None = None

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

    def current(self) -> StreamTokenKey | None:
        """The key as the file holds it now, or ``None`` if there is no usable key."""
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            if stamp != self._stamp:
                self._key = self._load(st)
                self._stamp = stamp
            return self._key

    def _load(self, st: os.stat_result) -> StreamTokenKey | None:
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_KEY_FILE_BYTES:
            return None
        try:
            text = self._path.read_bytes().decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if len(text) != _KEY_HEX_LENGTH:
            return None
        try:
            return StreamTokenKey(bytes.fromhex(text))
        except ValueError:
            return None


class EdgeGate:
    """Admits an upgrade request when one offered subprotocol is a valid token for this plane and epoch.

    Args:
        key: The box's key (see :class:`EdgeKey`).
        plane_port: The ``port`` claim this plane accepts (:data:`DESKTOP_TOKEN_PORT` or
            :data:`TERMINAL_TOKEN_PORT`).
        epoch: The lease epoch this edge serves; a token with another ``leaseEpoch`` is refused.
    """

    def __init__(self, key: EdgeKey, plane_port: int, *, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"the edge's epoch must be an integer >= 0, not {epoch!r}")
        self._key = key
        self._plane_port = plane_port
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        """The lease epoch this edge serves."""
        return self._epoch

    def admit(self, header_values: Iterable[str], *, now: float | None = None) -> Admission:
        """Judge the ``Sec-WebSocket-Protocol`` header values of one request; never raises on their content."""
        offered = offered_protocols(header_values)
        tokens = [p for p in offered if p.startswith(STREAM_TOKEN_PREFIX)]
        rest = tuple(p for p in offered if not p.startswith(STREAM_TOKEN_PREFIX))
        if not tokens:
            return Admission(False, "no_token", rest)
        key = self._key.current()
        if key is None:
            return Admission(False, "no_key", rest)
        reason: AdmissionReason = "invalid_token"
        for token in tokens[:_MAX_TOKENS_CHECKED]:
            claims = key.verify(token, now=now)
            if claims is None:
                continue
            if claims.port != self._plane_port:
                reason = "wrong_plane"
                continue
            if claims.lease_epoch != self._epoch:
                reason = "wrong_epoch"
                continue
            return Admission(True, "ok", rest, claims)
        return Admission(False, reason, rest)
