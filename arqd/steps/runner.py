"""The runner of multi-step HTTP jobs: each step's request, its retries and redirects, the
outcome kept, and a checkpoint saved after every attempt.

A step is retried after ``retry_exponent ** attempt`` seconds (at most an hour) on network errors,
timeouts, 5xx and 429, and fails the job at once on any other status outside ``expect``, or when
its attempts run out (:class:`arqd.errors.StepFailed` and its subclasses).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import msgspec
import structlog
from multidict import CIMultiDict
from yarl import URL

from arqd.errors import ConfigError, HostNotAllowed, RedirectRefused, StepFailed
from arqd.model import StepState
from arqd.stepmodel import Credentials, StepSpec, parse_allow_hosts
from arqd.steps.checkpoint import Checkpoint, StepPhase
from arqd.steps.hosts import Policy, Refused, Resolver, getaddrinfo, host_header, origin
from arqd.steps.redact import has_secret_field, scrub, scrub_json, secrets_of

__all__ = ["BODY_LIMIT", "MAX_REDIRECTS", "run_steps"]

BODY_LIMIT = 64 * 1024  # a step's response is checkpointed truncated to 64 KiB
MAX_REDIRECTS = 5  # hops followed per attempt, each one checked against the allow-list
MAX_RETRY_DELAY = 3600.0  # seconds; `retry_exponent ** attempt` with 100 attempts would be absurd
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
_log = structlog.get_logger("arqd.steps")


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
    failure: type[StepFailed] = StepFailed  # what a "fail" raises


class _Unfollowable(Exception):
    """A redirect arqd will not follow (bad target, too many hops, secrets to another origin):
    the step fails with ``failure``. Never leaves the runner."""

    def __init__(self, status: int, message: str, failure: type[StepFailed] = StepFailed) -> None:
        super().__init__(message)
        self.status = status
        self.failure = failure


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
    state = checkpoint.resume(steps)
    own = session is None
    http = session if session is not None else _new_session()
    runner = _Runner(
        http=http,
        policy=Policy(allowed, resolver or getaddrinfo),
        credentials=credentials,
        secrets=secrets_of(steps, credentials),
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
    policy: Policy
    credentials: Credentials | None
    secrets: tuple[str, ...]
    save: Callable[[Checkpoint], Awaitable[None]]
    sleep: Callable[[float], Awaitable[None]]
    before: Callable[[], Awaitable[None]] | None = None

    async def run_step(self, index: int, step: StepSpec, cp: Checkpoint) -> None:
        done = min(cp.states[index].attempts, step.max_attempts - 1)
        log = _log.bind(step=step.name, method=step.method, host=host_header(URL(step.url)))
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
        where = f"step {step.name!r} ({step.method} {host_header(URL(step.url))})"
        failure: type[StepFailed]
        if verdict.kind == "refused":
            failure, message = HostNotAllowed, f"{where}: host not allowed: {verdict.detail}"
        elif verdict.kind == "retry":
            plural = "s" if attempt > 1 else ""
            failure = StepFailed
            message = f"{where}: gave up after {attempt} attempt{plural}: {verdict.detail}"
        else:
            failure, message = verdict.failure, f"{where}: {verdict.detail}"
        return failure(
            step.name,
            scrub(message, self.secrets),
            response_status=verdict.status,
            attempts=attempt,
        )

    async def _attempt(self, step: StepSpec) -> _Verdict:
        try:
            async with asyncio.timeout(step.timeout):
                reply = await self._exchange(step)
        except Refused as exc:
            return _Verdict("refused", None, str(exc))
        except _Unfollowable as exc:
            return _Verdict("fail", exc.status, str(exc), failure=exc.failure)
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
        secret_body = body is not None and (bool(step.secret.body) or has_secret_field(step.body))
        url = URL(step.url).with_fragment(None)
        marked = frozenset(n.lower() for n in step.secret.headers)
        return _Request(step.method, url, headers, body, secret_body, marked)

    async def _send(self, request: _Request, addresses: list[str], step: StepSpec) -> _Reply:
        """Send to the first checked address that accepts a connection."""
        headers = request.headers.copy()
        headers["Host"] = host_header(request.url)
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
        reason = scrub(resp.reason or "", self.secrets)
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
                return {"status": reply.status, "body": scrub_json(body, self.secrets)}
        text = scrub(_decode(reply.raw, reply.charset), self.secrets)
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
    if origin(target) != origin(request.url):
        if body is not None and secret_body:
            raise _Unfollowable(
                reply.status,
                f"a {reply.status} redirect to another origin ({host_header(target)}) would "
                "resend the body's secret fields; not followed",
                failure=RedirectRefused,
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
    code = os_error.errno if isinstance(os_error, OSError) else None
    name = errno.errorcode.get(code) if isinstance(code, int) else None
    return f"{type(exc).__name__} ({name})" if name else type(exc).__name__
