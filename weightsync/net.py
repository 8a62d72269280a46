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
