"""``GET /v1/openapi.json``: the OpenAPI 3.1 document of the HTTP API."""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web

from arqd import __version__
from arqd.http.wire import encode


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "arqd", "version": __version__},
        "paths": {},
    }


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=encode(document()), content_type="application/json")
