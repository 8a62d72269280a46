"""`ray job submit` of the demo to a Ray head started here (127.0.0.1), as on a real cluster.

The head gets its own temp dir, so stopping it kills exactly its processes (``ray stop``
would also kill any other Ray instance on the machine).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from weightsync.net import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _kill_head(temp_dir: str) -> None:
    procs = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(temp_dir in part for part in (p.info["cmdline"] or []))
    ]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="wsrj", dir="/tmp")  # short: Ray's socket paths
    port, dash = free_port(), free_port()
    env = dict(os.environ)  # Ray's token auth stays on: the token in ~/.ray opens the head
    cmd = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        _kill_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_demo_as_a_ray_job(ray_head, tmp_path):
    out = tmp_path / "job"
    t0 = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/ray_job/submit.py"),
            "--address",
            ray_head,
            "--steps",
            "3",
            "--out",
            str(out),
            "--timeout-s",
            "600",
        ],
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SUCCEEDED" in result.stdout
    report = json.loads((out / "report.json").read_text())
    versions = [s["engine_version"] for s in report["steps"]]
    assert versions == ["1", "2", "3"], versions
    assert all(s["sync"]["verified"] for s in report["steps"])
    print(f"ray job round trip: {time.monotonic() - t0:.0f} s")
