"""int4 on slices (weightsync.quant.shards): a slice quantized alone equals that slice of the
whole weight's codes, scales and zero points, or is refused."""

from __future__ import annotations

import pytest
import torch

from weightsync.quant.config import Int4Config
from weightsync.quant.shards import encode, packed_parts
from weightsync.quant.stream import quantize_named

NAME = "model.layers.0.self_attn.o_proj.weight"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("box", [((0, 16), (0, 64)), ((8, 24), (32, 64)), ((16, 32), (16, 48))])
def test_a_slice_quantized_alone_is_the_slice_of_the_whole(symmetric, box) -> None:
    cfg = Int4Config(group_size=16, symmetric=symmetric)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = dict(quantize_named(NAME, w, cfg))
    (r0, r1), (c0, c1) = box
    parts = packed_parts(NAME, tuple(w.shape), box, w.dtype, cfg)
    got = encode(NAME, w[r0:r1, c0:c1], cfg)
    assert [p[0].rsplit(".", 1)[1] for p in parts] == ["weight_packed", "weight_scale"] + (
        [] if symmetric else ["weight_zero_point"]
    )
    for (name, pbox, dtype), t in zip(parts, got, strict=True):
        want = whole[name][tuple(slice(lo, hi) for lo, hi in pbox)]
        assert t.dtype == dtype and torch.equal(t, want), name


@pytest.mark.parametrize(
    "box,symmetric",
    [
        (((0, 32), (0, 24)), True),  # columns end inside a group
        (((0, 32), (4, 20)), True),  # not whole int32 words either
        (((4, 12), (0, 64)), False),  # zero points pack 8 rows per word
    ],
)
def test_an_inexact_slice_is_refused_naming_the_tensor(box, symmetric) -> None:
    cfg = Int4Config(group_size=16, symmetric=symmetric)
    with pytest.raises(ValueError, match=r"o_proj.*not fall on int4 group boundaries"):
        packed_parts(NAME, (32, 64), box, torch.bfloat16, cfg, where=" for engine X")


def test_unquantized_tensors_pass_whole() -> None:
    cfg = Int4Config(group_size=16)
    box = ((0, 3), (0, 64))
    assert packed_parts("model.norm.weight", (64,), ((0, 64),), torch.float32, cfg) == [
        ("model.norm.weight", ((0, 64),), torch.float32)
    ]
    emb = "model.embed_tokens.weight"
    assert packed_parts(emb, (100, 64), box, torch.bfloat16, cfg) == [(emb, box, torch.bfloat16)]
