"""The ``arqd`` command (docs/cli.md).

Client commands talk to a running daemon over HTTP (``--url``/``ARQD_URL``,
``--token``/``ARQD_TOKEN``). Exit status: 0 on success, 1 on a failed job or a refused request,
2 on bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TextIO

import msgspec

from arqd.config import SCOPES, load_config
from arqd.errors import ArqdError, ConfigError
from arqd.http.client import HttpClient
from arqd.http.wire import job_dict
from arqd.model import State
from arqd.view import Job

DEFAULT_URL = "http://127.0.0.1:8080"


def _print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=False))


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("ARQD_CONFIG") or "config.toml")


# --- commands that need no daemon -----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from arqd.daemon import serve

    return serve(_config_path(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config, import its handlers and check its exposure; print every problem,
    one line each, and exit 1 if there is any."""
    from arqd.config import Config, validate_config
    from arqd.daemon import check_step_keys, preflight
    from arqd.handlers import Registry
    from arqd.stores import check_backends

    path = _config_path(args)
    config, found = validate_config(path)
    problems = [str(p) for p in found]
    if config is not None:
        checks: list[Callable[[Config], object]] = [Registry.from_config]
        if not any(p.setting.split(".")[0] in ("server", "auth") for p in found):
            checks.append(preflight)  # exposure needs a valid server and auth: no false alarm
        else:
            checks += [check_backends, check_step_keys]
        for check in checks:
            try:
                check(config)
            except ConfigError as exc:
                problems += str(exc).splitlines()
    for problem in problems:
        print(f"arqd: {problem}", file=sys.stderr)
    if problems or config is None:
        return 1
    print(
        f"{path}: ok ({config.queue.backend} queue, {config.results.backend} results, "
        f"{len(config.handlers)} handlers, concurrency {config.workers.concurrency})"
    )
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        print(f"arqd: --scopes takes a comma list of {', '.join(SCOPES)}", file=sys.stderr)
        return 2
    secret = secrets.token_urlsafe(32)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    print(f"secret (shown once, store it now): {secret}")
    print("add to [auth] tokens in config.toml:")
    print(f'  {{ name = "{args.name}", sha256 = "{digest}", scopes = {json.dumps(scopes)} }}')
    return 0


def cmd_steps_key_new(args: argparse.Namespace) -> int:
    """A fresh Fernet key for ``http_steps.keys``, alone on stdout (so ``$(arqd steps-key
    new)`` works); every daemon sharing a queue needs the same keys."""
    from arqd.steps.keys import new_key

    print(new_key().decode("ascii"))
    return 0


def cmd_init_aws(args: argparse.Namespace) -> int:
    from arqd.stores import init_aws

    try:
        config = load_config(_config_path(args))
        if config.queue.backend != "dynamodb" and config.results.backend != "s3":
            print("arqd: init-aws: the config uses neither dynamodb nor s3", file=sys.stderr)
            return 1
        done = asyncio.run(init_aws(config.queue, config.results))
    except ArqdError as exc:
        print(f"arqd: {exc}", file=sys.stderr)
        return 1
    for line in done or ["nothing to do: the table and bucket exist"]:
        print(line)
    return 0


def cmd_init_db(args: argparse.Namespace) -> int:
    from arqd.stores import init_db

    try:
        config = load_config(_config_path(args))
        if config.queue.backend != "postgres":
            print("arqd: init-db: the config does not use postgres", file=sys.stderr)
            return 1
        done = asyncio.run(init_db(config.queue))
    except ArqdError as exc:
        print(f"arqd: {exc}", file=sys.stderr)
        return 1
    for line in done or ["nothing to do: the schema is up to date"]:
        print(line)
    return 0


# --- client commands ------------------------------------------------------------------------------

ClientCommand = Callable[[HttpClient, argparse.Namespace], Awaitable[int]]


def client_command(fn: ClientCommand) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def go() -> int:
            async with HttpClient(args.url, args.token) as client:
                return await fn(client, args)

        try:
            return asyncio.run(go())
        except ArqdError as exc:
            print(f"arqd: {exc.code}: {exc}", file=sys.stderr)
            return 1
        except TimeoutError:
            print("arqd: timed out", file=sys.stderr)
            return 1

    return run


async def _submit(client: HttpClient, args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload) if args.payload is not None else None
    except json.JSONDecodeError as exc:
        print(f"arqd: --payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    job = await client.submit(
        args.handler, payload, key=args.key, sticky=args.sticky, queue=args.queue, delay=args.delay
    )
    if not args.wait:
        _print_json(job_dict(job))
        return 0
    job = await _follow(client, job, started)
    if job.state is not State.SUCCEEDED:
        _print_json(job_dict(job))
        print(f"arqd: {_why(job)}", file=sys.stderr)
        return 1
    result = await client.result(job.id)
    if isinstance(result, bytes):
        sys.stdout.buffer.write(result)
        _end_stdout(result)
    else:
        _print_json(result)
    return 0


