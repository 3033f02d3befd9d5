"""Run the consumer pool in-process on the repository's config.toml and push a few demo jobs
through it: ``python examples/quickstart.py``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import arqd
from arqd import logs

CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


async def main() -> None:
    config = arqd.load_config(CONFIG)
    logs.configure(config.log.level, config.log.format)
    async with arqd.App(config) as app:
        echo = await app.client.submit("echo", {"hello": "world"})
        blob = await app.client.submit("blob", {"size": 5_000_000})
        prog = await app.client.submit("progress", {"steps": 5, "seconds": 1})
        for job in (echo, blob, prog):
            done = await app.client.wait(job.id, timeout=30)
            print(
                f"{done.handler:9} {done.state.value:10} attempts={done.attempts} "
                f"result={done.result}"
            )
        print("echo says:", await app.client.result(echo.id))


if __name__ == "__main__":
    asyncio.run(main())
