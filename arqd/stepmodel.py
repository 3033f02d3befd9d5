"""What a multi-step HTTP job is made of, validated: its steps, its credentials, the hosts the
daemon may reach (``[http_steps] allow_hosts``) and what a sealing key looks like.

Model level: both ``arqd.config`` (which checks the steps of configured groups and the allow-list
when a config loads) and ``arqd.steps`` (which runs them) import this module; it imports only the
model and the errors, never aiohttp or cryptography. The rules themselves are in the docstring of
:mod:`arqd.steps`.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from yarl import URL

from arqd.errors import InvalidRequest
from arqd.jsonpointer import MISSING, pointed
from arqd.model import NAME_PATTERN, NAME_RE, explain

__all__ = [
    "CONTROL",
    "REDACTED",
    "SEALED",
    "SECRET_NAME",
    "STEPS_HANDLER",
    "Credentials",
    "StepSecrets",
    "StepSpec",
    "canon_host",
    "ip_of",
    "is_fernet_key",
    "is_secret_name",
    "parse_allow_hosts",
    "parse_credentials",
    "parse_steps",
    "redact_headers",
    "redact_url",
]

STEPS_HANDLER = "arqd.steps"  # the built-in handler of multi-step jobs; no client may name it
SEALED = "sealed"  # the payload field holding a multi-step job's encrypted secrets
REDACTED = "[redacted]"

# Header, query and body-field names whose values are secrets.
SECRET_NAME = re.compile(
    r"(?i)(authorization|cookie|token|secret|passw(or)?d|api[-_]?key|credential|signature"
    r"|(^|[-_.])(auth|key)([-_.]|$))"
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 header name
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Framing and routing headers are arqd's to set: a step overriding them could smuggle requests.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"}
)
_HOSTNAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")


# --- step specs -----------------------------------------------------------------------------------

StepName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
StatusCode = Annotated[int, msgspec.Meta(ge=100, le=599)]


HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
Pointer = Annotated[str, msgspec.Meta(max_length=1024)]  # an RFC 6901 JSON pointer into ``body``


class StepSecrets(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a step marks as secret, by name: ``headers`` (any case), ``query`` parameter names,
    and ``body`` fields as JSON pointers (``"/card/pin"``, ``""`` for the whole body)."""

    headers: Annotated[tuple[HeaderName, ...], msgspec.Meta(max_length=64)] = ()
    query: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=1024)], ...], msgspec.Meta(max_length=64)
    ] = ()
    body: Annotated[tuple[Pointer, ...], msgspec.Meta(max_length=64)] = ()


class StepSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One step of a multi-step HTTP job, validated; ``expect=None`` means any 2xx."""

    name: StepName
    url: Annotated[str, msgspec.Meta(max_length=8192)]
    method: Method = "GET"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: Any = None
    expect: Annotated[tuple[StatusCode, ...], msgspec.Meta(min_length=1)] | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    retry_exponent: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    secret: StepSecrets = msgspec.field(default_factory=StepSecrets)

    def __post_init__(self) -> None:
        _check_url(self.url)
        _check_headers(self.headers)
        try:
            msgspec.json.encode(self.body)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("body: must be JSON") from None
        _check_marks(self)

    def __repr__(self) -> str:
        marks = self.secret
        return (
            f"StepSpec(name={self.name!r}, method={self.method!r},"
            f" url={redact_url(self.url, marks.query)!r},"
            f" headers={redact_headers(self.headers, marks.headers)!r})"
        )

    def expects(self, status: int) -> bool:
        return 200 <= status < 300 if self.expect is None else status in self.expect


def _check_url(url: str) -> None:
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ValueError("url: not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ValueError("url: must be an absolute http or https URL")
    host = canon_host(parsed.raw_host)
    if not (ip_of(host) or _HOSTNAME.match(host)):
        raise ValueError("url: the host is not a valid name or address")
    if parsed.raw_user or parsed.raw_password:
        raise ValueError("url: must not hold credentials; use the job's credentials")


def _check_headers(headers: dict[str, str]) -> None:
    seen: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        if not _TOKEN.match(name):
            raise ValueError(f"headers: {name!r} is not a valid header name")
        if lower in _RESERVED_HEADERS:
            raise ValueError(f"headers: {name} is set by arqd")
        if lower in seen:
            raise ValueError(f"headers: {name} is given twice")
        if CONTROL.search(value.replace("\t", " ")):
            raise ValueError(f"headers: the value of {name} holds control characters")
        seen.add(lower)


def _check_marks(step: StepSpec) -> None:
    """Every name in ``secret`` must name something of the step: a typo would leave the value
    it meant to protect in clear."""
    names = {n.lower() for n in step.headers}
    for name in step.secret.headers:
        if name.lower() not in names:
            raise ValueError(f"secret.headers: {name} is not one of the step's headers")
    query = URL(step.url).query
    for name in step.secret.query:
        if name not in query:
            raise ValueError(f"secret.query: {name!r} is not a query parameter of the url")
    for pointer in step.secret.body:
        if step.body is None or pointed(step.body, pointer) is MISSING:
            raise ValueError(f"secret.body: {pointer!r} is not a JSON pointer into the body")


def parse_steps(raw: list[dict[str, Any]]) -> list[StepSpec]:
    """Validate a job's ``steps``; :class:`InvalidRequest` names the step and the field."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("steps: must be a non-empty list of step objects")
    specs: list[StepSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        label = _step_label(index, item)
        if not isinstance(item, dict):
            raise InvalidRequest(f"{label}: must be an object")
        try:
            spec = msgspec.convert(item, StepSpec)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"{label}: {explain(exc)}") from None
        if spec.name in seen:
            raise InvalidRequest(f"{label}: name: another step has this name")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _step_label(index: int, item: object) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    if isinstance(name, str) and NAME_RE.match(name):
        return f"steps[{index}] ({name})"
    return f"steps[{index}]"


