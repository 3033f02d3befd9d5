"""The dashboard at ``/`` (arqd/http/static/dashboard.html), driven in a real browser.

Debian's ``chromium`` (installed by ``scripts/ci-system-deps``) runs headless under Playwright's
async API against an ``arqd serve`` process on a sqlite config. Playwright never downloads a
browser here: it launches ``/usr/bin/chromium``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

import arqd

from .daemons import Daemon, Daemons, sqlite_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/arqd-dashboard.png")
UI = 15_000  # ms: how long the page may take to show a change (it polls every 3 s, streams live)

OPS_SECRET = "ops-dashboard-secret-0123456789"
VIEWER_SECRET = "viewer-dashboard-secret-0123456789"


def token_line(name: str, secret: str, scopes: list[str]) -> str:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    scope_list = ", ".join(f'"{s}"' for s in scopes)
    return f'{{ name = "{name}", sha256 = "{digest}", scopes = [{scope_list}] }}'


AUTH = f"""
[auth]
tokens = [
  {token_line("ops", OPS_SECRET, ["admin"])},
  {token_line("viewer", VIEWER_SECRET, ["submit", "read"])},
]
"""


def read_file(path: Path) -> bytes:
    return path.read_bytes()


OpenPage = Callable[[Daemon], Awaitable[Page]]


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with scripts/ci-system-deps")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Opens the dashboard of a daemon in a fresh browser context; after the test, no
    uncaught script error may have happened on any page."""
    errors: list[str] = []

    async def open_(daemon: Daemon) -> Page:
        context = await browser.new_context(viewport={"width": 1400, "height": 1000})
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(daemon.url + "/")
        return page

    yield open_
    assert errors == []


@pytest.fixture
def daemon(daemons: Daemons, tmp_path: Path) -> Daemon:
    return daemons.start(sqlite_config(tmp_path))


