"""int4 weight quantization on one grid, shared by training (QAT) and rollout (packing).

The trainer's fake-quant forward and the engine's dequantization of our packed checkpoint must
give the same bits, or rollouts are sampled from a policy the trainer never saw. Peers compute
codes with an fp32 scale and then store the scale in bf16, so the engine multiplies by a
slightly different scale than the trainer did and codes near a rounding boundary flip. Here the
scale is rounded to its storage dtype FIRST, codes are computed against that stored value, and
dequantization is the exact op compressed-tensors runs: ``(q - zp).to(dtype) * scale``.

Grid (per group of ``K`` consecutive input elements of one output row):
  symmetric:  scale = max|x| / 7, codes q = round(x / scale) in [-7, 7], stored as q + 8.
  asymmetric: lo = min(min x, 0), hi = max(max x, 0) (0 always exact), scale = (hi - lo) / 15,
              zp = round(-lo / scale) in [0, 15], q = round(x / scale) + zp in [0, 15].
  scale >= 1e-5; rounding is half-to-even (torch.round).

Packed layout (compressed-tensors "pack-quantized"): word j of a row holds elements 8j..8j+7,
element 8j+k in bits 4k..4k+3 as an unsigned nibble. Asymmetric zero points are packed the
same way along the OUTPUT dim. Bit work is done on uint8 (never int8: ``x << 4`` overflows for
nibbles >= 8 in int8 on some backends) and the bytes are reinterpreted as little-endian int32.

Shape legend: E experts, O out features, I in features, G groups per row (I / K), K group size,
P packed words per row (I / 8), Q packed zero-point rows (O / 8).
"""

from __future__ import annotations

import sys

import torch

from weightsync.quant.kernels import native

SCALE_FLOOR = 1e-5
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Rows per chunk: keeps the fp32 temporaries of a 4096-wide row block inside L2.
_CHUNK_ELEMS = 1 << 18

assert sys.byteorder == "little", "int32 views of packed bytes assume a little-endian host"


def check_weight(w: torch.Tensor, group_size: int, symmetric: bool, name: str) -> int:
    """Validate a weight for int4 packing; return the effective group size K."""
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: dtype {w.dtype} cannot be int4-quantized; allowed {FLOAT_DTYPES}"
        )
    if w.dim() not in (2, 3):
        raise ValueError(
            f"{name}: shape {tuple(w.shape)} is not a 2-D Linear weight [out, in] "
            "or a 3-D expert stack [E, out, in]"
        )
    out_dim, in_dim = w.shape[-2], w.shape[-1]
    k = in_dim if group_size in (-1, None) else group_size
    if k <= 0 or in_dim % k != 0:
        raise ValueError(
            f"{name}: group_size={group_size} must be -1 (per channel) or a "
            f"positive divisor of the input dim {in_dim}"
        )
    if in_dim % 8 != 0:
        raise ValueError(
            f"{name}: input dim {in_dim} must be a multiple of 8 (8 nibbles per int32 word)"
        )
    if not symmetric and out_dim % 8 != 0:
        raise ValueError(
            f"{name}: output dim {out_dim} must be a multiple of 8 for asymmetric "
            "quantization (zero points are packed 8 per word along the output dim)"
        )
    return k


def _non_finite(name: str) -> ValueError:
    return ValueError(f"{name}: weight has non-finite values (NaN/Inf); refusing to quantize")


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    # CUDA torch turns division by a Python scalar into a multiply by its reciprocal, which
    # is not correctly rounded; dividing by a tensor keeps IEEE division on every device.
    return x.div_(torch.full_like(x, c))


def _grid_rows(w_RGK: torch.Tensor, symmetric: bool, dtype: torch.dtype, name: str):
    """Scale (storage dtype), fp32 view of it, and zero point (fp32) for a block of rows."""
    if symmetric:
        amax_RG = w_RGK.abs().amax(-1)
        scale_RG = _div(amax_RG, 7.0).clamp_(min=SCALE_FLOOR).to(dtype)
        zp_RG = None
    else:
        lo_RG = w_RGK.amin(-1).clamp_(max=0.0)
        hi_RG = w_RGK.amax(-1).clamp_(min=0.0)
        scale_RG = _div(hi_RG.sub_(lo_RG), 15.0).clamp_(min=SCALE_FLOOR).to(dtype)
    scale_f_RG = scale_RG.float()
    if not torch.isfinite(scale_f_RG).all():
        raise _non_finite(name)
    if not symmetric:
        zp_RG = torch.round(lo_RG.neg_().div_(scale_f_RG)).clamp_(0, 15)
    return scale_RG, scale_f_RG, zp_RG


def _codes_rows(w_RGK, scale_f_RG, zp_RG) -> torch.Tensor:
    """Unsigned codes in [0, 15] (fp32) for a block of rows."""
    q_RGK = torch.round(w_RGK / scale_f_RG.unsqueeze(-1))
    if zp_RG is None:
        return q_RGK.clamp_(-7, 7).add_(8)
    return q_RGK.add_(zp_RG.unsqueeze(-1)).clamp_(0, 15)


def quantize(w: torch.Tensor, group_size: int, symmetric: bool, name: str = "weight"):
    """Return (codes uint8 [..., O, I] in [0, 15], scale [..., O, G] in w.dtype, zp uint8|None)."""
    return _quantize(w, check_weight(w, group_size, symmetric, name), symmetric, name)


