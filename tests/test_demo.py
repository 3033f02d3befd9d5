"""The demo handlers check their inputs: a bad one fails the job at once with a message naming
the field, and never reaches ``asyncio.sleep`` or memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import arqd
from arqd import demo
from arqd.config import Config

BAD = [
    ("sleep", {"seconds": float("nan")}, "seconds"),
    ("sleep", {"seconds": "nan"}, "seconds"),
    ("sleep", {"seconds": float("inf")}, "seconds"),
    ("sleep", {"seconds": 1e308}, "seconds"),
    ("sleep", {"seconds": -1}, "seconds"),
    ("sleep", {"seconds": True}, "seconds"),
    ("sleep", {"seconds": "2"}, "seconds"),
    ("sleep", [1, 2], "payload"),
    ("progress", {"steps": 0}, "steps"),
    ("progress", {"steps": 10**9}, "steps"),
    ("progress", {"steps": 2.5}, "steps"),
    ("progress", {"seconds": float("nan")}, "seconds"),
    ("progress", {"seconds": "inf"}, "seconds"),
    ("blob", {"size": -1}, "size"),
    ("blob", {"size": 1 << 40}, "size"),
    ("blob", {"size": 64 << 20, "stream": False}, "size"),
    ("blob", {"size": float("nan")}, "size"),
    ("blob", {"stream": "no"}, "stream"),
    ("fail", {"message": {"a": 1}}, "message"),
    ("fail", {"permanent": "yes"}, "permanent"),
]


@pytest.mark.parametrize(("handler", "payload", "field"), BAD)
async def test_bad_input_fails_the_job_naming_the_field(handler: str, payload: Any, field: str):
    """Each bad input raises arqd.Fail (the job fails at once, no retry) naming the field."""
    fn = getattr(demo, handler)
    with pytest.raises(arqd.Fail, match=field):
        await fn(None, payload)


async def test_nan_sleep_fails_at_once_in_a_pool(tmp_path: Path):
    """Submitted to a pool, ``sleep`` with NaN seconds ends failed on its first attempt with a
    clear message; valid inputs still work."""
    config = Config.from_dict(
        {
            "queue": {"backend": "memory"},
            "results": {"backend": "files", "path": str(tmp_path / "results")},
            "handlers": {"sleep": "arqd.demo:sleep"},
        }
    )
    async with arqd.App(config) as app:
        bad = await app.client.submit("sleep", {"seconds": "nan"}, max_attempts=5)
        good = await app.client.submit("sleep", {"seconds": 0.01})
        failed = await app.client.wait(bad.id, timeout=10)
        ok = await app.client.wait(good.id, timeout=10)
    assert failed.state == "failed" and failed.attempts == 1 and failed.error is not None
    assert failed.error.type == "Fail" and "seconds" in failed.error.message
    assert ok.state == "succeeded"
    assert await app.client.result(good.id) == {"slept": 0.01}
