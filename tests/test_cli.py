"""The ``arqd`` command against a running daemon, and its exit statuses."""

from __future__ import annotations

import ast
import asyncio
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from arqd.api import JobsAPI
from arqd.cli import Progress
from arqd.model import Progress as Reported
from arqd.model import State
from arqd.view import Job

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
    assert run.stderr.splitlines()[-1].startswith("progress succeeded  100%  ")
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


def test_serve_on_a_taken_port_says_so(tmp_path: Path):
    """`arqd serve` on a port another socket holds exits 1 with one line naming the setting and
    the reason, not a traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(sqlite_config(tmp_path).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        run = arqd("serve", "-c", str(config))
    assert run.returncode == 1
    assert f"server.listen: cannot listen on 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_token_new_prints_secret_and_config_line():
    """token new prints a fresh secret once and the [auth] line holding its SHA-256."""
    import hashlib

    run = arqd("token", "new", "web", "--scopes", "submit,read")
    assert run.returncode == 0
    secret = run.stdout.split("store it now): ")[1].split()[0]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert f'name = "web", sha256 = "{digest}", scopes = ["submit", "read"]' in run.stdout


def test_jobs_pages_with_the_cursor_it_prints(tmp_path: Path, daemons: Daemons):
    """`arqd jobs --limit 2` prints a `--cursor` hint, and that cursor gives the next page."""
    d = daemons.start(sqlite_config(tmp_path, workers='queues = ["other"]'))
    for n in range(3):
        assert arqd("submit", "echo", "--payload", str(n), url=d.url).returncode == 0
    first = arqd("jobs", "--limit", "2", url=d.url)
    assert first.returncode == 0, first.stderr
    cursor = re.search(r"\(more: --cursor ([0-9a-f]{32})\)", first.stdout)
    assert cursor is not None, first.stdout
    second = arqd("jobs", "--limit", "2", "--cursor", cursor.group(1), url=d.url)
    assert second.returncode == 0 and "(more:" not in second.stdout
    ids = re.findall(r"^([0-9a-f]{32}) ", first.stdout + second.stdout, re.M)
    assert len(ids) == len(set(ids)) == 3


def test_steps_key_new_prints_a_fernet_key():
    """`arqd steps-key new` prints one fresh Fernet key alone on stdout."""
    from cryptography.fernet import Fernet

    run = arqd("steps-key", "new")
    assert run.returncode == 0
    key = run.stdout.strip()
    assert run.stdout == key + "\n" and Fernet(key.encode()).decrypt(Fernet(key).encrypt(b"x"))
    assert arqd("steps-key", "new").stdout != run.stdout


# --- submit --wait: cheap, and readable in a pipe and on a terminal ----------------------------

TERMINAL_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}  # a UTF-8 terminal, whatever the host's locale


def in_terminal(*args: str, url: str, stdout_too: bool = False) -> tuple[int, str, bytes]:
    """Run ``arqd`` with stderr (and stdout if ``stdout_too``) on a pseudo-terminal 100 columns
    wide; answer its exit status, what the terminal received, and the piped stdout."""
    command, *rest = args
    argv = [sys.executable, "-m", "arqd", command, "--url", url, *rest]
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=side if stdout_too else subprocess.PIPE,
        stderr=side,
        cwd=ROOT,
        env=TERMINAL_ENV,
    )
    os.close(side)
    received = bytearray()
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the process closed its end of the terminal
            break
        if not data:
            break
        received += data
    os.close(main)
    piped = proc.stdout.read() if proc.stdout is not None else b""
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.wait(60), received.decode(), piped


def frames(screen: str) -> list[str]:
    """The successive contents of the terminal's line: each redraw (``\\r``), each new line."""
    return [f for f in re.split(r"[\r\n]+", screen.replace("\x1b[K", "")) if f]


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


def test_submit_wait_piped_prints_a_line_per_state(tmp_path: Path, daemons: Daemons):
    """Piped, submit --wait prints at most one line per state the job goes through (no redraws),
    each with the progress reported then and the elapsed time."""
    d = daemons.start(sqlite_config(tmp_path))
    run = arqd("submit", "progress", "--payload", '{"steps": 3, "seconds": 3}', "--wait", url=d.url)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"steps": 3}
    assert "\r" not in run.stderr and len(run.stderr) < 300, run.stderr[:300]
    lines = run.stderr.splitlines()
    states = [line.split()[1] for line in lines]
    assert states == sorted(set(states), key=states.index), lines  # one line per state
    assert set(states) <= {"queued", "running", "succeeded"} and states[-1] == "succeeded"
    assert re.fullmatch(r"progress succeeded  100%  (step 3 of 3|done)  0:0[2-9]", lines[-1])


def test_submit_wait_on_a_terminal_draws_a_bar(tmp_path: Path, daemons: Daemons):
    """On a terminal, submit --wait redraws one line: a bar with the percentage, the handler's
    message and the elapsed time (``progress ▕███▎      ▏  33%  step 2 of 3  0:01``), then ends
    it with a newline; stdout keeps only the result."""
    d = daemons.start(sqlite_config(tmp_path))
    payload = '{"steps": 3, "seconds": 3}'
    status, screen, out = in_terminal(
        "submit", "progress", "--payload", payload, "--wait", url=d.url
    )
    assert status == 0, screen
    assert json.loads(out) == {"steps": 3}
    shown = frames(screen)
    bar = r"progress ▕[█▉▊▋▌▍▎▏ ]{10}▏ {1,3}\d{1,3}%  (step \d of 3|done)  0:0\d"
    assert all(re.fullmatch(bar, f) or re.fullmatch(r"progress . queued  0:0\d", f) for f in shown)
    assert any(re.fullmatch(r"progress ▕███▎      ▏  33%  step 2 of 3  0:0[0-2]", f) for f in shown)
    assert any(f.endswith("  0:02") for f in shown), shown  # the clock runs between changes
    final = r"progress ▕██████████▏ 100%  (step 3 of 3|done)  0:0[3-9]"
    assert re.fullmatch(final, shown[-1]), shown[-1]
    assert screen.endswith("\r\n")


