"""What a browser may not make arqd do (docs/design.md section 5b, "Browsers").

A web page the operator visits can send requests to ``127.0.0.1:8080``; it cannot read the
answers (same-origin policy) unless DNS rebinding makes its own name point at arqd. Three rules,
applied by ``server.access_middleware`` to every route but the public ones (``/``, ``/healthz``,
``/readyz`` hold no data and change nothing), close both doors:

- **Host** (421 ``misdirected_request``): a request that presents no valid token must name this
  daemon in ``Host``: the listen host, ``localhost``, an IP address, or a name of
  ``server.allowed_hosts``. A rebinding page sends its own name, which is none of these. IP
  addresses pass: a browser never rebinds an address, so a page whose origin is an address is
  served by that address. The port is not compared: a tunnel (``ssh -L 9000:localhost:8080``)
  or a port-forward legitimately changes it, and a rebinding page's name fails anyway.
- **Origin** (403 ``forbidden``): a present ``Origin`` must be this daemon's own (``http(s)://``
  plus the request's ``Host``, or a name of ``server.allowed_hosts``); ``Origin: null``
  (sandboxed frames, files) is refused, as is ``Sec-Fetch-Site: cross-site`` except a
  top-level navigation by GET (following a link: the linking page reads nothing).
- **Content type** (415 ``unsupported_media_type``): a body must be declared
  ``application/json``; HTML forms can only send ``application/x-www-form-urlencoded``,
  ``multipart/form-data`` or ``text/plain``. Routes that read JSON require the header even for
  an empty body (``server.read_body``).

Header values arrive as ``str`` with undecodable bytes as lone surrogates; nothing here encodes
them, and messages quote them with ``ascii()``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

JSON_TYPE = "application/json"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = frozenset({"localhost"})
QUOTE_MAX = 80  # characters of a refused header value quoted back in the error message


def quote(value: str) -> str:
    """A header value for an error message: ASCII-only, short."""
    text = ascii(value)
    return text if len(text) <= QUOTE_MAX else text[: QUOTE_MAX - 3] + "..."


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name``, ``name:port``, ``[v6]`` or ``[v6]:port`` as (lowercase host, port); ``None`` if
    it is none of these."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = value.rpartition(":")
        if not sep:
            host, port_text = value, None
        elif ":" in host:
            return None  # an IPv6 address must be in brackets
        else:
            port_text = port_text_
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
            return None
        port = int(port_text)
    host = host.lower().rstrip(".")
    if not host or not host.isascii():
        return None
    return host, port


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# Distinct good ``Host`` values remembered (clients may name any address of the daemon, so the
# set is capped; past it each is parsed again, as all refused ones are).
ACCEPTED_MAX = 64


class Guard:
    """The three rules for one daemon: its listen host and ``server.allowed_hosts``."""

    def __init__(self, listen_host: str, allowed_hosts: Iterable[str]) -> None:
        self.allowed = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.names = LOOPBACK_NAMES | self.allowed | {listen_host.lower().rstrip(".")}
        self._accepted: set[str] = set()  # Host values found good, at most ACCEPTED_MAX

    def host_problem(self, host_header: str | None) -> str | None:
        """Why ``Host`` does not name this daemon, or ``None``. No header: not a browser."""
        if host_header is None or host_header in self._accepted:
            return None  # clients send the same Host on every request: parse it once
        parsed = split_host(host_header)
        if parsed is not None and (parsed[0] in self.names or is_address(parsed[0])):
            if len(self._accepted) < ACCEPTED_MAX:
                self._accepted.add(host_header)
            return None
        return (
            f"Host {quote(host_header)} is not a name of this daemon; without a token use its "
            "listen address or localhost, or list the name in server.allowed_hosts"
        )

    def origin_problem(self, headers: Mapping[str, str], method: str) -> str | None:
        """Why the request comes from another site's page, or ``None``."""
        origin = headers.get("Origin")
        if origin is not None:
            problem = self._foreign_origin(origin.strip(), headers.get("Host"))
            if problem:
                return problem
        if headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
            navigating = headers.get("Sec-Fetch-Mode", "").strip().lower() == "navigate"
            if not (navigating and method in ("GET", "HEAD")):
                return "a page of another site may not call this API (Sec-Fetch-Site: cross-site)"
        return None

    def _foreign_origin(self, origin: str, host_header: str | None) -> str | None:
        refused = f"Origin {quote(origin)} is not this daemon's own; pages of other sites "
        refused += "may not call this API"
        scheme, sep, authority = origin.partition("://")
        if origin.lower() == "null" or not sep or scheme.lower() not in DEFAULT_PORTS:
            return refused
        parsed = split_host(authority)
        if parsed is None:
            return refused
        host, port = parsed
        if host in self.allowed:
            return None
        own = split_host(host_header) if host_header is not None else None
        default = DEFAULT_PORTS[scheme.lower()]
        if own is None or own[0] != host or (own[1] or default) != (port or default):
            return refused
        return None


def content_type_problem(content_type: str, has_body: bool, method: str) -> str | None:
    """Why an unsafe request's body may not be read as JSON, or ``None``. ``content_type`` is
    aiohttp's parsed media type (parameters dropped; ``application/octet-stream`` if absent)."""
    if method in SAFE_METHODS or not has_body or content_type == JSON_TYPE:
        return None
    return f"a request body must be {JSON_TYPE}, not {quote(content_type)}"
