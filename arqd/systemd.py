"""The sd_notify protocol, spoken without libsystemd: one datagram per message to the Unix
socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name starting with ``@``)."""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send ``READY=1``-style lines; answer whether a supervisor was listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp systemd ≥ 253 asks for."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
