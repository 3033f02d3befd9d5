"""Multi-step HTTP jobs (docs/jobs.md): validation, the runner, credentials and redaction.

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
  origin (scheme, host or port) carries on only the step headers of a small allow-list
  (``Accept``, ``Accept-Encoding``, ``Accept-Language``, ``Cache-Control``, ``Content-Language``,
  ``Content-Type``, ``User-Agent``) that the step does not mark secret: credentials and every
  other header stay with the origin they were written for, secret-looking or not. A 307/308 (or
  301/302 after a PUT, PATCH or DELETE) to another origin resends the body: if the body holds a
  secret field, the redirect is not followed and the step fails at once (``error.type``
  ``"RedirectRefused"``); stripping the field would send the other origin a request the job
  never asked for.
- **Secrets.** A value is secret when the step marks it (``"secret": {"headers": [names],
  "query": [names], "body": [JSON pointers]}``; every name must name something of the step, so a
  typo is a 422, not a leak) or when its name looks like one (``Authorization``, ``Cookie``,
  ``*token*``, ``*secret*``, ``*password*``, ``*api-key*``, a ``key`` or ``auth`` word, ...).
  Job credentials replace any ``Authorization`` header of a step. Secret values never reach a
  checkpoint, an error message, a log line, a ``repr`` or the job JSON (:func:`redact_steps`
  shows ``"[redacted]"``); a response that echoes one back has it replaced by ``"[redacted]"``
  (secrets shorter than 4 characters are not scrubbed from responses: that would shred every
  body). The job record holds the raw steps and the credentials only sealed (:func:`seal`,
  Fernet; see the keys below).
- **Keys.** The sealing keys are ``[http_steps] keys`` (seal with the first, open with any: how
  a key is rotated), else ``key``, else the file ``key_file`` (one key a line, the first seals),
  created on first use; its default is ``steps.key`` beside the sqlite database, so every daemon
  on that database finds the same one (:func:`step_keys`). A queue several hosts share
  (``QueueBackend.multi_host``) needs keys set explicitly, or a key file that already exists:
  :func:`check_keys` refuses to start, reload or pass ``check-config`` otherwise. The core reads
  the keys again whenever its config changes (SIGHUP). No key is ever logged or quoted.
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote_plus

import aiohttp
import msgspec
import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from multidict import CIMultiDict
from yarl import URL

from arqd.errors import ConfigError, CredentialsUnreadable, InvalidRequest, StepFailed
from arqd.model import NAME_PATTERN, StepState

if TYPE_CHECKING:
    from arqd.config import Config

__all__ = [
    "BODY_LIMIT",
    "MAX_REDIRECTS",
    "Checkpoint",
    "Credentials",
    "CredentialsUnreadable",
    "Resolver",
    "StepFailed",
    "StepPhase",
    "StepSecrets",
    "StepSpec",
    "check_keys",
    "decrypt_credentials",
    "encrypt_credentials",
    "is_public_address",
    "key_file",
    "load_or_create_key",
    "load_or_create_keys",
    "parse_allow_hosts",
    "parse_credentials",
    "parse_steps",
    "read_keys",
    "redact_steps",
    "run_steps",
    "seal",
    "step_keys",
    "unseal",
]

BODY_LIMIT = 64 * 1024  # a step's response is checkpointed truncated to 64 KiB
MAX_REDIRECTS = 5  # hops followed per attempt, each one checked against the allow-list
MAX_RETRY_DELAY = 3600.0  # seconds; `retry_exponent ** attempt` with 100 attempts would be absurd
MIN_SCRUBBED = 4  # shorter secrets are not scrubbed from response bodies (would shred the text)
REDACTED = "[redacted]"

_log = structlog.get_logger("arqd.steps")

# Header, query and body-field names whose values are secrets.
_SECRET_NAME = re.compile(
    r"(?i)(authorization|cookie|token|secret|passw(or)?d|api[-_]?key|credential|signature"
    r"|(^|[-_.])(auth|key)([-_.]|$))"
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 header name
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Framing and routing headers are arqd's to set: a step overriding them could smuggle requests.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"}
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The only step headers a redirect to another origin carries on: content negotiation and the
# client's name, nothing that could authenticate, identify or be secret.
_SAFE_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "content-language",
        "content-type",
        "user-agent",
    }
)
_HOSTNAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


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
            f" url={_redact_url(self.url, marks.query)!r},"
            f" headers={_redact_headers(self.headers, marks.headers)!r})"
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
        if step.body is None or _pointed(step.body, pointer) is _MISSING:
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


Keys = bytes | Sequence[bytes]
"""One Fernet key, or a keyring: seal with the first, open with any."""


def _fernet(key: Keys) -> Fernet | MultiFernet:
    keys = [key] if isinstance(key, bytes) else list(key)
    try:
        fernets = [Fernet(k) for k in keys]
    except (ValueError, TypeError):
        raise ConfigError("the step credentials key is not a valid Fernet key") from None
    if not fernets:
        raise ConfigError("no key to seal step secrets with")
    return fernets[0] if len(fernets) == 1 else MultiFernet(fernets)


def encrypt_credentials(creds: Credentials, key: Keys) -> str:
    """The credentials as a Fernet token (ASCII), the only form in which a job record holds them."""
    return _fernet(key).encrypt(msgspec.json.encode(creds.to_dict())).decode("ascii")


def seal(value: Any, key: Keys) -> str:
    """Any JSON value as a Fernet token: how a job record holds its steps' secrets."""
    return _fernet(key).encrypt(msgspec.json.encode(value)).decode("ascii")