def test_submit_wait_on_a_terminal_spins_without_progress(tmp_path: Path, daemons: Daemons):
    """A handler that reports no progress gets a spinner with its state and the elapsed time."""
    d = daemons.start(sqlite_config(tmp_path))
    status, screen, _ = in_terminal(
        "submit", "sleep", "--payload", '{"seconds": 1.5}', "--wait", url=d.url
    )
    assert status == 0, screen
    shown = frames(screen)
    spinning = [f for f in shown if re.fullmatch(r"sleep [⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] running  0:0[0-2]", f)]
    assert len({f.split()[1] for f in spinning}) > 3, shown
    assert re.fullmatch(r"sleep • succeeded  0:0[1-3]", shown[-1]), shown[-1]


def test_failed_job_prints_its_error_on_a_terminal(tmp_path: Path, daemons: Daemons):
    """A job that fails under submit --wait ends with one line on stderr naming the error type
    and message, then exit status 1; the job JSON still goes to stdout."""
    d = daemons.start(sqlite_config(tmp_path))
    payload = '{"permanent": true, "message": "disk on fire"}'
    status, screen, out = in_terminal("submit", "fail", "--payload", payload, "--wait", url=d.url)
    assert status == 1
    job = json.loads(out)
    assert job["state"] == "failed"
    assert frames(screen)[-1] == f"arqd: job {job['id']} failed: Fail: disk on fire"


def test_result_ends_with_a_newline_only_on_a_terminal(tmp_path: Path, daemons: Daemons):
    """arqd result adds a final newline on a terminal, and never to piped bytes."""
    d = daemons.start(sqlite_config(tmp_path))
    run = arqd("submit", "echo", "--payload", '{"a": 1}', "--wait", url=d.url)
    assert run.returncode == 0, run.stderr
    job_id = arqd("jobs", "--limit", "1", url=d.url).stdout.splitlines()[1].split()[0]
    piped = subprocess.run(
        [sys.executable, "-m", "arqd", "result", "--url", d.url, job_id],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )
    assert piped.stdout == b'{"a":1}'
    status, screen, _ = in_terminal("result", job_id, url=d.url, stdout_too=True)
    assert status == 0 and screen == '{"a":1}\r\n'


def test_progress_falls_back_to_ascii():
    """A terminal that cannot show block characters gets an ASCII bar and spinner."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    shown = Progress(out, "resize", started=0.0)
    job = Job(
        id="0" * 32,
        queue="default",
        handler="resize",
        state=State.RUNNING,
        created_at=datetime.now(UTC),
        ready_at=datetime.now(UTC),
        progress=Reported(fraction=0.5, message="half"),
    )
    assert shown.line(job).startswith("resize [#####     ]  50%  half  ")
    spinning = msgspec.structs.replace(job, progress=None)
    assert shown.line(spinning).startswith("resize | running  ")


def test_operator_commands(tmp_path: Path, daemons: Daemons):
    """queues, redrive, purge and trigger answer from the daemon, each in its one line (or the
    group's JSON), through HttpClient's public methods."""
    group = '[groups.pair]\njobs = [{ handler = "echo", payload = 1 }, { handler = "noop" }]'
    d = daemons.start(sqlite_config(tmp_path, extra=group))
    failed = arqd("submit", "fail", "--payload", '{"permanent": true}', "--wait", url=d.url)
    assert failed.returncode == 1
    queues = arqd("queues", url=d.url)
    (row,) = [line.split() for line in queues.stdout.splitlines() if line.startswith("default ")]
    assert row[1:6] == ["0", "0", "0", "1", "0"], queues.stdout
    redrive = arqd("redrive", "default", url=d.url)
    assert (redrive.returncode, redrive.stdout) == (0, "requeued 1 failed jobs of default\n")
    arqd("submit", "echo", "--payload", "1", "--wait", url=d.url)
    purge = arqd("purge", "--area", "temporary", url=d.url)
    assert purge.returncode == 0 and purge.stdout.startswith("purged ")
    assert purge.stdout.endswith(" results from the temporary area\n")
    trigger = arqd("trigger", "pair", url=d.url)
    assert trigger.returncode == 0, trigger.stderr
    answer = json.loads(trigger.stdout)["group"]
    assert answer["name"] == "pair" and len(answer["jobs"]) == 2
    missing = arqd("redrive", "no/such", url=d.url)
    assert missing.returncode == 1 and "not_found" in missing.stderr


def test_the_cli_uses_only_public_client_methods():
    """Every call the CLI makes on its HttpClient is a method of arqd.JobsAPI or HttpClient.poll:
    no ``_call``, no ``request_json`` with a path written out in the CLI."""
    tree = ast.parse((ROOT / "arqd" / "cli.py").read_text())
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "client"
    }
    allowed = {name for name in vars(JobsAPI) if not name.startswith("_")} | {"poll"}
    assert called and called <= allowed, called - allowed
