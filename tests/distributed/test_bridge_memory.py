"""The exporter streams: its extra peak memory is about one atomic unit, not the model."""

from __future__ import annotations

import pytest

from benchmarks.bridge_memory import run
from tests.models import tiny_dims
from weightsync.config import MiB


@pytest.mark.slow
def test_export_extra_peak_memory_stays_near_the_largest_unit() -> None:
    # The tiny model grown until its bytes dwarf one unit's.
    dims = tiny_dims(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    source, other = run(dims)
    unit, model = source["largest_unit_bytes"], source["model_bytes"]
    assert model > 16 * unit  # the bound below must be able to tell the two apart
    # Shards are received straight into the full tensor (one unit) plus at most one shard.
    assert source["extra_peak_bytes"] < 2 * unit, source
    assert other["extra_peak_bytes"] < 4 * MiB, other  # it only sends its own shards
