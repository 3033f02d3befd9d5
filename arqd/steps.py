"""Multi-step HTTP jobs (API.md section 5): validation, the runner, credentials and redaction.

A job made of ``steps`` runs them in order. Each step is one HTTP request, retried after
``retry_exponent ** attempt`` seconds on network errors, timeouts, 5xx and 429, and failing the job
at once (:class:`StepFailed`) on any other status outside ``expect`` or when its attempts run out.
After every attempt the runner hands a :class:`Checkpoint` to ``save`` (the worker makes that a
write fenced by the lease); a job resumed from a checkpoint skips the steps that already succeeded.

Decisions the contract leaves open:

- **The allow-list** (``[http_steps] allow_hosts``; entries ``host``, ``host:port``, ``[v6]:port``
  or a bare IPv6 address) is matched against the host *as written in the URL* (lowercased, IDNA,
  trailing dot dropped), not against the address it resolves to: listing ``127.0.0.1:8080`` does
  not let ``localhost:8080`` through. An entry without a port allows every port.
  With a **non-empty** list, only listed hosts are reached at all, and a listed host may resolve
  to any address (listing an internal service is how an operator allows it). With an **empty**
  list, any host is allowed whose every resolved address is public: loopback, private
  (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7), link-local (169.254/16 including the cloud
  metadata address 169.254.169.254, fe80::/10), unspecified, multicast and reserved addresses are
  refused, also when they hide inside IPv4-mapped, 6to4 or NAT64 IPv6 addresses.
- **No DNS rebinding window.** arqd resolves the name itself, checks every address, and connects
  to exactly a checked address (the URL is rewritten to the IP literal; ``Host`` and the TLS
  server name stay the original host, so certificates are verified against it). A host with any
  refused address is refused whole.
- **Redirects** are followed by arqd, at most 5, and every hop is checked like the first. A
  redirect whose status is in the step's ``expect`` is not followed (it is the answer). 303 (and
  301/302 after a POST) continue as GET without a body, as browsers do. A redirect to another
  origin (scheme, host or port) drops the credentials and every secret header.
- **Secrets.** Job credentials replace any ``Authorization`` header of a step. Header values named
  like secrets (``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``*token*``, ``*secret*``,
  ``*api-key*``, ...) never reach a checkpoint, an error message, a log line or the result; a
  response that echoes one back has it replaced by ``"[redacted]"`` (secrets shorter than 4
  characters are not scrubbed from responses: that would shred every body). Credentials are stored
  only encrypted (:func:`encrypt_credentials`, Fernet, key from :func:`load_or_create_key`; every
  daemon sharing a backend needs the same key file).
- **Request and response bodies.** ``body`` is sent JSON-encoded (``Content-Type:
  application/json`` unless the step sets one); absent or ``null`` means no body. Response bodies
  are read up to 64 KiB: parsed JSON when the response says JSON and is complete, else text;
  a longer body is cut and its outcome carries ``"truncated": true``.
- **Attempts across crashes.** A step's attempts are counted in the checkpoint, so a step resumed
  while ``running`` continues its count; a step that had ``failed`` (a redriven job) starts over.
  A retry delay is capped at one hour (``retry_exponent ** attempt`` overflows quickly).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import errno
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import msgspec
import structlog
from cryptography.fernet import Fernet, InvalidToken
from multidict import CIMultiDict
from yarl import URL

from arqd.errors import ArqdError, ConfigError, InvalidRequest
from arqd.model import NAME_PATTERN, StepState

__all__ = [
    "BODY_LIMIT",
    "MAX_REDIRECTS",
    "Checkpoint",
    "Credentials",
    "CredentialsUnreadable",
    "Resolver",
    "StepFailed",
    "StepPhase",
    "StepSpec",
    "decrypt_credentials",
    "encrypt_credentials",
    "is_public_address",
    "load_or_create_key",
    "parse_allow_hosts",
    "parse_credentials",
    "parse_steps",
    "redact_steps",
    "run_steps",
]

BODY_LIMIT = 64 * 1024  # API.md: a step's response is checkpointed truncated to 64 KiB
MAX_REDIRECTS = 5  # hops followed per attempt, each one checked against the allow-list
MAX_RETRY_DELAY = 3600.0  # seconds; `retry_exponent ** attempt` with 100 attempts would be absurd
MIN_SCRUBBED = 4  # shorter secrets are not scrubbed from response bodies (would shred the text)
REDACTED = "[redacted]"

_log = structlog.get_logger("arqd.steps")

# Header, query and body-field names whose values are secrets.
_SECRET_NAME = re.compile(
    r"(?i)(authorization|cookie|token|secret|passw(or)?d|api[-_]?key|credential|signature)"
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 header name
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Framing and routing headers are arqd's to set: a step overriding them could smuggle requests.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"}
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HOSTNAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


# --- step specs -----------------------------------------------------------------------------------

StepName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
StatusCode = Annotated[int, msgspec.Meta(ge=100, le=599)]


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

    def __post_init__(self) -> None:
        _check_url(self.url)
        _check_headers(self.headers)
        try:
            msgspec.json.encode(self.body)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("body: must be JSON") from None

    def __repr__(self) -> str:
        return (
            f"StepSpec(name={self.name!r}, method={self.method!r}, url={_redact_url(self.url)!r},"
            f" headers={_redact_headers(self.headers)!r})"
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
    host = _canon_host(parsed.raw_host)
    if not (_ip(host) or _HOSTNAME.match(host)):
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
        if _CONTROL.search(value.replace("\t", " ")):
            raise ValueError(f"headers: the value of {name} holds control characters")
        seen.add(lower)


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
            raise InvalidRequest(f"{label}: {_explain(str(exc))}") from None
        if spec.name in seen:
            raise InvalidRequest(f"{label}: name: another step has this name")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _step_label(index: int, item: object) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        return f"steps[{index}] ({name})"
    return f"steps[{index}]"


def _explain(message: str) -> str:
    """Turn msgspec's ``reason - at `$.field` `` into ``field: reason``."""
    reason, _, where = message.partition(" - at ")
    path = where.strip("`").removeprefix("$").lstrip(".")
    for pattern, text in (
        (r"Object contains unknown field `(.+)`", "unknown field"),
        (r"Object missing required field `(.+)`", "required"),
    ):
        m = re.match(pattern, reason)
        if m:
            return f"{m.group(1)}: {text}"
    return f"{path}: {reason}" if path else reason