def unseal(token: str | bytes, key: Keys) -> Any:
    """Inverse of :func:`seal`; :class:`CredentialsUnreadable` when no key opens it."""
    try:
        return msgspec.json.decode(_fernet(key).decrypt(token))
    except (InvalidToken, msgspec.DecodeError):
        raise CredentialsUnreadable(
            "the job's sealed step data cannot be opened with this daemon's keys (every daemon "
            "needs the key that sealed it in http_steps.keys, http_steps.key or key_file)"
        ) from None


def decrypt_credentials(token: str | bytes, key: Keys) -> Credentials:
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


# --- where the keys come from ---------------------------------------------------------------------

KEY_FILE = "steps.key"  # the default key file's name, beside the sqlite database
_process_key: list[bytes] = []  # the memory backend's key: its jobs die with the process


def step_keys(config: Config, multi_host: bool = False) -> tuple[bytes, ...]:
    """The keys sealing step secrets (the first seals, any opens): ``http_steps.keys``, else
    ``key``, else the key file (made when missing, except for a queue several hosts share);
    a memory queue without any uses a key of this process. :class:`ConfigError` if none."""
    cfg = config.http_steps
    if cfg.key_list:
        return tuple(k.encode() for k in cfg.key_list)
    if cfg.key is not None:
        return (cfg.key.encode(),)
    path = key_file(config)
    if multi_host:
        check_keys(config, multi_host)
        assert path is not None  # check_keys refuses a shared queue without an existing file
        return read_keys(path)
    if path is not None:
        return load_or_create_keys(path)
    if config.queue.backend == "memory":
        if not _process_key:
            _process_key.append(Fernet.generate_key())
        return (_process_key[0],)
    raise ConfigError(  # pragma: no cover - every backend has a default or is multi_host
        f"{config.source}: http_steps: set keys, key or key_file"
    )


def key_file(config: Config) -> Path | None:
    """``http_steps.key_file``; by default ``steps.key`` beside the sqlite database, where every
    daemon using that database finds it (None for other backends)."""
    if config.http_steps.key_file is not None:
        return Path(config.http_steps.key_file)
    if config.queue.backend == "sqlite":
        return Path(config.queue.path).parent / KEY_FILE
    return None


def check_keys(config: Config, multi_host: bool) -> None:
    """The start (and reload, and ``check-config``) check of the steps keys: a queue shared by
    several hosts (``multi_host``) needs keys every host agrees on, given explicitly; an
    existing key file must be private and hold keys. Never quotes a key."""
    cfg = config.http_steps
    if cfg.key_list or cfg.key is not None:
        return  # their shape was checked when the config loaded
    path = key_file(config)
    if multi_host and (cfg.key_file is None or path is None or not path.exists()):
        missing = "" if cfg.key_file is None else f" ({cfg.key_file} does not exist)"
        raise ConfigError(
            f"{config.source}: http_steps: the {config.queue.backend} queue is shared by "
            "daemons on several hosts, and step secrets sealed on one must open on all, but no "
            f"key is set{missing}: set the same http_steps.keys (or http_steps.key) on every "
            "daemon, e.g. ARQD_HTTP_STEPS_KEYS (or ARQD_HTTP_STEPS_KEY) in the environment, "
            "or point http_steps.key_file at a key file present on every host"
        )
    if path is not None and path.exists():
        read_keys(path)


