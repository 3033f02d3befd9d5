"""What the chaos driver submits: jobs of mixed kinds, each with the result it must end with, and
the local HTTP service that multi-step jobs talk to.

Every submitted spec belongs to a *group*: the submits that must map to one stored job (a fresh
key of its own for most kinds, shared by design for ``keyed`` and ``cached``). Submits carry
their group's key, so a submit retried after a lost answer lands on the same job.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .handlers import expected_inline, payload_bytes

WORK, FAIL, STREAM, CACHED = "chaos_work", "chaos_fail", "chaos_stream", "chaos_cached"
STEP_NAMES = ("reserve", "pay", "confirm")
MAX_ATTEMPTS = 25  # chaos may cost a job several attempts; running out is not what we test

# kind → relative weight in the mix
MIX = {
    "noop": 26,
    "sleep": 18,
    "flaky": 5,
    "keyed": 5,
    "stream": 14,
    "cached": 8,
    "fail": 4,
    "steps": 12,
}
DESIGNED_TO_FAIL = frozenset({"fail", "steps_poison"})


@dataclass
class Group:
    """The submits that must land on one job, and what that job must end as."""

    name: str
    kind: str
    spec: dict[str, Any]
    state: str = "succeeded"
    inline: Any = None  # expected inline result
    digest: str | None = None  # expected sha256 of a blob result
    size: int | None = None
    steps: dict[str, Any] | None = None  # expected multi-step result
    error_type: str | None = None
    error_step: str | None = None
    acked: set[str] = field(default_factory=set)  # job ids answered to its submits
    submits: int = 0
    retried: int = 0  # submits sent again after an error (a failed job frees its key)

    @property
    def designed_to_fail(self) -> bool:
        return self.kind in DESIGNED_TO_FAIL


class Workload:
    """Makes the groups of one run from a seeded RNG; ``next_specs()`` answers the next batch."""

    def __init__(self, rng: random.Random, run: str, remote_url: str) -> None:
        self.rng = rng
        self.run = run
        self.remote_url = remote_url
        self.groups: dict[str, Group] = {}
        self.count = 0
        self._kinds = list(MIX)
        self._weights = [MIX[k] for k in self._kinds]
        self._keyed = [self._keyed_group(k) for k in range(4)]
        self._cached = [self._cached_group(k) for k in range(6)]

    def next_specs(self, size: int) -> list[Group]:
        """``size`` submits (groups may repeat: keyed and cached groups are meant to)."""
        out = []
        for _ in range(size):
            kind = self.rng.choices(self._kinds, self._weights)[0]
            if kind == "keyed":
                group = self.rng.choice(self._keyed)
            elif kind == "cached":
                group = self.rng.choice(self._cached)
            else:
                group = getattr(self, f"_{kind}")(self._next_name())
            self.groups[group.name] = group
            out.append(group)
        return out

    def _next_name(self) -> str:
        self.count += 1
        return f"{self.run}-{self.count}"

    def _spec(
        self, name: str, handler: str, payload: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        return {
            "handler": handler,
            "payload": payload,
            "max_attempts": MAX_ATTEMPTS,
            "meta": {"chaos": name},
            **extra,
        }

    def _work(self, name: str, kind: str, **payload: Any) -> Group:
        body = {"kind": kind, "n": name, **payload}
        spec = self._spec(name, WORK, body, key=f"chaos:{name}")
        return Group(name, kind, spec, inline=expected_inline(body))

    def _noop(self, name: str) -> Group:
        return self._work(name, "noop")

    def _sleep(self, name: str) -> Group:
        return self._work(name, "sleep", sleep=round(self.rng.uniform(0.1, 1.5), 3))

    def _flaky(self, name: str) -> Group:
        return self._work(name, "flaky", flaky=True, sleep=0.05)

    def _keyed_group(self, k: int) -> Group:
        name = f"{self.run}-keyed-{k}"
        body = {"kind": "keyed", "n": name, "sleep": 0.2}
        spec = self._spec(name, WORK, body, key=f"chaos:{name}")
        return Group(name, "keyed", spec, inline=expected_inline(body))

    def _stream(self, name: str) -> Group:
        seed, size = self.rng.randrange(2**31), self.rng.randint(20_000, 400_000)
        body = {"seed": seed, "size": size, "pace": 0.03}
        spec = self._spec(name, STREAM, body, key=f"chaos:{name}")
        return Group(name, "stream", spec, digest=_digest(seed, size), size=size)

    def _cached_group(self, k: int) -> Group:
        name = f"{self.run}-cached-{k}"
        seed, size = self.rng.randrange(2**31), self.rng.randint(2_000, 200_000)
        body = {"seed": seed, "size": size, "sleep": 0.3}
        spec = self._spec(name, CACHED, body)  # its key is the automatic cache key
        return Group(name, "cached", spec, digest=_digest(seed, size), size=size)

    def _fail(self, name: str) -> Group:
        spec = self._spec(name, FAIL, {"n": name}, key=f"chaos:{name}")
        return Group(name, "fail", spec, state="failed", error_type="Fail")

    def _steps(self, name: str) -> Group:
        mode = self.rng.choices(["ok", "flaky", "poison"], [6, 3, 1])[0]
        delay = round(self.rng.uniform(0.0, 0.8), 3)
        steps = []
        for step in STEP_NAMES:
            query = f"?mode={mode}&delay={delay}" if step == "pay" else ""
            entry: dict[str, Any] = {
                "name": step,
                "method": {"reserve": "PUT", "pay": "POST", "confirm": "GET"}[step],
                "url": f"{self.remote_url}/{name}/{step}{query}",
                "retry_exponent": 1.0,
                "timeout": 10,
            }
            if step != "confirm":
                entry["body"] = {"tag": name, "step": step}
            steps.append(entry)
        spec = {
            "steps": steps,
            "key": f"chaos:{name}",
            "max_attempts": MAX_ATTEMPTS,
            "meta": {"chaos": name},
        }
        if mode == "poison":
            return Group(
                name,
                "steps_poison",
                spec,
                state="failed",
                error_type="StepFailed",
                error_step="pay",
            )
        expected = {s: {"status": 200, "body": _remote_body(name, s)} for s in STEP_NAMES}
        return Group(name, f"steps_{mode}", spec, steps=expected)


def _digest(seed: int, size: int) -> str:
    return hashlib.sha256(payload_bytes(seed, size)).hexdigest()


def _remote_body(tag: str, step: str) -> dict[str, Any]:
    return {"tag": tag, "step": step}


# --- the service multi-step jobs call -------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request a multi-step job made: which step of which job, when, the status answered
    and the pid of the daemon that sent it (None when it could not be told)."""

    tag: str
    step: str
    t: float
    status: int
    pid: int | None