# --- credentials ----------------------------------------------------------------------------------


class CredentialsUnreadable(ArqdError):
    """Stored step credentials cannot be decrypted (the key changed, or the record is damaged)."""

    code, status = "credentials_unreadable", 500


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
    if _CONTROL.search(secret):
        raise InvalidRequest(f"credentials.{scheme}: must not hold control characters")
    if scheme == "bearer":
        if " " in secret:
            raise InvalidRequest("credentials.bearer: must not hold spaces")
        return Credentials("bearer", secret)
    user, colon, _ = secret.partition(":")
    if not colon or not user:
        raise InvalidRequest('credentials.basic: must be "user:password"')
    return Credentials("basic", secret)


def _fernet(key: bytes) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError):
        raise ConfigError("the step credentials key is not a valid Fernet key") from None


def encrypt_credentials(creds: Credentials, key: bytes) -> str:
    """The credentials as a Fernet token (ASCII), the only form in which a job record holds them."""
    return _fernet(key).encrypt(msgspec.json.encode(creds.to_dict())).decode("ascii")


def seal(value: Any, key: bytes) -> str:
    """Any JSON value as a Fernet token: how a job record holds its steps' secrets."""
    return _fernet(key).encrypt(msgspec.json.encode(value)).decode("ascii")


def unseal(token: str | bytes, key: bytes) -> Any:
    """Inverse of :func:`seal`; :class:`CredentialsUnreadable` on a wrong key."""
    try:
        return msgspec.json.decode(_fernet(key).decrypt(token))
    except (InvalidToken, msgspec.DecodeError):
        raise CredentialsUnreadable(
            "the job's sealed step data cannot be decrypted with this daemon's key "
            "([http_steps] key or key_file must be the same on every daemon)"
        ) from None


def decrypt_credentials(token: str | bytes, key: bytes) -> Credentials:
    """Inverse of :func:`encrypt_credentials`; :class:`CredentialsUnreadable` on a wrong key."""
    try:
        data = msgspec.json.decode(_fernet(key).decrypt(token), type=dict[str, str])
        creds = parse_credentials(data)
    except (InvalidToken, msgspec.DecodeError, InvalidRequest):
        raise CredentialsUnreadable(
            "stored step credentials cannot be decrypted with this key"
        ) from None
    if creds is None:  # pragma: no cover - parse_credentials answers None only for None
        raise CredentialsUnreadable("stored step credentials are empty")
    return creds


