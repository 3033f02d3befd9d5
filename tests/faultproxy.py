"""A fault-injecting HTTP proxy for tests: it sits between aiobotocore and moto on 127.0.0.1.

Each request draws one fate, with the probabilities in :class:`Faults`:

- ``throttle``: not forwarded; answered as AWS answers an overloaded service (DynamoDB: HTTP 400
  with ``ThrottlingException`` or ``ProvisionedThroughputExceededException``; S3: 503
  ``SlowDown``);
- ``unavailable``: not forwarded; HTTP 503;
- ``drop``: not forwarded; the connection is closed without an answer;
- ``lose``: forwarded (the write happens), then the connection is closed without the answer,
  which is the ambiguous case: the client cannot know whether its request was applied;
- otherwise forwarded, and moto's answer is relayed.

``injected`` counts the faults dealt per kind, so a test can show that its faults happened.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web

DYNAMODB_ERROR = "com.amazonaws.dynamodb.v20120810#{}"
THROTTLE_CODES = ("ThrottlingException", "ProvisionedThroughputExceededException")
S3_SLOW_DOWN = (
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
# Headers that describe one hop (or that aiohttp computes itself), never relayed.
HOP_HEADERS = frozenset(
    {"connection", "content-length", "transfer-encoding", "keep-alive", "host", "date", "server"}
)


@dataclass
class Faults:
    """Probabilities (0..1) of each fate; they are drawn in this order, so they add up.

    ``only`` limits faults to DynamoDB operations of those names (e.g. ``{"UpdateItem"}``);
    ``carrying`` to requests whose body holds those bytes (e.g. one item's key);
    ``budget`` to that many faults in all."""

    throttle: float = 0.0
    unavailable: float = 0.0
    drop: float = 0.0
    lose: float = 0.0
    only: frozenset[str] | None = None
    carrying: bytes | None = None
    budget: int | None = None


class FaultProxy:
    """``async with FaultProxy(upstream, Faults(...)) as proxy``: ``proxy.url`` is its address;
    ``proxy.faults`` may be changed at any time."""

    def __init__(self, upstream: str, faults: Faults | None = None, seed: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults or Faults()
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._random = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _fate(self, request: web.Request, body: bytes) -> str | None:
        f = self.faults
        operation = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        if f.only is not None and operation not in f.only:
            return None
        if f.carrying is not None and f.carrying not in body:
            return None
        if f.budget is not None and sum(self.injected.values()) >= f.budget:
            return None
        roll = self._random.random()
        for kind in ("throttle", "unavailable", "drop", "lose"):
            roll -= getattr(f, kind)
            if roll < 0:
                self.injected[kind] += 1
                return kind
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fate = self._fate(request, body)
        if fate == "throttle":
            return self._throttled(request)
        if fate == "unavailable":
            return web.json_response({"message": "Service Unavailable"}, status=503)
        if fate == "drop":
            return _hang_up(request)
        answer = await self._forward(request, body)
        if fate == "lose":
            return _hang_up(request)
        return answer

    def _throttled(self, request: web.Request) -> web.Response:
        if "X-Amz-Target" in request.headers:  # DynamoDB's JSON protocol
            code = self._random.choice(THROTTLE_CODES)
            body = {"__type": DYNAMODB_ERROR.format(code), "message": "Rate exceeded"}
            return web.json_response(body, status=400, content_type="application/x-amz-json-1.0")
        return web.Response(status=503, text=S3_SLOW_DOWN, content_type="application/xml")

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=io.BytesIO(body),  # aiohttp warns about large raw bytes bodies
            allow_redirects=False,
        ) as upstream:
            data = await upstream.read()
            relayed = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            if request.method == "HEAD" and "Content-Length" in upstream.headers:
                # A HEAD answer's length is its content, not this hop's (S3's head_object).
                relayed["Content-Length"] = upstream.headers["Content-Length"]
            self.forwarded += 1
            return web.Response(status=upstream.status, body=data, headers=relayed)


def _hang_up(request: web.Request) -> web.Response:
    """Close the client's connection without an answer (the response below is never sent)."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response(status=599)
