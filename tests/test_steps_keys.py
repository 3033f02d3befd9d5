"""The keys sealing multi-step jobs' secrets across hosts: every daemon on one sqlite file finds
the same key, a queue shared by several hosts needs an explicit one (at start, on reload and in
``check-config``), keys rotate (seal with the first, open with any) and reload on SIGHUP, and no
key ever reaches an answer, an error or a log line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet, InvalidToken

import arqd
from arqd.backends.sqlite import SqliteQueue
from arqd.config import Config, load_config
from arqd.errors import ConfigError
from arqd.model import JobSpec
from arqd.stepmodel import SEALED
from arqd.steps import CredentialsUnreadable, check_keys, seal, step_keys, unseal

from .daemons import ROOT, Daemon, Daemons, sqlite_config
from .test_aws_daemons import AWS_ENV, aws_config

K1, K2, K3 = (Fernet.generate_key().decode() for _ in range(3))
BEARER = "tok-keys-0123456789"


class Remote:
    """The service steps call: records the Authorization of every request."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        return web.json_response({"ok": True})

    @property
    def entry(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def job(self) -> dict[str, Any]:
        url = f"http://{self.entry}/call"
        return {"steps": [{"name": "call", "url": url}], "credentials": {"bearer": BEARER}}


@pytest.fixture
async def remote() -> AsyncIterator[Remote]:
    r = Remote()
    await r.server.start_server()
    yield r
    await r.server.close()


def steps_config(tmp_path: Path, remote: Remote, workers: str = "", steps: str = "") -> str:
    extra = f'[http_steps]\nallow_hosts = ["{remote.entry}"]\n{steps}\n'
    return sqlite_config(tmp_path, workers=workers, extra=extra)


def start_in(daemons: Daemons, where: Path, config: str, name: str, **env: str) -> Daemon:
    """A daemon whose config file lives in its own directory ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(where, config, name, env)
    daemons.all.append(daemon)
    return daemon.start()


async def sealed_token(tmp_path: Path, job_id: str) -> str:
    """The sealed secrets of a job as the queue database holds them."""
    async with SqliteQueue(str(tmp_path / "q.sqlite3")) as queue:
        job = await queue.get(job_id)
    assert job is not None and isinstance(job.payload, dict)
    token = job.payload[SEALED]
    assert isinstance(token, str)
    return token


def opens_with(token: str, key: str) -> bool:
    try:
        Fernet(key.encode()).decrypt(token)
    except InvalidToken:
        return False
    return True


# --- several daemons, one key ---------------------------------------------------------------------


async def test_two_daemons_on_one_sqlite_file_open_each_others_steps(
    tmp_path: Path, daemons: Daemons, remote: Remote
):
    """Two daemons on one sqlite file, each with its config in its own directory and no key
    set: a step job submitted through the one that runs nothing is run by the other, with its
    credentials (both find the key file beside the database)."""
    config_a = steps_config(tmp_path, remote, workers="concurrency = 0")
    config_b = steps_config(tmp_path, remote)
    submitter = start_in(daemons, tmp_path / "a", config_a, "a")
    runner = start_in(daemons, tmp_path / "b", config_b, "b")
    async with arqd.HttpClient(submitter.url) as client:
        job = await client.request_json("POST", "/v1/jobs", remote.job())
        done = await client.wait(job["id"], timeout=30)
    assert done.state == "succeeded", done.error
    assert remote.auth == [f"Bearer {BEARER}"]
    assert [line["job_id"] for line in runner.events("job.succeeded")] == [job["id"]]
    assert (tmp_path / "steps.key").exists()
    assert not (tmp_path / "a" / "var").exists() and not (tmp_path / "b" / "var").exists()


async def test_keys_rotate_on_reload(tmp_path: Path, daemons: Daemons, remote: Remote):
    """Sealed with k1; reloaded with keys [k2, k1]: the old job still runs and a new one is
    sealed with k2; reloaded with [k2] only, a job sealed with k1 fails CredentialsUnreadable.
    No key reaches the log."""
    daemon = daemons.start(
        steps_config(tmp_path, remote, workers="concurrency = 0", steps=f'keys = ["{K1}"]')
    )

    def reload(keys: list[str], count: int, workers: str = "") -> None:
        listed = ", ".join(f'"{k}"' for k in keys)
        text = steps_config(tmp_path, remote, workers=workers, steps=f"keys = [{listed}]")
        daemon.config_path.write_text(text)
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("config.reloaded", count=count)

    async with arqd.HttpClient(daemon.url) as client:
        old = (await client.request_json("POST", "/v1/jobs", remote.job()))["id"]
        assert opens_with(await sealed_token(tmp_path, old), K1)
        reload([K2, K1], 1)
        assert (await client.wait(old, timeout=30)).state == "succeeded"
        new = (await client.request_json("POST", "/v1/jobs", remote.job()))["id"]
        token = await sealed_token(tmp_path, new)
        assert opens_with(token, K2) and not opens_with(token, K1)
        assert (await client.wait(new, timeout=30)).state == "succeeded"
        reload([K1], 2, workers="concurrency = 0")
        stale = (await client.request_json("POST", "/v1/jobs", remote.job()))["id"]
        reload([K2], 3)
        done = await client.wait(stale, timeout=30)
    assert done.state == "failed" and done.error is not None
    assert done.error.type == "CredentialsUnreadable"
    assert remote.auth == [f"Bearer {BEARER}"] * 2
    log = daemon.log_path.read_text()
    assert K1 not in log and K2 not in log and BEARER not in log


async def test_core_picks_up_new_keys_when_its_config_changes(tmp_path: Path):
    """Core.steps_key is not cached across a config change (what a SIGHUP reload makes): a job
    submitted after the change is sealed with the new first key."""
    config = Config.from_dict({"queue": {"backend": "memory"}, "http_steps": {"key": K1}})
    async with arqd.App(config) as app:
        spec = JobSpec(steps=[{"name": "s", "url": "https://example.com/"}])
        first = app.core.new_job(spec, 0.0)
        app.reconfigure(
            msgspec.structs.replace(
                config, http_steps=Config.from_dict({"http_steps": {"key": K2}}).http_steps
            )
        )
        second = app.core.new_job(spec, 0.0)
    assert opens_with(first.payload[SEALED], K1) and opens_with(second.payload[SEALED], K2)
    assert not opens_with(second.payload[SEALED], K1)


# --- a queue shared by several hosts --------------------------------------------------------------


def run_arqd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``arqd ARGS`` with no steps key from this environment, only those of ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ARQD_HTTP_STEPS")}
    environ |= {"PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "arqd", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=30,
    )


def dynamo_config(tmp_path: Path, steps: str = "") -> Path:
    """A config on dynamodb (at an address nothing answers) whose [http_steps] is ``steps``."""
    path = tmp_path / "dynamo.toml"
    path.write_text(aws_config(tmp_path, "http://127.0.0.1:9", "arqd-keys", steps=steps))
    return path


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_shared_queue_without_a_key_is_refused(tmp_path: Path, command: str):
    """On dynamodb (a queue several hosts share) without http_steps.keys or .key, serve exits
    2 and check-config 1, naming the settings and variables that fix it; a missing key_file
    is no better (it would be made per host)."""
    for steps in ("", f'key_file = "{tmp_path / "nowhere.key"}"'):
        done = run_arqd(command, "-c", str(dynamo_config(tmp_path, steps)), env=AWS_ENV)
        assert done.returncode == (2 if command == "serve" else 1), done.stderr
        for name in ("http_steps.keys", "http_steps.key", "ARQD_HTTP_STEPS_KEYS"):
            assert name in done.stderr
        assert "dynamodb" in done.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"ARQD_HTTP_STEPS_KEYS": f'["{K1}", "{K2}"]'},
        {"ARQD_HTTP_STEPS_KEYS": f"{K1},{K2}"},
        {"ARQD_HTTP_STEPS_KEY": K1},
    ],
    ids=["toml-list", "comma-list", "single"],
)
def test_check_config_accepts_a_shared_key_and_never_prints_it(tmp_path: Path, env: dict[str, str]):
    """A shared queue with keys from the environment passes check-config; the keys appear
    in neither its output nor the loaded config's repr."""
    path = dynamo_config(tmp_path)
    done = run_arqd("check-config", "-c", str(path), env={**AWS_ENV, **env})
    assert done.returncode == 0, done.stderr
    config = load_config(path, env)
    shown = done.stdout + done.stderr + repr(config) + str(config) + repr(config.http_steps)
    assert K1 not in shown and K2 not in shown
    assert step_keys(config)[0] == K1.encode()


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"ARQD_HTTP_STEPS_KEYS": f"{K1},{K2[:-3]}"}, "keys[1]: not a Fernet key"),
        ({"ARQD_HTTP_STEPS_KEY": K1[:-2] + "!="}, "key: not a Fernet key"),
        ({"ARQD_HTTP_STEPS_KEY": K1, "ARQD_HTTP_STEPS_KEYS": K2}, "keys or key, not both"),
    ],
    ids=["bad-in-list", "bad-single", "both"],
)
def test_bad_keys_are_refused_without_quoting_them(
    tmp_path: Path, env: dict[str, str], reason: str
):
    """A malformed key, or both key and keys, is a config error naming the setting, and the
    message never quotes a key."""
    done = run_arqd("check-config", "-c", str(dynamo_config(tmp_path)), env={**AWS_ENV, **env})
    assert done.returncode == 1 and "http_steps" in done.stderr and reason in done.stderr
    for value in env.values():
        for key in value.split(","):
            assert key[:20] not in done.stderr