def load_or_create_key(path: Path) -> bytes:
    """The Fernet key in ``path``, made (mode 0600, atomically) when missing.

    A key file readable by group or others is refused (:class:`ConfigError`), as ssh does.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # publish whole, and never over a key another process just made
        except FileExistsError:
            return _read_key(path)
        _fsync_dir(path.parent)
    finally:
        os.unlink(tmp)
    return key


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"{path}: the step credentials key must be readable by its owner only (chmod 600)"
        )
    key = path.read_bytes().strip()
    _fernet(key)
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- redaction ------------------------------------------------------------------------------------


def redact_steps(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps with secret header values, URL passwords and secret-named query parameters and
    body fields replaced by ``"[redacted]"``; for showing a job's payload."""
    return [_redact_step(step) if isinstance(step, dict) else step for step in raw]


def _redact_step(step: dict[str, Any]) -> dict[str, Any]:
    out = dict(step)
    if isinstance(out.get("headers"), dict):
        out["headers"] = _redact_headers(out["headers"])
    if isinstance(out.get("url"), str):
        out["url"] = _redact_url(out["url"])
    if "body" in out:
        out["body"] = _redact_json(out["body"])
    return out


def _redact_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: REDACTED if _SECRET_NAME.search(str(k)) else v for k, v in headers.items()}


def _redact_url(url: str) -> str:
    try:
        parsed = URL(url)
        if parsed.raw_password:
            parsed = parsed.with_password(REDACTED)
        query = parsed.query
        if any(_SECRET_NAME.search(k) for k in query):
            parsed = parsed.with_query(
                [(k, REDACTED if _SECRET_NAME.search(k) else v) for k, v in query.items()]
            )
        return str(parsed)
    except (ValueError, TypeError):
        return REDACTED


def _redact_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if _SECRET_NAME.search(str(k)) else _redact_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value


def _secrets_of(steps: Iterable[StepSpec], credentials: Credentials | None) -> tuple[str, ...]:
    """Every secret string of a job, longest first, for scrubbing what servers send back."""
    found: set[str] = set(credentials.secrets() if credentials else ())
    for step in steps:
        for name, value in step.headers.items():
            if _SECRET_NAME.search(name):
                found.update(_header_secrets(value))
        query = URL(step.url).query
        found.update(v for k, v in query.items() if _SECRET_NAME.search(k))
        found.update(_json_secrets(step.body))
    return tuple(sorted((s for s in found if len(s) >= MIN_SCRUBBED), key=len, reverse=True))


def _header_secrets(value: str) -> list[str]:
    """The value, the token of ``Scheme token``, and each value of ``a=b; c=d``."""
    parts = [value, value.partition(" ")[2].strip()]
    parts += [p.partition("=")[2].strip() for p in value.split(";") if "=" in p]
    return parts


def _json_secrets(value: Any) -> list[str]:
    if isinstance(value, dict):
        out: list[str] = []
        for k, v in value.items():
            out += [v] if isinstance(v, str) and _SECRET_NAME.search(str(k)) else _json_secrets(v)
        return out
    if isinstance(value, list):
        return [s for v in value for s in _json_secrets(v)]
    return []


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_json(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return _scrub(value, secrets)
    if isinstance(value, dict):
        return {_scrub(k, secrets): _scrub_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v, secrets) for v in value]
    return value


# --- which hosts may be reached -------------------------------------------------------------------


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
    name = _canon_host(host or "")
    if not text or not clean or not (_ip(name) or _HOSTNAME.match(name)):
        raise ValueError(f"allow_hosts: {entry!r} is not a host or host:port")
    return name, url.explicit_port


