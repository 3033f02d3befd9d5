"""Three ``arqd serve`` daemons on one backend, and the chaos dealt to them.

A *slot* is one daemon position; each (re)start is a new *incarnation* (its own pid, config
file and log file). For the dynamodb run each slot talks to moto through a fault proxy of its
own, so a fault is known to have hit that slot's daemon. For the postgres and redis runs the
chaos also restarts the database server (a clean shutdown, or a crash) and freezes it (SIGSTOP of
all its processes: a failover-like stall); that disrupts every daemon at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from tests.daemons import Daemon
from tests.faultproxy import FaultProxy, Faults

from .analysis import Disruption
from .handlers import RECORD_ENV

AWS_REGION = "us-east-1"
AWS_KEY = "testing"  # moto takes any credentials; these never leave the machine
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": AWS_KEY,
    "AWS_SECRET_ACCESS_KEY": AWS_KEY,
    "AWS_DEFAULT_REGION": AWS_REGION,
}
BASELINE_FAULTS = Faults(throttle=0.01, unavailable=0.005, drop=0.003, lose=0.003)
BURST_FAULTS = Faults(throttle=0.15, unavailable=0.1, drop=0.05, lose=0.05)
CONCURRENCIES = (2, 3, 4, 6)
BROKEN = ("syntax", "invalid", "handler")
ACTION_LIMIT = 30.0  # seconds any one step of a chaos action may take before it is a problem
START_LIMIT = 60.0  # seconds a daemon may take from listening to ready
READY_AGAIN_LIMIT = 30.0  # seconds a running daemon may take to be ready once its server is back
# How the chaos may stop each kind of server: a clean shutdown, or a crash (nothing flushed).
SERVER_STOPS = {
    "postgres": {"fast": signal.SIGINT, "immediate": signal.SIGQUIT},
    "redis": {"clean": signal.SIGTERM, "crash": signal.SIGKILL},
}


@dataclass(frozen=True)
class Backend:
    """Where the three daemons keep their jobs and results."""

    kind: str  # "sqlite", "dynamodb", "postgres" or "redis"
    workdir: Path
    name: str = ""  # the dynamodb table and s3 bucket; the postgres database and schema; the prefix
    moto_url: str = ""
    url: str = ""  # postgres: the run's own database; redis: the server
    visibility_timeout: float = 2.0
    poll_max: str = "100ms"


def config_text(
    backend: Backend,
    *,
    endpoint: str,
    concurrency: int,
    remote_port: int,
    steps_key: str,
    broken: str | None = None,
) -> str:
    """One daemon's config; ``broken`` makes it fail validation in one of three ways (and ask for
    another concurrency, so a partly applied reload would show)."""
    work = "tests.chaos.handlers:missing" if broken == "handler" else "tests.chaos.handlers:work"
    vt = "soon" if broken == "invalid" else f"{backend.visibility_timeout:g}s"
    if broken:
        concurrency += 5
    files = f"""[results]
path = "{backend.workdir / "results"}"
inline_max = "1KiB"
"""
    if backend.kind == "sqlite":
        storage = f"""[queue]
backend = "sqlite"
path = "{backend.workdir / "q.sqlite3"}"

{files}"""
    elif backend.kind in SERVER_STOPS:  # on a database server: postgres, redis
        where = "dsn" if backend.kind == "postgres" else "url"
        named = "schema" if backend.kind == "postgres" else "prefix"
        storage = f"""[queue]
backend = "{backend.kind}"
{where} = "{backend.url}"
{named} = "{backend.name}"

{files}"""
    else:
        storage = f"""[queue]
backend = "dynamodb"
table = "{backend.name}"
region = "{AWS_REGION}"
endpoint_url = "{endpoint}"
shards = 1

[results]
backend = "s3"
bucket = "{backend.name}"
region = "{AWS_REGION}"
endpoint_url = "{endpoint}"
inline_max = "1KiB"
"""
    text = f"""[server]
listen = "127.0.0.1:0"

{storage}
[workers]
concurrency = {concurrency}
visibility_timeout = "{vt}"
heartbeat = "400ms"
shutdown_grace = "1s"
poll_max = "{backend.poll_max}"

[defaults]
max_attempts = 25
backoff = {{ base = "50ms", max = "300ms" }}

[handlers]
chaos_work = "{work}"
chaos_fail = "tests.chaos.handlers:fail"
chaos_stream = "tests.chaos.handlers:stream"
chaos_cached = {{ call = "tests.chaos.handlers:cached", cache = true }}