class Remote:
    """An aiohttp server on 127.0.0.1: ``/{tag}/{step}`` answers ``{"tag", "step"}``; the ``pay``
    step answers 400 in mode ``poison`` and 503 to its first call in mode ``flaky``, after
    ``delay`` seconds. ``pids()`` names the daemons, to tell which one sent each request."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self.pids = pids
        self.calls: list[Call] = []
        self._seen: Counter[tuple[str, str]] = Counter()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tag}/{step}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        tag, step = request.match_info["tag"], request.match_info["step"]
        arrived = time.time()
        pid = self._sender(request)
        await request.read()
        delay = float(request.query.get("delay", 0))
        if delay:
            await asyncio.sleep(delay)
        mode = request.query.get("mode", "ok")
        self._seen[tag, step] += 1
        status = 200
        if step == "pay" and mode == "poison":
            status = 400
        elif step == "pay" and mode == "flaky" and self._seen[tag, step] == 1:
            status = 503
        self.calls.append(Call(tag, step, arrived, status, pid))
        return web.json_response(_remote_body(tag, step), status=status)

    def _sender(self, request: web.Request) -> int | None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer:
            return None
        try:
            return peer_pid(int(peer[1]), self.port, list(self.pids()))
        except OSError:
            return None


def peer_pid(client_port: int, server_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the client end of the loopback TCP connection from
    ``client_port`` to ``server_port`` (Linux ``/proc``; None elsewhere or when gone)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                local, remote = parts[1], parts[2]
                if (
                    int(local.rsplit(":", 1)[1], 16) == client_port
                    and int(remote.rsplit(":", 1)[1], 16) == server_port
                ):
                    inode = parts[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None
