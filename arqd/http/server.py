"""The HTTP control API (API.md section 2) as an aiohttp application.

``make_app(app)`` builds the ``web.Application`` around a running ``arqd.App``; the daemon
(``arqd.daemon``) serves it, and tests serve it in-process or as ``arqd serve``.

Status polling is cheap by design: a small change cache remembers recently served jobs (their
ETag and encoded body); a local change (from this process's consumers or clients, through the
hub) drops the entry at once, and an entry older than ``CACHE_TTL`` is read again, which bounds
how long a change made by another process can go unseen. A poll of a fresh entry is answered
from memory: 304 when ``If-None-Match`` matches, else 200 with the cached body; neither touches
the backend.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from arqd.app import App
from arqd.backends.base import ListFilter
from arqd.core import JSON, TOO_DEEP, Core, explain, parse_group, parse_spec
from arqd.errors import (
    ArqdError,
    BackendError,
    InvalidRequest,
    JobNotFound,
)
from arqd.groups import Group, GroupStatus, group_of, status_of
from arqd.http.auth import ANONYMOUS, Principal, Scope, Tokens
from arqd.http.dashboard import dashboard
from arqd.http.guard import JSON_TYPE, Guard, content_type_problem
from arqd.http.openapi import openapi
from arqd.http.wire import encode, error_body, job_dict
from arqd.model import JOB_ID_RE, NAME_PATTERN, Job, JobSpec, State, from_ts

log = structlog.get_logger("arqd.http")

CACHE_TTL = 1.0  # seconds a cached ETag may answer 304 without asking the backend
CACHE_SIZE = 100_000  # ETags remembered (about 100 bytes each)
EVENTS_TICK = 1.0  # an event stream wakes this often to send keepalives (changes wake it at once)
WAIT_MAX = 60.0
KEEPALIVE = 15.0  # an SSE comment line this often keeps proxies from closing the stream
BATCH_MAX = 1000
LIST_MAX = 1000
WORKER_STALE = 15.0  # a worker row older than this is not listed (rows refresh every 2 s)
READY_TIMEOUT = 2.0


@dataclass(slots=True)
class Cached:
    job: Job
    body: bytes
    at: float


class ChangeCache:
    """Recently served jobs, with their encoded body; see the module docstring."""

    def __init__(self, ttl: float = CACHE_TTL, size: int = CACHE_SIZE) -> None:
        self._ttl, self._size = ttl, size
        self._entries: OrderedDict[str, Cached] = OrderedDict()

    def fresh(self, job_id: str) -> Cached | None:
        entry = self._entries.get(job_id)
        if entry is None or time.monotonic() - entry.at > self._ttl:
            return None
        return entry

    def put(self, job: Job) -> Cached:
        entry = Cached(job, encode(job_dict(job)), time.monotonic())
        self._entries[job.id] = entry
        self._entries.move_to_end(job.id)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry

    def changed(self, job_id: str, job: Job | None = None) -> None:
        self._entries.pop(job_id, None)


@dataclass
class ServerState:
    app: App
    guard: Guard
    cache: ChangeCache = field(default_factory=ChangeCache)
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
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("http.internal_error", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; the daemon's log has details")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route has a scope (see ROUTES); unknown routes fall through to a 404."""
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
    return await handler(request)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What a browser may not do (``arqd/http/guard.py``): name another host without a token
    (421), call from another site's page (403), send a body that is not JSON (415). Public and
    unknown routes are left alone: they hold no data and change nothing."""
    st = state_of(request)
    scope = st.scopes.get(request.match_info.route.handler)
    if scope is None or scope == "public":
        return await handler(request)
    guard = st.guard
    if principal_of(request).name is None:  # no token proved anything: rebinding is possible
        problem = guard.host_problem(request.headers.get("Host"))
        if problem:
            return error_response(421, "misdirected_request", problem)
    problem = guard.origin_problem(request.headers, request.method)
    if problem:
        return error_response(403, "forbidden", problem)
    problem = content_type_problem(request.content_type, request.body_exists, request.method)
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
    params = query(request, {"wait"})
    wanted = etags(request.headers.get("If-None-Match"))
    wait = 0.0
    if "wait" in params:
        try:
            wait = float(params["wait"])
        except ValueError:
            raise InvalidRequest("wait: a number of seconds") from None
        if not 0 <= wait <= WAIT_MAX:
            raise InvalidRequest(f"wait: between 0 and {WAIT_MAX:g} seconds")
    owner = sees(request)
    entry = st.cache.fresh(job_id)
    if entry is None or wait > 0:
        entry = await read_entry(st, job_id, owner)
    elif owner is not None and entry.job.owner != owner:
        raise JobNotFound(f"no job {job_id}")
    if wait > 0:
        job = await wait_for_change(st, entry.job, wanted or {entry.job.etag}, wait, owner)
        entry = st.cache.fresh(job.id) or st.cache.put(job)
    etag = entry.job.etag
    if etag in wanted:
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=entry.body, content_type="application/json", headers={"ETag": etag})


async def read_entry(st: ServerState, job_id: str, owner: str | None) -> Cached:
    return st.cache.put(await st.core.get(job_id, owner))


async def read_job(st: ServerState, job_id: str, owner: str | None) -> Job:
    return (await read_entry(st, job_id, owner)).job


async def wait_for_change(
    st: ServerState, job: Job, baseline: set[str], wait: float, owner: str | None
) -> Job:
    """Hold until the job's ETag leaves ``baseline`` or ``wait`` seconds pass. Local changes
    arrive through the hub at once; other processes' through ``Core.follow_changes``, which
    reads every watched job once a second in batches (waiters never poll on their own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    hub = st.core.hub
    while job.etag in baseline and not job.state.terminal:
        left = deadline - loop.time()
        if left <= 0:
            break
        fut = hub.watch(job.id, job.version)
        try:
            await asyncio.wait([fut], timeout=left)
        finally:
            hub.unwatch(job.id, fut)
        if not fut.done():
            break
        changed = fut.result()
        job = changed if changed is not None else await read_job(st, job.id, owner)
    return job


async def get_result(request: web.Request) -> web.StreamResponse:
    core = state_of(request).core
    job = await core.get(job_id_of(request), sees(request))
    ref = core.check_result(job)
    if ref.is_inline:
        size, content_type = core.result_size(ref), JSON
    else:
        stored = await core.blob_size(ref)
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
    await resp.prepare(request)
    async for chunk in core.read_result(ref, start, end):
        await resp.write(chunk)
    await resp.write_eof()
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
    they happen; the stream closes after the terminal state."""
    st = state_of(request)
    owner = sees(request)
    job = await read_job(st, job_id_of(request), owner)
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    await resp.write(sse("state", job))
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while not job.state.terminal:
        try:
            new = await wait_for_change(st, job, {job.etag}, EVENTS_TICK, owner)
        except JobNotFound:
            break
        if new.etag != job.etag:
            event = (
                "progress" if new.state == job.state and new.progress != job.progress else "state"
            )
            await resp.write(sse(event, new))
            quiet_since = loop.time()
        elif loop.time() - quiet_since > KEEPALIVE:
            await resp.write(b": keepalive\n\n")
            quiet_since = loop.time()
        job = new
    await resp.write_eof()
    return resp


def sse(event: str, job: Job) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + encode(job_dict(job)) + b"\n\n"


async def delete_job(request: web.Request) -> web.Response:
    core = state_of(request).core
    job_id = job_id_of(request)
    owner = sees(request)
    job = await core.get(job_id, owner)
    if job.state.terminal:
        await core.delete(job_id, owner)
        return web.Response(status=204)
    job = await core.cancel(job_id, owner)
    return job_response(job, 200 if job.state is State.CANCELLED else 202)


async def cancel_job(request: web.Request) -> web.Response:
    """An addition to API.md: cancel without ever deleting (``DELETE`` deletes terminal jobs);
    a terminal job is answered unchanged. ``arqd.HttpClient.cancel`` uses it."""
    job = await state_of(request).core.cancel(job_id_of(request), sees(request))
    return job_response(job, 202 if job.state is State.RUNNING else 200)


async def list_jobs(request: web.Request) -> web.Response:
    params = query(request, {"queue", "state", "handler", "group_id", "limit", "cursor"})
    try:
        limit = int(params.get("limit", "100"))
    except ValueError:
        raise InvalidRequest("limit: a whole number") from None
    if not 1 <= limit <= LIST_MAX:
        raise InvalidRequest(f"limit: between 1 and {LIST_MAX}")
    state = params.get("state")
    if state is not None and state not in State.__members__.values():
        raise InvalidRequest(f"state: one of {', '.join(s.value for s in State)}")
    cursor = params.get("cursor")
    if cursor is not None and not JOB_ID_RE.match(cursor):
        raise InvalidRequest("cursor: not a cursor this API gave out")
    where = ListFilter(
        queue=params.get("queue"),
        state=State(state) if state else None,
        handler=params.get("handler"),
        group_id=params.get("group_id"),
        owner=sees(request),
    )
    jobs, nxt = await state_of(request).core.queue.list_jobs(where, limit, cursor)
    return json_response({"jobs": [job_dict(j) for j in jobs], "next": nxt})


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
    name = request.match_info["name"]
    record, _ = await core.submit_group(name, core.group_specs(name), principal_of(request).name)
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
    core = state_of(request).core
    stats = {s.name: s for s in await core.queue.stats()}
    names = sorted(set(stats) | set(core.config.workers.queues))
    out = []
    for name in names:
        s = stats.get(name)
        out.append(
            {
                "name": name,
                "queued": s.queued if s else 0,
                "running": s.running if s else 0,
                "succeeded": s.succeeded if s else 0,
                "failed": s.failed if s else 0,
                "cancelled": s.cancelled if s else 0,
                "oldest_queued_seconds": s.oldest_queued_seconds if s else None,
            }
        )
    return json_response({"queues": out})


async def redrive(request: web.Request) -> web.Response:
    core = state_of(request).core
    name = request.match_info["name"]
    if not re.match(NAME_PATTERN, name):
        raise JobNotFound(f"no queue {name!r}")
    count = await core.queue.redrive(name)
    if count:
        core.hub.jobs_ready()
    return json_response({"requeued": count})


async def list_workers(request: web.Request) -> web.Response:
    core = state_of(request).core
    workers = await core.queue.list_workers(core.clock.time() - WORKER_STALE)
    return json_response(
        {
            "workers": [
                {
                    "id": w.id,
                    "host": w.host,
                    "started_at": from_ts(w.started_at),
                    "last_seen": from_ts(w.last_seen),
                    "running": w.running,
                    "concurrency": w.concurrency,
                }
                for w in workers
            ]
        }
    )


async def metrics(request: web.Request) -> web.Response:
    st = state_of(request)
    m = st.core.metrics
    pool = st.app.pool
    m.in_flight.set(pool.running if pool else 0)
    m.concurrency.set(pool.concurrency if pool else 0)
    m.set_queue_stats(await st.core.queue.stats())
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    core = state_of(request).core
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await core.queue.ping()
            await core.results.ping()
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
        middlewares=[errors_middleware, auth_middleware, guard_middleware],
        client_max_size=app.config.server.max_body,
    )
    server = app.config.server  # restart-only: a reload keeps it
    listen_host = server.listen.rpartition(":")[0].strip("[]")
    state = ServerState(app, Guard(listen_host, server.allowed_hosts))
    web_app[STATE] = state
    app.core.hub.add_listener(state.cache.changed)
    for method, path, handler, scope in ROUTES:
        route = web_app.router.add_route(method, path, handler)
        state.scopes[route.handler] = scope
    return web_app
