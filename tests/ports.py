"""Free TCP ports for the servers tests start (SeaweedFS, Ray heads and nodes).

Below the ephemeral range: there the kernel hands ports to any process's outgoing connections
(Ray's, say), which could take one between a test's check and its server's bind. Ray's workers
take 10002-19999, and `ray start` refuses a named port there.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = range(10002, 20000)


def ephemeral_start() -> int:
    """Where the kernel starts handing out ports to outgoing connections (Linux's default: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(taken: set[int] | None = None, twin: int = 0) -> int:
    """A free port from RAY_WORKER_PORTS' end to the ephemeral range, not in `taken` (ports already
    handed out for one server; added to). With `twin`, port + twin is free too (SeaweedFS serves
    gRPC on port + 10000)."""
    taken = set() if taken is None else taken
    while True:
        port = random.randrange(RAY_WORKER_PORTS.stop, max(ephemeral_start() - twin, RAY_WORKER_PORTS.stop + 1))
        wanted = {port, port + twin}
        if not wanted & taken and all(map(bindable, wanted)):
            taken |= wanted
            return port