async def test_dashboard_is_self_contained(daemon: Daemon) -> None:
    """GET / is text/html and loads nothing from another host (no external URL/script/link)."""
    async with aiohttp.ClientSession() as http, http.get(daemon.url + "/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
    assert "<title>" in html and "data-testid=" in html
    assert re.findall(r"https?://", html) == []
    assert re.findall(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE) == []
    for href in re.findall(r"<link[^>]*\shref\s*=\s*[\"']?([^\"'\s>]*)", html, re.IGNORECASE):
        assert href.startswith(("data:", "/")) and not href.startswith("//"), href
    assert re.findall(r"@import|url\(\s*[\"']?(?!data:)", html) == []


async def test_sections_render(daemon: Daemon, open_page: OpenPage) -> None:
    """Without tokens, the queues, jobs, workers and detail sections fill in from the API."""
    async with arqd.HttpClient(daemon.url) as client:
        job = await client.submit("echo", {"hello": "dashboard"})
        await client.wait(job.id, timeout=10)
    page = await open_page(daemon)
    await expect(page.get_by_test_id("queue-row-default")).to_be_visible(timeout=UI)
    await expect(page.get_by_test_id(f"job-row-{job.id}")).to_be_visible(timeout=UI)
    await expect(page.get_by_test_id(f"state-{job.id}")).to_have_text("succeeded")
    await expect(page.locator("[data-testid^=worker-row-]")).to_have_count(1, timeout=UI)
    await expect(page.get_by_test_id("token-input")).to_be_visible()
    await expect(page.get_by_test_id("status")).not_to_have_class("error")
    await page.get_by_test_id(f"job-row-{job.id}").click()
    await expect(page.get_by_test_id("detail-payload")).to_contain_text('"hello": "dashboard"')


async def test_progress_bar_follows_a_running_job(daemon: Daemon, open_page: OpenPage) -> None:
    """A running job's progress bar follows its SSE progress events up to succeeded."""
    page = await open_page(daemon)
    await expect(page.get_by_test_id("jobs-table")).to_be_visible()
    async with arqd.HttpClient(daemon.url) as client:
        job = await client.submit("progress", {"steps": 8, "seconds": 5})
    bar = page.get_by_test_id(f"progress-{job.id}")
    await expect(bar).to_be_attached(timeout=UI)
    await bar.evaluate(
        """bar => {
            window.seenFractions = [bar.dataset.fraction];
            new MutationObserver(() => window.seenFractions.push(bar.dataset.fraction))
                .observe(bar, {attributes: true, attributeFilter: ["data-fraction"]});
        }"""
    )
    await expect(bar).to_have_attribute("data-fraction", re.compile(r"^0\.\d*[1-9]"), timeout=UI)
    await page.get_by_test_id(f"job-row-{job.id}").click()
    await expect(page.get_by_test_id("detail-state")).to_have_text("running")
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    await expect(page.get_by_test_id(f"state-{job.id}")).to_have_text("succeeded", timeout=UI)
    await expect(bar).to_have_attribute("data-fraction", "1")
    seen = {float(f) for f in await page.evaluate("window.seenFractions") if f is not None}
    # the list poll (every 3 s) could show at most two fractions of a 5 s job: these are events
    assert len({f for f in seen if 0 < f < 1}) >= 3, seen
    assert 1.0 in seen


async def test_cancel_button_cancels_a_running_job(daemon: Daemon, open_page: OpenPage) -> None:
    """A running job's Cancel button cancels it: the page and the API say cancelled."""
    page = await open_page(daemon)
    async with arqd.HttpClient(daemon.url) as client:
        job = await client.submit("sleep", {"seconds": 60})
        await expect(page.get_by_test_id(f"state-{job.id}")).to_have_text("running", timeout=UI)
        await page.get_by_test_id(f"cancel-{job.id}").click()
        await expect(page.get_by_test_id(f"state-{job.id}")).to_have_text("cancelled", timeout=UI)
        await expect(page.get_by_test_id(f"cancel-{job.id}")).to_be_hidden()
        assert (await client.get(job.id)).state == "cancelled"


async def test_redrive_button_requeues_failed_jobs(daemon: Daemon, open_page: OpenPage) -> None:
    """A failed job is listed; its queue's Redrive requeues it (requeued 1, it runs again)."""
    page = await open_page(daemon)
    async with arqd.HttpClient(daemon.url) as client:
        job = await client.submit("fail", {"permanent": True, "message": "no such file"})
        first = await client.wait(job.id, timeout=10)
        assert first.state == "failed" and first.attempts == 1
        row = page.get_by_test_id(f"failed-row-{job.id}")
        await expect(row).to_be_visible(timeout=UI)
        await expect(row).to_contain_text("no such file")
        await page.get_by_test_id("redrive-default").click()
        await expect(page.get_by_test_id("status")).to_contain_text("requeued 1", timeout=UI)
        again = await client.wait(job.id, timeout=10)
    assert again.state == "failed" and again.attempts == 1
    assert again.finished_at is not None and first.finished_at is not None
    assert again.finished_at > first.finished_at
    assert len([e for e in daemon.events("job.failed") if e.get("job_id") == job.id]) == 2


async def test_token_prompt_then_jobs(
    daemons: Daemons, tmp_path: Path, open_page: OpenPage
) -> None:
    """With tokens the page prompts for one, then shows jobs, and keeps it across a reload."""
    daemon = daemons.start(sqlite_config(tmp_path, extra=AUTH))
    async with arqd.HttpClient(daemon.url, token=OPS_SECRET) as client:
        job = await client.submit("echo", {"n": 1})
    page = await open_page(daemon)
    await expect(page.get_by_test_id("status")).to_contain_text("token", timeout=UI)
    await expect(page.get_by_test_id("token-form")).to_have_class(re.compile("attention"))
    await expect(page.get_by_test_id(f"job-row-{job.id}")).to_have_count(0)
    await page.get_by_test_id("token-input").fill(OPS_SECRET)
    await page.get_by_test_id("token-save").click()
    await expect(page.get_by_test_id(f"job-row-{job.id}")).to_be_visible(timeout=UI)
    await expect(page.get_by_test_id("queue-row-default")).to_be_visible(timeout=UI)
    await expect(page.get_by_test_id("status")).not_to_contain_text("token")
    await page.reload()
    await expect(page.get_by_test_id(f"job-row-{job.id}")).to_be_visible(timeout=UI)


async def test_token_without_admin_degrades(
    daemons: Daemons, tmp_path: Path, open_page: OpenPage
) -> None:
    """A non-admin token sees its own jobs; admin-only sections say not allowed."""
    daemon = daemons.start(sqlite_config(tmp_path, extra=AUTH))
    async with arqd.HttpClient(daemon.url, token=VIEWER_SECRET) as client:
        mine = await client.submit("echo", {"n": 1})
    async with arqd.HttpClient(daemon.url, token=OPS_SECRET) as client:
        theirs = await client.submit("echo", {"n": 2})
    page = await open_page(daemon)
    await page.get_by_test_id("token-input").fill(VIEWER_SECRET)
    await page.get_by_test_id("token-save").click()
    await expect(page.get_by_test_id(f"job-row-{mine.id}")).to_be_visible(timeout=UI)
    await expect(page.get_by_test_id(f"job-row-{theirs.id}")).to_have_count(0)
    for section in ("queues", "schedules", "workers"):
        note = page.get_by_test_id(f"note-{section}")
        await expect(note).to_contain_text("Not allowed", timeout=UI)
        await expect(note).to_contain_text("admin")


async def test_submit_form_detail_and_download(daemon: Daemon, open_page: OpenPage) -> None:
    """The submit form posts a job, shows its detail, downloads its result, reports errors."""
    page = await open_page(daemon)
    await page.get_by_test_id("submit-handler").fill("echo")
    await page.get_by_test_id("submit-payload").fill("{not json")
    await page.get_by_test_id("submit-button").click()
    await expect(page.get_by_test_id("status")).to_contain_text("not valid JSON")
    await page.get_by_test_id("submit-payload").fill('{"answer": 42}')
    await page.get_by_test_id("submit-button").click()
    await expect(page.get_by_test_id("status")).to_contain_text("Submitted job")
    await expect(page.get_by_test_id("detail-payload")).to_contain_text('"answer": 42')
    await expect(page.get_by_test_id("detail-state")).to_have_text("succeeded", timeout=UI)
    async with page.expect_download() as info:
        await page.get_by_test_id("detail-download").click()
    download = await info.value
    assert read_file(await download.path()) == b'{"answer":42}'
    await page.get_by_test_id("submit-handler").fill("nope")
    await page.get_by_test_id("submit-button").click()
    await expect(page.get_by_test_id("status")).to_contain_text("unknown_handler")


async def test_group_lookup_cancel_and_stream_cap(daemon: Daemon, open_page: OpenPage) -> None:
    """Groups look up and cancel; more live jobs than the stream cap never starve the page."""
    async with arqd.HttpClient(daemon.url) as client:
        group = await client.submit_group(
            [{"handler": "sleep", "payload": {"seconds": 60}} for _ in range(8)], name="batch"
        )
    page = await open_page(daemon)
    ids = [member.id for member in group.jobs]
    for job_id in ids:
        await expect(page.get_by_test_id(f"state-{job_id}")).to_have_text("running", timeout=UI)
    await page.get_by_test_id("group-input").fill(group.id)
    await page.get_by_test_id("group-lookup").click()
    await expect(page.get_by_test_id("group-state")).to_have_text("running")
    await expect(page.get_by_test_id("group-body")).to_contain_text("running 8")
    await page.get_by_test_id("group-cancel").click()
    await expect(page.get_by_test_id("status")).to_contain_text("cancelled 8")
    for job_id in ids:
        await expect(page.get_by_test_id(f"state-{job_id}")).to_have_text("cancelled", timeout=UI)
    await page.get_by_test_id("group-lookup").click()
    await expect(page.get_by_test_id("group-state")).to_have_text("failed")
