"""The sync benchmark, `--quick`: every section is there, for real processes and real kernels.

Timings are measured, never asserted: the machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runner import BenchConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_bench_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.sync_bench", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert {"config", "quant", "sync", "vllm", "summary"} <= report.keys()
    rows = [r for m in report["sync"] for r in m["rows"]]
    combos = {(r["transport"], r["int4"], r["bucket_mib"]) for r in rows}
    transports = ("broadcast", "ipc")
    assert combos == {(t, q, b) for t in transports for q in (False, True) for b in (16, 64)}
    for r in rows:
        assert r["sync_s"] > 0 and r["raw_s"] > 0 and r["extra_peak_bytes"] >= 0
        assert r["receiver"].startswith("weightsync receiver")
        assert {"export_s", "quantize_s", "transfer_s", "engine_load_s"} <= r["stages_s"].keys()
    int4_bytes = {r["nbytes"] for r in rows if r["int4"]}
    bf16_bytes = {r["nbytes"] for r in rows if not r["int4"]}
    assert max(int4_bytes) < min(bf16_bytes)  # packed weights really went over the wire
    assert report["quant"]["cpu"]["ours_over_compressed_tensors"] > 0
    assert {"sync_over_raw_median", "mem_over_2_buckets_worst"} <= report["summary"].keys()
    assert (out / "bench.png").stat().st_size > 0
    assert "| sync/raw |" in (out / "bench.md").read_text()


def test_config_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="sizes"):
        BenchConfig(out_dir="x", sizes=("3T",))
    with pytest.raises(ValueError, match="transports"):
        BenchConfig(out_dir="x", transports=("pigeon",))
