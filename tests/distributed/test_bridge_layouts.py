"""megatron_bridge pure pieces: layout kinds, shard merge/split, names, registry. No processes."""

from __future__ import annotations

import pytest
import torch

from megatron_bridge import HFWeightMeta
from megatron_bridge.families import get_family, register_family
from megatron_bridge.families.base import GLU, QKV, VOCAB, Dims
from megatron_bridge.gather import shard_of
from tests.bridge_helpers import hf_config

# 4 heads in 2 KV groups, head_dim 3: megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
D = Dims(vocab=10, hidden=5, layers=1, heads=4, kv_heads=2, head_dim=3, ffn=4, tied=False)


def _rows(tag: float, n: int) -> torch.Tensor:
    return tag + torch.arange(n * 3, dtype=torch.float32).reshape(n * 3, 1) / 100


def test_qkv_splits_rows_per_kv_group() -> None:
    q, k, v = _rows(1, 4), _rows(2, 2), _rows(3, 2)
    mcore = torch.cat([q[:6], k[:3], v[:3], q[6:], k[3:], v[3:]])
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(mcore, D), (q, k, v), strict=True))
    assert torch.equal(QKV.to_mcore([q, k, v], D, tuple(mcore.shape)), mcore)
    bias = mcore[:, 0]
    assert torch.equal(QKV.to_mcore([t[:, 0] for t in (q, k, v)], D, tuple(bias.shape)), bias)


def test_glu_and_vocab_round_trip() -> None:
    gate, up = torch.randn(4, 5), torch.randn(4, 5)
    fc1 = GLU.to_mcore([gate, up], D, (8, 5))
    assert [torch.equal(a, b) for a, b in zip(GLU.to_hf(fc1, D), (gate, up), strict=True)] == [
        True,
        True,
    ]
    embed = torch.randn(10, 5)
    padded = VOCAB.to_mcore([embed], D, (16, 5))
    assert padded.shape == (16, 5) and torch.equal(padded[10:], torch.zeros(6, 5))
    assert torch.equal(VOCAB.to_hf(padded, D)[0], embed)


@pytest.mark.parametrize(("world", "stride", "dim"), [(2, 1, 0), (2, 2, 0), (4, 2, 0), (2, 1, 1)])
def test_shards_merge_back(world: int, stride: int, dim: int) -> None:
    full = torch.randn(16, 8)
    shards = [shard_of(full, dim, stride, r, world).chunk(stride, dim) for r in range(world)]
    assert torch.equal(torch.cat([s[j] for j in range(stride) for s in shards], dim), full)


def test_strided_shard_holds_gate_and_up_of_its_rank() -> None:
    gate, up = torch.arange(4.0).reshape(4, 1), 10 + torch.arange(4.0).reshape(4, 1)
    shard1 = shard_of(torch.cat([gate, up]), 0, 2, rank=1, world=2)
    assert shard1.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]


def test_te_grouped_expert_names_are_canonicalised() -> None:
    from megatron_bridge.chunks import canonical_name

    name = "decoder.layers.3.mlp.experts.linear_fc1.weight7"
    assert canonical_name(name) == "decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight"
    assert (
        canonical_name("decoder.layers.3.mlp.router.weight") == "decoder.layers.3.mlp.router.weight"
    )


def test_registry_is_explicit() -> None:
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        get_family(type("Cfg", (), {"model_type": "gpt2"})())
    # no substring matching: a look-alike model_type is not llama
    with pytest.raises(ValueError, match="'llama4_text'"):
        get_family(type("Cfg", (), {"model_type": "llama4_text"})())
    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family(hf_config("qwen3")))


def test_unsupported_config_fields_raise() -> None:
    from megatron_bridge.model import build_model

    cfg = hf_config(
        "llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    )
    with pytest.raises(ValueError, match="'rope_type': 'linear'"):
        build_model(cfg)
    with pytest.raises(ValueError, match="mlp_bias"):
        build_model(hf_config("llama", mlp_bias=True))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        build_model(hf_config("qwen3", hidden_act="gelu"))


def test_meta_nbytes() -> None:
    assert HFWeightMeta("w", (3, 4), torch.bfloat16, "u").nbytes == 24


def test_import_is_light_and_patches_nothing() -> None:
    """`import megatron_bridge` pulls in neither megatron nor a patch (patches are explicit)."""
    import subprocess
    import sys

    code = (
        "import sys, torch, megatron_bridge, megatron_bridge.families\n"
        "assert not any(m.startswith('megatron.') for m in sys.modules), 'megatron imported'\n"
        "assert torch.cuda.current_device.__module__ == 'torch.cuda'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
