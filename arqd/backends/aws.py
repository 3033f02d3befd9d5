"""The AWS toolkit: what the DynamoDB queue backend and the S3 result store share.

- **Sessions**: one aioboto3 session per (credentials, region) in the process, since a session
  caches the service models it loads (otherwise ~0.15 s per client).
- **Clients**: botocore's client config from settings (retry mode, attempts, timeouts), and for
  each store two clients: the working one, and the ping one (one attempt, short timeouts), so
  ``ping()`` and ``/readyz`` answer promptly even when the endpoint is dead.
- **Errors**: a botocore failure becomes an arqd error here, once: no answer at all (connection
  refused or reset, timeout, no credentials) is :class:`BackendUnavailable`, as are throttling
  and 5xx answers; any other refusal is :class:`BackendError`, unless the store's own ``refine``
  reads it first (a failed condition, a missing object). Missing credentials are named in plain
  words with where botocore looks for them.
- **Open failures**: why the last ``open()`` of each table or bucket failed, so a call to a store
  that is not open (``/readyz`` asks a fresh one while the daemon retries) says why.

A toolkit, not a backend: it stores nothing and decides nothing, and it imports no backend and
no store; both AWS stores import it (``docs/architecture.md``). ``aioboto3`` and ``botocore`` are
imported only when a client is opened or an error mapped, so the core never needs them (extra
``arqd[aws]``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from arqd.errors import ArqdError, BackendError, BackendUnavailable, ConfigError

PING_TIMEOUT = 2.0  # seconds a ping client waits to connect or read, in its one attempt


class AwsSettings(Protocol):
    """The fields every AWS store's settings carry (``DynamoSettings``, ``S3Settings``)."""

    @property
    def region(self) -> str | None: ...
    @property
    def endpoint_url(self) -> str | None: ...
    @property
    def access_key_id(self) -> str | None: ...  # None: botocore's usual credential chain
    @property
    def secret_access_key(self) -> str | None: ...
    @property
    def retry_mode(self) -> str: ...  # botocore's: "standard" or "adaptive"
    @property
    def max_attempts(self) -> int: ...  # per request, the first one included
    @property
    def connect_timeout(self) -> float: ...
    @property
    def read_timeout(self) -> float: ...


# --- errors ---------------------------------------------------------------------------------------

# botocore says only "Unable to locate credentials": say where it looked. Unavailable, not an
# error: the daemon keeps retrying, and credentials that appear later (a role attached, a file
# written) are picked up without a restart.
NO_CREDENTIALS = (
    "no AWS credentials found: botocore looks in the environment (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY), then in ~/.aws/credentials and ~/.aws/config (the profile "
    "AWS_PROFILE names, else default), then for a container or instance role; a local endpoint "
    "such as moto accepts any pair (AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing)"
)


@dataclass(frozen=True)
class Refusal:
    """What AWS answered to a request it refused: its error code, HTTP status and the whole
    response (which may carry more, such as the item a failed condition saw)."""

    code: str
    status: int
    response: Mapping[str, Any]


@functools.cache
def driver_errors() -> tuple[type[Exception], ...]:
    """What a request through botocore may raise: catch these around a call, and map them with
    :func:`translate`."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, OSError, TimeoutError)


def credentials_missing(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore finding no credentials at all."""
    from botocore.exceptions import NoCredentialsError

    return isinstance(exc, NoCredentialsError)


