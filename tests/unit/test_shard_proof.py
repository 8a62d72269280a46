"""verify's expected fingerprints from trainer slices (weightsync.shard_proof): the parts of
the slices the holdings tile each tensor with add up to what proof.checkpoint_fingerprints
gives for the whole tensors (the gathered path's expectation), bf16 and int4."""

from __future__ import annotations

import pytest
import torch

from megatron_bridge.holdings import ParallelSizes, plan_holdings
from tests.bridge_helpers import hf_config
from weightsync.proof import Probe, checkpoint_fingerprints
from weightsync.quant.config import Int4Config
from weightsync.quant.stream import quantize_stream
from weightsync.shard_proof import expected, slice_part


def _whole(holdings) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {h.name: h.shape for h in holdings}
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in sorted(shapes.items())}


def _parts(holdings, full, probe, int4=None) -> list[dict[str, list[dict]]]:
    """Each rank's parts: the slices it is the first holder of, read off the whole tensors."""
    ranks: dict[int, dict[str, list[dict]]] = {}
    for h in holdings:
        piece = full[h.name][tuple(slice(lo, hi) for lo, hi in h.box)]
        part = slice_part(h.name, piece, h.box, h.shape, probe, int4)
        ranks.setdefault(h.ranks[0], {}).setdefault(h.name, []).append(part)
    return list(ranks.values())


@pytest.mark.parametrize("level", ["sample", "full"])
@pytest.mark.parametrize(
    "family,sizes",
    [("llama", dict(world=4, tp=2)), ("qwen2_moe", dict(world=4, tp=2, ep=2)), ("qwen3", {})],
)
def test_slice_parts_add_up_to_the_whole_tensors_fingerprints(family, sizes, level) -> None:
    sizes = dict(world=1) | sizes
    holdings = plan_holdings(hf_config(family, num_hidden_layers=2), ParallelSizes(**sizes))
    full = _whole(holdings)
    probe = Probe(seed=11, level=level)
    got = expected(_parts(holdings, full, probe))
    assert len({h.box for h in holdings}) > 1 and got == checkpoint_fingerprints(full, probe)


@pytest.mark.parametrize("symmetric,tp", [(True, 2), (False, 1)])
def test_int4_slices_fingerprint_as_the_whole_packed_weight(symmetric, tp) -> None:
    cfg = Int4Config(group_size=8, symmetric=symmetric)
    holdings = plan_holdings(hf_config("llama", num_hidden_layers=2), ParallelSizes(2, tp=tp))
    full = _whole(holdings)
    probe = Probe(seed=5, level="sample", group=8)
    want = checkpoint_fingerprints(dict(quantize_stream(full.items(), cfg)), probe, 8, symmetric)
    assert expected(_parts(holdings, full, probe, cfg)) == want


def test_a_wrong_element_in_one_slice_changes_that_weight_alone() -> None:
    holdings = plan_holdings(hf_config("llama", num_hidden_layers=2), ParallelSizes(2, tp=2))
    full = _whole(holdings)
    probe = Probe(seed=3, level="full")
    name = "model.layers.1.self_attn.o_proj.weight"
    bad = dict(full) | {name: full[name].clone()}
    bad[name][0, -1] += 1
    got, want = expected(_parts(holdings, bad, probe)), checkpoint_fingerprints(full, probe)
    assert [n for n in want if got[n] != want[n]] == [name]


def test_a_tied_heads_alias_is_hashed_on_its_own_columns() -> None:
    """The engine reads a tied head under its own name, so sampled columns differ from the
    embedding's: the alias's parts are hashed under the alias (ShardedSender._proof_parts)."""
    holdings = plan_holdings(hf_config("qwen3", num_hidden_layers=2), ParallelSizes(2, tp=2))
    full = _whole(holdings)
    probe = Probe(seed=9, level="sample")
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    parts = [
        slice_part(head, full[embed][tuple(slice(a, b) for a, b in h.box)], h.box, h.shape, probe)
        for h in holdings
        if h.name == embed
    ]
    want = checkpoint_fingerprints({head: full[embed]}, probe)[head]
    assert expected([{head: parts}])[head] == want
    assert want != checkpoint_fingerprints({embed: full[embed]}, probe)[embed]  # other columns
