"""Cluster-safe schedules: ``[[schedules]]`` with a cron expression (5 fields; or 6, with
``cron_seconds`` saying whether the seconds field comes first or last; croniter) or
``every = "30s"`` (ticks at whole multiples of the interval since the Unix epoch).

Every daemon runs the scheduler. What the cluster has done is kept in the queue backend, one mark
per schedule (``advance_mark``, named ``schedule:<name>``): the latest tick fired. A daemon fires a
tick only while the mark is below it, submits it with the deterministic dedupe key
``schedule:<name>:<tick seconds>`` (so daemons firing at the same moment still store one job,
the others getting ``created=False``), then raises the mark. A tick at or below the mark is never
fired again. Its key is never freed by a failure, cancel or purge, nor expires with its result
(``arqd.outcomes.frees_key``); once its record is deleted, the core raises the mark to the tick
(``Core._retire_ticks``), for a daemon that died between its submit and its mark.
The job's ``ready_at`` is the tick time and its ``meta`` is ``{"schedule": name}``.

Ticks missed while no daemon ran are skipped (``catch_up = "none"``, the default; docs/jobs.md,
Schedules). A schedule the cluster has never seen (no mark) is noted on first sight by setting its
mark to its latest past tick without firing it, so a new schedule never fires a past tick.
``catch_up = "last"`` fires the latest missed tick once, when a daemon starts, and only if the
mark shows that the cluster knew the schedule before that tick; earlier ticks are never replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from croniter import croniter

from arqd.config import Config, ScheduleConfig
from arqd.core import Core
from arqd.errors import ArqdError, ConfigError, InvalidRequest
from arqd.model import JobSpec
from arqd.outcomes import mark_name, tick_key

__all__ = ["Schedule", "Scheduler", "mark_name", "tick_key"]

log = structlog.get_logger("arqd.schedules")


MAX_SLEEP = 1.0  # the loop wakes at least this often, so a reload takes effect quickly


@dataclass
class Schedule:
    config: ScheduleConfig
    last_run: float | None = None  # the latest tick this daemon fired or found fired
    seen: float | None = None  # the latest tick this daemon has dealt with; None: not looked yet

    @property
    def name(self) -> str:
        return self.config.name

    def _zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.config.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"schedules.{self.name}.timezone: {exc}") from None

    def _cron(self, at: float) -> croniter:
        start = datetime.fromtimestamp(at, UTC).astimezone(self._zone())
        return croniter(
            self.config.cron or "", start, second_at_beginning=self.config.seconds_first
        )

    def next_after(self, at: float) -> float:
        if self.config.every is not None:
            step = float(self.config.every)
            return (math.floor(at / step) + 1) * step
        return float(self._cron(at).get_next(float))

    def last_at_or_before(self, at: float) -> float:
        if self.config.every is not None:
            step = float(self.config.every)
            return math.floor(at / step) * step
        if self.next_after(at - 1e-6) == at:
            return at
        return float(self._cron(at).get_prev(float))


class Scheduler:
    """Fires the configured schedules' ticks; ``update()`` swaps them on reload."""

    def __init__(self, core: Core, config: Config) -> None:
        self.core = core
        self._schedules: dict[str, Schedule] = {}
        self._wake = asyncio.Event()
        self.update(config)

    def update(self, config: Config) -> None:
        old = self._schedules
        self._schedules = {
            s.name: Schedule(s, old[s.name].last_run, old[s.name].seen)
            if s.name in old
            else Schedule(s)
            for s in config.schedules
        }
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.fire_due()
            now = self.core.clock.time()
            waits = (s.next_after(now) - now for s in self._schedules.values())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # woken early: the schedules changed
                await asyncio.wait_for(self._wake.wait(), max(0.0, min([MAX_SLEEP, *waits])))

    async def fire_due(self) -> None:
        """Deal with each schedule's latest tick at or before now: look at a schedule this
        daemon has not looked at yet (start, reload), else fire its tick unless the cluster
        did. A backend error leaves the tick to the next round."""
        now = self.core.clock.time()
        for sched in list(self._schedules.values()):
            try:
                if sched.seen is None:
                    await self._first_look(sched, now)
                elif (tick := sched.last_at_or_before(now)) > sched.seen:
                    await self._fire_unless_marked(sched, tick)
            except ArqdError as exc:
                log.warning("schedule.backend_failed", schedule=sched.name, error=str(exc))

    async def _first_look(self, sched: Schedule, now: float) -> None:
        queue = self.core.queue
        latest = sched.last_at_or_before(now)
        mark = await queue.get_mark(mark_name(sched.name))
        if mark is None:  # new to the cluster: its past ticks are not for us to fire
            await queue.advance_mark(mark_name(sched.name), latest)
            log.info("schedule.first_seen", schedule=sched.name, tick=_iso(latest))
        elif mark >= latest:  # the latest tick is already dealt with
            if await queue.find_by_key(tick_key(sched.name, mark)) is not None:
                sched.last_run = mark
        elif sched.config.catch_up == "last":  # known before its latest tick, which was missed
            await self._fire(sched, latest)
            return
        else:
            log.info("schedule.missed", schedule=sched.name, tick=_iso(latest))
        sched.seen = latest

    async def _fire_unless_marked(self, sched: Schedule, tick: float) -> None:
        mark = await self.core.queue.get_mark(mark_name(sched.name))
        if mark is not None and mark >= tick:  # another daemon fired it
            sched.last_run = sched.seen = tick
            return
        await self._fire(sched, tick)

    async def _fire(self, sched: Schedule, tick: float) -> None:
        cfg = sched.config
        spec = JobSpec(
            handler=cfg.handler,
            payload=cfg.payload,
            queue=cfg.queue,
            key=tick_key(cfg.name, tick),
            run_at=datetime.fromtimestamp(tick, UTC),
            meta={"schedule": cfg.name},
        )
        try:
            (stored,) = await self.core.submit([spec], internal=True)
        except InvalidRequest as exc:  # e.g. a handler gone from the registry: skip this tick
            log.error("schedule.fire_failed", schedule=cfg.name, tick=_iso(tick), error=str(exc))
            sched.seen = tick
            return
        await self.core.queue.advance_mark(mark_name(cfg.name), tick)
        sched.last_run = sched.seen = tick
        if stored.created:
            log.info("schedule.fired", schedule=cfg.name, job_id=stored.job.id, tick=_iso(tick))

    def status(self) -> list[dict[str, Any]]:
        now = self.core.clock.time()
        return [
            {
                "name": s.name,
                "cron": s.config.cron,
                "every": float(s.config.every) if s.config.every is not None else None,
                "handler": s.config.handler,
                "timezone": s.config.timezone,
                "last_run": None if s.last_run is None else datetime.fromtimestamp(s.last_run, UTC),
                "next_run": datetime.fromtimestamp(s.next_after(now), UTC),
            }
            for s in self._schedules.values()
        ]


def _iso(tick: float) -> str:
    return datetime.fromtimestamp(tick, UTC).isoformat()
