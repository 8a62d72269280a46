"""The README stays true to the code: its Python compiles, its config table names real fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from weightsync.config import SyncConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_python_blocks_compile():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for i, code in enumerate(blocks):
        compile(code, f"README.md python block {i}", "exec")


def test_config_table_lists_every_sync_config_field_with_its_default():
    section = README.split("`SyncConfig` (", 1)[1].split("\n\n", 2)[1]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, flags=re.M))
    fields = {f.name: f.default for f in dataclasses.fields(SyncConfig)}
    assert rows.keys() == fields.keys()
    for name, default in fields.items():
        shown = rows[name].strip().strip("`")
        if isinstance(default, int) and not isinstance(default, bool) and default >= 1 << 20:
            assert shown == f"{default >> 20} MiB", name
        else:
            assert shown == str(default) or shown == f"{default:g}", name
