"""The dashboard at ``/``: one self-contained page (no build step, no CDN) that talks to the
same API with the same auth (a token entered once, kept in session storage)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from aiohttp import web

PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"


@cache
def _page() -> bytes:
    return PAGE.read_bytes()


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(
        body=_page(),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            # The page loads nothing from elsewhere; scripts and styles are inline.
            "Content-Security-Policy": (
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
        },
    )
