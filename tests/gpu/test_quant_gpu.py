"""The Triton kernel on a CUDA device: same bits as the reference grid (run on a lent GPU)."""

import pytest
import torch

from weightsync.quant import fake_quant_int4, pack_int4
from weightsync.quant import int4 as ref

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[..., 0, :] = w[..., 0, :].abs() + 1.0
    w[..., 1, :] = -w[..., 1, :].abs()
    w[..., 2, :] = 0.3
    w[..., 3, :] = 0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(200, 512), (3, 64, 256)])
def test_triton_equals_reference_on_cpu_and_cuda(dtype, symmetric, group_size, shape):
    w = sample(dtype, shape)
    gpu = pack_int4(w.cuda(), group_size, symmetric)
    codes, scale, zp = ref.quantize(w, group_size, symmetric)  # CPU torch reference
    assert torch.equal(gpu["weight_packed"].cpu(), ref.pack_nibbles(codes))
    assert torch.equal(gpu["weight_scale"].cpu(), scale)
    if not symmetric:
        zp_ref = ref.pack_nibbles(zp.transpose(-1, -2).contiguous()).transpose(-1, -2)
        assert torch.equal(gpu["weight_zero_point"].cpu(), zp_ref)
    # The QAT forward on the GPU (torch ops) lands on the same grid as the Triton packer.
    fq = fake_quant_int4(w.cuda(), group_size, symmetric)
    assert torch.equal(fq.cpu(), fake_quant_int4(w, group_size, symmetric))


def test_triton_refuses_non_finite():
    w = sample(torch.bfloat16, (64, 256)).cuda()
    w[10, 100] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        pack_int4(w, 128, True, name="experts.w1")
