"""Probe digests: what ``verify`` compares between the trainer's tensors and an engine's kernels.

An engine does not compute with the bytes it received: it computes with whatever its
post-processing made of them (repacked for oneDNN, prepacked MoE experts, int4 repacked for the
WNA16 kernel, an LM head that aliases the embedding). So verify reads the weights back *through
the engine's kernels*: a linear layer fed one-hot rows e_j returns column j of the weight it
multiplies with, exactly (one product by 1.0, the rest by 0.0: no rounding), whatever layout it
keeps. A handful of columns, chosen afresh per update from a seed, are read back from every
weight and digested; the trainer digests the same columns of what it sent.

Legend: ``w_OI`` a weight [out, in]; ``cols_C`` the probed input columns.
"""

from __future__ import annotations

import torch

from weightsync.tensors import sha256

PROBE_COLUMNS = 8
"""Columns read back per weight: each is a full output row's worth of the kernel's weight."""

INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def probe_columns(seed: int, in_features: int) -> torch.Tensor:
    """The input columns probed in a weight with ``in_features`` inputs under ``seed``."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + in_features) % (1 << 62))
    k = min(PROBE_COLUMNS, in_features)
    return torch.randperm(in_features, generator=g)[:k].sort().values


def probe_view(t: torch.Tensor, seed: int) -> torch.Tensor:
    """The part of ``t`` that is digested: probed columns of a matrix, all of a vector."""
    if t.dim() < 2:
        return t
    return t[..., probe_columns(seed, t.shape[-1])]


def digest(t: torch.Tensor) -> str:
    """dtype, shape and the sha256 of the bytes: equal only for the same values stored alike."""
    return f"{t.dtype}{tuple(t.shape)}:{sha256(t)}"


def probe_digest(t: torch.Tensor, seed: int) -> str:
    return digest(probe_view(t, seed))


def logical_name(name: str) -> str | None:
    """The weight a checkpoint tensor belongs to: ``X.weight_packed`` -> ``X.weight``; the
    other int4 parts (scale, shape, zero point) have no weight of their own (None)."""
    base, _, leaf = name.rpartition(".")
    if leaf == "weight_packed":
        return f"{base}.weight"
    return None if leaf in INT4_PARTS else name


def int4_columns(
    parts: dict[str, torch.Tensor], cols_C: torch.Tensor, group_size: int, symmetric: bool
) -> torch.Tensor:
    """Dequantized columns ``cols_C`` of a pack-quantized weight, op for op as
    compressed-tensors dequantizes (``(q - zp).to(dtype) * scale``), without unpacking the rest."""
    packed_OP, scale_OG = parts["weight_packed"], parts["weight_scale"]
    in_features = int(parts["weight_shape"][-1])
    k = in_features if group_size in (-1, None) else group_size
    words, shifts = cols_C // 8, (cols_C % 8) * 4
    codes_OC = (packed_OP[..., words] >> shifts) & 0xF
    if symmetric:
        offset_OC = torch.full_like(codes_OC, 8)
    else:
        zp_QG = parts["weight_zero_point"]  # packed along the output dim
        out = codes_OC.shape[-2]
        rows = torch.arange(out)
        zp_OG = (zp_QG[..., rows // 8, :] >> ((rows % 8) * 4).unsqueeze(-1)) & 0xF
        offset_OC = zp_OG[..., cols_C // k]
    q_OC = codes_OC.to(torch.int16) - offset_OC.to(torch.int16)
    return q_OC.to(scale_OG.dtype) * scale_OG[..., cols_C // k]


def checkpoint_digests(
    named: dict[str, torch.Tensor], seed: int, group_size: int = 128, symmetric: bool = True
) -> dict[str, str]:
    """The probe digests an engine holding exactly the checkpoint tensors ``named`` reads
    back, by weight name: int4 weights dequantized from their parts (``group_size`` and
    ``symmetric`` as packed), every other tensor as it is."""
    out = {}
    for name, t in named.items():
        logical = logical_name(name)
        if logical is None or logical == name:
            if logical is not None:
                out[name] = probe_digest(t, seed)
            continue
        base = name.rpartition(".")[0]
        parts = {p: named[f"{base}.{p}"] for p in INT4_PARTS if f"{base}.{p}" in named}
        out[logical] = int4_probe_digest(parts, seed, group_size, symmetric)
    return out


def int4_probe_digest(
    parts: dict[str, torch.Tensor], seed: int, group_size: int, symmetric: bool
) -> str:
    """The probe digest of a pack-quantized weight (its parts by leaf name): the probed
    columns dequantized from the packed bytes."""
    cols = probe_columns(seed, int(parts["weight_shape"][-1]))
    return digest(int4_columns(parts, cols, group_size, symmetric))
