"""Which hosts a step may reach: the allow-list, checked against every address a name resolves
to, and the addresses the runner then connects to (no DNS rebinding window).

The allow-list as written is parsed by :func:`arqd.stepmodel.parse_allow_hosts` (the config checks
it when it loads); :class:`Policy` applies it to each URL a step or a redirect names.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from yarl import URL

from arqd.stepmodel import canon_host, ip_of

__all__ = [
    "Policy",
    "Refused",
    "Resolver",
    "getaddrinfo",
    "host_header",
    "is_public_address",
    "origin",
]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local,
    shared, unspecified, multicast and reserved ones, also inside mapped/6to4/NAT64 addresses."""
    ip = ip_of(address)
    return ip is not None and _is_global(ip)


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return _is_global(inner)
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: how names are resolved (injectable for tests)."""


async def getaddrinfo(host: str, port: int) -> list[str]:
    """The resolver used unless one is injected: every address of ``host``, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Refused(Exception):
    """A host the allow-list refuses; the runner turns it into :class:`~arqd.errors.HostNotAllowed`
    (it never leaves the runner)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The allow-list (``(host, port or None)`` pairs, empty for "public addresses only") and how
    names are resolved."""

    allowed: frozenset[tuple[str, int | None]]
    resolve: Resolver

    async def admit(self, url: URL) -> list[str]:
        """The checked addresses to connect to for ``url``, or Refused."""
        host, port = canon_host(url.raw_host or ""), url.port or 0
        where = _hostport(host, port)
        listed = (host, None) in self.allowed or (host, port) in self.allowed
        if self.allowed and not listed:
            raise Refused(f"{where} is not in http_steps.allow_hosts")
        literal = ip_of(host)
        addresses = [host] if literal is not None else await self.resolve(host, port)
        if not addresses:
            raise OSError(errno.EHOSTUNREACH, "the name resolved to no address")
        if not listed and not all(is_public_address(a) for a in addresses):
            what = "is" if literal is not None else "resolves to"
            raise Refused(f"{where} {what} a non-public address and is not in allow_hosts")
        return addresses


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_header(url: URL) -> str:
    """``Host`` for ``url`` as written: brackets around IPv6, the port only when not default."""
    host = url.raw_host or ""
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(url.scheme)
    return host if url.explicit_port in (None, default) else f"{host}:{url.explicit_port}"


def origin(url: URL) -> tuple[str, str, int | None]:
    """Scheme, canonical host and port: what a redirect must keep to stay on the same origin."""
    return url.scheme, canon_host(url.raw_host or ""), url.port
