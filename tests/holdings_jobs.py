"""What each rank runs in the reshard-holdings process tests (spawned via bridge_helpers)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.bridge_helpers import hf_config


def check_holdings(rank: int, world: int, family: str, tp: int, pp: int, ep: int, etp: int):
    """Every slice the holdings say this rank holds, read from its own parameters, equals that
    slice of the full export (megatron's own gathers: an oracle the holdings do not share)."""
    from megatron.core import parallel_state as ps

    import megatron_bridge as mb
    from megatron_bridge.chunks import local_tensors
    from megatron_bridge.families import get_family
    from megatron_bridge.holdings import live_holdings, local_slice

    mb.init_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    cfg = hf_config(family, num_hidden_layers=2)
    chunks = mb.build_model(cfg)
    distinct_values(chunks[0])
    holdings = live_holdings(chunks, cfg)
    full = {n: t.clone() for n, t in mb.export_hf_weights(chunks, cfg)}  # collective
    box = [full]
    dist.broadcast_object_list(box, src=0)
    full = box[0]
    tensors, dims = local_tensors(chunks), get_family(cfg).dims(cfg)
    checked, wrong = 0, []
    for h in holdings:
        if rank not in h.ranks:
            continue
        mine = local_slice(tensors, h, dims)
        want = full[h.name][tuple(slice(lo, hi) for lo, hi in h.box)]
        checked += 1
        if not torch.equal(mine, want):
            wrong.append((h.name, h.box))
    covered = {h.name for h in holdings}
    ps.destroy_model_parallel()
    return {"checked": checked, "wrong": wrong, "names": covered == set(full)}


def distinct_values(chunk: torch.nn.Module, std: float = 1.0) -> None:
    """Random values per shard: equal on the replicas megatron keeps equal (data-parallel
    copies, a replicated norm across TP ranks), different wherever shards differ, so reading
    another rank's block cannot pass unnoticed."""
    import zlib

    from megatron.core import parallel_state as ps

    from megatron_bridge.gather import is_sharded

    for name, p in chunk.named_parameters():
        expert = ".experts.local_experts." in name
        key = [name, ps.get_pipeline_model_parallel_rank()]
        if expert:
            key.append(ps.get_expert_model_parallel_rank())
        if is_sharded(p):
            key.append(
                ps.get_expert_tensor_parallel_rank()
                if expert
                else ps.get_tensor_model_parallel_rank()
            )
        g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        values = torch.randn(p.shape, generator=g) * std
        if std < 1 and p.dim() == 1:
            values += 1  # norms near 1: small weights, yet a model whose outputs tell them apart
        p.data.copy_(values.to(p.dtype))
