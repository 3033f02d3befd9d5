"""config.toml loading: defaults, units, overrides and errors that name file, setting, reason."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import arqd
from arqd.backends.memory import MemoryQueue
from arqd.config import Config, load_config, parse_duration, parse_size, redact_dsn
from arqd.errors import ConfigError
from arqd.handlers import Registry
from arqd.results.memory import MemoryResults

from .daemons import Daemons, sqlite_config

ROOT = Path(__file__).resolve().parent.parent


def test_repository_config_loads():
    """The config.toml at the repository root is valid and uses sqlite + files under var/."""
    cfg = load_config(ROOT / "config.toml", environ={})
    assert cfg.queue.backend == "sqlite" and cfg.results.backend == "files"
    assert cfg.queue.path == str(ROOT / "var" / "arqd.sqlite3")
    assert {"noop", "echo", "sleep", "fail", "progress", "blob"} <= set(cfg.handlers)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("24h", 86400), ("1.5s", 1.5), (2, 2.0)],
)
def test_durations(text: object, seconds: float):
    """Durations accept the units of docs/configuration.md, or plain seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("64KiB", 65536), ("1MiB", 1048576), (10, 10)])
def test_sizes(text: object, size: int):
    """Sizes accept binary units, or plain bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("toml", "mentions"),
    [
        ("[workers]\nconcurrency = 'many'", "workers.concurrency"),
        ("[workers]\nvisibility_timeout = '30 parsecs'", "workers.visibility_timeout"),
        ("[workers]\nconcurency = 3", "workers.concurency: unknown setting"),
        ("[queue]\nbackend = 'rabbitmq'", "queue.backend"),
        ("[handlers]\nx = { call = 'no colon' }", "handlers.x"),
        ("[handlers]\necho = 'arqd.demo:echo'\n[groups.g]\njobs = []", "groups.g"),
        ("[groups.g]\njobs = [{ handler = 'nope' }]", "groups.g.jobs[0].handler: unknown handler"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_invalid_config_names_file_setting_and_reason(tmp_path: Path, toml: str, mentions: str):
    """A config that does not validate is refused with the file, the setting and the reason."""
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value) and mentions in str(info.value)


def test_environment_overrides(tmp_path: Path):
    """ARQD_<SECTION>_<KEY> overrides the file, with values read as TOML when they parse."""
    path = tmp_path / "c.toml"
    path.write_text("[workers]\nconcurrency = 4\n")
    cfg = load_config(
        path,
        environ={
            "ARQD_WORKERS_CONCURRENCY": "64",
            "ARQD_WORKERS_QUEUES": '["a", "b"]',
            "ARQD_HTTP_STEPS_ALLOW_HOSTS": '["api.example.com"]',
            "ARQD_QUEUE_PATH": "/tmp/elsewhere.sqlite3",
            "UNRELATED": "1",
        },
    )
    assert cfg.workers.concurrency == 64 and cfg.workers.queues == ["a", "b"]
    assert cfg.http_steps.allow_hosts == ["api.example.com"]
    assert cfg.queue.path == "/tmp/elsewhere.sqlite3"


def test_handlers_short_and_long_form(tmp_path: Path):
    """A handler is a "module:function" string or a table with per-handler defaults."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[handlers]\necho = "arqd.demo:echo"\n'
        'report = { call = "arqd.demo:sleep", timeout = "1h", max_attempts = 3, cache = true,'
        ' queue = "reports" }\n'
    )
    handlers = load_config(path, environ={}).handler_configs()
    assert handlers["echo"].call == "arqd.demo:echo" and handlers["echo"].timeout is None
    report = handlers["report"]
    assert (report.timeout, report.max_attempts, report.cache, report.queue) == (
        3600,
        3,
        True,
        "reports",
    )


def test_missing_file_is_a_clear_error(tmp_path: Path):
    """A config path that does not exist says so."""
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_defaults_are_the_embedded_default():
    """With no file at all, arqd runs on sqlite + files with the documented defaults."""
    cfg = Config()
    assert cfg.workers.visibility_timeout == 30 and cfg.defaults.max_attempts == 5
    assert cfg.results.inline_max == 65536 and cfg.server.max_body == 1024 * 1024
    assert cfg.workers.heartbeat_interval == 2.0


# --- configs that would silently stop work (issue 12, item 7) ------------------------------------

TOKEN = "0" * 64


@pytest.mark.parametrize(
    ("toml", "mentions"),
    [
        ("[workers]\nqueues = []", "workers.queues: "),
        (
            f"[auth]\ntokens = [{{ name = 'w', sha256 = '{TOKEN}', scopes = [] }}]",
            "auth.tokens.w.scopes: ",
        ),
        ("[defaults]\ntimeout = '0s'", "defaults.timeout: "),
        ("[handlers]\nx = { call = 'arqd.demo:echo', timeout = '0s' }", "handlers.x.timeout: "),
        ("[workers]\nheartbeat = '0s'", "workers.heartbeat: "),
        ("[workers]\npoll_max = '0s'", "workers.poll_max: "),
        ("[results]\ntemporary_ttl = '0s'", "results.temporary_ttl: "),
        ("[handlers]\nx = 'no colon'", "handlers.x.call: "),
        (
            "[handlers]\ne = 'arqd.demo:echo'\n"
            "[[schedules]]\nname = 's'\nhandler = 'e'\ncron = '0 0 31 2 *'",
            "schedules.s.cron: ",
        ),
    ],
)
def test_configs_that_would_stop_all_work_are_refused(tmp_path: Path, toml: str, mentions: str):
    """An empty list or a zero duration that would leave the daemon doing nothing (no queue to
    lease from, a token with no scope, every attempt timed out at once, a cron that never
    fires...) is refused at load time, naming the setting."""
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}: {mentions}" in str(info.value)