def load_or_create_key(path: Path) -> bytes:
    """The (first) Fernet key in ``path``, made when missing: see :func:`load_or_create_keys`."""
    return load_or_create_keys(path)[0]


def load_or_create_keys(path: Path) -> tuple[bytes, ...]:
    """The Fernet keys in ``path`` (one a line, the first seals), a new key written there
    (mode 0600, atomically) when the file is missing.

    A key file readable by group or others is refused (:class:`ConfigError`), as ssh does.
    """
    try:
        return read_keys(path)
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
            return read_keys(path)
        _fsync_dir(path.parent)
    finally:
        os.unlink(tmp)
    return (key,)


def read_keys(path: Path) -> tuple[bytes, ...]:
    """The keys of an existing key file; :class:`ConfigError` if others may read it or a line
    is not a key (the message names the line, never the key)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{path}: the step credentials key must be readable by its owner only (chmod 600)"
            )
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise  # load_or_create_keys makes it
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the steps key file: {exc.strerror}") from None
    keys = tuple(line.strip() for line in lines if line.strip())
    for number, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ConfigError(f"{path}: key {number} is not a Fernet key") from None
    if not keys:
        raise ConfigError(f"{path}: the steps key file holds no key")
    return keys


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- redaction ------------------------------------------------------------------------------------


def redact_steps(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps (already validated by :func:`parse_steps`) with every secret value replaced by
    ``"[redacted]"``: the values the step marks in ``secret``, and those whose header, query
    parameter or body field name looks like a secret, plus URL passwords; for showing a job."""
    return [_redact_step(step) if isinstance(step, dict) else step for step in raw]


def _redact_step(step: dict[str, Any]) -> dict[str, Any]:
    out = dict(step)
    marks = _marks_of(step)
    if isinstance(out.get("headers"), dict):
        out["headers"] = _redact_headers(out["headers"], marks.headers)
    if isinstance(out.get("url"), str):
        out["url"] = _redact_url(out["url"], marks.query)
    if "body" in out:
        body = out["body"]
        for pointer in marks.body:
            body = _replaced(body, pointer, REDACTED)
        out["body"] = _redact_json(body)
    return out


def _marks_of(step: dict[str, Any]) -> StepSecrets:
    try:
        return msgspec.convert(step.get("secret") or {}, StepSecrets)
    except msgspec.ValidationError:  # pragma: no cover - redact_steps takes validated steps
        return StepSecrets()


def _is_secret_name(name: object, marked: Iterable[str] = ()) -> bool:
    return bool(_SECRET_NAME.search(str(name))) or str(name).lower() in {m.lower() for m in marked}


def _redact_headers(headers: dict[str, Any], marked: Iterable[str] = ()) -> dict[str, Any]:
    marked = tuple(marked)
    return {k: REDACTED if _is_secret_name(k, marked) else v for k, v in headers.items()}


def _redact_url(url: str, marked: Iterable[str] = ()) -> str:
    """The URL without its password and with secret query parameters' values redacted (query
    names are case-sensitive: a marked ``sig`` does not cover ``SIG``)."""
    names = set(marked)

    def secret(name: str) -> bool:
        return name in names or bool(_SECRET_NAME.search(name))

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


def _redact_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if _SECRET_NAME.search(str(k)) else _redact_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value


