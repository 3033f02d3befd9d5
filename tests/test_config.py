"""config.toml loading: defaults, units, overrides and errors that name file, setting, reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from arqd.config import Config, load_config, parse_duration, parse_size
from arqd.errors import ConfigError

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
    """Durations accept the units of API.md section 6, or plain seconds."""
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
        ("[queue]\nbackend = 'redis'", "queue.backend"),
        ("[handlers]\nx = { call = 'no colon' }", "handlers.x"),
        ("[handlers]\necho = 'arqd.demo:echo'\n[groups.g]\njobs = []", "groups.g"),
        ("[groups.g]\njobs = [{ handler = 'nope' }]", "groups.g: unknown handler"),
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
