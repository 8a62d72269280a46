"""Staging before the pause (``SyncConfig.stage_bytes``): megatron TP=2 over gloo, real export.

Whatever part of the update is staged, the buckets that leave the source rank are the same
bytes as a fully streamed update, every rank stays in step through the export's collectives,
and a staged export abandoned by a failed update is dropped by the next ``prepare``.
"""

from __future__ import annotations

import pytest
import torch

from tests.bridge_helpers import hf_config, run_ranks
from weightsync.plan import Bucket
from weightsync.transport.base import Ticket

pytestmark = pytest.mark.slow
BUDGETS = (0, 40 << 10, 1 << 30)  # nothing, a few units, everything


class _Recorder:
    """A transport sender that keeps a copy of every bucket it is handed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, torch.Tensor]] = []
        self._bufs: dict = {}

    def buffers(self, bucket: Bucket) -> dict[torch.dtype, torch.Tensor]:
        return {g.dtype: torch.empty(g.numel, dtype=g.dtype) for g in bucket.groups}

    def send(self, bucket: Bucket, buffers: dict) -> Ticket:
        self.sent.append({str(d): b.clone() for d, b in buffers.items()})
        return Ticket(bucket.index)

    def acknowledge(self, ticket: Ticket) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _job(rank: int, world: int, int4: bool) -> dict:
    import megatron_bridge as mb
    from weightsync.config import SyncConfig
    from weightsync.quant import Int4Config
    from weightsync.sender import WeightSender

    mb.init_parallel(tp=2)
    torch.manual_seed(0)
    cfg = hf_config("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    chunks = mb.build_model(cfg, params_dtype=torch.bfloat16)
    quant = Int4Config(group_size=32) if int4 else None
    out = {}
    for budget in BUDGETS:
        ws = WeightSender(chunks, cfg, SyncConfig(bucket_bytes=1 << 20, stage_bytes=budget), quant)
        if budget:
            # An update that failed after staging: the next prepare drops it on every rank.
            ws.prepare()
            ws.stage()
        ws.prepare()
        staged = ws.stage()
        recorder = _Recorder()
        stats = ws.send([], recorder if ws.is_source else None)
        out[budget] = {
            "staged": staged,
            "stats_staged": stats.staged_bytes,
            "total": stats.nbytes,
            "sent": recorder.sent,
        }
    return out


@pytest.mark.parametrize("int4", [False, True], ids=["bf16", "int4"])
def test_staged_updates_send_the_same_bytes(int4: bool) -> None:
    source, other = run_ranks(_job, 2, int4)
    full = source[0]["sent"]
    assert full and source[0]["staged"] == 0
    partial, everything = source[BUDGETS[1]], source[BUDGETS[2]]
    assert 0 < partial["staged"] <= BUDGETS[1] and partial["staged"] == partial["stats_staged"]
    assert everything["staged"] == everything["total"]
    for budget in BUDGETS[1:]:
        sent = source[budget]["sent"]
        assert len(sent) == len(full)
        for got, want in zip(sent, full, strict=True):
            assert got.keys() == want.keys()
            assert all(
                torch.equal(got[d].view(torch.uint8), want[d].view(torch.uint8)) for d in want
            )
    assert all(not other[b]["sent"] for b in BUDGETS)  # only the source rank sends
