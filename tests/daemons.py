"""Running ``arqd serve`` as a real process in tests: start it on a temporary config, learn its
port from its ``daemon.ready`` log line, signal it, kill it, read its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def sqlite_config(tmp_path: Path, *, workers: str = "", extra: str = "") -> str:
    """A config on a sqlite file and result directory under ``tmp_path``, demo handlers on."""
    return f"""
[server]
listen = "127.0.0.1:0"
max_body = "64KiB"

[queue]
backend = "sqlite"
path = "{tmp_path / "q.sqlite3"}"

[results]
path = "{tmp_path / "results"}"
inline_max = "1KiB"

[workers]
heartbeat = "200ms"
poll_max = "100ms"
{workers}

[defaults]
backoff = {{ base = "50ms", max = "200ms" }}

[handlers]
noop = "arqd.demo:noop"
echo = "arqd.demo:echo"
sleep = "arqd.demo:sleep"
fail = "arqd.demo:fail"
progress = "arqd.demo:progress"
blob = "arqd.demo:blob"
record = "tests.procs:record"
trickle = "tests.procs:trickle"

[log]
level = "info"
format = "json"
{extra}
"""


class Daemon:
    """One ``arqd serve`` process; ``stop_all`` in fixtures kills what is left."""

    def __init__(
        self, tmp_path: Path, config: str, name: str = "d0", env: dict[str, str] | None = None
    ) -> None:
        self.dir = tmp_path
        self.name = name
        self.config_path = tmp_path / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp_path / f"{name}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready: str = "daemon.ready") -> Daemon:
        """Start and wait for the ``ready`` log event (which carries the bound address)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "arqd", "serve", "-c", str(self.config_path)],
                cwd=self.dir,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        line = self.wait_log(ready, START_TIMEOUT)
        self.port = int(line["listen"].rsplit(":", 1)[1])
        return self

    def lines(self) -> list[dict[str, Any]]:
        """This run's JSON log lines (non-JSON lines, such as tracebacks, as ``{"raw": ...}``)."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    def wait_log(self, event: str, limit: float = 10.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            found = self.events(event)
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode}:\n"
                    + self.log_path.read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {event!r} from {self.name} within {limit}s:\n"
                    + self.log_path.read_text()[-3000:]
                )
            time.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, limit: float) -> int:
        assert self.proc is not None
        return self.proc.wait(limit)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Daemons:
    """A fixture's handle on every daemon a test starts."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.all: list[Daemon] = []

    def start(
        self,
        config: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        ready: str = "daemon.ready",
    ) -> Daemon:
        daemon = Daemon(self.tmp_path, config, name or f"d{len(self.all)}", env)
        self.all.append(daemon)
        return daemon.start(ready)

    def stop_all(self) -> None:
        for daemon in self.all:
            daemon.kill()
