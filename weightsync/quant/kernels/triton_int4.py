"""Fused int4 quantize + pack on CUDA (Triton): one read of the weight, one write of the codes.

Same grid as ``weightsync/quant/int4.py``, op for op: fp32 group statistics, the scale rounded
to the storage dtype (round-to-nearest-even conversion) before codes are computed, codes from a
correctly rounded division (``div_rn``; Triton's plain ``/`` is approximate and would flip
codes) and ``rint`` (half to even). Each program owns BLOCK_R rows of one group, so the
reduction is a register-level row max and the nibble pairs are packed before the store.

Shape legend: R rows (all leading dims flattened), I in features, K group size, G = I / K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _quant_pack_kernel(
    w_ptr,
    packed_ptr,
    scale_ptr,
    zp_ptr,
    bad_ptr,
    n_rows,
    n_in,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    STORE_DTYPE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    gid = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = gid * K + tl.arange(0, K)
    mask = (rows < n_rows)[:, None]
    x_RK = tl.load(w_ptr + rows[:, None] * n_in + cols[None, :], mask=mask, other=0.0)
    x_RK = x_RK.to(tl.float32)
    # x - x is 0 for every finite x and NaN for NaN/Inf: one flag per program, no extra pass.
    nonfinite = tl.max(((x_RK - x_RK) != 0.0).to(tl.int32))
    tl.atomic_max(bad_ptr, nonfinite)
    if SYMMETRIC:
        s_R = tl.math.div_rn(tl.max(tl.abs(x_RK), axis=1), 7.0)
        qmin, qmax, off = -7.0, 7.0, 8.0
    else:
        lo_R = tl.minimum(tl.min(x_RK, axis=1), 0.0)
        hi_R = tl.maximum(tl.max(x_RK, axis=1), 0.0)
        s_R = tl.math.div_rn(hi_R - lo_R, 15.0)
        qmin, qmax, off = 0.0, 15.0, 0.0
    s_R = tl.maximum(s_R, 1e-5).to(STORE_DTYPE)
    tl.store(scale_ptr + rows * (n_in // K) + gid, s_R, mask=rows < n_rows)
    s_R = s_R.to(tl.float32)
    q_RK = libdevice.rint(tl.math.div_rn(x_RK, s_R[:, None]))
    if not SYMMETRIC:
        zp_R = libdevice.rint(tl.math.div_rn(-lo_R, s_R))
        zp_R = tl.minimum(tl.maximum(zp_R, 0.0), 15.0)
        tl.store(zp_ptr + rows * (n_in // K) + gid, zp_R.to(tl.uint8), mask=rows < n_rows)
        q_RK = q_RK + zp_R[:, None]
    q_RK = (tl.minimum(tl.maximum(q_RK, qmin), qmax) + off).to(tl.uint8)
    lo_RH, hi_RH = tl.split(tl.reshape(q_RK, (BLOCK_R, K // 2, 2)))
    byte_RH = lo_RH | (hi_RH << 4)
    half = gid * (K // 2) + tl.arange(0, K // 2)
    tl.store(packed_ptr + rows[:, None] * (n_in // 2) + half[None, :], byte_RH, mask=mask)


def supports(w: torch.Tensor, k: int) -> bool:
    """CUDA, a float dtype, and a power-of-two group of 8..1024 (one program's row block)."""
    return w.is_cuda and w.dtype in _TL_DTYPES and k >= 8 and (k & (k - 1)) == 0 and k <= 1024


def pack_rows(w_RI: torch.Tensor, k: int, symmetric: bool):
    """(packed bytes uint8 [R, I/2], scale [R, G] in w's dtype, zp uint8 [R, G] | None, bad)."""
    w_RI = w_RI.contiguous()
    rows, in_dim = w_RI.shape
    g = in_dim // k
    packed = torch.empty(rows, in_dim // 2, dtype=torch.uint8, device=w_RI.device)
    scale = torch.empty(rows, g, dtype=w_RI.dtype, device=w_RI.device)
    zp = None if symmetric else torch.empty(rows, g, dtype=torch.uint8, device=w_RI.device)
    block_r = max(1, min(64, 4096 // k))
    bad = torch.zeros(1, dtype=torch.int32, device=w_RI.device)
    grid = (triton.cdiv(rows, block_r), g)
    zp_arg = zp if zp is not None else packed  # unused when symmetric
    _quant_pack_kernel[grid](
        w_RI,
        packed,
        scale,
        zp_arg,
        bad,
        rows,
        in_dim,
        K=k,
        BLOCK_R=block_r,
        SYMMETRIC=symmetric,
        STORE_DTYPE=_TL_DTYPES[w_RI.dtype],
    )
    return packed, scale, zp, bool(bad.item())
