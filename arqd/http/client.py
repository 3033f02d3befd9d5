"""``arqd.HttpClient``: the in-process client's methods (``arqd.JobsAPI``) over the HTTP API, with
the same return types and the same exceptions.

It imports the model, the views and the wire format only: ``import arqd.http.client`` loads no
core, hub, metrics or handlers (``tests/test_imports.py``), so a program that only talks to a
daemon does not pay for them.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import aiohttp
import msgspec

from arqd.api import JobsAPI, plain_spec, spec_of
from arqd.errors import ArqdError, BackendUnavailable, InvalidRequest
from arqd.groups import Group, GroupStatus
from arqd.http.wire import ERRORS, job_from_dict
from arqd.model import WAIT_MAX, State
from arqd.view import Job, QueueInfo, WorkerInfo

WAIT_SLICE = WAIT_MAX  # the server holds a long-poll at most this long
SLICE_MARGIN = 5.0  # a long-poll's hold ends this long before the client's own request timeout


class HttpClient:
    """``async with arqd.HttpClient("http://127.0.0.1:8080", token=...) as client: ...``"""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 90.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # A long-poll must end before the request times out (a client made with timeout=30).
        self._slice = max(1.0, min(WAIT_SLICE, timeout - SLICE_MARGIN))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            self.url, headers=self._headers, timeout=self._timeout
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    # --- transport --------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        assert self._session is not None, "use HttpClient inside `async with`"
        try:
            async with self._session.request(
                method, path, json=json, params=params, headers=headers
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise _error(resp.status, body)
                return resp.status, body, resp.headers
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach arqd at {self.url}: {exc}") from exc

    async def _job(self, method: str, path: str, **kw: Any) -> Job:
        _, body, headers = await self._call(method, path, **kw)
        return job_from_dict(msgspec.json.decode(body), headers.get("ETag"))

    # --- the client's methods ---------------------------------------------------------------------

    async def submit(
        self,
        handler: str,
        payload: Any = None,
        *,
        queue: str | None = None,
        key: str | None = None,
        sticky: bool = False,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        meta: Mapping[str, Any] | None = None,
        connection: object = None,
    ) -> Job:
        _no_connection(connection)
        spec = spec_of(
            handler,
            payload,
            sticky,
            queue=queue,
            key=key,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            meta=meta,
        )
        return await self._job("POST", "/v1/jobs", json=spec)

    async def submit_many(
        self, specs: Sequence[Mapping[str, Any]], *, connection: object = None
    ) -> builtins.list[Job]:
        _no_connection(connection)
        plain = [plain_spec(s) for s in specs]
        _, body, _ = await self._call("POST", "/v1/jobs/batch", json={"jobs": plain})
        return [job_from_dict(j) for j in msgspec.json.decode(body)["jobs"]]

    async def get(self, job_id: str) -> Job:
        return await self._job("GET", _job_path(job_id))

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Reads the job, then long-polls it with its ETag until it is terminal: one request per
        change (or per minute without one)."""
        async with asyncio.timeout(timeout):
            job = await self.get(job_id)
            while not job.state.terminal:
                job = await self.poll(job)
            return job

    async def result(self, job_id: str) -> Any:
        _, body, headers = await self._call("GET", _job_path(job_id, "/result"))
        if headers.get("Content-Type", "").startswith("application/json"):
            return msgspec.json.decode(body)
        return body

    async def stream_result(self, job_id: str) -> AsyncIterator[bytes]:
        assert self._session is not None, "use HttpClient inside `async with`"
        try:
            async with self._session.get(_job_path(job_id, "/result")) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, await resp.read())
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    yield chunk
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach arqd at {self.url}: {exc}") from exc

    async def cancel(self, job_id: str) -> Job:
        return await self._job("POST", _job_path(job_id, "/cancel"))

    async def delete(self, job_id: str) -> None:
        await self._call("DELETE", _job_path(job_id))

    async def list(
        self,
        *,
        queue: str | None = None,
        state: State | str | None = None,
        handler: str | None = None,
        group_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        params = {"limit": str(limit)}
        for name, value in (
            ("queue", queue),
            ("state", state.value if isinstance(state, State) else state),
            ("handler", handler),
            ("group_id", group_id),
            ("cursor", cursor),
        ):
            if value is not None:
                params[name] = value
        _, body, _ = await self._call("GET", "/v1/jobs", params=params)
        data = msgspec.json.decode(body)
        return [job_from_dict(j) for j in data["jobs"]], data["next"]

    # --- groups and the cache -------------------------------------------------------------------

    async def trigger_group(self, name: str) -> Group:
        _, body, _ = await self._call("POST", f"/v1/groups/{_segment(name)}")
        return msgspec.convert(msgspec.json.decode(body)["group"], Group)

    async def submit_group(
        self, jobs: Sequence[Mapping[str, Any]], name: str | None = None
    ) -> Group:
        payload: dict[str, Any] = {"jobs": [plain_spec(j) for j in jobs]}
        if name is not None:
            payload["name"] = name
        _, body, _ = await self._call("POST", "/v1/groups", json=payload)
        return msgspec.convert(msgspec.json.decode(body)["group"], Group)

    async def group(self, group_id: str) -> GroupStatus:
        _, body, _ = await self._call("GET", f"/v1/groups/{_segment(group_id)}")
        data = msgspec.json.decode(body)
        jobs = [job_from_dict(j) for j in data.pop("jobs")]
        return GroupStatus(jobs=jobs, **data)

    async def cancel_group(self, group_id: str) -> int:
        _, body, _ = await self._call("DELETE", f"/v1/groups/{_segment(group_id)}")
        return int(msgspec.json.decode(body)["cancelled"])

    async def purge(self, area: str) -> int:
        _, body, _ = await self._call("DELETE", "/v1/cache", params={"area": area})
        return int(msgspec.json.decode(body)["purged"])

    # --- queues and workers ---------------------------------------------------------------------

    async def queues(self) -> builtins.list[QueueInfo]:
        _, body, _ = await self._call("GET", "/v1/queues")
        return msgspec.convert(msgspec.json.decode(body)["queues"], builtins.list[QueueInfo])

    async def redrive(self, queue: str) -> int:
        _, body, _ = await self._call("POST", f"/v1/queues/{_segment(queue)}/redrive")
        return int(msgspec.json.decode(body)["requeued"])

    async def workers(self) -> builtins.list[WorkerInfo]:
        _, body, _ = await self._call("GET", "/v1/workers")
        data = msgspec.json.decode(body)["workers"]
        return msgspec.convert(data, builtins.list[WorkerInfo], strict=False)

    # --- operator calls (used by the CLI) ---------------------------------------------------------

    async def poll(self, job: Job, wait: float | None = None) -> Job:
        """One long-poll: the job once it differs from ``job`` (as last answered: the server
        compares its ETag), or ``job`` itself after ``wait`` seconds without a change (at most
        60, and less than the client's request timeout). A terminal job is answered at once
        without a request (the server would hold it the whole time)."""
        if job.state.terminal:
            return job
        if job.etag is None:  # from a list: no ETag to compare, so read the job as it is now
            return await self.get(job.id)
        hold = self._slice if wait is None else min(wait, self._slice)
        status, body, answered = await self._call(
            "GET",
            _job_path(job.id),
            params={"wait": f"{hold:g}"},
            headers={"If-None-Match": job.etag},
        )
        if status == 304:
            return job
        return job_from_dict(msgspec.json.decode(body), answered.get("ETag"))

    async def request_json(self, method: str, path: str, json: Any = None) -> Any:
        """Any API call answering JSON, e.g. ``("GET", "/v1/queues")``."""
        _, body, _ = await self._call(method, path, json=json)
        return msgspec.json.decode(body) if body else None


def _segment(value: str) -> str:
    """A value as one path segment: a ``/``, ``?`` or ``#`` in an id or a name stays in it."""
    return quote(value, safe="")


def _job_path(job_id: str, tail: str = "") -> str:
    return f"/v1/jobs/{_segment(job_id)}{tail}"


def _error(status: int, body: bytes) -> ArqdError:
    try:
        err = msgspec.json.decode(body)["error"]
        code, message = err["code"], err["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        code, message = "error", body[:200].decode(errors="replace") or f"HTTP {status}"
    exc = ERRORS.get(code, ArqdError)(message)
    if type(exc) is ArqdError:
        exc.code, exc.status = code, status
    return exc


if TYPE_CHECKING:  # mypy holds HttpClient to the one client interface
    _client: type[JobsAPI] = HttpClient


def _no_connection(connection: object) -> None:
    """A daemon cannot join the caller's database transaction: only ``arqd.Client`` can."""
    if connection is not None:
        raise InvalidRequest(
            "connection: only the in-process arqd.Client submits inside a database transaction"
        )
