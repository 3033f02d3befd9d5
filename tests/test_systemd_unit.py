"""systemd/arqd.service states what docs/cli.md and the operations guide promise."""

from __future__ import annotations

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "arqd.service"


def load() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def seconds(value: str) -> float:
    return float(value.rstrip("s"))


def test_unit_is_a_notify_service_with_reload_and_grace():
    """Type=notify, reload by SIGHUP, and a stop timeout above the 30 s default grace."""
    service = load()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert seconds(service["TimeoutStopSec"]) > 30
    assert service["StateDirectory"] == "arqd"
    assert "arqd serve" in service["ExecStart"]


def test_unit_is_hardened():
    """A dedicated user and the hardening options the operations guide relies on."""
    service = load()["Service"]
    assert service["User"] == "arqd"
    for option, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service[option] == value
