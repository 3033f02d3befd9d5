"""Database servers the tests (and benchmarks) start for themselves, usable outside pytest.

``RedisServer`` runs Debian's ``redis-server`` on 127.0.0.1 at a free port with its files in a
temporary directory, without persistence unless asked (``aof=True``: AOF, fsync every second); it
can be stopped (cleanly, or killed) and started again on the same port and files, and paused with
SIGSTOP. Missing, it raises :class:`ServerMissing` saying how to install it.

``PostgresServer`` runs a throw-away cluster of the Debian ``postgresql`` package: ``initdb`` in a
temporary directory, ``postgres`` on 127.0.0.1 at a free port (and a unix socket in that
directory), as the ``postgres`` user when we are root (the server refuses to run as root). It can
be stopped and started again on the same port and data (a restarted server), and paused with
SIGSTOP (a failover-like stall). If the binaries are missing it raises :class:`ServerMissing`
saying how to install them: a suite that needs the server fails, it never skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

START_TIMEOUT = 60.0  # seconds for the cluster to accept logins after its start
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found: install them with"
    " `apt-get install postgresql` (scripts/ci-system-deps does, as root on Debian)"
)


class ServerMissing(RuntimeError):
    """The server's binaries are not installed, or it would not start; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory; :class:`ServerMissing` if none."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    binary = shutil.which("postgres")
    if binary is not None and shutil.which("initdb") is not None:
        return Path(binary).resolve().parent
    raise ServerMissing(INSTALL_HINT)


class Server:
    """What the throw-away servers share: a process in a temporary directory (``self.dir``,
    ``server.log``), stopped with ``STOP``, frozen and thawed with SIGSTOP/SIGCONT over
    :meth:`_processes`, restored whatever was done to it, closed with its directory."""

    STOP: signal.Signals = signal.SIGTERM

    dir: Path
    proc: subprocess.Popen[bytes] | None

    def start(self) -> Self:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def _processes(self) -> list[int]:
        """The server's processes (the one it was started as, by default)."""
        return [] if self.proc is None else [self.proc.pid]

    def log_tail(self, lines: int = 10) -> str:
        log = self.dir / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: signal.Signals | None = None) -> None:
        """Stop the server with ``sig`` (its class's ``STOP`` by default)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = None
            return
        self.resume()  # a frozen server cannot stop
        self.proc = None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig or self.STOP)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open and nothing answers, as in a failover."""
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in reversed(self._processes()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def restore(self) -> None:
        """Up and answering, whatever was done to it: resumed if frozen, started again if
        stopped (the chaos suite's ``finally``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self._wait_ready()
        else:
            self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class PostgresServer(Server):
    """One throw-away cluster; ``start()``, ``stop()`` (SIGINT: a fast shutdown, clients
    disconnected; SIGQUIT: an immediate one), ``pause()``/``resume()``, ``close()``."""

    STOP = signal.SIGINT

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.bindir = pg_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="arqd-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": "200",
            "fsync": "off",  # a test cluster: its data never outlives the session
            "full_page_writes": "off",
            "synchronous_commit": "off",
            **(settings or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, object] = {}
        if os.geteuid() == 0:
            self._as = {"user": "postgres", "group": "postgres", "extra_groups": []}
            shutil.chown(self.dir, "postgres", "postgres")
        self._initdb()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _initdb(self) -> None:
        cmd = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres"]
        cmd += ["-A", "trust", "-E", "UTF8", "--no-sync"]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.dir,
            **self._as,  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            raise ServerMissing(f"initdb failed: {done.stderr.strip()[-500:]}")

    def start(self) -> PostgresServer:
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        with (self.dir / "server.log").open("ab") as out:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                **self._as,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        isready = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1"]
        isready += ["-p", str(self.port), "-U", "postgres"]
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerMissing(f"postgres exited at start:\n{self.log_tail()}")
            if subprocess.run(isready, check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise ServerMissing(f"postgres did not accept logins in {START_TIMEOUT:g} s")

    def _processes(self) -> list[int]:
        """The postmaster and its children (each backend is a session leader of its own, so a
        process group does not reach them)."""
        assert self.proc is not None
        found = [self.proc.pid]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == self.proc.pid:
                found.append(int(Path(stat).parent.name))
        return found


REDIS_HINT = (
    "redis-server was not found: install it with `apt-get install redis-server`"
    " (scripts/ci-system-deps does, as root on Debian)"
)


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise ServerMissing(REDIS_HINT)
    return found


class RedisServer(Server):
    """One throw-away redis-server; ``start()``, ``stop()``, ``kill()``, ``restart()``,
    ``pause()``/``resume()``, ``close()``. ``settings`` are extra directives (``{"requirepass":
    "pw"}``); ``aof`` turns the append-only file on (fsync every second)."""

    def __init__(self, *, aof: bool = False, settings: dict[str, str] | None = None) -> None:
        self.binary = redis_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="arqd-redis-"))
        self.port = free_port()
        self.settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.dir),
            "save": "",
            "appendonly": "yes" if aof else "no",
            "appendfsync": "everysec",
            "protected-mode": "no",
            "daemonize": "no",
            "logfile": str(self.dir / "server.log"),
            **(settings or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        password = self.settings.get("requirepass")
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        cmd = [self.binary]
        for key, value in self.settings.items():
            cmd += [f"--{key}", value]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _answers(self) -> bool:
        """Whether the server answers a PING (``-NOAUTH`` counts: it is up)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerMissing(f"redis-server exited at start:\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        raise ServerMissing(f"redis-server did not answer in {START_TIMEOUT:g} s")

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()