def _why(job: Job) -> str:
    """One line saying why a job did not succeed."""
    if job.state is State.CANCELLED:
        return f"job {job.id} was cancelled"
    error = job.error
    detail = f"{error.type}: {error.message}" if error is not None else "no error recorded"
    return f"job {job.id} failed: {detail}"


async def _follow(client: HttpClient, job: Job, started: float) -> Job:
    """Long-poll the job until it is terminal, showing it on stderr as it goes."""
    with Progress(sys.stderr, job.handler, started) as shown:
        shown.update(job)
        while not job.state.terminal:
            job = await client.poll(job)
            shown.update(job)
    return job


class Progress:
    """What ``submit --wait`` shows on ``out``: on a terminal, one line redrawn in place (a bar
    when the handler reports a fraction, else a spinner, then the message and elapsed time);
    otherwise one line per state the job is seen in, and nothing in between."""

    TICK = 0.1  # seconds between redraws on a terminal (spinner and clock)
    WIDTH = 10  # bar cells

    def __init__(self, out: TextIO, handler: str, started: float) -> None:
        self.out, self.handler, self.started = out, handler, started
        self.tty = out.isatty()
        self.glyphs = _glyphs(out)
        self.job: Job | None = None
        self.frame = 0
        self._ticker: asyncio.Task[None] | None = None

    def __enter__(self) -> Progress:
        if self.tty:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.tty and self.job is not None:
            self._draw()
            self.out.write("\n")
            self.out.flush()

    def update(self, job: Job) -> None:
        seen, self.job = self.job, job
        if self.tty:
            self._draw()
        elif seen is None or seen.state is not job.state:
            self.out.write(self.summary(job) + "\n")
            self.out.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.TICK)
            self.frame += 1
            self._draw()

    def _draw(self) -> None:
        if self.job is None:
            return
        width = shutil.get_terminal_size().columns - 1
        self.out.write("\r" + self.line(self.job)[:width] + "\x1b[K")
        self.out.flush()

    def line(self, job: Job) -> str:
        """The terminal's line: ``progress ▕███▎      ▏  33%  step 2 of 3  0:01`` when the
        handler reports a fraction, else ``sleep ⠹ running  0:01``."""
        fraction, message = _reported(job)
        if fraction is not None:
            head = f"{self._bar(fraction)} {round(fraction * 100):3d}%"
        else:
            spin = self.glyphs.spinner[self.frame % len(self.glyphs.spinner)]
            head = f"{self.glyphs.done if job.state.terminal else spin} {job.state.value}"
        return _joined(f"{self.handler} {head}", message, self._elapsed())

    def summary(self, job: Job) -> str:
        """A line for a log or a pipe: ``progress running  33%  step 2 of 3  0:01``."""
        fraction, message = _reported(job)
        percent = f"{round(fraction * 100)}%" if fraction is not None else None
        return _joined(f"{self.handler} {job.state.value}", percent, message, self._elapsed())

    def _bar(self, fraction: float) -> str:
        g = self.glyphs
        eighths = int(min(max(fraction, 0.0), 1.0) * self.WIDTH * 8)  # a cell fills once done
        full, part = divmod(eighths, 8)
        cells = g.full * full + (g.parts[part] if part else "")
        return f"{g.left}{cells.ljust(self.WIDTH)}{g.right}"

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        hours, rest = divmod(seconds, 3600)
        clock = f"{rest // 60}:{rest % 60:02d}"
        return f"{hours}:{clock.zfill(5)}" if hours else clock


def _reported(job: Job) -> tuple[float | None, str | None]:
    """The fraction and message the handler last reported (a success counts as 100%)."""
    if job.progress is None:
        return None, None
    fraction = job.progress.fraction
    if fraction is not None and job.state is State.SUCCEEDED:
        fraction = 1.0
    return fraction, job.progress.message


def _joined(*parts: str | None) -> str:
    return "  ".join(p for p in parts if p)


class _Glyphs(NamedTuple):
    left: str
    right: str
    full: str
    parts: str  # index i: a cell i/8 full
    spinner: str
    done: str


_UNICODE = _Glyphs("▕", "▏", "█", " ▏▎▍▌▋▊▉", "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏", "•")
_ASCII = _Glyphs("[", "]", "#", "        ", "|/-\\", "*")