[http_steps]
allow_hosts = ["127.0.0.1:{remote_port}"]
key = "{steps_key}"

[log]
level = "info"
format = "json"
"""
    if broken == "syntax":
        text += "\n[workers\nconcurrency = = 3\n"
    return text


def write_atomically(path: Path, text: str) -> None:
    """A daemon re-reading its config on SIGHUP never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ChaosProxy(FaultProxy):
    """A fault proxy that also remembers when each fault was dealt, and slow answers."""

    def __init__(self, upstream: str, faults: Faults, seed: int) -> None:
        super().__init__(upstream, faults, seed)
        self.times: list[float] = []
        self.slow: list[tuple[float, float, str]] = []  # (start, seconds, operation) over 0.5 s

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        start = time.time()
        try:
            return await super()._handle(request)
        finally:
            took = time.time() - start
            if took >= 0.5:
                op = request.headers.get("X-Amz-Target", request.method + " s3").rpartition(".")[2]
                self.slow.append((start, took, op))

    def _fate(self, request: web.Request, body: bytes) -> str | None:
        fate = super()._fate(request, body)
        if fate is not None:
            self.times.append(time.time())
        return fate


class Server(Protocol):
    """A database server the tests start (``tests/servers.py``: PostgreSQL, Redis)."""

    def stop(self, sig: signal.Signals, /) -> None: ...
    def start(self) -> object: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def restore(self) -> None: ...


class ServerChaos:
    """The database server the daemons share (``kind`` names its stops in ``SERVER_STOPS``),
    stopped, started, frozen and resumed from threads (each call blocks), one call at a time: an
    operation a cancelled task left running in its thread ends before :meth:`restore` looks."""

    def __init__(self, server: Server, kind: str) -> None:
        self.server = server
        self.stops = SERVER_STOPS[kind]
        self._lock = threading.Lock()

    def stop(self, mode: str) -> None:
        with self._lock:
            self.server.stop(self.stops[mode])

    def start(self) -> None:
        with self._lock:
            self.server.start()

    def pause(self) -> None:
        with self._lock:
            self.server.pause()

    def resume(self) -> None:
        with self._lock:
            self.server.resume()

    def restore(self) -> None:
        """Up and accepting logins, whatever the chaos left it in."""
        with self._lock:
            self.server.restore()


@dataclass
class Incarnation:
    slot: int
    daemon: Daemon
    pid: int
    worker: str
    ended: tuple[str, float] | None = None  # (kill | term | final, when)


@dataclass
class Slot:
    index: int
    cluster: Cluster
    concurrency: int
    status: str = "down"  # up | paused | stopping | down
    busy: bool = False
    proxy: ChaosProxy | None = None
    incarnations: list[Incarnation] = field(default_factory=list)

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    @property
    def url(self) -> str:
        return self.current.daemon.url

    def config(self, concurrency: int | None = None, broken: str | None = None) -> str:
        c = self.cluster
        endpoint = self.proxy.url if self.proxy is not None else ""
        return config_text(
            c.backend,
            endpoint=endpoint,
            concurrency=self.concurrency if concurrency is None else concurrency,
            remote_port=c.remote_port,
            steps_key=c.steps_key,
            broken=broken,
        )

    async def start(self) -> Incarnation:
        c = self.cluster
        name = f"s{self.index}g{len(self.incarnations)}"
        env = {RECORD_ENV: str(c.record_path), **AWS_ENV}
        daemon = Daemon(c.backend.workdir, self.config(), name, env)
        c.spawned.append(daemon)
        # In threads: the fault proxies and the remote service run on this event loop. Ready
        # may take long on a loaded machine, or while the backend answers with faults.
        try:
            await asyncio.to_thread(daemon.start, "daemon.listening")
            ready = await asyncio.to_thread(daemon.wait_log, "daemon.ready", START_LIMIT)
        except BaseException:
            daemon.kill()  # never a daemon the verdict does not know of
            raise
        assert daemon.proc is not None
        inc = Incarnation(self.index, daemon, daemon.proc.pid, ready["worker"])
        self.incarnations.append(inc)
        self.status = "up"
        return inc