def refusal(exc: BaseException) -> Refusal | None:
    """AWS's answer in ``exc``; ``None`` when there was none (the request never got one)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return None
    response: Mapping[str, Any] = exc.response
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return Refusal(code, status, response)


def translate(
    service: str,
    op: str,
    exc: BaseException,
    *,
    unavailable: frozenset[str] = frozenset(),
    refine: Callable[[str, Refusal], Exception | None] | None = None,
) -> Exception:
    """The arqd error for one failed request ``op`` to ``service``: ``refine(op, refusal)``'s
    answer when it has one (the store's own reading of a refusal), else
    :class:`BackendUnavailable` for no answer, a code in ``unavailable`` or a 5xx, else
    :class:`BackendError`."""
    answer = refusal(exc)
    if answer is None:  # no answer at all: connection refused, reset, timed out, no credentials
        return BackendUnavailable(
            f"{service} {op}: {NO_CREDENTIALS if credentials_missing(exc) else exc}"
        )
    special = None if refine is None else refine(op, answer)
    if special is not None:
        return special
    if answer.code in unavailable or answer.status >= 500:
        return BackendUnavailable(f"{service} {op}: {answer.code or answer.status}: {exc}")
    return BackendError(f"{service} {op}: {answer.code}: {exc}")


# --- sessions and clients -------------------------------------------------------------------------


def _aioboto3() -> Any:
    try:
        import aioboto3
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "the dynamodb and s3 backends need aioboto3: pip install 'arqd[aws]'"
        ) from None
    return aioboto3


_sessions: dict[tuple[str | None, str | None, str | None], Any] = {}


def session(key_id: str | None, secret: str | None, region: str | None) -> Any:
    """The process's aioboto3 session for these credentials (``None``: botocore's chain) and
    region."""
    found = _sessions.get((key_id, secret, region))
    if found is None:
        found = _aioboto3().Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=region
        )
        _sessions[key_id, secret, region] = found
    return found


def client_config(
    s: AwsSettings, *, attempts: int | None = None, timeout: float = 0, **extra: Any
) -> Any:
    """botocore's client config from the settings' retry mode, attempts and timeouts
    (``attempts`` and ``timeout`` override them); ``extra`` is service-specific."""
    from botocore.config import Config

    return Config(
        retries={"mode": s.retry_mode, "total_max_attempts": attempts or s.max_attempts},
        connect_timeout=timeout or s.connect_timeout,
        read_timeout=timeout or s.read_timeout,
        **extra,
    )


async def open_client(
    stack: contextlib.AsyncExitStack, service: str, s: AwsSettings, config: Any
) -> Any:
    """An aiobotocore client for ``service`` (``dynamodb``, ``s3``) with ``config``, on the
    settings' credentials, region and endpoint; closed with ``stack``."""
    from botocore.exceptions import BotoCoreError

    aws = session(s.access_key_id, s.secret_access_key, s.region)
    try:
        client_cm = aws.client(service, endpoint_url=s.endpoint_url, config=config)
        return await stack.enter_async_context(client_cm)
    except BotoCoreError as exc:  # NoRegionError and friends: a setup problem, named plainly
        raise BackendError(f"cannot set up the {service} client: {exc}") from exc


class Clients(NamedTuple):
    work: Any  # every request but pings, with the settings' retries and timeouts
    ping: Any  # one attempt, ``PING_TIMEOUT``


async def open_clients(
    stack: contextlib.AsyncExitStack,
    service: str,
    s: AwsSettings,
    config: Callable[..., Any] = client_config,
) -> Clients:
    """The working client and the ping client of one store, closed with ``stack``;
    ``config(s, attempts=, timeout=)`` makes each one's config (the store's own when it adds
    service-specific options)."""
    work = await open_client(stack, service, s, config(s))
    ping = await open_client(stack, service, s, config(s, attempts=1, timeout=PING_TIMEOUT))
    return Clients(work, ping)


# --- why a store is not open ----------------------------------------------------------------------

# Why the last open of each table or bucket failed in this process: the daemon retries with
# fresh store objects, and /readyz asks one that has not tried yet. One entry per store.
_open_failures: dict[str, str] = {}


@contextlib.contextmanager
def remembering_open_failure(where: str) -> Iterator[None]:
    """Around an AWS store's ``open()``: remember why it failed, forget it once it opens."""
    try:
        yield
    except ArqdError as exc:
        _open_failures[where] = str(exc)
        raise
    _open_failures.pop(where, None)


def not_open(what: str, where: str) -> BackendError:
    """The error of a call to a store that is not open, with why its last open failed."""
    reason = _open_failures.get(where)
    if reason is None:
        return BackendError(f"{what} is not open")
    return BackendError(f"{what} is not open (its last open failed: {reason})")
