"""Backends plugged by config: ``queue.backend`` / ``results.backend`` = ``"package.module:Class"``
load a class implementing the contract, made with its ``options`` table; a class that does not
load is a config error at start, in ``arqd check-config`` and on SIGHUP, naming the setting.
The contract suites run over the plugged classes of ``tests/plugin/queue.py`` (conftest)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import arqd
from arqd.config import QueueConfig, load_config
from arqd.daemon import preflight
from arqd.errors import ConfigError
from arqd.stores import make_queue, make_results

from .conftest import PLUGGED_QUEUE, PLUGGED_RESULTS
from .daemons import ROOT, Daemons
from .plugin.queue import PluggedQueue, PluggedResults


def plugged_config(tmp_path: Path, queue: str = PLUGGED_QUEUE, options: str = "") -> str:
    return f"""
[server]
listen = "127.0.0.1:0"

[queue]
backend = "{queue}"

[queue.options]
label = "by-config"
{options}

[results]
backend = "{PLUGGED_RESULTS}"

[workers]
heartbeat = "200ms"
poll_max = "100ms"

[handlers]
echo = "arqd.demo:echo"

[log]
format = "json"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_a_plugged_backend_is_made_by_config_with_its_options(tmp_path: Path):
    """The classes named by import path are made with the ``options`` tables as keywords
    (``ARQD_QUEUE_OPTIONS_<NAME>`` sets one), and the options stay out of the config's repr."""
    path = write(tmp_path, plugged_config(tmp_path))
    config = load_config(path, environ={"ARQD_RESULTS_OPTIONS_LABEL": "from-env"})
    preflight(config)
    queue, results = make_queue(config.queue), make_results(config.results)
    assert type(queue) is PluggedQueue and queue.label == "by-config"
    assert type(results) is PluggedResults and results.label == "from-env"
    assert "by-config" not in repr(config.queue) and "'label'" in repr(config.queue)


@pytest.mark.parametrize(
    ("backend", "options", "reason"),
    [
        ("tests.plugin.nosuch:Queue", "", "cannot import 'tests.plugin.nosuch': ModuleNotFound"),
        ("tests.plugin.queue:Missing", "", "module 'tests.plugin.queue' has no 'Missing'"),
        ("tests.plugin.queue:NotABackend", "", "is not a subclass of arqd.backends.base.Queue"),
        ("arqd.backends.base:QueueBackend", "", "does not implement "),
        (PLUGGED_QUEUE, "shards = 3", "unexpected keyword argument 'shards'"),
    ],
)
def test_a_plugged_backend_that_would_not_run_is_a_config_error(
    tmp_path: Path, backend: str, options: str, reason: str
):
    """A missing module or class, a class that is not (or not wholly) a queue backend, or an
    option its class does not take is refused before anything starts, naming the setting."""
    path = write(tmp_path, plugged_config(tmp_path, backend, options))
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as info:
        preflight(config)
    setting = "queue.options" if options else "queue.backend"
    assert f"{path}: {setting}: " in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ('[queue]\nbackend = "mysql"', "queue.backend: expected 'memory', 'sqlite', 'dyn"),
        ('[results]\nbackend = "a b:C"', "results.backend: expected 'memory', 'files', 's3'"),
        ('[queue]\nbackend = "memory"\noptions = { x = 1 }', "queue.options: only a plugged"),
    ],
)
def test_a_backend_setting_is_a_name_or_an_import_path(tmp_path: Path, toml: str, reason: str):
    """``backend`` is a built-in name or ``"package.module:Class"``; only a plugged class takes
    ``options`` (a built-in's settings are its own, typed)."""
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError, match=f"^{path}: {reason}"):
        load_config(path, environ={})
    with pytest.raises(ValueError, match="backend: expected"):
        QueueConfig(backend="nope")


def test_check_config_names_a_plugged_backend_that_does_not_load(tmp_path: Path):
    """``arqd check-config`` exits 1 naming the setting and why the class does not load."""
    path = write(tmp_path, plugged_config(tmp_path, "tests.plugin.queue:NotABackend"))
    done = subprocess.run(
        [sys.executable, "-m", "arqd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1
    assert f"{path}: queue.backend: 'tests.plugin.queue:NotABackend' is not a subclass" in (
        done.stderr
    )


async def test_a_daemon_runs_jobs_on_a_plugged_backend(tmp_path: Path, daemons: Daemons):
    """``arqd serve`` on the plugged queue and store runs a job; a SIGHUP naming a class that
    does not load is refused and the daemon goes on; a start with it exits 2."""
    d = daemons.start(plugged_config(tmp_path))
    async with arqd.HttpClient(d.url) as client:
        job = await client.submit("echo", {"via": "plugin"})
        done = await client.wait(job.id, timeout=20)
        assert done.state == "succeeded"
        assert await client.result(job.id) == {"via": "plugin"}
        d.config_path.write_text(plugged_config(tmp_path, "tests.plugin.queue:Missing"))
        d.signal(signal.SIGHUP)
        failed = d.wait_log("config.reload_failed")
        assert (
            f"{d.config_path}: queue.backend: module 'tests.plugin.queue' has no"
            in (failed["error"])
        )
        again = await client.submit("echo", {"after": "reload"})
        assert (await client.wait(again.id, timeout=20)).state == "succeeded"
    start = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "arqd", "serve", "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert start.returncode == 2 and "queue.backend" in start.stderr
