"""The HTTP control API (docs/http-api.md) as an aiohttp application.

``make_app(app)`` builds the ``web.Application`` around a running ``arqd.App``; the daemon
(``arqd.daemon``) serves it, and tests serve it in-process or as ``arqd serve``.

Status polling is cheap by design: the change cache (``arqd/http/cache.py``) answers a poll of
a job read in the last second from memory, 304 when ``If-None-Match`` matches, else 200 with the
cached body; neither touches the backend. Long-polls and event streams are held requests
(``arqd/http/held.py``): capped in number, and ended when their client goes away.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from arqd.app import App
from arqd.core import TOO_DEEP, Core, parse_group, parse_spec
from arqd.errors import (
    ArqdError,
    BackendError,
    InvalidRequest,
    JobNotFound,
)
from arqd.groups import Group, GroupStatus, group_of, status_of
from arqd.http.auth import ANONYMOUS, Principal, Scope, Tokens
from arqd.http.cache import ChangeCache, Entry
from arqd.http.dashboard import dashboard
from arqd.http.guard import JSON_TYPE, Guard, content_type_problem
from arqd.http.held import Held
from arqd.http.openapi import openapi
from arqd.http.wire import encode, error_body, job_dict
from arqd.model import (
    BATCH_MAX,
    JOB_ID_RE,
    WAIT_MAX,
    Job,
    JobSpec,
    ListQuery,
    State,
    explain,
)
from arqd.resultio import JSON

log = structlog.get_logger("arqd.http")

EVENTS_TICK = 1.0  # an event stream wakes this often to send keepalives (changes wake it at once)
KEEPALIVE = 15.0  # an SSE comment line this often keeps proxies from closing the stream
# A job listing reads the backend in chunks of at most this many bytes of jobs (counting each as
# ``server.max_body``, about the most a client can store in one) and answers early, with ``next``,
# once its JSON passes this size: a page of 200 jobs of 1 MB held them all, decoded and encoded
# (issue 12). The price, on sqlite: 100 small jobs take 4 ms in reads of 8 (1.3 ms in one).
LIST_BYTES = 8 * 1024**2
RETRY_AFTER = "1"  # seconds a client refused for too many held requests is asked to wait
READY_TIMEOUT = 2.0


@dataclass
class ServerState:
    app: App
    guard: Guard
    cache: ChangeCache
    held: Held
    scopes: dict[Any, Scope] = field(default_factory=dict)
    _tokens: tuple[object, Tokens] | None = None

    @property
    def core(self) -> Core:
        return self.app.core

    @property
    def tokens(self) -> Tokens:
        """The configured tokens, rebuilt when a reload replaced the auth section."""
        auth = self.app.config.auth
        if self._tokens is None or self._tokens[0] is not auth:
            self._tokens = (auth, Tokens(auth))
        return self._tokens[1]


STATE = web.AppKey("state", ServerState)
PRINCIPAL = web.RequestKey("principal", Principal)


class BatchSpec(msgspec.Struct, forbid_unknown_fields=True):
    jobs: list[JobSpec]


_batch_decoder = msgspec.json.Decoder(BatchSpec)


# --- responses ------------------------------------------------------------------------------------


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encode(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        body=error_body(code, message), status=status, content_type="application/json"
    )


def job_response(job: Job, status: int = 200, **headers: str) -> web.Response:
    return json_response(job_dict(job), status, {"ETag": job.etag, **headers})


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    421: "misdirected_request",
    429: "rate_limited",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A refusal at the HTTP level (no ``ArqdError`` fits): its status, code, message and
    headers, answered as the JSON error."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is the JSON error body with a truthful status; never a traceback."""
    try:
        return await handler(request)
    except Refused as exc:
        response = error_response(exc.status, exc.code, str(exc))
        response.headers.update(exc.headers)
        return response
    except ArqdError as exc:
        if isinstance(exc, BackendError):
            log.warning("http.backend_error", path=request.path, error=str(exc))
            return error_response(503, "unavailable", "the queue backend is unavailable")
        return error_response(exc.status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return error_response(413, "too_large", "the request body is larger than allowed")
        code = _HTTP_CODES.get(exc.status, "error")
        response = error_response(exc.status, code, exc.reason or code)
        for name in ("Allow", "Content-Range"):  # 405 and 416 carry these (RFC 9110)
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except ConnectionResetError:  # the client left mid-request (e.g. mid-upload): not an error
        log.debug("http.client_gone", method=request.method, path=request.path)
        return web.Response(status=400)  # nobody reads it; aiohttp drops it quietly
    except Exception:
        log.exception("http.internal_error", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; the daemon's log has details")


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who may call a route, in one pass (one middleware layer less per request: a status poll
    is ~100 µs, each layer ~10 µs of it). Every route has a scope (see ROUTES); public and
    unknown routes are left alone (unknown ones fall through to a 404): they hold no data and
    change nothing. Then: a bearer token with the route's scope (401, 403), and what a browser
    may not do (``arqd/http/guard.py``): name another host without a token (421), call from
    another site's page (403), send a body that is not JSON (415)."""
    st = state_of(request)
    scope = st.scopes.get(request.match_info.route.handler)
    if scope is None or scope == "public":
        return await handler(request)
    principal = st.tokens.authenticate(request.headers.get("Authorization"))
    if principal is None:
        return web.Response(
            body=error_body("unauthorized", "a valid bearer token is required"),
            status=401,
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="arqd"'},
        )
    if not principal.allows(scope):
        return error_response(403, "forbidden", f"this token lacks the {scope!r} scope")
    request[PRINCIPAL] = principal
    guard = st.guard
    if principal.name is None:  # no token proved anything: rebinding is possible
        problem = guard.host_problem(request.headers.get("Host"))
        if problem:
            return error_response(421, "misdirected_request", problem)
    problem = guard.origin_problem(request.headers, request.method)
    if problem:
        return error_response(403, "forbidden", problem)
    if request.body_exists:  # only then parse the Content-Type header
        problem = content_type_problem(request.content_type, True, request.method)
        if problem:
            return error_response(415, "unsupported_media_type", problem)
    return await handler(request)


# --- helpers --------------------------------------------------------------------------------------


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]


def principal_of(request: web.Request) -> Principal:
    principal: Principal = request.get(PRINCIPAL, ANONYMOUS)
    return principal


def sees(request: web.Request) -> str | None:
    """Whose jobs this request may see: its token's name, or ``None`` for everyone's."""
    return principal_of(request).sees


def job_id_of(request: web.Request) -> str:
    job_id = request.match_info["id"]
    if not JOB_ID_RE.match(job_id):
        raise JobNotFound(f"no job {job_id}")
    return job_id


async def read_body(request: web.Request) -> bytes:
    """The JSON body of a route that reads one: declared ``application/json`` (415 otherwise,
    even when empty: a form cannot declare it) and not empty."""
    if request.content_type != JSON_TYPE:
        raise Refused(415, "unsupported_media_type", f"this route takes a {JSON_TYPE} body")
    body = await request.read()
    if not body:
        raise InvalidRequest("the request needs a JSON body")
    return body


def query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    unknown = set(request.query) - allowed
    if unknown:
        raise InvalidRequest(f"unknown query parameter {sorted(unknown)[0]!r}")
    return dict(request.query)


def etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {part.strip().removeprefix("W/") for part in header.split(",")}


# --- routes: jobs ---------------------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    body = await read_body(request)
    try:
        spec = parse_spec(body)
    except msgspec.DecodeError:
        return error_response(400, "invalid_json", "the body is not valid JSON")
    (stored,) = await state_of(request).core.submit([spec], owner=principal_of(request).name)
    job = stored.job
    if not stored.created:
        return job_response(msgspec.structs.replace(job, deduplicated=True), 200)
    return job_response(job, 202, Location=job.links["self"])


async def submit_batch(request: web.Request) -> web.Response:
    body = await read_body(request)
    try:
        batch = _batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc)) from None
    except msgspec.DecodeError:
        return error_response(400, "invalid_json", "the body is not valid JSON")
    except RecursionError:
        raise InvalidRequest(TOO_DEEP) from None
    if not 1 <= len(batch.jobs) <= BATCH_MAX:
        raise InvalidRequest(f"jobs: a batch holds 1 to {BATCH_MAX} jobs")
    stored = await state_of(request).core.submit(batch.jobs, owner=principal_of(request).name)
    jobs = [
        job_dict(e.job if e.created else msgspec.structs.replace(e.job, deduplicated=True))
        for e in stored
    ]
    return json_response({"jobs": jobs}, 202)


