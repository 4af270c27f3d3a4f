"""The WebSocket URL a viewer opens to reach a box's stream port (upstream ``buildStreamUrl``).

``build_stream_url`` turns the endpoint a provider returns for an exposed port into
``<scheme>://<host>[:<port>]<path>[?<query>]``: ``wss`` when the endpoint is TLS else ``ws``, the
scheme's default port (443 / 80) dropped, an IPv6 literal bracketed, the path defaulting to ``/``,
and the provider's own query (a Blaxel ``bl_preview_token``, a Daytona signed token) appended
verbatim. The OpenGeni stream token is never part of the URL: it travels in-band.

Stricter than upstream, which accepts any JavaScript number as a port and brackets any host with a
``:``: a port outside 1..65535, a host that is neither a hostname nor an IP literal, or a field of
the wrong type is a malformed endpoint and raises :class:`~sandbox.errors.StreamPortUnavailable`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Final, Protocol, runtime_checkable

from sandbox.errors import StreamPortUnavailable

__all__ = ["ExposedEndpoint", "build_stream_url"]

_DEFAULT_PORTS: Final = {"wss": 443, "ws": 80}
# Characters that would end or re-shape the authority part of the URL.
_HOST_FORBIDDEN: Final = frozenset("/?#@[]\\")


@runtime_checkable
class ExposedEndpoint(Protocol):
    """What :func:`build_stream_url` reads from an endpoint; :class:`sandbox.box.Endpoint` has it."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> str: ...


def _malformed(host: object, port: object, why: str) -> StreamPortUnavailable:
    # Only host and port are echoed: the query may carry a provider token.
    return StreamPortUnavailable(
        f"provider returned a malformed exposed-port endpoint (host={host!r}, port={port!r}): {why}"
    )


def _has_control_or_space(text: str) -> bool:
    return any(ch <= " " or ch == "\x7f" or ch.isspace() for ch in text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)  # accepts a zone id ("fe80::1%eth0")
    except ValueError:
        return False
    return True


def _authority_host(host: object, port: object) -> str:
    if not isinstance(host, str) or not host:
        raise _malformed(host, port, "host must be a non-empty string")
    if _has_control_or_space(host):
        raise _malformed(host, port, "host contains whitespace or a control character")
    if host.startswith("["):
        if not host.endswith("]") or not _is_ipv6(host[1:-1]):
            raise _malformed(host, port, "bracketed host is not an IPv6 literal")
        return host
    if ":" in host:
        if not _is_ipv6(host):
            raise _malformed(host, port, "host contains ':' but is not an IPv6 literal")
        return f"[{host}]"
    if any(ch in _HOST_FORBIDDEN for ch in host):
        raise _malformed(host, port, "host contains a URL delimiter")
    return host


def _checked_part(value: object, name: str, host: object, port: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _malformed(host, port, f"{name} must be a string")
    # Copied verbatim, so nothing that would split or truncate the URL.
    if _has_control_or_space(value) or "#" in value:
        raise _malformed(host, port, f"{name} contains whitespace, a control character or '#'")
    return value


def build_stream_url(endpoint: ExposedEndpoint | Mapping[str, object]) -> str:
    """Return the ``ws``/``wss`` URL of an exposed stream port.

    ``endpoint`` is our :class:`sandbox.box.Endpoint` (any :class:`ExposedEndpoint`) or the
    upstream ``ExposedPortEndpoint`` shape as a mapping (``host``, ``port``, optional ``tls``,
    ``path``, ``query``; other keys such as ``protocol`` and ``url`` are ignored, and ``None`` means
    absent). The port is dropped when it is the scheme's default (443 for ``wss``, 80 for ``ws``), a
    bare IPv6 host is bracketed, an empty path becomes ``/`` and a missing leading ``/`` is added,
    and a non-empty query is appended after ``?`` exactly as given.

    Raises:
        StreamPortUnavailable: The endpoint is malformed: no host, a host that is neither a hostname
            nor an IP literal, a port that is not an int in 1..65535, a non-bool ``tls``, or a path
            or query with whitespace, control characters or ``#``.
    """
    host: object
    port: object
    tls: object
    path: object
    query: object
    if isinstance(endpoint, Mapping):
        host, port, tls = endpoint.get("host"), endpoint.get("port"), endpoint.get("tls")
        path, query = endpoint.get("path"), endpoint.get("query")
    elif isinstance(endpoint, ExposedEndpoint):
        host, port, tls = endpoint.host, endpoint.port, endpoint.tls
        path, query = endpoint.path, endpoint.query
    else:
        raise StreamPortUnavailable(f"provider returned no exposed-port endpoint (got {type(endpoint).__name__})")

    authority = _authority_host(host, port)
    if type(port) is not int or not 1 <= port <= 65535:
        raise _malformed(host, port, "port must be an integer in 1..65535")
    if tls is not None and not isinstance(tls, bool):
        raise _malformed(host, port, "tls must be a bool")
    scheme = "wss" if tls else "ws"
    path_part = _checked_part(path, "path", host, port) or "/"
    if not path_part.startswith("/"):
        path_part = "/" + path_part
    query_part = _checked_part(query, "query", host, port)

    port_part = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{authority}{port_part}{path_part}{f'?{query_part}' if query_part else ''}"