async def test_reload_to_no_queues_is_refused_and_work_goes_on(tmp_path: Path, daemons: Daemons):
    """SIGHUP with workers.queues = [] is refused (config.reload_failed naming the setting), the
    running queues stay, and jobs submitted afterwards still run; a start with it exits 2."""
    d = daemons.start(sqlite_config(tmp_path))
    d.config_path.write_text(sqlite_config(tmp_path, workers="queues = []"))
    d.signal(signal.SIGHUP)
    failed = d.wait_log("config.reload_failed")
    assert f"{d.config_path}: workers.queues: " in failed["error"]
    async with arqd.HttpClient(d.url) as client:
        job = await client.submit("echo", {"after": "reload"})
        done = await client.wait(job.id, timeout=20)
    assert done.state == "succeeded"
    start = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "arqd", "serve", "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert start.returncode == 2 and "workers.queues" in start.stderr


# --- where an error comes from (issue 12, item 21) ----------------------------------------------


def test_an_environment_error_names_the_variable(tmp_path: Path):
    """A bad value from ARQD_<SECTION>_<KEY> is reported against that variable, not the file."""
    path = tmp_path / "c.toml"
    path.write_text("[workers]\nconcurrency = 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"ARQD_WORKERS_CONCURRENCY": "many"})
    assert str(info.value).startswith("ARQD_WORKERS_CONCURRENCY: workers.concurrency: ")
    assert str(path) not in str(info.value)
    with pytest.raises(ConfigError, match=r"^ARQD_WORKERS_CONCURENCY: workers\.concurency: unk"):
        load_config(path, environ={"ARQD_WORKERS_CONCURENCY": "3"})


def test_nested_settings_can_come_from_the_environment(tmp_path: Path):
    """ARQD_DEFAULTS_BACKOFF_BASE reaches defaults.backoff.base (a table inside a section)."""
    cfg = load_config(None, environ={"ARQD_DEFAULTS_BACKOFF_BASE": '"2s"'})
    assert cfg.defaults.backoff.base == 2.0


def test_every_problem_is_reported_at_once(tmp_path: Path):
    """A config with several problems, in several sections and in one section, names each of
    them, one line each, with its own source."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[workers]\nconcurrency = 'many'\nbatch = 0\n"
        "[queue]\nbackend = 'rabbitmq'\n"
        "[handlers]\nx = { call = 'no colon' }\ny = { call = 'a:b', retries = 1 }\n"
        "[[schedules]]\nname = 's'\nhandler = 'nope'\nevery = '1s'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"ARQD_LOG_LEVEL": "loud"})
    lines = str(info.value).splitlines()
    expected = [
        f"{path}: workers.concurrency: ",
        f"{path}: workers.batch: ",
        f"{path}: queue.backend: ",
        f"{path}: handlers.x.call: ",
        f"{path}: handlers.y.retries: unknown setting",
        f"{path}: schedules.s.handler: unknown handler 'nope'",
        "ARQD_LOG_LEVEL: log.level: ",
    ]
    for start in expected:
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)
    assert len(lines) == len(expected)


def test_a_handler_import_error_names_the_file_and_the_setting(tmp_path: Path):
    """Every handler that cannot be imported is reported as <file>: handlers.<name>.call."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[handlers]\necho = 'arqd.demo:echo'\ngone = 'arqd.nowhere:f'\n"
        "missing = { call = 'arqd.demo:nothing_here' }\n"
    )
    cfg = load_config(path, environ={})
    with pytest.raises(ConfigError) as info:
        Registry.from_config(cfg)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: handlers.gone.call: cannot import 'arqd.nowhere:f': ")
    assert lines[1].startswith(f"{path}: handlers.missing.call: cannot import 'arqd.demo:nothing")
    env = load_config(None, environ={"ARQD_HANDLERS_LOST": '"arqd.nowhere:g"'})
    with pytest.raises(ConfigError, match=r"^ARQD_HANDLERS_LOST: handlers\.lost\.call: cannot"):
        Registry.from_config(env)