async def get_job(request: web.Request) -> web.Response:
    st = state_of(request)
    job_id = job_id_of(request)
    wait = wait_of(query(request, {"wait"}))
    wanted = etags(request.headers.get("If-None-Match"))
    owner = sees(request)
    if wait > 0:
        held = await long_poll(request, st, job_id, wanted, wait, owner)
        if isinstance(held, web.Response):
            return held
        entry = held
    else:
        cached = st.cache.fresh(job_id)
        if cached is not None and owner is not None and cached.owner != owner:
            raise JobNotFound(f"no job {job_id}")
        entry = cached or await read_entry(st, job_id, owner)
    if entry.etag in wanted:
        return web.Response(status=304, headers={"ETag": entry.etag})
    return web.Response(
        body=entry.body, content_type="application/json", headers={"ETag": entry.etag}
    )


async def long_poll(
    request: web.Request,
    st: ServerState,
    job_id: str,
    wanted: set[str],
    wait: float,
    owner: str | None,
) -> Entry | web.Response:
    """The entry to answer ``?wait=`` with, or the response that ends it otherwise (429 when
    too many requests are held; nothing to send when the client left)."""
    gone = st.held.enter(request)
    if gone is None:
        return busy_response()
    try:
        # Held without its body: 10,000 long-polls of 1 MB jobs would hold 10 GB.
        first = (await read_entry(st, job_id, owner, fresh=True)).bare()
        entry = await wait_for_change(st, first, wanted or {first.etag}, wait, owner, gone)
    finally:
        st.held.leave(request)
    if entry is None:
        log.debug("http.client_gone", route="long_poll", job_id=job_id)
        return web.Response(status=204)  # never sent: nobody is listening
    if not entry.body and entry.etag not in wanted:  # unchanged, answered with the job
        return st.cache.fresh(job_id) or await read_entry(st, job_id, owner)
    return entry