def _glyphs(out: TextIO) -> _Glyphs:
    """Block and braille characters where the stream can encode them, ASCII elsewhere."""
    try:
        "".join(_UNICODE).encode(out.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return _ASCII
    return _UNICODE


def _end_stdout(last: bytes) -> None:
    """After bytes written to stdout, ending with ``last``: on a terminal add a newline if they
    lack one (so the prompt starts on its own line); in a pipe or a file add nothing."""
    if sys.stdout.isatty() and not last.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()


async def _status(client: HttpClient, args: argparse.Namespace) -> int:
    _print_json(job_dict(await client.get(args.id)))
    return 0


async def _result(client: HttpClient, args: argparse.Namespace) -> int:
    if args.output:
        with open(args.output, "wb") as out:  # noqa: ASYNC230 -- a CLI: nothing else runs
            async for chunk in client.stream_result(args.id):
                out.write(chunk)
        return 0
    last = b""
    async for chunk in client.stream_result(args.id):
        if chunk:
            sys.stdout.buffer.write(chunk)
            last = chunk
    _end_stdout(last)
    return 0


async def _cancel(client: HttpClient, args: argparse.Namespace) -> int:
    _print_json(job_dict(await client.cancel(args.id)))
    return 0


async def _jobs(client: HttpClient, args: argparse.Namespace) -> int:
    jobs, nxt = await client.list(
        state=args.state, queue=args.queue, limit=args.limit, cursor=args.cursor
    )
    print(f"{'id':32}  {'queue':12} {'handler':16} {'state':10} {'attempts':>8}")
    for j in jobs:
        print(f"{j.id:32}  {j.queue:12} {j.handler:16} {j.state.value:10} {j.attempts:>8}")
    if nxt:
        print(f"(more: --cursor {nxt})")
    return 0


async def _queues(client: HttpClient, args: argparse.Namespace) -> int:
    cols = ("queued", "running", "succeeded", "failed", "cancelled")
    print(f"{'queue':16} " + " ".join(f"{c:>10}" for c in cols) + "  oldest")
    for q in await client.queues():
        age = q.oldest_queued_seconds
        print(
            f"{q.name:16} "
            + " ".join(f"{getattr(q, c):>10}" for c in cols)
            + (f"  {age:.1f}s" if age is not None else "  -")
        )
    return 0


async def _redrive(client: HttpClient, args: argparse.Namespace) -> int:
    count = await client.redrive(args.queue)
    print(f"requeued {count} failed jobs of {args.queue}")
    return 0


async def _purge(client: HttpClient, args: argparse.Namespace) -> int:
    count = await client.purge(args.area)
    print(f"purged {count} results from the {args.area} area")
    return 0


async def _trigger(client: HttpClient, args: argparse.Namespace) -> int:
    _print_json({"group": await client.trigger_group(args.group)})  # the API's answer
    return 0


# --- the parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arqd", description="arqd: an async request queue")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help: str,
        client: bool = False,
        config: bool = False,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=fn)
        if client:
            p.add_argument(
                "--url",
                default=os.environ.get("ARQD_URL", DEFAULT_URL),
                help="daemon URL (env ARQD_URL)",
            )
            p.add_argument(
                "--token",
                default=os.environ.get("ARQD_TOKEN"),
                help="bearer token (env ARQD_TOKEN)",
            )
        if config:
            p.add_argument("-c", "--config", help="config file (env ARQD_CONFIG; config.toml)")
        return p

    add("serve", cmd_serve, "run the daemon: HTTP API and consumer pool", config=True)
    add(
        "check-config",
        cmd_check_config,
        "validate a config file and import its handlers",
        config=True,
    )
    p = add("submit", client_command(_submit), "submit a job", client=True)
    p.add_argument("handler")
    p.add_argument("--payload", help="JSON payload")
    p.add_argument("--key", help="dedupe key")
    p.add_argument("--queue")
    p.add_argument("--delay", type=float, help="seconds before the job may run")
    p.add_argument("--sticky", action="store_true", help="keep the result until purged")
    p.add_argument("--wait", action="store_true", help="show progress, then print the result")
    p = add("status", client_command(_status), "show a job", client=True)
    p.add_argument("id")
    p = add("result", client_command(_result), "print or save a job's result", client=True)
    p.add_argument("id")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p = add("cancel", client_command(_cancel), "cancel a job", client=True)
    p.add_argument("id")
    p = add("jobs", client_command(_jobs), "list jobs, newest first", client=True)
    p.add_argument("--state", choices=[s.value for s in State])
    p.add_argument("--queue")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor", help="the page after this one (the cursor a listing printed)")
    add("queues", client_command(_queues), "show queue counts", client=True)
    p = add("redrive", client_command(_redrive), "requeue a queue's failed jobs", client=True)
    p.add_argument("queue")
    p = add("purge", client_command(_purge), "drop cached results of an area", client=True)
    p.add_argument("--area", required=True, choices=["temporary", "persistent"])
    p = add("trigger", client_command(_trigger), "submit a group defined in config", client=True)
    p.add_argument("group")
    add(
        "init-aws",
        cmd_init_aws,
        "create the DynamoDB table and S3 bucket when missing",
        config=True,
    )
    add("init-db", cmd_init_db, "create or migrate the PostgreSQL schema", config=True)
    token = sub.add_parser("token", help="manage auth tokens").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    p = token.add_parser("new", help="make a token: prints the secret once and its config line")
    p.add_argument("name")
    p.add_argument("--scopes", required=True, help="comma list of submit,read,cancel,admin")
    p.set_defaults(run=cmd_token_new)
    key = sub.add_parser("steps-key", help="manage the keys sealing step secrets").add_subparsers(
        dest="key_command", required=True, metavar="ACTION"
    )
    p = key.add_parser("new", help="print a fresh key for http_steps.keys")
    p.set_defaults(run=cmd_steps_key_new)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))
