"""Which destinations a box may reach through its egress proxy (pure: no sockets, no DNS).

A box's only way out is the HTTP/CONNECT proxy that runs outside it (``providers/egress_proxy.py``).
The proxy asks this policy twice for every connection:

1. :meth:`EgressPolicy.allows_name` before resolving: does the operator's allowlist
   (``SANDBOX_LOCAL_EGRESS_ALLOW``) name this host and port? Empty means deny everything.
2. :meth:`EgressPolicy.refusal` for each address the name resolved to: addresses the runtime never
   lets a box reach, whatever the allowlist says, even ``*``: loopback, link-local, unspecified,
   multicast and broadcast addresses, the host's own addresses (the caller says which are local),
   and every endpoint the runtime itself uses (Temporal, NATS, the database, the artifact store).

The proxy then connects to the checked address itself, never to the name again, so a DNS answer
that changes between the check and the connect (rebinding) cannot redirect it.

Allowlist grammar (comma- or whitespace-separated entries)::

    example.com           that host, any port
    *.example.com         any subdomain of example.com (not example.com itself)
    example.com:443       that host, port 443 only
    *                     any host (the fixed refusals still apply)
    10.1.2.3, [2001:db8::1]:8080, 10.0.0.0/8   literal addresses and networks, optionally with a port
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from sandbox.errors import SandboxConfigError

__all__ = [
    "ALLOW_SETTING",
    "EgressPolicy",
    "EgressRule",
    "IPAddress",
    "parse_allowlist",
    "runtime_endpoints",
]

ALLOW_SETTING: Final = "SANDBOX_LOCAL_EGRESS_ALLOW"
"""The setting an operator changes to let boxes reach a destination (named in every refusal)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_RE: Final = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}\.?")
_ENTRY_RE: Final = re.compile(r"(?P<host>\[[^\]]+\]|[^:\[\]]+)(?::(?P<port>\d{1,5}))?")
_MAX_HOST_LEN: Final = 253


@dataclass(frozen=True)
class EgressRule:
    """One allowlist entry: a host pattern or a network, and a port (None = any port)."""

    host: str | None
    network: IPNetwork | None
    port: int | None

    def matches(self, host: str, port: int) -> bool:
        """Whether this entry allows ``host:port`` (host lowercased, without a trailing dot)."""
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            address = _literal_address(host)
            return address is not None and address in self.network
        assert self.host is not None
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __str__(self) -> str:
        where = str(self.host) if self.network is None else str(self.network)
        return where if self.port is None else f"{where}:{self.port}"


def parse_allowlist(text: str) -> tuple[EgressRule, ...]:
    """Parse ``SANDBOX_LOCAL_EGRESS_ALLOW`` into rules.

    Raises:
        SandboxConfigError: an entry is not a host pattern, address or network with an optional port.
    """
    rules: list[EgressRule] = []
    for entry in re.split(r"[\s,]+", text.strip()):
        if entry:
            rules.append(_parse_entry(entry))
    return tuple(rules)


def _parse_entry(entry: str) -> EgressRule:
    def bad(why: str) -> SandboxConfigError:
        return SandboxConfigError(
            f"{ALLOW_SETTING}: {entry!r} {why}; entries look like example.com, *.example.com, "
            "example.com:443, 10.0.0.0/8 or [2001:db8::1]:8080"
        )

    m = _ENTRY_RE.fullmatch(entry)
    # No match: a bare IPv6 address or network without brackets (it can have no port then).
    host, port_text = (entry, None) if m is None else (m["host"], m["port"])
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise bad("has a port outside 1..65535")
    host = host.strip("[]").lower()
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        network = None
    if network is not None:
        return EgressRule(host=None, network=network, port=port)
    if host == "*":
        return EgressRule(host="*", network=None, port=port)
    if len(host) > _MAX_HOST_LEN or not _HOST_RE.fullmatch(host):
        raise bad("is not a host name pattern")
    return EgressRule(host=host.rstrip("."), network=None, port=port)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return _unmapped(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _unmapped(address: IPAddress) -> IPAddress:
    """IPv4-mapped and -compatible IPv6 addresses are checked as the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None and address.sixtofour.is_loopback:
            return address.sixtofour
    return address


@dataclass(frozen=True)
class EgressPolicy:
    """The operator's allowlist plus the destinations the runtime always refuses.

    Attributes:
        rules: The allowlist (empty = deny everything).
        runtime: ``(address, port)`` of every endpoint the runtime uses; port None = every port.
    """

    rules: tuple[EgressRule, ...] = ()
    runtime: frozenset[tuple[IPAddress, int | None]] = frozenset()

    @classmethod
    def from_settings(cls, allow: str, runtime: Iterable[tuple[IPAddress, int | None]] = ()) -> EgressPolicy:
        """A policy from the allowlist text and the runtime's resolved endpoints.

        Raises:
            SandboxConfigError: the allowlist is malformed.
        """
        return cls(rules=parse_allowlist(allow), runtime=frozenset((_unmapped(a), p) for a, p in runtime))

    def allows_name(self, host: str, port: int) -> bool:
        """Whether the allowlist names ``host:port`` (checked before the name is resolved)."""
        name = host.strip("[]").lower().rstrip(".")
        return any(rule.matches(name, port) for rule in self.rules)

    def refusal(self, address: IPAddress, port: int, *, local: bool) -> str | None:
        """Why ``address:port`` is refused whatever the allowlist says, or None when it may be reached.

        ``local`` says whether the address is one of this host's own (the caller finds out).
        """
        address = _unmapped(address)
        if address.is_loopback:
            return f"{address} is a loopback address"
        if address.is_link_local:
            return f"{address} is a link-local address"
        if address.is_unspecified:
            return f"{address} is the unspecified address"
        if address.is_multicast or (isinstance(address, ipaddress.IPv4Address) and address.packed[-1] == 255):
            return f"{address} is a multicast or broadcast address"
        if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
            return f"{address} is a site-local address"
        if local:
            return f"{address} is an address of the sandbox host itself"
        if (address, port) in self.runtime or (address, None) in self.runtime:
            return f"{address}:{port} is an endpoint of the sandbox runtime itself"
        return None


def runtime_endpoints(urls: Iterable[str | None]) -> list[tuple[str, int | None]]:
    """``(host, port)`` of each runtime endpoint URL or ``host:port`` (Temporal, NATS, database, artifacts).

    Unparseable or empty values are skipped: they refer to nothing a box could reach. A URL
    without a port names the host on every port (conservative).
    """
    out: list[tuple[str, int | None]] = []
    for raw in urls:
        if not raw:
            continue
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            if "://" not in part:
                part = "tcp://" + part
            try:
                split = urlsplit(part)
                host, port = split.hostname, split.port
            except ValueError:
                continue
            if host:
                out.append((host, port))
    return out