# --- credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """Job-level credentials, sent as ``Authorization`` on every step; ``repr`` hides the secret."""

    scheme: Literal["basic", "bearer"]
    secret: str = field(repr=False)

    def header(self) -> str:
        if self.scheme == "bearer":
            return f"Bearer {self.secret}"
        return "Basic " + base64.b64encode(self.secret.encode()).decode("ascii")

    def secrets(self) -> tuple[str, ...]:
        """Every form in which the secret could come back in a response."""
        if self.scheme == "bearer":
            return (self.secret,)
        encoded = base64.b64encode(self.secret.encode()).decode("ascii")
        return (self.secret, self.secret.partition(":")[2], encoded)

    def to_dict(self) -> dict[str, str]:
        return {self.scheme: self.secret}


_CREDENTIALS_SHAPE = 'credentials: must be {"basic": "user:password"} or {"bearer": "<token>"}'


def parse_credentials(raw: dict[str, str] | None) -> Credentials | None:
    """Validate job-level ``credentials``; error messages never quote the secret."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1:
        raise InvalidRequest(_CREDENTIALS_SHAPE)
    ((scheme, secret),) = raw.items()
    if scheme not in ("basic", "bearer"):
        raise InvalidRequest(_CREDENTIALS_SHAPE)
    if not isinstance(secret, str) or not secret or len(secret) > 8192:
        raise InvalidRequest(f"credentials.{scheme}: must be a string of 1 to 8192 characters")
    if CONTROL.search(secret):
        raise InvalidRequest(f"credentials.{scheme}: must not hold control characters")
    if scheme == "bearer":
        if " " in secret:
            raise InvalidRequest("credentials.bearer: must not hold spaces")
        return Credentials("bearer", secret)
    user, colon, _ = secret.partition(":")
    if not colon or not user:
        raise InvalidRequest('credentials.basic: must be "user:password"')
    return Credentials("basic", secret)


def is_fernet_key(key: str | bytes) -> bool:
    """True for a Fernet key: url-safe base64 of 32 bytes (what ``cryptography`` accepts)."""
    try:
        raw = key.encode("ascii") if isinstance(key, str) else key
        return len(base64.urlsafe_b64decode(raw)) == 32
    except (ValueError, TypeError):  # binascii.Error and UnicodeEncodeError are ValueErrors
        return False


# --- secret names ---------------------------------------------------------------------------------


def is_secret_name(name: object, marked: Iterable[str] = ()) -> bool:
    """True for a name that looks like a secret's, or one of ``marked`` (in any case)."""
    return bool(SECRET_NAME.search(str(name))) or str(name).lower() in {m.lower() for m in marked}


def redact_headers(headers: dict[str, Any], marked: Iterable[str] = ()) -> dict[str, Any]:
    """The headers with the values of secret-looking or ``marked`` ones redacted."""
    marked = tuple(marked)
    return {k: REDACTED if is_secret_name(k, marked) else v for k, v in headers.items()}


def redact_url(url: str, marked: Iterable[str] = ()) -> str:
    """The URL without its password and with secret query parameters' values redacted (query
    names are case-sensitive: a marked ``sig`` does not cover ``SIG``)."""
    names = set(marked)

    def secret(name: str) -> bool:
        return name in names or bool(SECRET_NAME.search(name))

    try:
        parsed = URL(url)
        if parsed.raw_password:
            parsed = parsed.with_password(REDACTED)
        query = parsed.query
        if any(secret(k) for k in query):
            parsed = parsed.with_query(
                [(k, REDACTED if secret(k) else v) for k, v in query.items()]
            )
        return str(parsed)
    except (ValueError, TypeError):
        return REDACTED


# --- which hosts may be reached, as written -------------------------------------------------------


def parse_allow_hosts(entries: Iterable[str]) -> frozenset[tuple[str, int | None]]:
    """``allow_hosts`` as ``(host, port or None)`` pairs; ValueError names a malformed entry."""
    return frozenset(_allow_entry(entry) for entry in entries)


def _allow_entry(entry: str) -> tuple[str, int | None]:
    text = entry.strip() if isinstance(entry, str) else ""
    try:
        return str(ipaddress.ip_address(text)), None  # a bare address (IPv6 needs no brackets)
    except ValueError:
        pass
    try:
        url = URL(f"http://{text}")
        host = url.raw_host
        extra = url.raw_query_string or url.raw_fragment or url.raw_user
        clean = url.raw_path in ("", "/") and not extra
    except (ValueError, TypeError):
        host, clean = None, False
    name = canon_host(host or "")
    if not text or not clean or not (ip_of(name) or _HOSTNAME.match(name)):
        raise ValueError(f"allow_hosts: {entry!r} is not a host or host:port")
    return name, url.explicit_port


def canon_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
