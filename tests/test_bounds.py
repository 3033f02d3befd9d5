"""``arqd serve`` keeps its memory bounded by configuration, not by what clients send, and takes
clients that go away as a normal event (docs/operations.md, "Worst-case memory")."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .daemons import Daemon, Daemons, sqlite_config

pytestmark = pytest.mark.timeout(180)

PARKED = "parked"  # no daemon here consumes it: jobs stay queued
JOBS = 200
PAYLOAD = 1_000_000  # bytes of payload per job
RSS_GROWTH_MAX = 100 * 1024**2


def rss(daemon: Daemon) -> int:
    """The daemon's resident set size in bytes (``VmRSS`` of ``/proc/<pid>/status``)."""
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def test_reading_large_jobs_keeps_rss_bounded(tmp_path: Path, daemons: Daemons):
    """200 jobs of 1 MB payload, each read (twice, as status polls do), listed in pages of up to
    1,000 and then long-polled all at once grow the daemon's RSS by less than 100 MB, and the
    listing still yields every job once through its cursors."""
    d = daemons.start(sqlite_config(tmp_path), env={"ARQD_SERVER_MAX_BODY": '"2MiB"'})
    http = requests.Session()
    before = rss(d)
    ids = []
    for i in range(JOBS):
        spec = {"handler": "echo", "queue": PARKED, "payload": {"i": i, "data": "x" * PAYLOAD}}
        resp = http.post(f"{d.url}/v1/jobs", json=spec, timeout=30)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    for job_id in ids * 2:
        resp = http.get(f"{d.url}/v1/jobs/{job_id}", timeout=30)
        assert resp.status_code == 200 and len(resp.content) > PAYLOAD
    listed: list[str] = []
    cursor = None
    while True:
        params = {"queue": PARKED, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = http.get(f"{d.url}/v1/jobs", params=params, timeout=60).json()
        listed += [job["id"] for job in page["jobs"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert listed == ids[::-1]  # newest first, each once
    polls = []
    for job_id in ids:  # every job long-polled at once: a held request holds no job body
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        sock.sendall(f"GET /v1/jobs/{job_id}?wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        polls.append(sock)
    try:
        deadline = time.monotonic() + 30
        while held_requests(d) < JOBS:
            assert time.monotonic() < deadline, f"only {held_requests(d)} long-polls held"
            time.sleep(0.1)
        growth = rss(d) - before
    finally:
        for sock in polls:
            sock.close()
    assert growth < RSS_GROWTH_MAX, f"RSS grew by {growth / 1024**2:.0f} MB"


def held_requests(daemon: Daemon) -> float:
    """``arqd_http_held_requests`` as scraped from the daemon."""
    text = requests.get(f"{daemon.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "arqd_http_held_requests":
            return float(family.samples[0].value)
    raise AssertionError("no arqd_http_held_requests in /metrics")


def dropped(daemon: Daemon, path: str, read: int, reset: bool = False) -> None:
    """GET ``path``, read ``read`` bytes of the answer, then hang up (``reset``: with a RST)."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    got = 0
    while got < read:
        chunk = sock.recv(min(65536, read - got))
        assert chunk, f"{path}: the daemon closed first"
        got += len(chunk)
    if reset:  # SO_LINGER 0: close() sends a RST, as a killed client does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_hanging_up_are_not_errors(tmp_path: Path, daemons: Daemons):
    """Event streams, long-polls and result downloads whose clients hang up end within a few
    seconds (the held gauge is back to 0) and leave no traceback, error or warning in the log,
    only ``http.client_gone`` debug lines; an upload cut short does not either."""
    d = daemons.start(sqlite_config(tmp_path), env={"ARQD_LOG_LEVEL": "debug"})
    http = requests.Session()
    running = http.post(
        f"{d.url}/v1/jobs", json={"handler": "sleep", "payload": {"seconds": 120}}, timeout=10
    ).json()["id"]
    big = http.post(
        f"{d.url}/v1/jobs", json={"handler": "blob", "payload": {"size": 8_000_000}}, timeout=10
    ).json()["id"]
    deadline = time.monotonic() + 30
    while http.get(f"{d.url}/v1/jobs/{big}", timeout=10).json()["state"] != "succeeded":
        assert time.monotonic() < deadline, "the blob job did not finish"
        time.sleep(0.05)
    for i in range(40):
        dropped(d, f"/v1/jobs/{running}/events", read=200, reset=i % 2 == 0)
        dropped(d, f"/v1/jobs/{big}/result", read=300_000, reset=i % 2 == 0)
    for i in range(40):
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        sock.sendall(f"GET /v1/jobs/{running}?wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    upload = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    upload.sendall(
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 5000\r\n\r\n{"handler": '
    )
    upload.close()
    deadline = time.monotonic() + 15  # gone clients are noticed within a second or two
    while held_requests(d) > 0:
        assert time.monotonic() < deadline, f"{held_requests(d)} requests still held"
        time.sleep(0.1)
    assert http.get(f"{d.url}/v1/jobs/{running}", timeout=10).json()["state"] == "running"
    noise = [
        line
        for line in d.lines()
        if "raw" in line or line.get("level") in ("warning", "error", "critical")
    ]
    assert not noise, json.dumps(noise[:20], indent=1)
    gone = [line for line in d.lines() if line.get("event") == "http.client_gone"]
    assert {line.get("route") for line in gone} >= {"events", "result", "long_poll"}
    assert all(line["level"] == "debug" for line in gone)
