"""Cluster-safe schedules: ``[[schedules]]`` with a cron expression (5 fields, or 6 with seconds
first; croniter) or ``every = "30s"`` (ticks at whole multiples of the interval since the Unix
epoch).

Every daemon runs the scheduler. Each tick is submitted with the deterministic dedupe key
``schedule:<name>:<tick seconds>``, so however many daemons fire it, the backend's conditional
write stores exactly one job (the others get ``created=False``). Schedule keys are never freed by
a failure or a cancel (see ``Core.frees_key``), so a daemon that is late cannot run a failed
tick again. The job's ``ready_at`` is the tick time and its ``meta`` is ``{"schedule": name}``.

After downtime, ``catch_up = "last"`` (the default) fires the most recent missed tick once when
the scheduler starts; ``"none"`` skips it. Earlier missed ticks are never replayed.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from croniter import croniter

from arqd.config import Config, ScheduleConfig
from arqd.core import Core
from arqd.errors import ArqdError, ConfigError
from arqd.model import SCHEDULE_KEY, JobSpec

log = structlog.get_logger("arqd.schedules")


MAX_SLEEP = 1.0  # the loop wakes at least this often, so a reload takes effect quickly


def tick_key(name: str, tick: float) -> str:
    return f"{SCHEDULE_KEY}{name}:{round(tick)}"


@dataclass
class Schedule:
    config: ScheduleConfig
    last_run: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def _zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.config.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"schedules.{self.name}.timezone: {exc}") from None

    def _cron(self, at: float) -> croniter:
        expr = self.config.cron or ""
        start = datetime.fromtimestamp(at, UTC).astimezone(self._zone())
        return croniter(expr, start, second_at_beginning=len(expr.split()) == 6)

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
            s.name: Schedule(s, old[s.name].last_run if s.name in old else None)
            for s in config.schedules
        }
        self._wake.set()

    async def run(self) -> None:
        await self._catch_up()
        while True:
            now = self.core.clock.time()
            due = {name: s.next_after(now) for name, s in self._schedules.items()}
            wait = min([MAX_SLEEP, *(t - now for t in due.values())])
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, wait))
                continue  # the schedules changed
            except TimeoutError:
                pass
            now = self.core.clock.time()
            for name, tick in due.items():
                sched = self._schedules.get(name)
                if sched is not None and tick <= now:
                    await self._fire(sched, tick)

    async def _catch_up(self) -> None:
        now = self.core.clock.time()
        for sched in list(self._schedules.values()):
            last = sched.last_at_or_before(now)
            try:
                if await self.core.queue.find_by_key(tick_key(sched.name, last)) is not None:
                    sched.last_run = last
                elif sched.config.catch_up == "last":
                    await self._fire(sched, last)
            except ArqdError as exc:
                log.warning("schedule.catch_up_failed", schedule=sched.name, error=str(exc))

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
        except ArqdError as exc:
            log.error("schedule.fire_failed", schedule=cfg.name, tick=tick, error=str(exc))
            return
        sched.last_run = tick
        if stored.created:
            log.info(
                "schedule.fired",
                schedule=cfg.name,
                job_id=stored.job.id,
                tick=datetime.fromtimestamp(tick, UTC).isoformat(),
            )

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