class Cluster:
    """The slots, the record file and the keys they share."""

    def __init__(
        self,
        backend: Backend,
        remote_port: int,
        steps_key: str,
        size: int = 3,
        server: ServerChaos | None = None,
    ) -> None:
        self.backend = backend
        self.remote_port = remote_port
        self.steps_key = steps_key
        self.server = server  # the database server, which the chaos restarts and freezes
        self.record_path = backend.workdir / "executions.jsonl"
        self.spawned: list[Daemon] = []  # every process started, ready or not
        self._proxies_open = False
        self.slots = [Slot(i, self, CONCURRENCIES[i % len(CONCURRENCIES)]) for i in range(size)]

    async def calm(self) -> list[str]:
        """Chaos over: no more faults, a daemon running in every slot. Answers problems seen:
        a daemon that exited by itself (a crash), a slot left without one."""
        problems = []
        for slot in self.slots:
            if slot.proxy is not None:
                slot.proxy.faults = Faults()
            inc = slot.current
            assert inc.daemon.proc is not None
            if inc.ended is None and inc.daemon.proc.poll() is not None:
                problems.append(f"slot {slot.index} pid {inc.pid} exited by itself")
                inc.ended = ("crash", time.time())
                slot.status = "down"
            if slot.status == "down":
                try:
                    await slot.start()
                except Exception as exc:
                    problems.append(f"slot {slot.index}: no daemon would start: {exc}"[:3000])
        return problems

    def running_pids(self) -> set[int]:
        """The pids running a recorded handler now (a start line without its end)."""
        open_: set[tuple[str, float, int]] = set()
        text = self.record_path.read_text() if self.record_path.exists() else ""
        for raw in text.splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue
            key = (rec["job"], rec["lease"], rec["pid"])
            if rec["ev"] == "start":
                open_.add(key)
            else:
                open_.discard(key)
        return {pid for _, _, pid in open_}

    def pids(self) -> list[int]:
        return [inc.pid for s in self.slots for inc in s.incarnations if inc.ended is None]

    def up(self) -> list[Slot]:
        return [s for s in self.slots if s.status == "up"]

    def faults(self) -> int:
        return sum(len(s.proxy.times) for s in self.slots if s.proxy is not None)

    async def start(self, seed: int) -> None:
        if self.backend.kind == "dynamodb":
            for s in self.slots:
                s.proxy = ChaosProxy(self.backend.moto_url, BASELINE_FAULTS, seed + s.index)
                await s.proxy.__aenter__()
                self._proxies_open = True
        for s in self.slots:
            await s.start()

    async def stop(self) -> None:
        """SIGTERM every daemon still running and wait for it; kill what does not stop."""
        for s in self.slots:
            if s.incarnations and s.current.ended is None:
                inc = s.current
                proc = inc.daemon.proc
                assert proc is not None
                if s.status == "paused":
                    proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                inc.ended = ("final", time.time())
        for s in self.slots:
            for inc in s.incarnations:
                proc = inc.daemon.proc
                if proc is not None and proc.poll() is None:
                    try:
                        await asyncio.to_thread(proc.wait, 30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            s.status = "down"
        if self._proxies_open:
            self._proxies_open = False
            for s in self.slots:
                if s.proxy is not None:  # closed, but kept: the verdict reads its counts
                    await s.proxy.__aexit__(None, None, None)

    def kill_all(self) -> None:
        for daemon in self.spawned:
            daemon.kill()


# --- chaos ----------------------------------------------------------------------------------------

DISRUPTIVE = frozenset({"kill", "term", "pause"})
SERVER_ACTIONS = frozenset({"server_restart", "server_pause"})  # on no slot: every daemon's


@dataclass(frozen=True)
class Action:
    kind: str
    slot: int  # -1: the server's
    params: dict[str, Any]


class Chaos:
    """Deals seeded chaos to the cluster until told to stop: kill -9 and restart, SIGTERM and
    restart, SIGSTOP past the visibility timeout then SIGCONT, SIGHUP with a changed config,
    SIGHUP with a broken one, (dynamodb) bursts of backend faults on one daemon's proxy, and
    (postgres, redis) restarts and freezes of the server, one at a time. Everything random is
    drawn in the dealing loop, so a seed replays the same schedule."""

    def __init__(self, cluster: Cluster, rng: random.Random, gap: tuple[float, float]) -> None:
        self.cluster = cluster
        self.rng = rng
        self.gap = gap
        self.kinds = ["kill", "term", "pause", "reload", "bad_reload"]
        if cluster.backend.kind == "dynamodb":
            self.kinds.append("burst")
        if cluster.server is not None:
            self.kinds += sorted(SERVER_ACTIONS)
        self.weights = {"kill": 5, "term": 3, "pause": 4, "reload": 3, "bad_reload": 2, "burst": 3}
        self.weights.update(server_restart=2, server_pause=2)
        self.server_busy = False
        self.stopped: set[str] = set()  # the ways the server has been stopped
        self.disruptions: list[Disruption] = []
        self.problems: list[str] = []
        self.reloads = 0
        self.bad_reloads = 0
        self.log: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, seconds: float) -> None:
        """Deal chaos for ``seconds``; each kind at least once first (in seeded order), and a
        server restart once for each way of stopping it (a clean shutdown and a crash)."""
        kinds = list(self.kinds)
        if self.cluster.server is not None:
            kinds += ["server_restart"] * (len(self.cluster.server.stops) - 1)
        first = self.rng.sample(kinds, len(kinds))
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(*self.gap))
            kind = first[0] if first else self._draw()
            action = self._plan(kind)
            if action is None:
                continue
            if first:
                first.pop(0)
            slot = self.cluster.slots[action.slot] if action.slot >= 0 else None
            self._take(slot, True)
            self.log.append(f"{time.time():.3f} {action.kind} slot {action.slot} {action.params}")
            task = asyncio.create_task(self._act(action, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self.settle()

    async def settle(self) -> None:
        """Let every action in flight finish (restarts done, pauses resumed)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def abort(self) -> None:
        """Cancel every action in flight (a run that failed); the caller restores the rest."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _take(self, slot: Slot | None, busy: bool) -> None:
        if slot is None:
            self.server_busy = busy
        else:
            slot.busy = busy

    def _draw(self) -> str:
        return self.rng.choices(self.kinds, [self.weights[k] for k in self.kinds])[0]

    def _plan(self, kind: str) -> Action | None:
        """An action on a free slot, with every random parameter drawn now; None when no slot
        may take it (a disruption must leave another daemon up)."""
        if kind in SERVER_ACTIONS:
            return self._plan_server(kind)
        free = [s for s in self.cluster.slots if s.status == "up" and not s.busy]
        if kind in DISRUPTIVE:
            free = [
                s for s in free if any(o.status == "up" for o in self.cluster.slots if o is not s)
            ]
        if not free:
            return None
        if kind in DISRUPTIVE:  # hit a daemon in the middle of a job when there is one
            running = self.cluster.running_pids()
            free = [s for s in free if s.current.pid in running] or free
        slot = self.rng.choice(free)
        vt = self.cluster.backend.visibility_timeout
        params: dict[str, Any] = {"down": round(self.rng.uniform(0.0, 1.0), 3)}
        if kind == "pause":
            params["seconds"] = round(vt + self.rng.uniform(0.5, 1.5), 3)
        elif kind == "reload":
            choices = [c for c in CONCURRENCIES if c != slot.concurrency]
            params["concurrency"] = self.rng.choice(choices)
        elif kind == "bad_reload":
            params["broken"] = self.rng.choice(BROKEN)
        elif kind == "burst":
            params["seconds"] = round(self.rng.uniform(1.0, 3.0), 3)
        return Action(kind, slot.index, params)

    def _plan_server(self, kind: str) -> Action | None:
        """A restart (a clean or a crash stop, then down a moment) or a freeze of a few
        seconds, beyond the visibility timeout; None while the last one is not over."""
        if self.server_busy:
            return None
        if kind == "server_restart":
            assert self.cluster.server is not None
            stops = sorted(self.cluster.server.stops)
            mode = self.rng.choice([m for m in stops if m not in self.stopped] or stops)
            self.stopped.add(mode)
            return Action(kind, -1, {"mode": mode, "down": round(self.rng.uniform(0.2, 1.5), 3)})
        vt = self.cluster.backend.visibility_timeout
        return Action(kind, -1, {"seconds": round(vt + self.rng.uniform(0.5, 2.5), 3)})

    def _others(self, slot: Slot) -> list[Slot]:
        return [o for o in self.cluster.slots if o is not slot]

    async def _act(self, action: Action, slot: Slot | None) -> None:
        try:
            async with asyncio.timeout(4 * ACTION_LIMIT):
                await getattr(self, f"_{action.kind}")(slot, action.params)
        except Exception as exc:  # a chaos step that went wrong is a finding, not a crash
            self.problems.append(f"{action}: {type(exc).__name__}: {exc}"[:3000])
            if slot is None:
                assert self.cluster.server is not None
                await asyncio.to_thread(self.cluster.server.restore)
            else:
                await self._recover(slot)
        finally:
            self._take(slot, False)

    async def _recover(self, slot: Slot) -> None:
        """After a failed action: make sure the slot runs a daemon again (``Cluster.calm``
        tries again at the end of the chaos)."""
        proc = slot.current.daemon.proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        if proc.poll() is None and slot.status != "down":
            slot.status = "up"
            return
        slot.status = "down"
        with contextlib.suppress(Exception):
            await slot.start()

    async def _kill(self, slot: Slot, params: dict[str, Any]) -> None:
        inc = slot.current
        assert inc.daemon.proc is not None
        slot.status = "down"
        t = time.time()
        inc.daemon.proc.kill()
        await asyncio.to_thread(inc.daemon.proc.wait, ACTION_LIMIT)
        inc.ended = ("kill", t)
        self.disruptions.append(Disruption("kill", slot.index, inc.pid, t, t))
        await asyncio.sleep(params["down"])
        await slot.start()

    async def _term(self, slot: Slot, params: dict[str, Any]) -> None:
        inc = slot.current
        proc = inc.daemon.proc
        assert proc is not None
        slot.status = "stopping"
        t = time.time()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, ACTION_LIMIT)
        end = time.time()
        inc.ended = ("term", end)
        self.disruptions.append(Disruption("term", slot.index, inc.pid, t, end))
        if code != 0 or not inc.daemon.events("daemon.stopped"):
            self.problems.append(f"slot {slot.index} pid {inc.pid}: SIGTERM exit {code}")
        slot.status = "down"
        await asyncio.sleep(params["down"])
        await slot.start()

    async def _pause(self, slot: Slot, params: dict[str, Any]) -> None:
        inc = slot.current
        proc = inc.daemon.proc
        assert proc is not None
        slot.status = "paused"
        t0 = time.time()
        proc.send_signal(signal.SIGSTOP)
        try:
            stalls = False
            if self.cluster.backend.kind == "sqlite":
                stalls = await asyncio.to_thread(holds_write_lock, self.cluster.backend.workdir)
            await asyncio.sleep(max(0.0, t0 + params["seconds"] - time.time()))
        finally:
            t1 = time.time()  # before SIGCONT: every line the daemon logs after is later
            proc.send_signal(signal.SIGCONT)
            slot.status = "up"
        self.disruptions.append(Disruption("pause", slot.index, inc.pid, t0, t1, stalls))

    async def _burst(self, slot: Slot, params: dict[str, Any]) -> None:
        proxy = slot.proxy
        assert proxy is not None
        before = len(proxy.times)
        t0 = time.time()
        proxy.faults = BURST_FAULTS
        try:
            await asyncio.sleep(params["seconds"])
        finally:
            proxy.faults = BASELINE_FAULTS
        t1 = time.time()
        dealt = len(proxy.times) - before
        self.disruptions.append(Disruption("burst", slot.index, None, t0, t1, faults=dealt))

    async def _server_restart(self, _: None, params: dict[str, Any]) -> None:
        """Stop the server (every daemon's connections cut), leave it down a moment, start it
        (after a crash: recovery first, from its WAL or AOF); every daemon must be ready
        again."""
        server = self.cluster.server
        assert server is not None
        t0 = time.time()
        try:
            await asyncio.to_thread(server.stop, params["mode"])
            await asyncio.sleep(params["down"])
            await asyncio.to_thread(server.start)
        finally:
            t1 = time.time()  # accepting logins again (or failed to: a problem, restored)
            self.disruptions.append(Disruption("server_restart", -1, None, t0, t1, True))
        await self._expect_ready(t1)

    async def _server_pause(self, _: None, params: dict[str, Any]) -> None:
        """Freeze the server (connections open, nothing answers) past the visibility timeout,
        then resume it; every daemon must be ready again."""
        server = self.cluster.server
        assert server is not None
        t0 = time.time()
        try:
            await asyncio.to_thread(server.pause)
            await asyncio.sleep(max(0.0, t0 + params["seconds"] - time.time()))
        finally:
            t1 = time.time()
            await asyncio.to_thread(server.resume)
            self.disruptions.append(Disruption("server_pause", -1, None, t0, t1, True))
        await self._expect_ready(t1)

    async def _expect_ready(self, since: float) -> None:
        """Every daemon running when the server came back answers ``/readyz`` 200 in time (a
        daemon paused meanwhile once it is resumed; one killed or stopped is not waited for)."""
        waiting = {s.index: s.current for s in self.cluster.slots if s.status in ("up", "paused")}
        deadline = time.monotonic() + READY_AGAIN_LIMIT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while waiting and time.monotonic() < deadline:
                for index, inc in list(waiting.items()):
                    slot = self.cluster.slots[index]
                    gone = inc is not slot.current or inc.ended is not None
                    if gone or slot.status == "down":
                        del waiting[index]  # killed or stopped meanwhile: not waited for
                        continue
                    if slot.status == "up" and await _ready(http, inc.daemon.url):
                        del waiting[index]
                if waiting:
                    await asyncio.sleep(0.2)
        for index, inc in waiting.items():
            self.problems.append(
                f"slot {index} pid {inc.pid}: not ready {READY_AGAIN_LIMIT:g} s after the "
                f"server came back at {since:.3f}"
            )

    async def _reload(self, slot: Slot, params: dict[str, Any]) -> None:
        inc = slot.current
        new = params["concurrency"]
        done = len(inc.daemon.events("config.reloaded"))
        write_atomically(inc.daemon.config_path, slot.config(new))
        inc.daemon.signal(signal.SIGHUP)
        line = await asyncio.to_thread(
            inc.daemon.wait_log, "config.reloaded", ACTION_LIMIT, done + 1
        )
        slot.concurrency = new
        self.reloads += 1
        if line.get("concurrency") != new:
            self.problems.append(f"slot {slot.index}: reload to {new} logged {line}")
        await self._expect_concurrency(slot, inc, new, time.time())

    async def _bad_reload(self, slot: Slot, params: dict[str, Any]) -> None:
        inc = slot.current
        failed = len(inc.daemon.events("config.reload_failed"))
        applied = len(inc.daemon.events("config.reloaded"))
        write_atomically(inc.daemon.config_path, slot.config(broken=params["broken"]))
        inc.daemon.signal(signal.SIGHUP)
        await asyncio.to_thread(
            inc.daemon.wait_log, "config.reload_failed", ACTION_LIMIT, failed + 1
        )
        after = time.time()
        write_atomically(inc.daemon.config_path, slot.config())  # the good file again
        self.bad_reloads += 1
        assert inc.daemon.proc is not None
        if inc.daemon.proc.poll() is not None:
            self.problems.append(f"slot {slot.index}: a broken config stopped the daemon")
            return
        if len(inc.daemon.events("config.reloaded")) != applied:
            self.problems.append(f"slot {slot.index}: a broken config ({params}) was applied")
        await self._expect_concurrency(slot, inc, slot.concurrency, after)

    async def _expect_concurrency(
        self, slot: Slot, inc: Incarnation, expected: int, after: float
    ) -> None:
        """The daemon's worker row, refreshed after ``after``, shows ``expected`` consumers."""
        deadline = time.monotonic() + ACTION_LIMIT
        seen: Any = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while time.monotonic() < deadline:
                seen = await _worker_row(http, inc.daemon.url, inc.worker)
                if seen is not None and _when(seen["last_seen"]) > after:
                    if seen["concurrency"] != expected:
                        break
                    return
                await asyncio.sleep(0.2)
        self.problems.append(
            f"slot {slot.index} pid {inc.pid}: expected concurrency {expected} after a reload "
            f"at {after:.3f}, worker row {seen}"
        )


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/readyz") as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def _worker_row(http: aiohttp.ClientSession, url: str, worker: str) -> Any:
    try:
        async with http.get(f"{url}/v1/workers") as resp:
            if resp.status != 200:
                return None
            rows = (await resp.json())["workers"]
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    return next((r for r in rows if r["id"] == worker), None)


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def holds_write_lock(workdir: Path, tries: int = 3) -> bool:
    """Whether some process holds the shared sqlite file's write lock for a while (three
    ``BEGIN IMMEDIATE`` of 0.3 s each all refused): a daemon stopped mid-transaction."""
    conn = sqlite3.connect(workdir / "q.sqlite3", timeout=0.3, isolation_level=None)
    try:
        for _ in range(tries):
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                continue
            conn.execute("ROLLBACK")
            return False
        return True
    finally:
        conn.close()
