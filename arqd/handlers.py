"""Handlers: the user's async callables, how they are registered, and what they are given.

A handler is ``async def handler(ctx: arqd.JobContext, payload) -> result``; it is registered by
import path (``"module:function"`` in ``[handlers]``) or with ``@app.handler("name")``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from arqd.errors import ConfigError
from arqd.model import Job, Progress

if TYPE_CHECKING:
    from arqd.config import Config


class Handler(Protocol):
    """An ``async def`` (or async generator, for streamed results) taking ``(ctx, payload)``."""

    def __call__(self, ctx: JobContext, payload: Any, /) -> Awaitable[Any] | AsyncIterator[Any]: ...


@dataclass(frozen=True, slots=True)
class HandlerDef:
    """A registered handler and its per-handler defaults (``None``: use ``[defaults]``)."""

    name: str
    fn: Handler
    timeout: float | None = None
    max_attempts: int | None = None
    cache: bool = False
    sticky: bool = False
    queue: str | None = None


def import_handler(path: str) -> Handler:
    """The callable at ``"module:function"``; :class:`ConfigError` saying why not."""
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # a user's module may raise anything while it loads; say which
        raise ConfigError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]  # checked callable just above


class Registry:
    """Handlers by name. Replaced whole on reload, never mutated while consumers read it."""

    def __init__(self, handlers: dict[str, HandlerDef] | None = None) -> None:
        self._handlers = dict(handlers or {})

    @classmethod
    def from_config(cls, config: Config, extra: dict[str, HandlerDef] | None = None) -> Registry:
        """Import every configured handler; :class:`ConfigError` names, one line each, every
        one that cannot be imported (``<source>: handlers.<name>.call: cannot import ...``)."""
        handlers = dict(extra or {})
        problems: list[str] = []
        for name, h in config.handler_configs().items():
            try:
                fn = import_handler(h.call)
            except ConfigError as exc:
                problems.append(config.problem(f"handlers.{name}.call", str(exc)))
                continue
            handlers[name] = HandlerDef(
                name=name,
                fn=fn,
                timeout=h.timeout,
                max_attempts=h.max_attempts,
                cache=h.cache,
                sticky=h.sticky,
                queue=h.queue,
            )
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(handlers)

    def get(self, name: str) -> HandlerDef | None:
        return self._handlers.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._handlers or name == "arqd.steps"  # built in, run by the pool

    def names(self) -> list[str]:
        return sorted(self._handlers)


def cache_key(handler: str, payload: Any) -> str:
    """The automatic key of a ``cache = true`` handler: the same question gives the same key."""
    canonical = msgspec.json.encode(payload, order="sorted")
    digest = hashlib.sha256(handler.encode() + b"\0" + canonical).hexdigest()
    return f"cache:{handler}:{digest}"[:256]


class JobContext:
    """What a handler gets besides its payload.

    ``cancelled`` is set when someone cancels the running job; the handler is interrupted at its
    next ``await`` too, so cleanup belongs in ``try/finally``.
    """

    __slots__ = ("_cancel_requested", "_cancelled", "_log", "_report", "attempt", "job")

    def __init__(self, job: Job, report: Callable[[Progress], None]) -> None:
        self.job = job
        self.attempt = job.attempts
        self._report = report
        self._log: Any = None
        self._cancelled: asyncio.Event | None = None  # made on first use: most handlers never look
        self._cancel_requested = False

    @property
    def cancelled(self) -> asyncio.Event:
        """Set once someone asked to cancel this job."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
            if self._cancel_requested:
                self._cancelled.set()
        return self._cancelled

    def request_cancel(self) -> None:
        self._cancel_requested = True
        if self._cancelled is not None:
            self._cancelled.set()

    @property
    def log(self) -> Any:
        """A structlog logger bound to this job (built on first use: most handlers never log)."""
        if self._log is None:
            self._log = structlog.get_logger("arqd.handler").bind(
                job_id=self.job.id, handler=self.job.handler, attempt=self.attempt
            )
        return self._log

    async def progress(self, fraction: float | None, message: str | None = None) -> None:
        """Report progress; writes are coalesced to a few per second per job."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._report(Progress(fraction=fraction, message=message))
        await asyncio.sleep(0)