def wait_of(params: dict[str, str]) -> float:
    if "wait" not in params:
        return 0.0
    try:
        wait = float(params["wait"])
    except ValueError:
        raise InvalidRequest("wait: a number of seconds") from None
    if not 0 <= wait <= WAIT_MAX:
        raise InvalidRequest(f"wait: between 0 and {WAIT_MAX:g} seconds")
    return wait


def busy_response() -> web.Response:
    """``server.max_held`` long-polls and event streams are open already."""
    response = error_response(
        429, "rate_limited", "too many long-polls and event streams are open; retry shortly"
    )
    response.headers["Retry-After"] = RETRY_AFTER
    return response


async def read_entry(st: ServerState, job_id: str, owner: str | None, fresh: bool = False) -> Entry:
    """The job's cache entry, read now; ``fresh`` (a long-poll about to watch it) includes any
    change this process made while reading."""
    core = st.core
    job = await (core.read_fresh(job_id, owner) if fresh else core.get(job_id, owner))
    return st.cache.put(job)


async def wait_for_change(
    st: ServerState,
    entry: Entry,
    baseline: set[str],
    wait: float,
    owner: str | None,
    gone: asyncio.Future[None],
) -> Entry | None:
    """Hold until the job's ETag leaves ``baseline`` or ``wait`` seconds pass; a deleted (or
    swept) job raises :class:`JobNotFound`; ``None`` once ``gone`` resolves (the client left).
    A terminal job is held like any other (docs/http-api.md), so a client long-polling it in a
    loop waits instead of spinning. Local changes arrive through the hub at once; other
    processes' through the follower (``Core.follow``, arqd/follow.py), which reads every watched
    job's version once a second in batches (waiters never poll on their own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    hub = st.core.hub
    while entry.etag in baseline:
        entry = entry.bare()  # nothing but the wait holds it now
        left = deadline - loop.time()
        if left <= 0:
            break
        fut = hub.watch(entry.id, entry.version)
        try:
            either: list[asyncio.Future[Any]] = [fut, gone]
            await asyncio.wait(either, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hub.unwatch(entry.id, fut)
        if gone.done():
            return None
        if not fut.done():
            break
        changed = fut.result()
        entry = st.cache.put(changed) if changed else await read_entry(st, entry.id, owner, True)
    return entry


async def get_result(request: web.Request) -> web.StreamResponse:
    core = state_of(request).core
    job = await core.get(job_id_of(request), sees(request))
    results = core.resultio
    ref = results.check(job)
    if ref.is_inline:
        size, content_type = results.size(ref), JSON
    else:
        stored = await results.blob_size(ref)
        if stored is None:
            return error_response(410, "expired", f"the result of job {job.id} has expired")
        size, content_type = stored, ref.content_type or "application/octet-stream"
    if job.etag in etags(request.headers.get("If-None-Match")):
        return web.Response(status=304, headers={"ETag": job.etag, "Accept-Ranges": "bytes"})
    span = parse_range(request.headers.get("Range"), size)
    start, end = span if span else (0, size)
    resp = web.StreamResponse(status=206 if span else 200)
    resp.content_type = content_type
    resp.content_length = end - start
    resp.headers["Accept-Ranges"] = "bytes"
    resp.headers["ETag"] = job.etag
    if span:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    chunks = results.read(ref, start, end)
    try:
        await resp.prepare(request)
        async for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
    except ConnectionResetError:  # the client hung up mid-download: nothing went wrong here
        log.debug("http.client_gone", route="result", job_id=job.id)
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()  # the store's file or stream now, not when collected
    return resp


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)\Z")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` range as a half-open (start, end); None for no Range header."""
    if header is None:
        return None
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    if not m.group(1):  # the last n bytes
        start, end = max(0, size - int(m.group(2))), size
    else:
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or start >= end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the current state first, then ``state`` and ``progress`` events as
    they happen; the stream closes after the terminal state (or when the job is deleted)."""
    st = state_of(request)
    owner = sees(request)
    job_id = job_id_of(request)
    gone = st.held.enter(request)
    if gone is None:
        return busy_response()
    try:
        entry = await read_entry(st, job_id, owner)
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        resp.content_type = "text/event-stream"
        try:
            await resp.prepare(request)
            if await stream_events(resp, st, entry, owner, gone):
                await resp.write_eof()
                return resp
        except ConnectionResetError:
            pass
        log.debug("http.client_gone", route="events", job_id=job_id)
        return resp
    finally:
        st.held.leave(request)


async def stream_events(
    resp: web.StreamResponse,
    st: ServerState,
    entry: Entry,
    owner: str | None,
    gone: asyncio.Future[None],
) -> bool:
    """Write the events of one stream until the job is terminal or deleted (True), or until
    its client is gone (False)."""
    await resp.write(sse("state", entry))
    entry = entry.bare()  # a stream holds no body between events
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while not entry.state.terminal:
        try:
            new = await wait_for_change(st, entry, {entry.etag}, EVENTS_TICK, owner, gone)
        except JobNotFound:
            return True
        except BackendError as exc:  # the status line is sent: end the stream, the client retries
            log.warning("http.events_backend_error", job_id=entry.id, error=str(exc))
            return True
        if new is None:
            return False
        if new.etag != entry.etag:
            same_state = new.state == entry.state and new.progress != entry.progress
            await resp.write(sse("progress" if same_state else "state", new))
            quiet_since = loop.time()
        elif loop.time() - quiet_since > KEEPALIVE:
            await resp.write(b": keepalive\n\n")
            quiet_since = loop.time()
        entry = new.bare()
    return True


def sse(event: str, entry: Entry) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + entry.body + b"\n\n"


async def delete_job(request: web.Request) -> web.Response:
    """``Core.delete``: a terminal job is deleted (204), a live one cancelled (its job)."""
    job = await state_of(request).core.delete(job_id_of(request), sees(request))
    if job is None:
        return web.Response(status=204)
    return job_response(job, 200 if job.state is State.CANCELLED else 202)


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel without ever deleting (``DELETE`` deletes terminal jobs); a terminal job is
    answered unchanged. ``arqd.HttpClient.cancel`` uses it."""
    job = await state_of(request).core.cancel(job_id_of(request), sees(request))
    return job_response(job, 202 if job.state is State.RUNNING else 200)