async def test_reload_dropping_the_shared_key_is_refused(
    tmp_path: Path, daemons: Daemons, moto_url: str, remote: Remote
):
    """A daemon on dynamodb reloaded with a config that lost its key refuses the reload
    (config.reload_failed naming the settings; the old config stays): step jobs still run."""
    allow = f'allow_hosts = ["{remote.entry}"]'
    keyed = aws_config(tmp_path, moto_url, "arqd-keys-reload", steps=f'{allow}\nkey = "{K1}"')
    daemon = daemons.start(keyed, env=AWS_ENV)
    daemon.config_path.write_text(aws_config(tmp_path, moto_url, "arqd-keys-reload", steps=allow))
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_log("config.reload_failed")
    assert "http_steps.keys" in failed["error"] and not daemon.events("config.reloaded")
    async with arqd.HttpClient(daemon.url) as client:
        job = await client.request_json("POST", "/v1/jobs", remote.job())
        done = await client.wait(job["id"], timeout=60)
    assert done.state == "succeeded", done.error
    assert K1 not in daemon.log_path.read_text()


# --- the keyring ----------------------------------------------------------------------------------


def test_keys_seal_with_the_first_and_open_with_any():
    """With keys [k2, k1] a value is sealed with k2, and values sealed with k1 still open; a
    keyring without the sealing key answers CredentialsUnreadable."""
    old = seal({"a": 1}, K1.encode())
    ring = (K2.encode(), K1.encode())
    assert unseal(old, ring) == {"a": 1}
    new = seal({"b": 2}, ring)
    assert opens_with(new, K2) and not opens_with(new, K1)
    with pytest.raises(CredentialsUnreadable) as info:
        unseal(new, (K3.encode(), K1.encode()))
    assert "http_steps.keys" in str(info.value)