def test_check_config_reports_every_error(tmp_path: Path):
    """check-config prints one line per problem (config, handler imports, exposure) and exits 1."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[server]\nlisten = '0.0.0.0:8080'\n"
        "[workers]\nqueues = []\n"
        "[handlers]\ngone = 'arqd.nowhere:f'\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "arqd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ARQD_WORKERS_BATCH": "0"},
    )
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert len(lines) == 4, lines
    assert any(line.startswith(f"arqd: {path}: workers.queues: ") for line in lines)
    assert any(line.startswith("arqd: ARQD_WORKERS_BATCH: workers.batch: ") for line in lines)
    assert any(
        line.startswith(f"arqd: {path}: handlers.gone.call: cannot import") for line in lines
    )
    assert any(line.startswith(f"arqd: {path}: server.listen: ") for line in lines)


# --- config groups (issue 12, item 17) ----------------------------------------------------------

GROUP_BASE = "[handlers]\necho = 'arqd.demo:echo'\n[groups.g]\n"


@pytest.mark.parametrize(
    ("jobs", "mentions"),
    [
        ("[{ handler = 'echo', name = 'a' }, { handler = 'echo', name = 'a' }]", "groups.g.jobs"),
        ("[{ handler = 'echo', name = 'job2' }, { handler = 'echo' }]", "groups.g.jobs"),
        ("[{ handler = 'echo', name = 'bad name' }]", "groups.g.jobs[0].name"),
        ("[{ handler = 'echo', key = 'schedule:x:1' }]", "groups.g.jobs[0].key"),
        (f"[{{ handler = 'echo', meta = {{ x = '{'y' * 5000}' }} }}]", "groups.g.jobs[0].meta"),
        ("[{ }]", "groups.g.jobs[0]"),
        (
            "[{ handler = 'echo', steps = [{ name = 'a', url = 'https://x.example' }] }]",
            "groups.g.jobs[0].handler",
        ),
        ("[{ steps = [{ name = 'a', url = 'ftp://x.example' }] }]", "groups.g.jobs[0]: steps[0]"),
        (
            "[{ steps = [{ name = 'a', url = 'https://x.example' }], payload = 1 }]",
            "groups.g.jobs[0].payload",
        ),
    ],
    ids=["same", "default", "name", "key", "meta", "empty", "both", "steps", "payload"],
)
def test_a_config_group_that_could_never_be_triggered_is_refused(
    tmp_path: Path, jobs: str, mentions: str
):
    """A configured group that every trigger would refuse with a 422 (duplicate member names,
    counting the default names job1, job2..., a bad name, a reserved key, a job with neither or
    both of handler and steps, invalid steps) is refused when the config loads."""
    path = tmp_path / "c.toml"
    path.write_text(f"{GROUP_BASE}jobs = {jobs}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}: {mentions}" in str(info.value)


async def test_a_config_group_may_hold_multi_step_jobs(tmp_path: Path):
    """A configured group job with steps (and credentials) loads and triggers a multi-step job,
    its secrets sealed like a submitted one's."""
    path = tmp_path / "c.toml"
    path.write_text(
        f"{GROUP_BASE}jobs = [\n"
        "  { handler = 'echo', payload = 1 },\n"
        "  { name = 'fetch', steps = [{ name = 'get', url = 'https://api.example.com/x' }],"
        " credentials = { bearer = 'sekrit' } },\n"
        "]\n"
        f"[http_steps]\nkey_file = '{tmp_path / 'steps.key'}'\n"
        "[workers]\nconcurrency = 0\n"
    )
    cfg = load_config(path, environ={})
    async with arqd.App(cfg, queue=MemoryQueue(), results=MemoryResults()) as app:
        group = await app.client.trigger_group("g")
        fetch = await app.client.get(group.jobs[1].id)
    assert [j.name for j in group.jobs] == ["job1", "fetch"]
    assert fetch.handler == "arqd.steps" and [s.name for s in fetch.steps or []] == ["get"]
    assert "sekrit" not in msgspec.json.encode(fetch).decode()


def test_a_whole_section_comes_from_one_variable(tmp_path: Path):
    """`ARQD_SCHEDULES` (a section that is a list) sets `[[schedules]]` from a TOML value, and
    an error in it names the variable."""
    env = {"ARQD_SCHEDULES": '[{ name = "tick", every = "1m", handler = "noop" }]'}
    path = tmp_path / "c.toml"
    path.write_text('[handlers]\nnoop = "arqd.demo:noop"\n')
    cfg = load_config(path, env)
    assert [s.name for s in cfg.schedules] == ["tick"]
    bad = {"ARQD_SCHEDULES": '[{ name = "tick", every = "1m", handler = "nope" }]'}
    with pytest.raises(ConfigError, match="ARQD_SCHEDULES"):
        load_config(path, bad)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("redis://:p@ss@h:6379/0", "redis://:[redacted]@h:6379/0"),
        ("postgresql://u:pa@ss@host:5432/db?x=1", "postgresql://u:[redacted]@host:5432/db?x=1"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h password=sec@ret dbname=x", "host=h password=[redacted] dbname=x"),
    ],
)
def test_a_password_is_hidden_whatever_it_holds(dsn: str, shown: str):
    """A server URL's password is hidden from logs, reprs and errors, also one holding "@"
    (the drivers split at the last one; the redaction stopped at the first and showed the
    rest of the password)."""
    assert redact_dsn(dsn) == shown
