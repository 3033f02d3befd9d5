"""The start checks (``arqd.daemon.preflight``) run at start, on every reload and in
``arqd check-config``: a reload can never weaken exposure (issue 12)."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import arqd
from arqd.config import Config
from arqd.daemon import check_exposure

from .daemons import ROOT, Daemons, sqlite_config

SECRET = "ops-preflight-secret-0123456789"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
TOKENS = f'[auth]\ntokens = [{{ name = "ops", sha256 = "{DIGEST}", scopes = ["admin"] }}]\n'
BEARER = {"Authorization": f"Bearer {SECRET}"}


async def test_reload_cannot_open_an_exposed_daemon(tmp_path: Path, daemons: Daemons):
    """A daemon on 0.0.0.0 with tokens, sent SIGHUP with a tokenless config, refuses the reload
    (also when the new file says 127.0.0.1: the running listen address is what counts), keeps
    answering 401 to anonymous admin calls and counts the failures; a config with tokens still
    reloads."""
    exposed = sqlite_config(tmp_path).replace("127.0.0.1:0", "0.0.0.0:0")
    d = daemons.start(exposed + TOKENS)
    async with aiohttp.ClientSession(d.url) as http:
        for count, config in enumerate((exposed, sqlite_config(tmp_path)), start=1):
            d.config_path.write_text(config)
            d.signal(signal.SIGHUP)
            failed = d.wait_log("config.reload_failed", count=count)
            assert "no tokens" in failed["error"]
            async with http.get("/v1/queues") as r:
                assert r.status == 401
        d.config_path.write_text(
            exposed.replace("poll_max", 'shutdown_grace = "5s"\npoll_max') + TOKENS
        )
        d.signal(signal.SIGHUP)
        d.wait_log("config.reloaded")
        async with http.get("/metrics", headers=BEARER) as r:
            text = await r.text()
        assert 'arqd_config_reloads_total{result="failed"} 2.0' in text
        async with http.get("/v1/queues") as r:
            assert r.status == 401


def test_check_config_refuses_an_unresolvable_listen_host(tmp_path: Path):
    """``arqd check-config`` runs the start checks: a listen host that resolves to nothing is a
    config error naming server.listen, even with tokens."""
    config = tmp_path / "c.toml"
    body = sqlite_config(tmp_path).replace("127.0.0.1:0", "no-such-host.invalid:8080")
    config.write_text(body + TOKENS)
    proc = subprocess.run(
        [sys.executable, "-m", "arqd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout
    assert "server.listen" in proc.stderr and "no-such-host.invalid" in proc.stderr


def fake_resolver(table: dict[str, list[str]]) -> Callable[..., list[Any]]:
    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    return getaddrinfo


@pytest.mark.parametrize(
    ("host", "addresses", "loopback"),
    [
        ("arqd.internal", ["127.0.0.1", "::1"], True),
        ("mixed.internal", ["127.0.0.1", "10.0.0.7"], False),
        ("localhost", ["10.0.0.5"], False),  # by what it resolves to, not by its name
        ("127.0.0.2", ["127.0.0.2"], True),
        ("0.0.0.0", ["0.0.0.0"], False),
    ],
)
def test_a_listen_name_counts_by_what_it_resolves_to(
    monkeypatch: pytest.MonkeyPatch, host: str, addresses: list[str], loopback: bool
):
    """A tokenless daemon may listen on a host name only if every address it resolves to is a
    loopback address."""
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({host: addresses}))
    config = Config.from_dict({"server": {"listen": f"{host}:8080"}})
    if loopback:
        check_exposure(config)
    else:
        with pytest.raises(arqd.ConfigError, match="no tokens"):
            check_exposure(config)