def _canon_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local,
    shared, unspecified, multicast and reserved ones, also inside mapped/6to4/NAT64 addresses."""
    ip = _ip(address)
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


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Refused(Exception):
    """A host the allow-list refuses (becomes StepFailed type HostNotAllowed)."""


@dataclass(frozen=True, slots=True)
class _Policy:
    allowed: frozenset[tuple[str, int | None]]
    resolve: Resolver

    async def admit(self, url: URL) -> list[str]:
        """The checked addresses to connect to for ``url``, or _Refused."""
        host, port = _canon_host(url.raw_host or ""), url.port or 0
        where = _hostport(host, port)
        listed = (host, None) in self.allowed or (host, port) in self.allowed
        if self.allowed and not listed:
            raise _Refused(f"{where} is not in http_steps.allow_hosts")
        literal = _ip(host)
        addresses = [host] if literal is not None else await self.resolve(host, port)
        if not addresses:
            raise OSError(errno.EHOSTUNREACH, "the name resolved to no address")
        if not listed and not all(is_public_address(a) for a in addresses):
            what = "is" if literal is not None else "resolves to"
            raise _Refused(f"{where} {what} a non-public address and is not in allow_hosts")
        return addresses


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(url.scheme)
    return host if url.explicit_port in (None, default) else f"{host}:{url.explicit_port}"


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, _canon_host(url.raw_host or ""), url.port


# --- checkpoints and failures ---------------------------------------------------------------------


class StepPhase(enum.StrEnum):
    """``StepState.state`` of a step."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class Checkpoint:
    """What the worker persists after every step attempt and gives back on resume.

    ``outcomes`` maps each succeeded step to ``{"status": int, "body": ...}`` (plus
    ``"truncated": true`` for a cut body); ``states`` is the job JSON's ``steps`` list.
    Neither ever holds a secret.
    """

    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: list[StepState] = field(default_factory=list)

    @classmethod
    def start(cls, steps: Iterable[StepSpec]) -> Checkpoint:
        """A fresh job's checkpoint: every step pending."""
        return cls({}, [StepState(name=s.name, state=StepPhase.PENDING) for s in steps])

    def copy(self) -> Checkpoint:
        return Checkpoint(dict(self.outcomes), list(self.states))


class StepFailed(Exception):
    """A step failed the job: ``type`` is ``"StepFailed"`` (an unexpected status, or attempts
    exhausted) or ``"HostNotAllowed"``; ``status`` is the last response's, if there was one."""

    def __init__(
        self,
        step: str,
        message: str,
        *,
        status: int | None = None,
        type: str = "StepFailed",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.status = status
        self.type = type
        self.attempts = attempts


def _resume(steps: list[StepSpec], checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint made consistent with ``steps``: succeeded means an outcome is recorded."""
    previous = {s.name: s for s in checkpoint.states}
    outcomes = {s.name: checkpoint.outcomes[s.name] for s in steps if s.name in checkpoint.outcomes}
    states = []
    for step in steps:
        prev = previous.get(step.name)
        if step.name in outcomes:
            attempts = prev.attempts if prev is not None else 1
            status = outcomes[step.name].get("status")
            states.append(StepState(step.name, StepPhase.SUCCEEDED, status, attempts))
        elif prev is not None and prev.state == StepPhase.RUNNING:
            states.append(prev)  # interrupted mid-step: its attempt count goes on
        else:
            states.append(StepState(name=step.name, state=StepPhase.PENDING))
    return Checkpoint(outcomes, states)


# --- the runner -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | None


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    reason: str
    location: str | None = None
    raw: bytes = b""
    content_type: str = ""
    charset: str | None = None


@dataclass(frozen=True, slots=True)
class _Verdict:
    kind: Literal["ok", "retry", "fail", "refused"]
    status: int | None
    detail: str
    outcome: dict[str, Any] | None = None


class _Unfollowable(Exception):
    """A redirect arqd will not follow (bad target, too many hops): a failed step."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def run_steps(
    steps: list[StepSpec],
    credentials: Credentials | None,
    allow_hosts: list[str],
    checkpoint: Checkpoint,
    save: Callable[[Checkpoint], Awaitable[None]],
    *,
    before: Callable[[], Awaitable[None]] | None = None,
    session: aiohttp.ClientSession | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    resolver: Resolver | None = None,
) -> dict[str, Any]:
    """Run the steps not yet succeeded in ``checkpoint``, in order; the job result
    ``{"steps": {name: {"status", "body"}}}``. Raises :class:`StepFailed`.

    ``save`` gets a fresh copy of the checkpoint after every attempt; ``before`` is awaited
    before every request (the pool checks there that its lease still holds). A given
    ``session`` must not use a proxy; without one, a session is made (no cookies, no proxy from
    the environment) and closed at the end.
    """
    try:
        allowed = parse_allow_hosts(allow_hosts)
    except ValueError as exc:
        raise ConfigError(f"http_steps.{exc}") from None
    state = _resume(steps, checkpoint)
    own = session is None
    http = session if session is not None else _new_session()
    runner = _Runner(
        http=http,
        policy=_Policy(allowed, resolver or _getaddrinfo),
        credentials=credentials,
        secrets=_secrets_of(steps, credentials),
        save=save,
        sleep=sleep,
        before=before,
    )
    try:
        for index, step in enumerate(steps):
            if step.name not in state.outcomes:
                await runner.run_step(index, step, state)
    finally:
        if own:
            await http.close()
    return {"steps": {step.name: state.outcomes[step.name] for step in steps}}


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(use_dns_cache=False),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        headers={"User-Agent": "arqd"},
    )


