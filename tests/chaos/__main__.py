"""The chaos soak: ``python -m tests.chaos --minutes 30
[--backend sqlite|dynamodb|postgres|redis|all] [--seed N]``.

Runs rounds of the CI chaos run back to back until the time is up, alternating backends; each
round has fresh daemons and storage (a fresh table and bucket on one moto server, started here,
for dynamodb; a fresh database on one PostgreSQL cluster, started here, for postgres; a fresh
prefix on one redis-server with AOF, started here, for redis) and a seed drawn from the master
seed, printed so any round can be replayed with
``ARQD_CHAOS_SEED=<round seed> ARQD_CHAOS_SECONDS=<its length> pytest tests/chaos -k <backend>``.
Exit status 0 when no round found a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.servers import PostgresServer

from .analysis import Report
from .driver import DatabaseServer, Settings, redis_for_chaos, run_chaos

ROUND_OVERHEAD = 30.0  # seconds a round spends starting daemons and checking, beyond its chaos
BACKENDS = ("sqlite", "dynamodb", "postgres", "redis")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="The chaos soak: rounds of three daemons under chaos, until the time is up.",
    )
    p.add_argument("--minutes", type=float, default=30.0, help="total soak time (default 30)")
    p.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    p.add_argument("--seed", type=int, default=None, help="master seed (default: random)")
    p.add_argument("--round-minutes", type=float, default=5.0, help="chaos per round (default 5)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    p.add_argument("--keep", action="store_true", help="keep the work dir of passing rounds")
    return p.parse_args(argv)


def total(reports: list[Report]) -> Report:
    """The sum of several rounds' reports."""
    out = Report()
    for r in reports:
        for f in dataclasses.fields(Report):
            value = getattr(r, f.name)
            setattr(out, f.name, getattr(out, f.name) + value)
    return out


async def soak(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="arqd-chaos-"))
    budget = args.minutes * 60
    length = max(20.0, min(args.round_minutes * 60, budget / len(backends) - ROUND_OVERHEAD))
    print(f"chaos soak: seed={seed} minutes={args.minutes:g} backends={backends} dir={workdir}")
    moto, moto_url = None, ""
    if "dynamodb" in backends:
        from tests.conftest import free_port, start_moto

        port = free_port()
        moto, moto_url = start_moto(port), f"http://127.0.0.1:{port}"
    servers: dict[str, DatabaseServer] = {}
    reports: dict[str, list[Report]] = {b: [] for b in backends}
    rounds = 0
    try:
        if "postgres" in backends:
            servers["postgres"] = PostgresServer().start()
        if "redis" in backends:
            servers["redis"] = redis_for_chaos().start()
        deadline = time.monotonic() + budget
        while (left := deadline - time.monotonic() - ROUND_OVERHEAD) >= 20.0 or not rounds:
            backend = backends[rounds % len(backends)]
            rounds += 1
            where = workdir / f"round{rounds}-{backend}"
            where.mkdir(parents=True)
            chaos = max(20.0, min(length, left))
            round_seed = rng.randrange(1_000_000)
            server = servers.get(backend)
            settings = Settings.of(backend, where, round_seed, chaos, moto_url, server)
            print(f"chaos soak: round {rounds} ({backend}, {settings.chaos_seconds:.0f} s)")
            report = await run_chaos(settings)
            reports[backend].append(report)
            if not report.violations and not args.keep:
                shutil.rmtree(where, ignore_errors=True)
    finally:
        if moto is not None:
            moto.stop()
        for running in servers.values():
            running.close()
    failed = 0
    for backend, done in reports.items():
        if done:
            summed = total(done)
            failed += len(summed.violations)
            print(f"chaos soak {backend} ({len(done)} rounds): {summed.details()}")
            print(f"chaos soak {backend}: {summed.summary()}")
    print(total([r for done in reports.values() for r in done]).summary())
    if failed:
        print(f"chaos soak: {failed} violations; work dirs kept under {workdir}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(soak(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