def _has_secret_field(value: Any) -> bool:
    """True if a JSON value holds a field named like a secret, at any depth."""
    if isinstance(value, dict):
        return any(_SECRET_NAME.search(str(k)) or _has_secret_field(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_secret_field(v) for v in value)
    return False


# JSON pointers (RFC 6901): "" is the whole value, "/a/0" the first item of field "a";
# "~1" stands for "/" and "~0" for "~" inside a token; an array index has no leading zero.
_MISSING: Any = object()
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")
_BAD_ESCAPE = re.compile(r"~(?![01])")


def _tokens(pointer: str) -> list[str] | None:
    if pointer == "":
        return []
    if not pointer.startswith("/") or _BAD_ESCAPE.search(pointer):
        return None
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _child_key(node: Any, token: str) -> Any:
    """The key or index ``token`` names in ``node``, or _MISSING."""
    if isinstance(node, dict):
        return token if token in node else _MISSING
    if isinstance(node, list) and _INDEX.match(token) and int(token) < len(node):
        return int(token)
    return _MISSING


def _pointed(doc: Any, pointer: str) -> Any:
    """The value ``pointer`` names in ``doc``, or _MISSING."""
    tokens = _tokens(pointer)
    if tokens is None:
        return _MISSING
    for token in tokens:
        key = _child_key(doc, token)
        if key is _MISSING:
            return _MISSING
        doc = doc[key]
    return doc


def _replaced(doc: Any, pointer: str, value: Any) -> Any:
    """``doc`` with the value at ``pointer`` replaced (copied along the path, never in place);
    ``doc`` itself when the pointer names nothing."""
    tokens = _tokens(pointer)
    if tokens is None or _pointed(doc, pointer) is _MISSING:
        return doc
    if not tokens:
        return value
    root = copy = doc.copy()
    for token in tokens[:-1]:
        key = _child_key(copy, token)
        copy[key] = copy[key].copy()
        copy = copy[key]
    copy[_child_key(copy, tokens[-1])] = value
    return root


def _leaves(value: Any) -> list[str]:
    """Every string and number inside a JSON value, as text: what a marked subtree protects."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _leaves(v)]
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [msgspec.json.encode(value).decode()]
    return []


def _secrets_of(steps: Iterable[StepSpec], credentials: Credentials | None) -> tuple[str, ...]:
    """Every secret string of a job, longest first, for scrubbing what servers send back."""
    found: set[str] = set(credentials.secrets() if credentials else ())
    for step in steps:
        marks = step.secret
        for name, value in step.headers.items():
            if _is_secret_name(name, marks.headers):
                found.update(_header_secrets(value))
        for name, raw in _raw_query(step.url):  # a value both decoded and as written
            if name in marks.query or _SECRET_NAME.search(name):
                found.update((raw, unquote_plus(raw)))
        found.update(_json_secrets(step.body))
        for pointer in marks.body:
            found.update(_leaves(_pointed(step.body, pointer)))
    return tuple(sorted((s for s in found if len(s) >= MIN_SCRUBBED), key=len, reverse=True))


def _raw_query(url: str) -> list[tuple[str, str]]:
    """``(name, value as written)`` for each query parameter of ``url``."""
    pairs = []
    for part in URL(url).raw_query_string.split("&"):
        name, _, raw = part.partition("=")
        pairs.append((unquote_plus(name), raw))
    return pairs


def _header_secrets(value: str) -> list[str]:
    """The value, the token of ``Scheme token``, and each value of ``a=b; c=d``."""
    parts = [value, value.partition(" ")[2].strip()]
    parts += [p.partition("=")[2].strip() for p in value.split(";") if "=" in p]
    return parts


def _json_secrets(value: Any) -> list[str]:
    if isinstance(value, dict):
        out: list[str] = []
        for k, v in value.items():
            out += _leaves(v) if _SECRET_NAME.search(str(k)) else _json_secrets(v)
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
    secret_body: bool = False  # the body holds a marked or secret-named field
    marked: frozenset[str] = frozenset()  # header names the step marks secret, lowercased


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
    error_type: str = "StepFailed"  # of a "fail"


class _Unfollowable(Exception):
    """A redirect arqd will not follow (bad target, too many hops, secrets to another origin):
    a failed step of error type ``kind``."""

    def __init__(self, status: int, message: str, kind: str = "StepFailed") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


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
            kind, message = verdict.error_type, f"{where}: {verdict.detail}"
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
            return _Verdict("fail", exc.status, str(exc), error_type=exc.kind)
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
        secret_body = body is not None and (bool(step.secret.body) or _has_secret_field(step.body))
        url = URL(step.url).with_fragment(None)
        marked = frozenset(n.lower() for n in step.secret.headers)
        return _Request(step.method, url, headers, body, secret_body, marked)

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
    secret_body = request.secret_body
    to_get = reply.status == 303 or (reply.status in (301, 302) and method == "POST")
    if to_get and method != "HEAD":
        method, body, secret_body = "GET", None, False
        headers.popall("Content-Type", None)
    if _origin(target) != _origin(request.url):
        if body is not None and secret_body:
            raise _Unfollowable(
                reply.status,
                f"a {reply.status} redirect to another origin ({_host_header(target)}) would "
                "resend the body's secret fields; not followed",
                kind="RedirectRefused",
            )
        safe = _SAFE_HEADERS - request.marked
        headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in safe)
    return _Request(method, target, headers, body, secret_body, request.marked)


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
