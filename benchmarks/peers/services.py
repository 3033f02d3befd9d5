"""The brokers the peers need, started for one benchmark run and stopped after it: Redis (no
persistence) and PostgreSQL (a throw-away cluster in a temporary directory), each on 127.0.0.1
on a free port. Installed with apt-get when missing (root on Debian). Standard library only.

Every process started here dies with the benchmark: it is stopped by ``close()`` (the caller's
``finally``), and asked by the kernel (``PR_SET_PDEATHSIG``) to stop if the benchmark process
itself is killed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.peers.common import die_with_parent

START_TIMEOUT = 30.0  # seconds for a broker to answer after its start


class ServiceError(Exception):
    """A broker could not be installed or started; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def apt_install(package: str) -> None:
    if os.geteuid() != 0:
        raise ServiceError(f"{package} is not installed, and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ServiceError(f"`{' '.join(cmd)}` failed: {' / '.join(tail)}")


def _answers(port: int, probe: bytes | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if probe is None:
                return True
            s.sendall(probe)
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Service:
    """One broker process; ``close()`` stops it and removes its directory."""

    name = "service"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"arqd-compare-{self.name}-"))
        self.port = free_port()
        self.url = ""

    def start(self) -> Service:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def _wait(self, probe: bytes | None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.port, probe):
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} did not answer in {START_TIMEOUT:g} s")
            time.sleep(0.05)

    def log_tail(self) -> str:
        log = self.dir / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # redis: save-less shutdown; postgres: fast
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Redis(Service):
    """``redis-server`` with no RDB snapshots and no AOF: every peer on Redis is measured without
    broker persistence."""

    name = "redis"

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            apt_install("redis-server")
            binary = shutil.which("redis-server")
            if binary is None:
                raise ServiceError("redis-server is still missing after apt-get install")
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        cmd += ["--loglevel", "warning", "--logfile", str(self.dir / "server.log")]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C goes to us; we stop it in order
            preexec_fn=die_with_parent,
        )
        self._wait(b"PING\r\n")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        return self

    def version(self) -> str:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout
        return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_pg_major)
    if found:
        return Path(found[-1]).parent
    binary = shutil.which("postgres")
    return Path(binary).resolve().parent if binary else None


def _pg_major(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


class Postgres(Service):
    """A fresh cluster (``initdb``, trust auth on 127.0.0.1) run by the ``postgres`` user when we
    are root. ``synchronous_commit = off`` (a documented setting: a commit does not wait for
    its WAL flush), the closest PostgreSQL comes to the Redis peers' no-persistence broker while
    staying crash-consistent; fsync stays on."""

    name = "postgres"

    def start(self) -> Postgres:
        bindir = _pg_bindir()
        if bindir is None:
            apt_install("postgresql")
            bindir = _pg_bindir()
            if bindir is None:
                raise ServiceError("postgres is still missing after apt-get install postgresql")
        self.bindir = bindir
        user: str | None = None
        extra_groups: list[int] | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            user, extra_groups = "postgres", []
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.dir,
            user=user,
            group=user,
            extra_groups=extra_groups,
        )
        if init.returncode != 0:
            raise ServiceError(f"initdb failed: {init.stderr.strip()[-300:]}")
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "synchronous_commit": "off",
            "max_connections": "300",
            "shared_buffers": "256MB",
        }
        cmd = [str(bindir / "postgres"), "-D", str(data)]
        for key, value in options.items():
            cmd += ["-c", f"{key}={value}"]
        with (self.dir / "server.log").open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=die_with_parent,
                user=user,
                group=user,
                extra_groups=extra_groups,
            )
        self._wait(None)
        self._wait_ready()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return self

    def _wait_ready(self) -> None:
        """The port opens a moment before the cluster accepts logins: ask ``pg_isready``."""
        isready = self.bindir / "pg_isready"
        deadline = time.monotonic() + START_TIMEOUT
        while isready.exists() and time.monotonic() < deadline:
            cmd = [str(isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
            if subprocess.run(cmd, check=False).returncode == 0:
                return
            time.sleep(0.05)
        time.sleep(0.3)

    def version(self) -> str:
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        found = re.search(r"PostgreSQL\) (\S+)", out)
        return found.group(1) if found else out.strip()