def test_check_keys_rules(tmp_path: Path):
    """Without a shared queue nothing is required; with one, keys, key or an existing key_file
    pass and nothing else does."""
    existing = tmp_path / "given.key"
    existing.write_text(K1 + "\n")
    existing.chmod(0o600)
    cases: list[tuple[dict[str, Any], bool]] = [
        ({}, False),
        ({"keys": [K1]}, True),
        ({"key": K1}, True),
        ({"key_file": str(existing)}, True),
        ({"key_file": str(tmp_path / "missing.key")}, False),
    ]
    for steps, shared_ok in cases:
        config = Config.from_dict({"http_steps": steps})
        check_keys(config, multi_host=False)
        if shared_ok:
            check_keys(config, multi_host=True)
        else:
            with pytest.raises(ConfigError, match=r"http_steps\.keys"):
                check_keys(config, multi_host=True)


def test_a_key_file_may_hold_several_keys(tmp_path: Path):
    """A key file of several lines is a keyring too: the first line seals, any opens."""
    path = tmp_path / "ring.key"
    path.write_text(f"{K2}\n{K1}\n")
    path.chmod(0o600)
    config = Config.from_dict(
        {"queue": {"backend": "memory"}, "http_steps": {"key_file": str(path)}}
    )
    assert step_keys(config) == (K2.encode(), K1.encode())
