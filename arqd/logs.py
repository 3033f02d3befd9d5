"""Logging with structlog: JSON lines to stdout when not a tty (systemd, containers), readable
console lines otherwise. Event names are stable (``job.succeeded``, ``config.reloaded``) and
secrets are redacted from every line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_state = {"level": logging.INFO}

SECRET_KEYS = re.compile(r"(authorization|token|secret|password|credentials|cookie)", re.I)
BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop the values of secret-looking fields and bearer/basic credentials inside strings."""
    for key, value in list(event.items()):
        if SECRET_KEYS.search(key) and key != "event":
            event[key] = "[redacted]"
        elif isinstance(value, str) and BEARER.search(value):
            event[key] = BEARER.sub(r"\1 [redacted]", value)
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog for the daemon, the CLI and benchmarks; safe to call again on reload."""
    numeric = _LEVELS[level]
    _state["level"] = numeric
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(renderer, numeric)


class _Lines(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure`` puts on the root logger (replaced, never added twice)."""


def _route_stdlib(renderer: Any, numeric: int) -> None:
    """Libraries' stdlib logging (asyncpg's pool, aiohttp's access errors) in the same lines as
    ours, each one line with its traceback as a field: they printed multi-line text into the
    JSON stream. Their warnings and errors only; arqd's own stdlib loggers at ``level``."""
    handler = _Lines(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _Lines)] + [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("arqd").setLevel(numeric)


def enabled(level: int) -> bool:
    """Whether lines of ``level`` are wanted (structlog's default setup logs everything)."""
    return level >= _state["level"]
