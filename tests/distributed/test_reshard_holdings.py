"""The trainer half of the reshard plan against real megatron shards: every slice a rank is
said to hold, read from its own parameters, equals that slice of the gathered export."""

from __future__ import annotations

import pytest

from tests.bridge_helpers import run_ranks
from tests.holdings_jobs import check_holdings

# Layouts test_shard_transfer does not send from (it reads every slice of its own layouts:
# DP replicas, tied PP=2, EP=2, MLA with ETP=2).
CASES = [
    ("llama", 2, 2, 1, 1, 4),  # TP=2 x PP=2
    ("qwen2_moe", 2, 1, 1, 2, 2),  # experts cut by ETP=2
]


@pytest.mark.parametrize("family,tp,pp,ep,etp,world", CASES, ids=lambda x: str(x))
def test_every_held_slice_is_the_exports_slice(family, tp, pp, ep, etp, world) -> None:
    results = run_ranks(check_holdings, world, family, tp, pp, ep, etp)
    for rank, r in enumerate(results):
        assert r["wrong"] == [], f"rank {rank}: slices differ from the export: {r['wrong'][:5]}"
        assert r["checked"] > 0 and r["names"], (rank, r)
