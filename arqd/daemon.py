"""``arqd serve``: the HTTP control API next to the consumer pool, run as a Unix service.

- Starts: load and validate the config, open the backends, start the pool, listen, then tell
  systemd ``READY=1``.
- SIGHUP: re-read the config. A valid one is applied without dropping in-flight jobs (handlers,
  workers, defaults, groups, schedules, auth, http_steps, log); changed ``server``, ``queue`` or
  ``results`` settings need a restart, which the reload says while keeping the running values.
  An invalid one, or one that fails a start check (``preflight``) against the listen address in
  force, is refused with the reason logged, and the running config stays in force.
- SIGTERM / SIGINT: stop leasing, let running jobs finish for ``workers.shutdown_grace``, then
  interrupt and release them (another daemon takes them at once), exit 0. A second signal skips
  the wait.
- A background task that keeps crashing (``task.gave_up``, see ``arqd/supervise.py``): stop as
  on SIGTERM, then exit 1, so systemd (``Restart=on-failure``) starts a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog
from aiohttp import web

from arqd import logs, malloc, systemd
from arqd.app import App
from arqd.config import Config, load_config
from arqd.errors import ArqdError, ConfigError
from arqd.gcpolicy import CollectorPolicy
from arqd.handlers import Registry
from arqd.http.server import STATE, ServerState, make_app
from arqd.steps import check_keys
from arqd.stores import check_backends, queue_class
from arqd.supervise import report_crash

log = structlog.get_logger("arqd.daemon")

RESTART_SECTIONS = ("server", "queue", "results")
BACKEND_RETRY_MAX = 30.0  # longest pause between tries to reach the backends at start
HTTP_SHUTDOWN = 2.0  # seconds open long-polls and event streams get once the pool has stopped
EXIT_FAILED = 1  # a background task kept crashing: the service manager should restart us


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"server.listen: expected host:port, got {listen!r}") from None


def resolve(host: str) -> list[str]:
    """Every address ``host`` names (an address names itself); ``OSError`` if none."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address (a name such as
    ``localhost`` counts by what it resolves to); :class:`ConfigError` if it resolves to none."""
    try:
        addresses = resolve(host)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc}") from None
    return bool(addresses) and all(
        ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses
    )


def check_exposure(config: Config) -> None:
    """Listening beyond loopback needs auth tokens, or an explicit ``allow_anonymous``."""
    listen = config.server.listen
    host, _ = split_listen(listen)
    try:
        loopback = is_loopback(host)
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: server.listen: {exc}") from None
    if not loopback and not config.auth.tokens and not config.server.allow_anonymous:
        raise ConfigError(
            f"{config.source}: server.listen: {listen} is reachable beyond this "
            "host, but [auth] lists no tokens; add tokens (arqd token new) or set "
            "server.allow_anonymous = true"
        )


# Every check a config must pass before it runs: at start, on reload (against the effective
# config: the running server, queue and results sections) and in ``arqd check-config``. Each
# raises ConfigError; a new check is one more function here.
def check_step_keys(config: Config) -> None:
    """A queue shared by several hosts needs step keys every host has (``arqd.steps``)."""
    try:
        queue = queue_class(config.queue.backend)
    except ConfigError:
        return  # a queue class that does not load: check_backends says why
    check_keys(config, queue.multi_host)


PREFLIGHT: list[Callable[[Config], None]] = [check_exposure, check_backends, check_step_keys]


def preflight(config: Config) -> None:
    """Run every check of ``PREFLIGHT`` on ``config`` (which may resolve host names); one
    :class:`ConfigError` names every problem found, a line each."""
    problems: list[str] = []
    for check in PREFLIGHT:
        try:
            check(config)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def effective(new: Config, running: Config) -> tuple[Config, list[str]]:
    """The config a reload would run: ``new`` with the running restart-only sections, and the
    names of those that changed (kept until a restart)."""
    kept = [name for name in RESTART_SECTIONS if getattr(new, name) != getattr(running, name)]
    if kept:
        new = msgspec.structs.replace(new, **{name: getattr(running, name) for name in kept})
    return new, kept


class Daemon:
    def __init__(self, config_path: str | os.PathLike[str] | None) -> None:
        self.config_path = None if config_path is None else Path(config_path)
        self.app: App | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._reloading: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def run(self) -> int:
        malloc.return_large_buffers()  # bounded memory comes back (docs/operations.md)
        try:
            config = load_config(self.config_path)
            preflight(config)
            registry = Registry.from_config(config)
        except ConfigError as exc:
            print(f"arqd: {exc}", file=sys.stderr)
            return 2
        logs.configure(config.log.level, config.log.format)
        self.app = App(config)
        self.app.core.registry = registry
        web_app = make_app(self.app)
        runner = web.AppRunner(
            web_app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN
        )
        await runner.setup()
        host, port = split_listen(config.server.listen)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:  # the port is taken, or the address is not this host's
            await runner.cleanup()
            print(
                f"arqd: {config.source}: server.listen: cannot listen on {host}:{port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        self.port = _bound_port(runner) or port
        self._install_signals()
        log.info("daemon.listening", listen=f"{host}:{self.port}", pid=os.getpid())
        if not await self._open_backends(config, registry, web_app[STATE]):
            await runner.cleanup()
            log.info("daemon.stopped")
            return 0
        try:
            watchdog = self.app.supervisor.spawn("arqd-watchdog", self._watchdog)
            collector = self.app.supervisor.spawn("arqd-gc", CollectorPolicy().run)
            log.info(
                "daemon.ready",
                listen=f"{host}:{self.port}",
                pid=os.getpid(),
                worker=self.app.pool.worker_id if self.app.pool else None,
                config=config.source,
            )
            systemd.notify("READY=1", f"STATUS=serving on {host}:{self.port}")
            code = await self._serve(self.app)
            systemd.notify("STOPPING=1")
            log.info("daemon.stopping", grace_s=self.app.config.workers.shutdown_grace)
            watchdog.cancel()
            collector.cancel()
        finally:
            await self.app.stop()
            await runner.cleanup()
        log.info("daemon.stopped", exit_code=code)
        return code

    async def _serve(self, app: App) -> int:
        """Wait for a stop signal (answers 0) or a background task given up (answers 1)."""
        stop = asyncio.ensure_future(self._stop.wait())
        failed = asyncio.ensure_future(app.supervisor.failed.wait())
        try:
            await asyncio.wait([stop, failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
        if app.supervisor.failed.is_set():
            log.error("daemon.failing", task=app.supervisor.failure, exit_code=EXIT_FAILED)
            return EXIT_FAILED
        return 0

    async def _open_backends(self, config: Config, registry: Registry, state: ServerState) -> bool:
        """Open the backends and start the pool, retrying while they cannot be reached: the HTTP
        API already answers (``/healthz`` 200, ``/readyz`` 503) and the daemon recovers by
        itself when they come back. False if asked to stop first."""
        delay = 0.5
        while not self._stop.is_set():
            assert self.app is not None
            try:
                await self.app.__aenter__()
                return True
            except (ArqdError, OSError) as exc:
                log.warning("daemon.backend_unavailable", error=str(exc), retry_in_s=delay)
                with contextlib.suppress(Exception):
                    await self.app.stop()
            self.app = App(config)  # fresh clients for the next try
            self.app.core.registry = registry
            state.app = self.app
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, BACKEND_RETRY_MAX)
        return False

    # --- signals ----------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)

    def _on_stop(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("daemon.signal", signal=sig.name, action="drain")
            self._stop.set()
        elif self.app is not None and self.app.pool is not None:
            log.warning("daemon.signal", signal=sig.name, action="skip the grace period")
            self.app.pool.hurry()

    def _on_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.info("config.reload_pending")
            return
        self._reloading = asyncio.create_task(self.reload(), name="arqd-reload")
        self._reloading.add_done_callback(report_crash)

    async def reload(self) -> None:
        assert self.app is not None
        systemd.reloading()
        try:
            await self._apply(self.app)
        finally:
            systemd.notify("READY=1")

    async def _apply(self, app: App) -> None:
        old = app.config
        try:
            loaded = load_config(self.config_path)
            # A restart-only section is kept, but a plugged backend of the new file that would
            # not load is refused now rather than at the restart that would apply it.
            await asyncio.to_thread(check_backends, loaded)
            new, kept = effective(loaded, old)
            await asyncio.to_thread(preflight, new)  # a name lookup must not stall the loop
            registry = Registry.from_config(new, app.extra_handlers)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), kept=old.source)
            app.reload_failures += 1
            app.metrics.reloads.labels("failed").inc()
            return
        if kept:
            log.warning(
                "config.restart_required",
                sections=kept,
                message="these sections change only on restart; running values kept",
            )
        app.reconfigure(new, registry)
        logs.configure(new.log.level, new.log.format)
        app.reloads += 1
        app.metrics.reloads.labels("ok").inc()
        log.info(
            "config.reloaded",
            concurrency=new.workers.concurrency,
            queues=new.workers.queues,
            handlers=sorted(new.handlers),
            restart_required=kept,
        )

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _bound_port(runner: web.AppRunner) -> int | None:
    for server in runner.sites:
        sock = getattr(getattr(server, "_server", None), "sockets", None)
        if sock:
            return int(sock[0].getsockname()[1])
    return None


def serve(config_path: str | None) -> int:
    # uvloop was measured (benchmarks/http_api.py): same throughput, a worse p99; not used.
    return asyncio.run(Daemon(config_path).run())