def _quantize(w: torch.Tensor, k: int, symmetric: bool, name: str):
    w_RI = w.reshape(-1, w.shape[-1])
    rows, in_dim = w_RI.shape
    g = in_dim // k
    codes_RI = torch.empty(rows, in_dim, dtype=torch.uint8, device=w.device)
    scale_RG = torch.empty(rows, g, dtype=w.dtype, device=w.device)
    zp_RG = None if symmetric else torch.empty(rows, g, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK_ELEMS // in_dim)
    for r in range(0, rows, step):
        w_CGK = w_RI[r : r + step].float().view(-1, g, k)
        s, s_f, zp = _grid_rows(w_CGK, symmetric, w.dtype, name)
        codes_RI[r : r + step] = _codes_rows(w_CGK, s_f, zp).view(-1, in_dim)
        scale_RG[r : r + step] = s
        if zp_RG is not None:
            zp_RG[r : r + step] = zp
    lead = w.shape[:-1]
    zp_out = None if zp_RG is None else zp_RG.view(*lead, g)
    return codes_RI.view(w.shape), scale_RG.view(*lead, g), zp_out


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' dequantization, op for op: (q - zp).to(dtype) * scale per group."""
    *lead, in_dim = codes.shape
    g = scale.shape[-1]
    offset = 8 if zp is None else zp.to(torch.int16).unsqueeze(-1)
    q = codes.view(*lead, g, in_dim // g).to(torch.int16) - offset
    return (q.to(scale.dtype) * scale.unsqueeze(-1)).view(*lead, in_dim)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., N] in [0, 15] -> int32 [..., N / 8]; element 8j+k in bits 4k of word j."""
    assert codes.dtype == torch.uint8 and codes.shape[-1] % 8 == 0
    # A fresh tensor: .contiguous() may keep a size-1 dim's odd stride, which .view rejects.
    bytes_ = torch.empty(
        *codes.shape[:-1], codes.shape[-1] // 2, dtype=torch.uint8, device=codes.device
    )
    torch.bitwise_or(codes[..., 0::2], codes[..., 1::2] << 4, out=bytes_)
    return bytes_.view(torch.int32)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., N / 8] -> uint8 codes [..., N]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    bytes_ = packed.contiguous().view(torch.uint8)
    return torch.stack((bytes_ & 0xF, bytes_ >> 4), dim=-1).flatten(-2)


def pack_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = True, name: str = "weight"
) -> dict[str, torch.Tensor]:
    """Quantize and pack one weight into compressed-tensors pack-quantized entries.

    Returns ``weight_packed`` int32 [..., O, I/8], ``weight_scale`` [..., O, G] in the weight's
    dtype, ``weight_shape`` int64 (the weight's shape: [2] for a Linear, [3] for an expert
    stack), and for asymmetric ``weight_zero_point`` int32 [..., O/8, G].
    """
    w = weight.detach()
    k = check_weight(w, group_size, symmetric, name)
    kernel = _kernel(w, k)
    if kernel is not None:
        packed, scale, zp = _pack_fused(kernel, w, k, symmetric, name)
    else:
        codes, scale, zp = _quantize(w, k, symmetric, name)
        packed = pack_nibbles(codes)
    out = {
        "weight_packed": packed,
        "weight_scale": scale,
        "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }
    if zp is not None:
        out["weight_zero_point"] = pack_nibbles(zp.transpose(-1, -2)).transpose(-1, -2).contiguous()
    return out


def _kernel(w: torch.Tensor, k: int):
    """The fused kernel (``weightsync.quant.kernels``) for ``w``, or None: the torch grid."""
    if not w.is_cuda:
        return native if native.supports(w, k) else None
    try:
        from weightsync.quant.kernels import triton_int4
    except ImportError:  # no Triton: the torch reference runs on the GPU instead
        return None
    return triton_int4 if triton_int4.supports(w, k) else None


def _pack_fused(kernel, w: torch.Tensor, k: int, symmetric: bool, name: str):
    packed, scale, zp, bad = kernel.pack_rows(w.reshape(-1, w.shape[-1]), k, symmetric)
    if bad:
        raise _non_finite(name)
    lead = w.shape[:-1]
    zp = None if zp is None else zp.view(*lead, -1)
    return packed.view(torch.int32).view(*lead, -1), scale.view(*lead, -1), zp


def unpack_int4(
    tensors: dict[str, torch.Tensor], group_size: int, symmetric: bool = True
) -> torch.Tensor:
    """Dequantize pack-quantized entries back to a dense weight in the scale's dtype."""
    shape = tuple(int(d) for d in tensors["weight_shape"].tolist())
    codes = unpack_nibbles(tensors["weight_packed"]).view(shape)
    scale = tensors["weight_scale"]
    k = shape[-1] if group_size in (-1, None) else group_size
    if scale.shape[-1] * k != shape[-1]:
        raise ValueError(
            f"weight_scale {tuple(scale.shape)} does not match weight_shape {shape} "
            f"with group_size={group_size}"
        )
    zp = None
    if not symmetric:
        if "weight_zero_point" not in tensors:
            raise ValueError("asymmetric unpack needs weight_zero_point")
        zp_GQ = tensors["weight_zero_point"].transpose(-1, -2)
        zp = unpack_nibbles(zp_GQ).transpose(-1, -2)[..., : shape[-2], :]
    return dequantize(codes, scale, zp)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward on the int4 grid, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
        codes, scale, zp = quantize(w, group_size, symmetric)
        return dequantize(codes, scale, zp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quant_int4(weight: torch.Tensor, group_size: int, symmetric: bool = True) -> torch.Tensor:
    """QAT forward: equals ``unpack_int4(pack_int4(weight))`` bit for bit; gradient passes through.

    (A ``w + (fq - w).detach()`` formulation would be off by one ulp in bf16, so a custom
    autograd Function carries the straight-through gradient instead.)
    """
    return _FakeQuantSTE.apply(weight, group_size, symmetric)
