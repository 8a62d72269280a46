"""Network helpers shared by the trainer side, the engine launcher, tests and benchmarks."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` ("" = every interface) a moment ago.

    The socket is closed before the port is used, so another process can take it in between:
    whoever binds it must fail loudly when it is taken (or check who answers on it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def node_address(loopback: bool) -> str:
    """Where processes on other hosts reach this one: loopback when all of them are local
    (nothing then listens beyond this host), else the Ray node's address."""
    if loopback:
        return "127.0.0.1"
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
