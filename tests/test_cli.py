"""The ``arqd`` command against a running daemon, and its exit statuses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from .daemons import ROOT, Daemons, sqlite_config
from .faultproxy import FaultProxy


def arqd(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env_url = ["--url", url] if url else []
    command, *rest = args
    argv = [sys.executable, "-m", "arqd", command, *rest]
    if url and command not in {"token", "check-config", "serve"}:
        argv = [sys.executable, "-m", "arqd", command, *env_url, *rest]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_submit_wait_status_result_and_queues(tmp_path: Path, daemons: Daemons):
    """submit --wait shows progress then prints the result; status, result -o and queues work."""
    d = daemons.start(sqlite_config(tmp_path))
    run = arqd(
        "submit", "progress", "--payload", '{"steps": 3, "seconds": 0.6}', "--wait", url=d.url
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"steps": 3}
    assert "100%" in run.stderr
    sub = arqd("submit", "blob", "--payload", '{"size": 1000, "stream": false}', url=d.url)
    job = json.loads(sub.stdout)
    arqd("submit", "noop", "--wait", url=d.url)
    status = arqd("status", job["id"], url=d.url)
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job["id"]
    out = tmp_path / "result.bin"
    got = arqd("result", job["id"], "-o", str(out), url=d.url)
    assert got.returncode == 0 and out.read_bytes() == (bytes(range(256)) * 4)[:1000]
    queues = arqd("queues", url=d.url)
    assert queues.returncode == 0 and "default" in queues.stdout


def test_failed_job_and_refused_request_exit_1(tmp_path: Path, daemons: Daemons):
    """A job that fails, or a request the daemon refuses, exits 1 with the reason."""
    d = daemons.start(sqlite_config(tmp_path))
    failed = arqd("submit", "fail", "--payload", '{"permanent": true}', "--wait", url=d.url)
    assert failed.returncode == 1 and '"failed"' in failed.stdout
    unknown = arqd("submit", "no-such-handler", url=d.url)
    assert unknown.returncode == 1 and "unknown_handler" in unknown.stderr
    missing = arqd("status", "0" * 32, url=d.url)
    assert missing.returncode == 1 and "not_found" in missing.stderr


def test_bad_usage_exits_2():
    """Bad usage exits 2."""
    assert arqd("submit").returncode == 2
    assert arqd("submit", "echo", "--payload", "{not json").returncode == 2
    assert arqd("token", "new", "x", "--scopes", "everything").returncode == 2


def test_check_config(tmp_path: Path):
    """check-config accepts the repository config and names file and setting of a bad one."""
    ok = arqd("check-config", "-c", str(ROOT / "config.toml"))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[workers]\nvisibility_timeout = 'soon'\n")
    refused = arqd("check-config", "-c", str(bad))
    assert refused.returncode == 1
    assert str(bad) in refused.stderr and "workers.visibility_timeout" in refused.stderr


def test_serve_refuses_an_invalid_config(tmp_path: Path):
    """arqd serve exits 2 on an invalid config, naming the file, the setting and the reason."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[handlers]\necho = { call = 'arqd.demo:echo', retries = 3 }\n")
    run = arqd("serve", "-c", str(bad))
    assert run.returncode == 2
    assert str(bad) in run.stderr and "handlers.echo.retries: unknown setting" in run.stderr


def test_token_new_prints_secret_and_config_line():
    """token new prints a fresh secret once and the [auth] line holding its SHA-256."""
    import hashlib

    run = arqd("token", "new", "web", "--scopes", "submit,read")
    assert run.returncode == 0
    secret = run.stdout.split("store it now): ")[1].split()[0]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert f'name = "web", sha256 = "{digest}", scopes = ["submit", "read"]' in run.stdout


async def test_submit_wait_costs_few_requests(tmp_path: Path, daemons: Daemons):
    """submit --wait on a job queued 0.5 s then running 2 s costs at most 5 requests (submit,
    long-polls with the answered ETag, result), where it polled without pause."""
    d = daemons.start(sqlite_config(tmp_path))
    async with FaultProxy(d.url) as proxy:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "arqd", "submit", "--url", proxy.url, "sleep"],
            *["--payload", '{"seconds": 2}', "--delay", "0.5", "--wait"],
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"slept": 2.0}
    assert proxy.forwarded <= 5, proxy.forwarded
