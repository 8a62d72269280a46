"""int4 grid and packing, held to compressed-tensors' own decompressor as the oracle."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsync.quant import fake_quant_int4, pack_int4, unpack_int4
from weightsync.quant import int4 as ref
from weightsync.quant.kernels import native

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def ct_scheme(group_size: int, symmetric: bool) -> QuantizationScheme:
    strategy = "channel" if group_size == -1 else "group"
    args = QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=None if group_size == -1 else group_size,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_decompress(packed: dict, group_size: int, symmetric: bool) -> torch.Tensor:
    return PackedQuantizationCompressor.decompress(dict(packed), ct_scheme(group_size, symmetric))[
        "weight"
    ]


def hard_weight(dtype: torch.dtype, shape=(64, 256), seed=0) -> torch.Tensor:
    """Random rows plus the groups peers get wrong: all-positive, all-negative, constant, zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[..., 0, :] = w[..., 0, :].abs() + 1.0  # all positive, far from 0
    w[..., 1, :] = -w[..., 1, :].abs() - 1.0  # all negative
    w[..., 2, :] = 0.3  # constant
    w[..., 3, :] = 0.0  # zero
    w[..., 4, :] = 1e-7  # below the scale floor
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_ct_decompress_equals_fake_quant(dtype, symmetric, group_size):
    w = hard_weight(dtype)
    packed = pack_int4(w, group_size, symmetric)
    fq = fake_quant_int4(w, group_size, symmetric)
    assert fq.dtype == dtype and packed["weight_scale"].dtype == dtype
    assert torch.equal(ct_decompress(packed, group_size, symmetric), fq)
    assert torch.equal(unpack_int4(packed, group_size, symmetric), fq)


@pytest.mark.parametrize("symmetric", [True, False])
def test_layout_matches_compressed_tensors(symmetric):
    w = hard_weight(torch.bfloat16, (16, 64))
    packed = pack_int4(w, 32, symmetric)
    assert packed["weight_packed"].dtype == torch.int32
    assert packed["weight_packed"].shape == (16, 8)
    assert packed["weight_scale"].shape == (16, 2)
    assert packed["weight_shape"].tolist() == [16, 64]
    assert ("weight_zero_point" in packed) == (not symmetric)
    if not symmetric:
        # Packed along the OUTPUT dim: [ceil(out/8), groups], not AWQ's transposed [groups, out/8].
        assert packed["weight_zero_point"].shape == (2, 2)
        assert packed["weight_zero_point"].dtype == torch.int32


def test_asymmetric_codes_clamped_in_one_sided_groups():
    """All-positive/all-negative groups keep every nibble in [0, 15] (peers overflow)."""
    w = hard_weight(torch.bfloat16)
    codes, _, zp = ref.quantize(w, 32, symmetric=False)
    assert int(codes.max()) <= 15 and int(zp.max()) <= 15
    err = (fake_quant_int4(w, 32, False).float() - w.float()).abs()
    assert err[0].max() < 0.05 * w[0].float().abs().max()  # one-sided groups keep accuracy
    assert torch.equal(fake_quant_int4(w, 32, False)[3], w[3])  # 0 stays exact


def test_expert_stack_3d():
    w = hard_weight(torch.bfloat16, (4, 32, 128))
    for symmetric in (True, False):
        packed = pack_int4(w, 64, symmetric)
        assert packed["weight_packed"].shape == (4, 32, 16)
        assert packed["weight_shape"].tolist() == [4, 32, 128]
        fq = fake_quant_int4(w, 64, symmetric)
        # compressed-tensors' dequantize infers the strategy from 2-D scales only: decode the
        # stack expert by expert with it.
        for e in range(4):
            one = {k: v[e] for k, v in packed.items() if k != "weight_shape"}
            one["weight_shape"] = packed["weight_shape"][1:]
            assert torch.equal(ct_decompress(one, 64, symmetric), fq[e])
        assert torch.equal(unpack_int4(packed, 64, symmetric), fq)
        per_expert = torch.stack([fake_quant_int4(e, 64, symmetric) for e in w])
        assert torch.equal(fq, per_expert)


def test_all_nibbles_in_every_position():
    # Every value 0..15 lands in every one of the 8 positions of a word, both dims.
    codes = ((torch.arange(8)[None, :] + torch.arange(16)[:, None]) % 16).to(torch.uint8)
    codes = codes.repeat(2, 1)  # [32, 8]: 32 rows so the output-dim packing has 4 words
    packed = ref.pack_nibbles(codes)
    oracle = pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4)
    assert torch.equal(packed, oracle)
    assert torch.equal(ref.unpack_nibbles(packed), codes)
    col = ref.pack_nibbles(codes.T.contiguous()).T
    assert torch.equal(col, pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4, 0))
    back = unpack_from_int32(packed, 4, codes.shape)
    assert torch.equal(back.to(torch.int16) + 8, codes.to(torch.int16))


def test_scale_rounded_before_codes():
    """The peer bug: codes from an fp32 scale, stored bf16 scale -> train/rollout mismatch."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    g = w.float().view(256, 8, 32)
    scale32 = (g.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-5)
    peer_codes = torch.round(g / scale32).clamp(-7, 7)
    peer_train = (peer_codes * scale32).to(torch.bfloat16).view(256, 256)
    engine = ct_decompress(pack_int4(w, 32, True), 32, True)
    assert torch.equal(engine, fake_quant_int4(w, 32, True))
    assert not torch.equal(engine, peer_train)  # the peer recipe really does drift


@pytest.mark.skipif(native.load() is None, reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_kernel_equals_reference(dtype, symmetric):
    w = torch.cat([hard_weight(dtype, (64, 512), seed=s) for s in range(3)])
    w[7, 9] = -0.0
    fast = pack_int4(w, 128, symmetric)
    codes, scale, zp = ref.quantize(w, 128, symmetric)
    assert torch.equal(fast["weight_packed"], ref.pack_nibbles(codes))
    assert torch.equal(fast["weight_scale"], scale)
    if zp is not None:
        zp_ref = ref.pack_nibbles(zp.T.contiguous()).T
        assert torch.equal(fast["weight_zero_point"], zp_ref)


def test_fake_quant_straight_through_gradient():
    w = hard_weight(torch.float32, (16, 64)).requires_grad_()
    out = fake_quant_int4(w, 32, True)
    out.backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out))
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=torch.float32).view_as(w))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6).map(lambda r: 8 * r),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 32, 64]),
    symmetric=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(1e-6, 1e3),
    offset=st.floats(-10, 10),
    seed=st.integers(0, 2**16),
)
def test_property_ct_oracle(rows, groups, group_size, symmetric, dtype, scale, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, groups * group_size, generator=gen) * scale + offset).to(dtype)
    packed = pack_int4(w, group_size, symmetric)
    fq = fake_quant_int4(w, group_size, symmetric)
    assert torch.equal(ct_decompress(packed, group_size, symmetric), fq)
    assert torch.equal(unpack_int4(packed, group_size, symmetric), fq)
