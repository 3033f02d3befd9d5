"""Bearer tokens and scopes (docs/http-api.md, Authentication and scopes).

``[auth] tokens`` lists each token by name with the SHA-256 of its secret and its scopes out of
``submit``, ``read``, ``cancel``, ``admin`` (``admin`` implies the others and the operator
routes). With no tokens configured every request is anonymous and may do everything; ``arqd
serve`` refuses to listen beyond loopback in that case unless ``server.allow_anonymous``.

A presented secret is hashed and compared with every configured digest in constant time
(``hmac.compare_digest``, never stopping at the first match), so timing says nothing about which
token or how much of it matched. Secrets are never logged: only token names are.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from arqd.config import SCOPES, AuthConfig
from arqd.config import Scope as TokenScope

# A route's scope: a token's, or ``public`` (anyone) or ``authenticated`` (any valid token).
Scope = Literal["public", "authenticated"] | TokenScope


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a token's name and scopes, or the anonymous user of a tokenless setup."""

    name: str | None
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        if scope in ("public", "authenticated"):
            return True
        return scope in self.scopes or "admin" in self.scopes

    @property
    def sees(self) -> str | None:
        """The owner this principal's view is limited to; ``None``: every job (admin,
        anonymous)."""
        if self.name is None or "admin" in self.scopes:
            return None
        return self.name


ANONYMOUS = Principal(None, frozenset(SCOPES))


@dataclass(frozen=True, slots=True)
class _Token:
    name: str
    digest: bytes
    scopes: frozenset[str]


class Tokens:
    """The configured tokens; rebuilt when the config is reloaded."""

    def __init__(self, config: AuthConfig) -> None:
        self._tokens = [
            _Token(t.name, bytes.fromhex(t.sha256), frozenset(t.scopes)) for t in config.tokens
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, header: str | None) -> Principal | None:
        """The principal behind an ``Authorization`` header, or ``None`` if it proves nothing."""
        if not self._tokens:
            return ANONYMOUS
        if header is None:
            return None
        kind, _, secret = header.partition(" ")
        if kind.lower() != "bearer" or not secret.strip():
            return None
        try:  # aiohttp hands undecodable header bytes over as lone surrogates: hash the bytes
            digest = hashlib.sha256(secret.strip().encode("utf-8", "surrogateescape")).digest()
        except UnicodeEncodeError:  # a surrogate no byte decodes to: proves nothing
            return None
        found: _Token | None = None
        for token in self._tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return None if found is None else Principal(found.name, found.scopes)