@dataclass(frozen=True, slots=True)
class _Runner:
    http: aiohttp.ClientSession
    policy: _Policy
    credentials: Credentials | None
    secrets: tuple[str, ...]
    save: Callable[[Checkpoint], Awaitable[None]]
    sleep: Callable[[float], Awaitable[None]]
    before: Callable[[], Awaitable[None]] | None = None

    async def run_step(self, index: int, step: StepSpec, cp: Checkpoint) -> None:
        done = min(cp.states[index].attempts, step.max_attempts - 1)
        log = _log.bind(step=step.name, method=step.method, host=_host_header(URL(step.url)))
        for attempt in range(done + 1, step.max_attempts + 1):
            if self.before is not None:
                await self.before()
            verdict = await self._attempt(step)
            if verdict.kind == "ok" and verdict.outcome is not None:
                cp.outcomes[step.name] = verdict.outcome
                await self._record(cp, index, StepPhase.SUCCEEDED, verdict.status, attempt)
                log.info("step.succeeded", attempt=attempt, status=verdict.status)
                return
            if verdict.kind == "retry" and attempt < step.max_attempts:
                await self._record(cp, index, StepPhase.RUNNING, verdict.status, attempt)
                delay = _delay(step, attempt)
                log.info("step.retrying", attempt=attempt, reason=verdict.detail, delay=delay)
                await self.sleep(delay)
                continue
            await self._record(cp, index, StepPhase.FAILED, verdict.status, attempt)
            error = self._failure(step, verdict, attempt)
            log.warning("step.failed", attempt=attempt, error_type=error.type, reason=str(error))
            raise error

    async def _record(
        self, cp: Checkpoint, index: int, phase: StepPhase, status: int | None, attempts: int
    ) -> None:
        cp.states[index] = StepState(cp.states[index].name, phase, status, attempts)
        await self.save(cp.copy())

    def _failure(self, step: StepSpec, verdict: _Verdict, attempt: int) -> StepFailed:
        where = f"step {step.name!r} ({step.method} {_host_header(URL(step.url))})"
        if verdict.kind == "refused":
            kind, message = "HostNotAllowed", f"{where}: host not allowed: {verdict.detail}"
        elif verdict.kind == "retry":
            plural = "s" if attempt > 1 else ""
            kind = "StepFailed"
            message = f"{where}: gave up after {attempt} attempt{plural}: {verdict.detail}"
        else:
            kind, message = "StepFailed", f"{where}: {verdict.detail}"
        return StepFailed(
            step.name,
            _scrub(message, self.secrets),
            status=verdict.status,
            type=kind,
            attempts=attempt,
        )

    async def _attempt(self, step: StepSpec) -> _Verdict:
        try:
            async with asyncio.timeout(step.timeout):
                reply = await self._exchange(step)
        except _Refused as exc:
            return _Verdict("refused", None, str(exc))
        except _Unfollowable as exc:
            return _Verdict("fail", exc.status, str(exc))
        except TimeoutError:
            return _Verdict("retry", None, f"no answer within {step.timeout:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Verdict("retry", None, _describe(exc))
        answer = f"answered {reply.status} {reply.reason}".rstrip()
        if step.expects(reply.status):
            return _Verdict("ok", reply.status, answer, self._outcome(reply))
        if reply.status >= 500 or reply.status == 429:
            return _Verdict("retry", reply.status, answer)
        expected = "any 2xx" if step.expect is None else ", ".join(map(str, step.expect))
        return _Verdict("fail", reply.status, f"{answer}, expected {expected}")

    async def _exchange(self, step: StepSpec) -> _Reply:
        request = self._first_request(step)
        for _ in range(MAX_REDIRECTS + 1):
            addresses = await self.policy.admit(request.url)
            reply = await self._send(request, addresses, step)
            if reply.location is None:
                return reply
            request = _follow(request, reply)
        raise _Unfollowable(reply.status, f"more than {MAX_REDIRECTS} redirects")

    def _first_request(self, step: StepSpec) -> _Request:
        headers: CIMultiDict[str] = CIMultiDict(step.headers)
        body = None if step.body is None else msgspec.json.encode(step.body)
        if body is not None and "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.header()
        return _Request(step.method, URL(step.url).with_fragment(None), headers, body)

    async def _send(self, request: _Request, addresses: list[str], step: StepSpec) -> _Reply:
        """Send to the first checked address that accepts a connection."""
        headers = request.headers.copy()
        headers["Host"] = _host_header(request.url)
        server_name = request.url.raw_host if request.url.scheme == "https" else None
        failure: aiohttp.ClientConnectorError | None = None
        for address in addresses:
            try:
                async with self.http.request(
                    request.method,
                    request.url.with_host(address),
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                    server_hostname=server_name,
                ) as resp:
                    return await self._reply(resp, step)
            except aiohttp.ClientConnectorError as exc:
                failure = exc  # nothing was sent: try the host's next address
        assert failure is not None  # admit() never answers an empty list
        raise failure

    async def _reply(self, resp: aiohttp.ClientResponse, step: StepSpec) -> _Reply:
        reason = _scrub(resp.reason or "", self.secrets)
        location = resp.headers.get("Location")
        if resp.status in _REDIRECTS and location and not step.expects(resp.status):
            return _Reply(resp.status, reason, location=location)
        margin = max((len(s.encode()) for s in self.secrets), default=0)
        raw = await _read_capped(resp.content, BODY_LIMIT + margin + 1)
        return _Reply(resp.status, reason, None, raw, resp.content_type, resp.charset)

    def _outcome(self, reply: _Reply) -> dict[str, Any]:
        truncated = len(reply.raw) > BODY_LIMIT
        if not truncated and _is_json(reply.content_type):
            try:
                body = msgspec.json.decode(reply.raw)
            except msgspec.DecodeError:
                pass
            else:
                return {"status": reply.status, "body": _scrub_json(body, self.secrets)}
        text = _scrub(_decode(reply.raw, reply.charset), self.secrets)
        if not truncated:
            return {"status": reply.status, "body": text}
        cut = text.encode()[:BODY_LIMIT].decode("utf-8", errors="ignore")
        return {"status": reply.status, "body": cut, "truncated": True}


def _follow(request: _Request, reply: _Reply) -> _Request:
    """The next hop of a redirect, method and secrets adjusted; _Unfollowable if it is not one."""
    try:
        target = request.url.join(URL(reply.location or "")).with_fragment(None)
    except (ValueError, TypeError):
        raise _Unfollowable(reply.status, "redirected to an invalid URL") from None
    if target.scheme not in ("http", "https") or not target.raw_host:
        raise _Unfollowable(reply.status, "redirected to a URL that is not http or https")
    if target.raw_user or target.raw_password:
        raise _Unfollowable(reply.status, "redirected to a URL holding credentials")
    method, body, headers = request.method, request.body, request.headers.copy()
    to_get = reply.status == 303 or (reply.status in (301, 302) and method == "POST")
    if to_get and method != "HEAD":
        method, body = "GET", None
        headers.popall("Content-Type", None)
    if _origin(target) != _origin(request.url):
        for name in [n for n in headers if _SECRET_NAME.search(n)]:
            headers.popall(name, None)
    return _Request(method, target, headers, body)


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """At most ``cap`` bytes of a body; the rest is never read (the connection is then closed)."""
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await stream.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _decode(raw: bytes, charset: str | None) -> str:
    try:
        return raw.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return raw.decode("utf-8", errors="replace")


def _delay(step: StepSpec, attempt: int) -> float:
    try:
        return float(min(step.retry_exponent**attempt, MAX_RETRY_DELAY))
    except OverflowError:
        return MAX_RETRY_DELAY


def _describe(exc: BaseException) -> str:
    """A network error in a few words, without addresses or anything from the request."""
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    code = getattr(os_error, "errno", None)
    name = errno.errorcode.get(code) if isinstance(code, int) else None
    return f"{type(exc).__name__} ({name})" if name else type(exc).__name__