_LIST_PARAMS = set(ListQuery.__struct_fields__)


async def list_jobs(request: web.Request) -> web.Response:
    st = state_of(request)
    asked = st.core.list_query(query(request, _LIST_PARAMS))
    body = await list_page(st, asked, sees(request))
    return web.Response(body=body, content_type="application/json")


_encoder = msgspec.json.Encoder()


async def list_page(st: ServerState, asked: ListQuery, owner: str | None) -> bytearray:
    """The JSON page of up to ``limit`` jobs, read in chunks of a few jobs and encoded straight
    into the body (see ``LIST_BYTES``). The page ends early, with a ``next`` cursor, once the
    body passes ``LIST_BYTES``, or where the backend answered a short page (DynamoDB's read
    budget)."""
    chunk = max(1, LIST_BYTES // max(1, st.app.config.server.max_body))
    body = bytearray(b'{"jobs":[')
    count, limit, cursor = 0, asked.limit, asked.cursor
    while True:
        size = min(chunk, limit - count)
        part = msgspec.structs.replace(asked, limit=size, cursor=cursor)
        jobs, after = await st.core.list_jobs(part, owner)
        for i, job in enumerate(jobs):
            if count:
                body += b","
            _encoder.encode_into(job_dict(job), body, -1)
            count += 1
            if len(body) >= LIST_BYTES and (i + 1 < len(jobs) or after is not None):
                return end_page(body, job.id)
        if after is None or count >= limit or len(jobs) < size:
            return end_page(body, after)
        cursor = after


def end_page(body: bytearray, nxt: str | None) -> bytearray:
    body += b'],"next":' + encode(nxt) + b"}"
    return body


# --- routes: groups, cache, schedules ---


def group_answer(group: Group) -> dict[str, Any]:
    return {"group": msgspec.to_builtins(group)}


def group_status_answer(status: GroupStatus) -> dict[str, Any]:
    return {
        "id": status.id,
        "name": status.name,
        "state": status.state,
        "counts": status.counts,
        "progress": status.progress,
        "jobs": [job_dict(j) for j in status.jobs],
    }


async def trigger_group(request: web.Request) -> web.Response:
    core = state_of(request).core
    record = await core.trigger_group(request.match_info["name"], principal_of(request).name)
    return json_response(group_answer(group_of(record)), 202)


async def submit_group(request: web.Request) -> web.Response:
    body = await read_body(request)
    try:
        spec = parse_group(body)
    except msgspec.DecodeError:
        return error_response(400, "invalid_json", "the body is not valid JSON")
    owner = principal_of(request).name
    record, _ = await state_of(request).core.submit_group(spec.name or "group", spec.jobs, owner)
    return json_response(group_answer(group_of(record)), 202)


def configured_group(core: Core, name: str) -> None:
    """A group of the config is triggered, not read or cancelled: 405 pointing to POST."""
    if name in core.config.groups and not JOB_ID_RE.match(name):
        raise Refused(
            405,
            "method_not_allowed",
            f"{name!r} is a group of the config: POST /v1/groups/{name} triggers it; read or "
            "cancel a triggered group by the id the trigger answered",
            Allow="POST",
        )


async def get_group(request: web.Request) -> web.Response:
    core = state_of(request).core
    configured_group(core, request.match_info["id"])
    record, jobs = await core.group(request.match_info["id"], sees(request))
    return json_response(group_status_answer(status_of(record, jobs)))


async def cancel_group(request: web.Request) -> web.Response:
    core = state_of(request).core
    group_id = request.match_info["id"]
    configured_group(core, group_id)
    cancelled = await core.cancel_group(group_id, sees(request))
    record, jobs = await core.group(group_id, sees(request))
    return json_response({"cancelled": cancelled, **group_status_answer(status_of(record, jobs))})


async def purge_cache(request: web.Request) -> web.Response:
    params = query(request, {"area"})
    purged = await state_of(request).core.purge(params.get("area", ""))
    return json_response({"purged": purged})


async def list_schedules(request: web.Request) -> web.Response:
    scheduler = state_of(request).app.scheduler
    return json_response({"schedules": scheduler.status() if scheduler else []})


# --- routes: queues, workers, health --------------------------------------------------------------


async def list_queues(request: web.Request) -> web.Response:
    return json_response({"queues": await state_of(request).core.queues()})


async def redrive(request: web.Request) -> web.Response:
    count = await state_of(request).core.redrive(request.match_info["name"])
    return json_response({"requeued": count})


async def list_workers(request: web.Request) -> web.Response:
    return json_response({"workers": await state_of(request).core.workers()})


async def metrics(request: web.Request) -> web.Response:
    st = state_of(request)
    m = st.app.metrics
    pool = st.app.pool
    m.in_flight.set(pool.running if pool else 0)
    m.concurrency.set(pool.concurrency if pool else 0)
    m.held.set(len(st.held))
    m.set_queue_stats(await st.core.queue_stats())
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    core = state_of(request).core
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await core.ping()
    except (ArqdError, TimeoutError) as exc:
        message = str(exc) or "the backends did not answer in time"
        return error_response(503, "unavailable", message)
    except Exception as exc:  # e.g. a backend not opened yet while the daemon waits for it
        log.info("http.not_ready", error=repr(exc))
        return error_response(503, "unavailable", "the backends are not open yet")
    return json_response({"status": "ready"})


# --- the application ------------------------------------------------------------------------------


# Every route with its auth decision: a route missing here is not served, and
# tests/test_auth.py checks each decision against the router.
ROUTES: list[tuple[str, str, Handler, Scope]] = [
    ("POST", "/v1/jobs", submit, "submit"),
    ("POST", "/v1/jobs/batch", submit_batch, "submit"),
    ("GET", "/v1/jobs", list_jobs, "read"),
    ("GET", "/v1/jobs/{id}", get_job, "read"),
    ("DELETE", "/v1/jobs/{id}", delete_job, "cancel"),
    ("POST", "/v1/jobs/{id}/cancel", cancel_job, "cancel"),
    ("GET", "/v1/jobs/{id}/result", get_result, "read"),
    ("GET", "/v1/jobs/{id}/events", job_events, "read"),
    ("POST", "/v1/groups", submit_group, "submit"),
    ("POST", "/v1/groups/{name}", trigger_group, "submit"),
    ("GET", "/v1/groups/{id}", get_group, "read"),
    ("DELETE", "/v1/groups/{id}", cancel_group, "cancel"),
    ("DELETE", "/v1/cache", purge_cache, "admin"),
    ("GET", "/v1/schedules", list_schedules, "admin"),
    ("GET", "/v1/queues", list_queues, "admin"),
    ("POST", "/v1/queues/{name}/redrive", redrive, "admin"),
    ("GET", "/v1/workers", list_workers, "admin"),
    ("GET", "/metrics", metrics, "admin"),
    ("GET", "/v1/openapi.json", openapi, "authenticated"),
    ("GET", "/", dashboard, "public"),
    ("GET", "/healthz", healthz, "public"),
    ("GET", "/readyz", readyz, "public"),
]


def make_app(app: App) -> web.Application:
    """The aiohttp application serving ``app`` (whose pool and backends the caller runs)."""
    web_app = web.Application(
        middlewares=[errors_middleware, access_middleware],
        client_max_size=app.config.server.max_body,
    )
    server = app.config.server  # restart-only: a reload keeps it
    listen_host = server.listen.rpartition(":")[0].strip("[]")
    state = ServerState(
        app,
        Guard(listen_host, server.allowed_hosts),
        ChangeCache(server.status_cache),
        Held(server.max_held),
    )
    web_app[STATE] = state
    hub = app.core.hub
    hub.add_listener(state.cache.changed)

    async def cleanup(_: web.Application) -> None:
        hub.remove_listener(state.cache.changed)
        await state.held.close()

    web_app.on_cleanup.append(cleanup)
    for method, path, handler, scope in ROUTES:
        route = web_app.router.add_route(method, path, handler)
        state.scopes[route.handler] = scope
    return web_app
