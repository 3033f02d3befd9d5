"""``arqd serve`` as a process: HTTP round trips, bad input, signals, crashes, two daemons."""

from __future__ import annotations

import asyncio
import collections
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

import arqd

from .daemons import Daemons, sqlite_config
from .util import eventually

pytestmark = pytest.mark.timeout(120)


async def test_json_bytes_and_streamed_results(tmp_path: Path, daemons: Daemons):
    """Submit → status → result over HTTP for an inline JSON, a large JSON, a bytes and a
    streamed result; ranged reads answer 206 with the right bytes."""
    d = daemons.start(sqlite_config(tmp_path))
    async with arqd.HttpClient(d.url) as client:
        small = await client.submit("echo", {"hello": "world"})
        big = await client.submit("echo", {"rows": list(range(1000))})
        whole = await client.submit("blob", {"size": 5000, "stream": False})
        streamed = await client.submit("blob", {"size": 3_000_000})
        for job in (small, big, whole, streamed):
            done = await client.wait(job.id, timeout=30)
            assert done.state == "succeeded", done.error
        assert await client.result(small.id) == {"hello": "world"}
        assert await client.result(big.id) == {"rows": list(range(1000))}
        pattern = bytes(range(256)) * 20
        assert await client.result(whole.id) == pattern[:5000]
        total = 0
        async for chunk in client.stream_result(streamed.id):
            total += len(chunk)
        assert total == 3_000_000
    async with aiohttp.ClientSession(d.url) as http:
        async with http.get(f"/v1/jobs/{whole.id}/result", headers={"Range": "bytes=10-19"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == "bytes 10-19/5000"
            assert await r.read() == bytes(range(10, 20))
        async with http.get(f"/v1/jobs/{whole.id}/result", headers={"Range": "bytes=9000-"}) as r:
            assert r.status == 416
        # A result never changes: a client holding it revalidates with its ETag.
        for job in (small, whole):
            async with http.get(f"/v1/jobs/{job.id}/result") as r:
                etag = r.headers["ETag"]
                assert r.status == 200 and await r.read()
            path = f"/v1/jobs/{job.id}/result"
            async with http.get(path, headers={"If-None-Match": etag}) as r:
                assert r.status == 304 and r.headers["ETag"] == etag and await r.read() == b""
            async with http.get(path, headers={"If-None-Match": '"other"'}) as r:
                assert r.status == 200
    canonical = d.events("job.succeeded")
    assert len(canonical) == 4
    for line in canonical:
        assert {"job_id", "handler", "queue", "attempt", "state", "queued_ms", "run_ms"} <= set(
            line
        )
    assert {line["job_id"] for line in canonical} == {small.id, big.id, whole.id, streamed.id}


async def test_status_304_long_poll_and_events(tmp_path: Path, daemons: Daemons):
    """An unchanged status answers 304; a long-poll returns when the job changes; the event
    stream delivers the current state, progress, then the terminal state, and closes."""
    d = daemons.start(sqlite_config(tmp_path))
    async with aiohttp.ClientSession(d.url) as http:
        async with http.post("/v1/jobs", json={"handler": "echo", "delay": 1.0}) as r:
            assert r.status == 202
            job = await r.json()
            assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
        path = f"/v1/jobs/{job['id']}"
        async with http.get(path) as r:
            etag = r.headers["ETag"]
        async with http.get(path, headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        started = time.monotonic()
        async with http.get(path, params={"wait": "20"}, headers={"If-None-Match": etag}) as r:
            assert r.status == 200
            assert r.headers["ETag"] != etag
            assert time.monotonic() - started < 15
        async with http.post(
            "/v1/jobs", json={"handler": "progress", "payload": {"steps": 5, "seconds": 1}}
        ) as r:
            pjob = await r.json()
        events = []
        async with http.get(f"/v1/jobs/{pjob['id']}/events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("event: "):
                    events.append(line[7:])
        assert events[0] == "state"
        assert "progress" in events
        assert events[-1] == "state" and events.count("state") >= 2


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/jobs", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/jobs", b'{"handler": "no-such-handler"}', 422, "unknown_handler"),
        ("POST", "/v1/jobs", b'{"handler": "echo", "colour": 1}', 422, "invalid_request"),
        ("POST", "/v1/jobs", b"[1, 2]", 422, "invalid_request"),
        (
            "POST",
            "/v1/jobs",
            b'{"handler": "echo", "payload": "' + b"x" * 70_000 + b'"}',
            413,
            "too_large",
        ),
        ("POST", "/v1/jobs/batch", b'{"jobs": []}', 422, "invalid_request"),
        ("GET", "/v1/jobs/not-a-job-id", None, 404, "not_found"),
        ("GET", "/v1/jobs/" + "0" * 32, None, 404, "not_found"),
        ("GET", "/v1/jobs/" + "0" * 32 + "/result", None, 404, "not_found"),
        ("GET", "/v1/jobs?limit=5000", None, 422, "invalid_request"),
        ("GET", "/v1/jobs?colour=red", None, 422, "invalid_request"),
        ("GET", "/v1/nowhere", None, 404, "not_found"),
        ("PUT", "/v1/jobs", None, 405, "method_not_allowed"),
    ],
)
async def test_bad_requests_get_the_right_error(
    tmp_path: Path,
    daemons: Daemons,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    code: str,
):
    """Each bad request gets its status and the JSON error body; the daemon keeps serving."""
    d = daemons.start(sqlite_config(tmp_path))
    async with aiohttp.ClientSession(d.url) as http:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        async with http.request(method, path, data=body, headers=headers) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert err["code"] == code and err["message"]
        async with http.get("/healthz") as r:
            assert r.status == 200
    assert not [line for line in d.lines() if "raw" in line and "Traceback" in line["raw"]]


async def test_batch_is_all_or_nothing(tmp_path: Path, daemons: Daemons):
    """One invalid spec in a batch stores none of them."""
    d = daemons.start(sqlite_config(tmp_path))
    async with aiohttp.ClientSession(d.url) as http:
        bad = {"jobs": [{"handler": "echo"}, {"handler": "echo", "max_attempts": 0}]}
        async with http.post("/v1/jobs/batch", json=bad) as r:
            assert r.status == 422
            assert "jobs[1].max_attempts" in (await r.json())["error"]["message"]
        async with http.get("/v1/jobs") as r:
            assert (await r.json())["jobs"] == []
        good = {"jobs": [{"handler": "echo", "payload": i} for i in range(3)]}
        async with http.post("/v1/jobs/batch", json=good) as r:
            assert r.status == 202
            assert len((await r.json())["jobs"]) == 3


async def test_delete_cancels_then_deletes(tmp_path: Path, daemons: Daemons):
    """DELETE cancels a queued job (200), requests cancel of a running one (202) and deletes a
    finished one (204, then 404)."""
    d = daemons.start(sqlite_config(tmp_path))
    async with arqd.HttpClient(d.url) as client, aiohttp.ClientSession(d.url) as http:
        later = await client.submit("echo", 1, delay=600)
        async with http.delete(f"/v1/jobs/{later.id}") as r:
            assert r.status == 200 and (await r.json())["state"] == "cancelled"
        slow = await client.submit("sleep", {"seconds": 60})

        async def running() -> bool:
            return (await client.get(slow.id)).state == "running"

        await eventually(running)
        async with http.delete(f"/v1/jobs/{slow.id}") as r:
            assert r.status == 202 and (await r.json())["cancel_requested"] is True
        assert (await client.wait(slow.id, timeout=20)).state == "cancelled"
        async with http.delete(f"/v1/jobs/{slow.id}") as r:
            assert r.status == 204
        async with http.get(f"/v1/jobs/{slow.id}") as r:
            assert r.status == 404


async def test_queues_redrive_and_workers(tmp_path: Path, daemons: Daemons):
    """Queue counts, redrive of failed jobs and the worker list reflect what happened."""
    d = daemons.start(sqlite_config(tmp_path))
    async with arqd.HttpClient(d.url) as client:
        failed = await client.submit("fail", max_attempts=1)
        assert (await client.wait(failed.id, timeout=20)).state == "failed"
        queues = await client.request_json("GET", "/v1/queues")
        default = next(q for q in queues["queues"] if q["name"] == "default")
        assert default["failed"] == 1
        assert await client.request_json("POST", "/v1/queues/default/redrive") == {"requeued": 1}
        redriven = await client.wait(failed.id, timeout=20)
        assert redriven.state == "failed" and redriven.attempts == 1
        workers = (await client.request_json("GET", "/v1/workers"))["workers"]
        assert len(workers) == 1 and workers[0]["concurrency"] == 32
        jobs, _ = await client.list(state="failed")
        assert [j.id for j in jobs] == [failed.id]


async def test_sighup_applies_new_concurrency_without_dropping_jobs(
    tmp_path: Path, daemons: Daemons
):
    """SIGHUP with more concurrency is applied (visible in /v1/workers) while a long job keeps
    running; SIGHUP with a broken config is refused and the old config stays in force."""
    d = daemons.start(sqlite_config(tmp_path, workers="concurrency = 2"))
    async with arqd.HttpClient(d.url) as client:
        long = await client.submit("sleep", {"seconds": 3})

        async def running() -> bool:
            return (await client.get(long.id)).state == "running"

        await eventually(running)
        d.config_path.write_text(sqlite_config(tmp_path, workers="concurrency = 7"))
        d.signal(signal.SIGHUP)
        d.wait_log("config.reloaded")

        async def resized() -> bool:
            workers = (await client.request_json("GET", "/v1/workers"))["workers"]
            return bool(workers) and workers[0]["concurrency"] == 7

        await eventually(resized)
        assert (await client.get(long.id)).state == "running"
        d.config_path.write_text("[workers]\nconcurrency = 'lots'\n")
        d.signal(signal.SIGHUP)
        failed = d.wait_log("config.reload_failed")
        assert "workers.concurrency" in failed["error"]
        done = await client.wait(long.id, timeout=20)
        assert done.state == "succeeded" and done.attempts == 1
        workers = (await client.request_json("GET", "/v1/workers"))["workers"]
        assert workers[0]["concurrency"] == 7


async def test_sighup_with_a_changed_backend_keeps_the_running_one(
    tmp_path: Path, daemons: Daemons
):
    """A reload that changes the queue backend says a restart is needed and keeps serving the
    old one, applying the rest."""
    d = daemons.start(sqlite_config(tmp_path))
    changed = sqlite_config(tmp_path, workers="concurrency = 5").replace(
        str(tmp_path / "q.sqlite3"), str(tmp_path / "other.sqlite3")
    )
    d.config_path.write_text(changed)
    d.signal(signal.SIGHUP)
    warning = d.wait_log("config.restart_required")
    assert warning["sections"] == ["queue"]
    assert d.wait_log("config.reloaded")["concurrency"] == 5
    assert not (tmp_path / "other.sqlite3").exists()


async def test_sigterm_releases_running_job_for_the_next_daemon(tmp_path: Path, daemons: Daemons):
    """SIGTERM during a long job exits 0 within the grace period; the job is released (attempt
    given back) and a new daemon completes it without waiting for the visibility timeout."""
    config = sqlite_config(tmp_path, workers='shutdown_grace = "1s"\nvisibility_timeout = "60s"')
    first = daemons.start(config)
    async with arqd.HttpClient(first.url) as client:
        job = await client.submit("sleep", {"seconds": 2.5}, timeout=30)

        async def running() -> bool:
            return (await client.get(job.id)).state == "running"

        await eventually(running)
    stopped = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait_exit(15) == 0
    assert time.monotonic() - stopped < 8
    second = daemons.start(config)
    async with arqd.HttpClient(second.url) as client:
        done = await client.wait(job.id, timeout=30)
        assert done.state == "succeeded" and done.attempts == 1
    assert time.monotonic() - stopped < 30  # far less than the 60 s visibility timeout


async def test_kill_9_job_completes_after_visibility_timeout(tmp_path: Path, daemons: Daemons):
    """kill -9 during a job loses nothing: a restarted daemon completes it after the
    visibility timeout, as attempt 2."""
    config = sqlite_config(tmp_path, workers='visibility_timeout = "2s"')
    first = daemons.start(config)
    async with arqd.HttpClient(first.url) as client:
        job = await client.submit("sleep", {"seconds": 3})

        async def running() -> bool:
            return (await client.get(job.id)).state == "running"

        await eventually(running)
    first.kill()
    second = daemons.start(config)
    async with arqd.HttpClient(second.url) as client:
        done = await client.wait(job.id, timeout=40)
    assert done.state == "succeeded" and done.attempts == 2


async def test_two_daemons_share_one_sqlite_file(tmp_path: Path, daemons: Daemons):
    """Two daemons on one sqlite file complete 2,000 jobs, each exactly once, both working."""
    log = tmp_path / "runs.log"
    config = sqlite_config(tmp_path, workers="concurrency = 16")
    a = daemons.start(config, "a")
    b = daemons.start(config, "b")
    async with arqd.HttpClient(a.url) as ca, arqd.HttpClient(b.url) as cb:
        for i in range(0, 2000, 500):
            client = ca if i % 1000 == 0 else cb
            await client.submit_many(
                [{"handler": "record", "payload": {"log": str(log)}} for _ in range(500)]
            )

        async def finished() -> bool:
            queues = (await ca.request_json("GET", "/v1/queues"))["queues"]
            return next(q for q in queues if q["name"] == "default")["succeeded"] == 2000

        await eventually(finished, 60)
    runs = collections.Counter()
    pids = set()
    for line in log.read_text().splitlines():
        job_id, what, pid, _ = line.split()
        runs[job_id, what] += 1
        pids.add(pid)
    assert len(runs) == 4000 and set(runs.values()) == {1}
    assert len(pids) == 2


async def test_long_polls_see_changes_made_by_another_daemon(tmp_path: Path, daemons: Daemons):
    """Daemon A runs no jobs; long-polls (and an event stream) on A for jobs that daemon B runs
    return when B changes them, through A's one follower of remote changes."""
    api = daemons.start(sqlite_config(tmp_path, workers="concurrency = 0"), "api")
    daemons.start(sqlite_config(tmp_path, workers="concurrency = 4"), "worker")
    async with aiohttp.ClientSession(api.url) as http:
        # Running for 3 s: longer than two rounds of the follower (1 s), so it is seen.
        async with http.post("/v1/jobs", json={"handler": "sleep", "payload": {"seconds": 3}}) as r:
            job = await r.json()
            etag = r.headers["ETag"]
        path = f"/v1/jobs/{job['id']}"
        seen = [job["state"]]
        while seen[-1] != "succeeded":
            async with http.get(path, params={"wait": "30"}, headers={"If-None-Match": etag}) as r:
                assert r.status == 200  # a change, not a timeout (304)
                etag = r.headers["ETag"]
                seen.append((await r.json())["state"])
        assert "running" in seen
    follows = [line for line in api.lines() if line.get("event") == "backend.follow_failed"]
    assert follows == []


async def test_sd_notify_protocol(tmp_path: Path, daemons: Daemons):
    """The daemon speaks sd_notify: READY=1 once listening, RELOADING=1 with MONOTONIC_USEC then
    READY=1 around SIGHUP, WATCHDOG=1 when the watchdog is on, STOPPING=1 on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    try:
        d = daemons.start(
            sqlite_config(tmp_path),
            env={
                "NOTIFY_SOCKET": str(sock_path),
                "WATCHDOG_USEC": "400000",
            },
        )
        messages: list[str] = []

        def receive_until(wanted: str) -> None:
            while not any(wanted in m for m in messages):
                messages.append(sock.recv(4096).decode())

        receive_until("READY=1")
        receive_until("WATCHDOG=1")
        d.signal(signal.SIGHUP)
        receive_until("RELOADING=1")
        reloading = next(m for m in messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        messages.clear()
        receive_until("READY=1")
        d.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert d.wait_exit(15) == 0
    finally:
        sock.close()


async def test_refuses_to_listen_beyond_loopback_without_tokens(tmp_path: Path):
    """arqd serve refuses a non-loopback listen address when no tokens are configured."""
    config = tmp_path / "open.toml"
    config.write_text(sqlite_config(tmp_path).replace("127.0.0.1:0", "0.0.0.0:0"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "arqd",
        "serve",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"server.listen" in err and b"allow_anonymous" in err
