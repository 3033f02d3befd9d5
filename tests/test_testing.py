"""``arqd.testing`` for users' own tests: a ``TestApp`` on memory backends and a test clock whose
jobs run only in ``drain()`` (retries and delays included, by moving the clock), a record of what
was submitted and how each attempt ended, ``reset()``, and the ``arqd_app`` pytest fixture."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import arqd
from arqd.testing import Attempt, TestApp

from .daemons import ROOT

CONFIG = arqd.Config.from_dict(
    {
        "defaults": {"max_attempts": 3, "backoff": {"base": "10s", "factor": 2, "jitter": False}},
        "handlers": {"echo": "arqd.demo:echo"},
    }
)


def flaky(app: TestApp) -> None:
    @app.handler("flaky")
    async def run(ctx: arqd.JobContext, payload: Any) -> str:
        if ctx.attempt < 3:
            raise RuntimeError(f"not yet ({ctx.attempt})")
        return "ok"


async def test_jobs_run_only_when_drained():
    """A submitted job stays queued, with no pool to take it, until ``drain()`` runs it."""
    async with TestApp(CONFIG) as app:
        job = await app.client.submit("echo", {"n": 1})
        assert app.pool is None
        assert (await app.client.get(job.id)).state == "queued" and app.attempts == []
        await app.drain()
        assert await app.client.result(job.id) == {"n": 1}
        assert app.attempts == [Attempt(job.id, "echo", 1, arqd.State.SUCCEEDED)]
        assert app.pool is None  # nothing runs in the background after it either


async def test_drain_runs_retries_by_moving_the_clock_over_the_backoff():
    """Failed attempts are retried after the configured backoff (10 s, then 20 s), which drain
    skips by moving the test clock, not by sleeping; each attempt's end is recorded."""
    async with TestApp(CONFIG) as app:
        flaky(app)
        start = app.clock.time()
        job = await app.client.submit("flaky")
        await app.drain()
        assert (await app.client.get(job.id)).state == "succeeded"
        assert [(a.attempt, a.state, a.error_type, a.error) for a in app.attempts] == [
            (1, "queued", "RuntimeError", "not yet (1)"),
            (2, "queued", "RuntimeError", "not yet (2)"),
            (3, "succeeded", None, None),
        ]
        assert 30 <= app.clock.time() - start < 31


async def test_drain_without_advance_runs_only_what_is_ready():
    """``drain(advance=False)`` leaves a retry (and a delayed job) waiting for its time."""
    async with TestApp(CONFIG) as app:
        flaky(app)
        job = await app.client.submit("flaky")
        later = await app.client.submit("echo", {"n": 2}, delay=3600)
        await app.drain(advance=False)
        assert (await app.client.get(job.id)).attempts == 1
        assert (await app.client.get(later.id)).state == "queued"
        await app.drain()
        assert (await app.client.get(later.id)).state == "succeeded"
        assert (await app.client.get(job.id)).state == "succeeded"


async def test_failures_and_dedupe_are_recorded():
    """``Fail`` ends a job at once (recorded as failed with its type); a submit whose key
    matched a live job is recorded with ``created=False`` and the live job's id."""
    async with TestApp(CONFIG) as app:

        @app.handler("refuse")
        async def refuse(ctx: arqd.JobContext, payload: Any) -> None:
            raise arqd.Fail("bad input")

        first = await app.client.submit("refuse", {"a": 1}, key="k1")
        second = await app.client.submit("refuse", {"a": 2}, key="k1")
        await app.drain()
        assert second.id == first.id
        assert [(s.job_id, s.payload, s.key, s.created) for s in app.submitted] == [
            (first.id, {"a": 1}, "k1", True),
            (first.id, {"a": 2}, "k1", False),
        ]
        assert app.attempts == [
            Attempt(first.id, "refuse", 1, arqd.State.FAILED, "Fail", "bad input")
        ]


async def test_reset_forgets_jobs_results_keys_and_the_record():
    """After ``reset()`` no job, result or key is left and the record is empty; the handlers
    stay, so the app runs the next test's jobs."""
    async with TestApp(CONFIG) as app:
        job = await app.client.submit("echo", "x" * 100_000, key="once")  # a blob result
        await app.drain()
        assert await app.client.result(job.id) == "x" * 100_000
        assert [page async for page in app.results.names("temporary")] != []
        app.reset()
        assert app.submitted == [] and app.attempts == []
        with pytest.raises(arqd.JobNotFound):
            await app.client.get(job.id)
        assert [page async for page in app.results.names("temporary")] == []
        again = await app.client.submit("echo", "y", key="once")
        assert not again.deduplicated
        await app.drain()
        assert await app.client.result(again.id) == "y"


def test_the_pytest_fixture_gives_an_open_app_with_the_configured_handlers(tmp_path: Path):
    """A user's test file using ``arqd_app`` (with ``arqd_config`` overridden) passes under a
    plain pytest run with the plugin enabled."""
    test_file = tmp_path / "test_user.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import arqd
            import pytest

            pytest_plugins = ["arqd.testing.pytest_plugin"]

            @pytest.fixture
            def arqd_config():
                return arqd.Config.from_dict({"handlers": {"echo": "arqd.demo:echo"}})

            @pytest.mark.asyncio
            async def test_echo(arqd_app):
                job = await arqd_app.client.submit("echo", [1, 2])
                await arqd_app.drain()
                assert await arqd_app.client.result(job.id) == [1, 2]
                assert [a.state for a in arqd_app.attempts] == ["succeeded"]
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
