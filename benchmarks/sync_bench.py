"""``weightsync bench`` from a checkout: python benchmarks/sync_bench.py [--quick] [--out DIR]."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weightsync.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
