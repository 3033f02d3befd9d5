"""Log lines: libraries' stdlib logging joins arqd's own lines, one JSON object each."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from arqd import logs


@pytest.fixture
def restored() -> Iterator[None]:
    """``logs.configure`` sets process-wide state: put it back for the other tests."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    arqd_level = logging.getLogger("arqd").level
    yield
    structlog.configure(**saved)
    root.handlers, root.level = handlers, level
    logging.getLogger("arqd").setLevel(arqd_level)


def test_a_librarys_warning_with_a_traceback_is_one_json_line(
    restored: None, capsys: pytest.CaptureFixture[str]
):
    """asyncpg's pool logs its reconnect failures through stdlib logging with a traceback: in
    a JSON log they were many lines of plain text. Now each is one JSON line with its level,
    its traceback as a field and secrets redacted; libraries' info lines stay out; configuring
    again (a reload) adds no second handler."""
    logs.configure("info", "json")
    logs.configure("info", "json")
    lib = logging.getLogger("asyncpg.pool")
    lib.info("chatty")
    try:
        raise ConnectionError("Authorization: Bearer s3cr3t-token refused")
    except ConnectionError:
        lib.warning("Failed to restore the pool connection floor", exc_info=True)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line["level"] == "warning"
    assert line["event"] == "Failed to restore the pool connection floor"
    assert "ConnectionError" in line["exception"]
    assert "s3cr3t-token" not in json.dumps(line)
